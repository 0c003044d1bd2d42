"""In-process A/B of the synthesis loop: this tree's BN statistics, augmentation and priors against
another checkout's (`--old`, its `src/diode/synthesis` folder), on one teacher in one process,
interleaved in rounds with the teacher's bare forward + backward, so the machine's drift and the
bare pass's mode (results/perf.md, session 8) hit all three alike. Prints JSON (milliseconds per
iteration, medians over rounds).

    git worktree add /tmp/old <commit>
    OMP_NUM_THREADS=2 python benchmarks/loop_ab.py --old /tmp/old/src/diode/synthesis
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from _timing import bare_pass_seconds, one_stage_config

import diode.synthesis.synthesizer as synthesizer_module
from diode.allocator import keep_freed_memory
from diode.detectors.checkpoint import load_detector
from diode.synthesis.bn_stats import select_bn_layers
from diode.synthesis.synthesizer import Synthesizer, use_channels_last
from diode.synthesis.targets import sample_one_box

_SWAPPED = ("augment_synthesis", "tv_l1", "BNLoss")  # what the synthesizer module takes from the three


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the other checkout's src/diode/synthesis folder")
    parser.add_argument("--teacher", default="shapes-teacher")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()
    device = torch.device("cpu")
    old_bn = _load("old_bn_stats", args.old / "bn_stats.py")
    old_augment = _load("old_augment", args.old / "augment.py")
    old_priors = _load("old_priors", args.old / "priors.py")
    teacher = load_detector(args.teacher, device=device)[0]
    if use_channels_last(device):
        teacher = teacher.to(memory_format=torch.channels_last)
    cfg = one_stage_config(args.recipe, args.iterations, args.batch_size)
    new, old = Synthesizer(teacher, cfg), Synthesizer(teacher, cfg)
    old.recorder = old_bn.BNStatsRecorder(select_bn_layers(teacher.bn_layers(), cfg.bn.layers))
    gen = torch.Generator().manual_seed(0)
    size = teacher.image_size
    targets = sample_one_box(args.batch_size, size, teacher.num_classes, gen)
    images = torch.rand(args.batch_size, 3, *size)
    current = tuple(getattr(synthesizer_module, name) for name in _SWAPPED)
    previous = (old_augment.augment_synthesis, old_priors.tv_l1, old_priors.BNLoss)

    def loop(synth: Synthesizer, parts: tuple) -> float:
        for name, part in zip(_SWAPPED, parts):
            setattr(synthesizer_module, name, part)
        try:
            t0 = time.perf_counter()
            synth.synthesize(targets, size, gen, init=images)
            return (time.perf_counter() - t0) / args.iterations
        finally:
            for name, part in zip(_SWAPPED, current):
                setattr(synthesizer_module, name, part)

    variants = {"bare": lambda: bare_pass_seconds(teacher, images, targets, args.iterations), "old": lambda: loop(old, previous), "new": lambda: loop(new, current)}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    print(json.dumps({"ms": ms, "ratio_old": round(ms["old"] / ms["bare"], 4),
                      "ratio_new": round(ms["new"] / ms["bare"], 4),
                      "new_minus_old_ms": round(ms["new"] - ms["old"], 2), "batch_size": args.batch_size,
                      "recipe": args.recipe, "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
