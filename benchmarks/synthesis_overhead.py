"""Synthesis loop overhead: wall time per iteration / the teacher's bare forward + backward.

Both are measured in this process on the same batch, interleaved in rounds so machine noise hits
both alike; prints JSON (`ratio` = median synthesis iteration time / median bare time).

    python benchmarks/synthesis_overhead.py --teacher shapes-teacher --batch-size 32 --recipe fast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch
from _timing import bare_pass_seconds, one_stage_config

from diode.allocator import keep_freed_memory
from diode.detectors.checkpoint import load_detector
from diode.detectors.registry import build_detector
from diode.synthesis.synthesizer import Synthesizer, use_channels_last
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
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="teacher in channels_last, as `diode synthesize --channels-last` (default as there: on "
                             "for the CPU; the pixels stay NCHW; until session 7 this made the images channels_last "
                             "too, and the default was off)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the teacher's network for both the loop and the bare pass")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the loop with the augmentation, tv_l1 or the BN statistics replaced by "
                             "no-ops (key `ablation`: each part's share of a teacher pass)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc thresholds alone (the CLI raises them: diode.allocator)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    malloc_tuned = False if args.no_malloc_tuning else keep_freed_memory()
    device = torch.device(args.device)
    try:
        teacher = load_detector(args.teacher, device=device)[0]
    except Exception:  # noqa: BLE001 - allow a bare architecture name for GPU sizing runs
        teacher = build_detector(args.teacher, class_names=[f"c{i}" for i in range(80)],
                                 image_size=tuple(args.image_size or (320, 320))).to(device).eval()
    image_size = tuple(args.image_size or teacher.image_size)
    args.channels_last = use_channels_last(device, args.channels_last)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=memory_format)
    if args.compile:
        from diode.detectors.base import compile_network

        compile_network(teacher)
    cfg = one_stage_config(args.recipe, args.iterations, args.batch_size, args.precision)
    synth = Synthesizer(teacher, cfg)
    gen = torch.Generator().manual_seed(0)
    targets = sample_one_box(args.batch_size, image_size, teacher.num_classes, gen)
    images = torch.rand(args.batch_size, 3, *image_size, device=device)

    def bare() -> float:
        return bare_pass_seconds(teacher, images, targets, args.iterations, args.precision, lambda: _sync(device))

    def full() -> float:
        _sync(device)
        t0 = time.perf_counter()
        synth.synthesize(targets, image_size, gen, init=images)
        _sync(device)
        return (time.perf_counter() - t0) / args.iterations

    variants = {"bare": bare, "full": full}
    if args.ablate:
        variants.update(_ablations(synth, targets, image_size, gen, images, args.iterations, device))
    for fn in variants.values():  # warm-up (allocator, kernels)
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, int] = {k: 0 for k in variants}  # minor page faults (memory the kernel maps afresh)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name].append(fn())
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    b, f = statistics.median(times["bare"]), statistics.median(times["full"])
    ablation = {name[3:]: round((f - statistics.median(times[name])) / b, 4) for name in times
                if name.startswith("no-")} or None
    print(json.dumps({
        "ratio": round(f / b, 4),
        "bare_forward_backward_s": round(b, 5),
        "synthesis_iteration_s": round(f, 5),
        "image_iterations_per_s": round(args.batch_size / f, 2),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "batch_size": args.batch_size, "image_size": list(image_size), "recipe": args.recipe,
        "precision": args.precision, "device": str(device), "torch": torch.__version__,
        "channels_last": args.channels_last, "compile": args.compile, "threads": torch.get_num_threads(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "malloc_tuned": malloc_tuned,
        "page_faults_per_iteration": {k: round(faults[k] / (args.rounds * args.iterations), 1) for k in ("bare", "full")},
        "ablation": ablation,
    }))


def _ablations(synth: Synthesizer, targets, image_size, gen, images, iterations: int, device: torch.device) -> dict:
    """The same loop with one part replaced by a no-op; (full - variant) / bare is that part's cost."""
    import diode.synthesis.synthesizer as module

    def timed(patch):
        def run() -> float:
            restore = patch()
            try:
                _sync(device)
                t0 = time.perf_counter()
                synth.synthesize(targets, image_size, gen, init=images)
                _sync(device)
                return (time.perf_counter() - t0) / iterations
            finally:
                restore()
        return run

    def swap(name, value):
        def patch():
            old = getattr(module, name)
            setattr(module, name, value)
            return lambda: setattr(module, name, old)
        return patch

    def no_bn():  # statistics not recorded: the BN term is computed from the running values (no gradient)
        recorder = synth.recorder
        old_recording, old_recorded = recorder.recording, recorder.recorded_flat
        recorder.recording = contextlib.nullcontext
        recorder.recorded_flat = lambda: tuple(torch.cat(stats) for stats in zip(*recorder.running()))

        def restore() -> None:
            recorder.recording, recorder.recorded_flat = old_recording, old_recorded
        return restore

    return {"no-augmentation": timed(swap("augment_synthesis", lambda im, t, cfg, jitter, g: (im, t))),
            "no-tv_l1": timed(swap("tv_l1", lambda im: im.sum() * 0.0)),
            "no-bn_statistics": timed(no_bn)}


if __name__ == "__main__":
    main()
