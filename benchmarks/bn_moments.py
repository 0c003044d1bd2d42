"""Per-channel moments of a BN layer's input (sum x, sum x^2): multiply-then-sum against a squared
L2 norm (what `diode.synthesis.bn_stats` uses), forward only, at activation shapes of the bundled
teacher at batch 16 and 128 px. Prints JSON (milliseconds, median of 5 rounds).

    OMP_NUM_THREADS=2 python benchmarks/bn_moments.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch


def _ms(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e3)
    return round(statistics.median(rounds), 4)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for shape in ((16, 16, 64, 64), (16, 32, 64, 64), (16, 64, 32, 32), (16, 128, 16, 16)):
        flat = torch.randn(shape).flatten(2)
        mul_sum = _ms(lambda: (flat.sum(2).sum(0), torch.mul(flat, flat).sum(2).sum(0)))
        norm = _ms(lambda: (flat.sum(2).sum(0), torch.linalg.vector_norm(flat, 2, dim=2).square_().sum(0)))
        rows.append({"shape": list(shape), "mul_sum_ms": mul_sum, "l2_norm_ms": norm, "ratio": round(norm / mul_sum, 3)})
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
