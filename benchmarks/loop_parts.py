"""Pieces of the synthesis loop timed alone (CPU): `tv_l1` (its gradient written out) against
autograd through the same slicing and abs, forward + backward after evicting the caches (as in
the loop), and the per-iteration cost of entering and leaving the teacher's `loss_mode()` and
the BN recorder's `recording()`. Prints JSON (milliseconds, medians).

    OMP_NUM_THREADS=2 python benchmarks/loop_parts.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from diode.allocator import keep_freed_memory
from diode.detectors.checkpoint import load_detector
from diode.synthesis import priors
from diode.synthesis.bn_stats import BNStatsRecorder


def _median_ms(fn, repeats: int = 15, before=None) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def _tv_l1_autograd(x: torch.Tensor) -> torch.Tensor:
    """The same value through autograd: slices, abs, mean."""
    return sum(d.abs().mean() for d in priors._neighbour_differences(x))


def main() -> None:
    keep_freed_memory()
    torch.manual_seed(0)
    evict = torch.rand(16 * 2**20)  # 64 MiB, twice the last-level cache: touched before each timing
    rows = []
    for shape in ((16, 3, 128, 128), (32, 3, 128, 128), (16, 3, 320, 320)):
        x = torch.rand(shape, requires_grad=True)
        timed = {}
        for name, fn in (("tv_l1", priors.tv_l1), ("autograd", _tv_l1_autograd)):
            def run(fn=fn) -> None:
                fn(x).backward()
                x.grad = None
            timed[name] = _median_ms(run, before=lambda: evict.mul_(1.0))
        rows.append({"shape": list(shape), "tv_l1_ms": timed["tv_l1"], "autograd_ms": timed["autograd"],
                     "ratio": round(timed["tv_l1"] / timed["autograd"], 3)})

    teacher = load_detector("shapes-teacher", device=torch.device("cpu"))[0].eval().requires_grad_(False)
    # as the synthesizer builds it: conv-BN pairs fold, so entering also installs their forwards
    recorder = BNStatsRecorder(teacher.bn_layers(), root=teacher, blocks=teacher.sequential_blocks())

    def loss_mode() -> None:
        with teacher.loss_mode():
            pass

    def recording() -> None:
        with recorder.recording():
            pass

    print(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "tv_l1": rows,
        "loss_mode_ms": _median_ms(loss_mode, repeats=200),
        "recording_ms": _median_ms(recording, repeats=200),
        "modules": sum(1 for _ in teacher.modules()), "bn_layers": len(recorder.modules),
    }))


if __name__ == "__main__":
    main()
