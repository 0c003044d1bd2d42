"""Synthesis loop overhead: wall time per iteration / the teacher's bare forward + backward.

Both are measured in this process on the same batch, interleaved in rounds so machine noise hits
both alike; prints JSON (`ratio` = median synthesis iteration time / median bare time).

    python benchmarks/synthesis_overhead.py --teacher shapes-teacher --batch-size 32 --recipe fast
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diode.detectors.checkpoint import load_detector
from diode.detectors.registry import build_detector
from diode.synthesis.recipes import build_config, load_recipe
from diode.synthesis.synthesizer import Synthesizer
from diode.synthesis.targets import sample_one_box


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="shapes-teacher", help="checkpoint, bundled name, or an arch name (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2)
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="teacher and images in channels_last")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        teacher = load_detector(args.teacher, device=device)[0]
    except Exception:  # noqa: BLE001 - allow a bare architecture name for GPU sizing runs
        teacher = build_detector(args.teacher, class_names=[f"c{i}" for i in range(80)],
                                 image_size=tuple(args.image_size or (320, 320))).to(device).eval()
    image_size = tuple(args.image_size or teacher.image_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=memory_format)
    # One full-resolution stage with the recipe's losses and augmentation: the per-iteration work.
    raw = load_recipe(args.recipe)
    stage = dict(raw["stages"][-1], iterations=args.iterations, scale=1.0, pixel_scale=1.0)
    raw.update(stages=[stage], fp={"enabled": False}, tiling={"enabled": False})
    cfg = build_config(raw, batch_size=args.batch_size, precision=args.precision)
    synth = Synthesizer(teacher, cfg)
    gen = torch.Generator().manual_seed(0)
    targets = sample_one_box(args.batch_size, image_size, teacher.num_classes, gen)
    images = torch.rand(args.batch_size, 3, *image_size, device=device).contiguous(memory_format=memory_format)

    def bare() -> float:
        x = images.clone().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
            with autocast, teacher.loss_mode():
                loss = teacher.weighted_loss(teacher.loss(x, targets))
            loss.backward()
            x.grad = None
        _sync(device)
        return (time.perf_counter() - t0) / args.iterations

    def full() -> float:
        _sync(device)
        t0 = time.perf_counter()
        synth.synthesize(targets, image_size, gen, init=images)
        _sync(device)
        return (time.perf_counter() - t0) / args.iterations

    bare(), full()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bare_times, full_times = [], []
    for _ in range(args.rounds):
        bare_times.append(bare())
        full_times.append(full())
    b, f = statistics.median(bare_times), statistics.median(full_times)
    print(json.dumps({
        "ratio": round(f / b, 4),
        "bare_forward_backward_s": round(b, 5),
        "synthesis_iteration_s": round(f, 5),
        "image_iterations_per_s": round(args.batch_size / f, 2),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "batch_size": args.batch_size, "image_size": list(image_size), "recipe": args.recipe,
        "precision": args.precision, "device": str(device), "torch": torch.__version__,
        "channels_last": args.channels_last, "threads": torch.get_num_threads(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
