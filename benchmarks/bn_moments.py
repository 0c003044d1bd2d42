"""Per-channel moments of a BN layer's input (sum x, sum x^2): multiply-then-sum against a squared
L2 norm (what `diode.synthesis.bn_stats` uses), forward only, at activation shapes of the bundled
teacher at batch 16 and 128 px; and for a channels_last activation, summed over the teacher's 58
BN inputs at batch 16: the sums over its [B, C, H W] view (strided), reduced over the rows of its
[B H W, C] view, and as matrix-vector products of those rows with a vector of ones (what
`bn_stats._moments` uses since session 8); and the layer's per-channel affine map on a
channels_last input through eval-mode batch_norm against a broadcast addcmul (`bn_stats._affine`
uses the latter there since session 8). Prints JSON (milliseconds, median of 5 rounds).

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
    rows_out = []
    for shape in ((16, 16, 64, 64), (16, 32, 64, 64), (16, 64, 32, 32), (16, 128, 16, 16)):
        flat = torch.randn(shape).flatten(2)
        mul_sum = _ms(lambda: (flat.sum(2).sum(0), torch.mul(flat, flat).sum(2).sum(0)))
        norm = _ms(lambda: (flat.sum(2).sum(0), torch.linalg.vector_norm(flat, 2, dim=2).square_().sum(0)))
        rows_out.append({"shape": list(shape), "mul_sum_ms": mul_sum, "l2_norm_ms": norm, "ratio": round(norm / mul_sum, 3)})
    # The bundled teacher's BN inputs at batch 16, 128 px: shape -> how many layers.
    layers = {(16, 24, 16, 16): 9, (16, 48, 8, 8): 9, (16, 48, 16, 16): 8, (16, 96, 8, 8): 8, (16, 128, 4, 4): 7,
              (16, 24, 32, 32): 6, (16, 64, 4, 4): 5, (16, 12, 32, 32): 4, (16, 16, 64, 64): 1, (16, 96, 4, 4): 1}
    totals = dict.fromkeys(("strided_view_ms", "rows_reduce_ms", "rows_matvec_ms", "affine_batch_norm_ms",
                            "affine_addcmul_ms"), 0.0)
    for shape, count in layers.items():
        c = shape[1]
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        flat = x.reshape(shape[0], c, -1)  # a view with the pixels strided by C
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        ones = torch.ones(rows.shape[0])
        scale, shift = torch.rand(c) + 0.5, torch.randn(c)
        zeros, unit = torch.zeros(c), torch.ones(c)
        variants = {
            "strided_view_ms": lambda: (flat.sum((0, 2)), torch.linalg.vector_norm(flat, 2, 2).square_().sum(0)),
            "rows_reduce_ms": lambda: (rows.sum(0), torch.linalg.vector_norm(rows, 2, 0).square_()),
            "rows_matvec_ms": lambda: (torch.mv(rows.t(), ones), torch.mv(rows.square().t(), ones)),
            "affine_batch_norm_ms": lambda: torch.batch_norm(x, scale, shift, zeros, unit, False, 0.0, 1e-30, False),
            "affine_addcmul_ms": lambda: torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)),
        }
        for key, fn in variants.items():
            totals[key] += count * _ms(fn)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows_out,
                      "channels_last_teacher_layers": {k: round(v, 3) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
