"""Distillation throughput: images/s of a KD epoch against plain supervised training of the same student.

Both run through the real trainer (`train_detector`: augmentation, AdamW, EMA, checkpoint writes)
on the same in-memory images, interleaved in rounds so machine noise hits both alike; the KD run
adds the teacher's forward (no autograd) on exactly the augmented batch. Prints JSON with
`ratio` = KD seconds per image / supervised seconds per image (target <= 1.5).

    python benchmarks/distill_throughput.py --teacher shapes-teacher --student yolo-lite-s-p2 --method soft
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diode.allocator import keep_freed_memory
from diode.config import TrainConfig
from diode.detectors.checkpoint import load_detector
from diode.detectors.registry import build_detector
from diode.distill.losses import DistillConfig, DistillObjective, resolve_methods
from diode.training.trainer import train_detector
from diode.types import empty_target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="shapes-teacher")
    parser.add_argument("--student", default="yolo-lite-s-p2")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--images", type=int, default=256, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does (diode.allocator)
    device = torch.device(args.device)
    teacher = load_detector(args.teacher, device=device)[0]
    size = tuple(teacher.image_size)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand((args.images, 3, *size), generator=gen) * 255).to(torch.uint8)
    # Supervised labels: the teacher's own detections (any boxes would do; these look realistic).
    with torch.no_grad():
        labels = []
        for chunk in images.split(64):
            labels += [{k: v.cpu() for k, v in p.items() if k != "scores"}
                       for p in teacher.predict(chunk.to(device).float() / 255, score_thresh=0.3)]
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, seed=0)
    empty_val = torch.empty((0, 3, *size), dtype=torch.uint8)

    def student():
        torch.manual_seed(0)
        return build_detector(args.student, class_names=teacher.class_names, image_size=size).to(device)

    methods = resolve_methods(args.method, teacher, student(), size)
    objective = DistillObjective(teacher, DistillConfig(methods=methods))

    def timed(kd: bool) -> float:
        model = student()
        with tempfile.TemporaryDirectory() as tmp:
            _sync(device)
            t0 = time.perf_counter()
            if kd:
                train_detector(model, images, [empty_target()] * len(images), empty_val, [], cfg, Path(tmp),
                               progress=False, objective=objective)
            else:
                train_detector(model, images, labels, empty_val, [], cfg, Path(tmp), progress=False)
            _sync(device)
            return time.perf_counter() - t0

    timed(False), timed(True)  # warm-up
    sup, kd = [], []
    for _ in range(args.rounds):
        sup.append(timed(False))
        kd.append(timed(True))
    s, k = statistics.median(sup), statistics.median(kd)
    n = (args.images // args.batch_size) * args.batch_size
    print(json.dumps({
        "ratio": round(k / s, 4),
        "kd_images_per_s": round(n / k, 1), "supervised_images_per_s": round(n / s, 1),
        "teacher": args.teacher, "student": args.student, "methods": methods, "batch_size": args.batch_size,
        "image_size": list(size), "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
