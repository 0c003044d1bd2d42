"""Per-channel moments of a BN layer's input (sum x, sum x^2): multiply-then-sum against a squared
L2 norm (what `diode.synthesis.bn_stats` uses for NCHW), forward only, at activation shapes of the
bundled teacher at batch 16 and 128 px; and for a channels_last activation, summed over the
teacher's 58 BN inputs at `--batch-size` (16): the sums over its [B, C, H W] view (strided),
reduced over the rows of its [B H W, C] view, as matrix-vector products of those rows with a
vector of ones (session 8), PyTorch's batch-statistics kernel (`batch_norm_update_stats`, mean and
variance) on those rows, and the same kernel on the wide view of `bn_stats._moments` (rows of
128+ columns, since session 9); and the layer's per-channel affine map on a channels_last input
through eval-mode batch_norm against a broadcast addcmul (`bn_stats._affine` uses the latter there
since session 8). Each variant repeats on the same tensor (warm caches; in the synthesis loop each
layer's input comes from memory, `--cold` evicts the caches before each call). Prints JSON
(milliseconds, median of 5 rounds).

    OMP_NUM_THREADS=2 python benchmarks/bn_moments.py [--batch-size 32] [--cold]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diode.synthesis.bn_stats import _groups, _moments

_EVICT = torch.empty(64 * 2**20 // 4)  # 64 MiB: more than this machine's caches


def _ms(fn, n: int = 50, cold: bool = False) -> float:
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        total = 0.0
        for _ in range(n):
            if cold:
                _EVICT.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        rounds.append(total / n * 1e3)
    return round(statistics.median(rounds), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="of the teacher-layer totals")
    parser.add_argument("--cold", action="store_true", help="evict the caches before each timed call")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_out = []
    for shape in ((16, 16, 64, 64), (16, 32, 64, 64), (16, 64, 32, 32), (16, 128, 16, 16)):
        flat = torch.randn(shape).flatten(2)
        mul_sum = _ms(lambda: (flat.sum(2).sum(0), torch.mul(flat, flat).sum(2).sum(0)))
        norm = _ms(lambda: (flat.sum(2).sum(0), torch.linalg.vector_norm(flat, 2, dim=2).square_().sum(0)))
        rows_out.append({"shape": list(shape), "mul_sum_ms": mul_sum, "l2_norm_ms": norm, "ratio": round(norm / mul_sum, 3)})
    # The bundled teacher's BN inputs at batch 16, 128 px: shape -> how many layers.
    b = args.batch_size
    layers = {(b, 24, 16, 16): 9, (b, 48, 8, 8): 9, (b, 48, 16, 16): 8, (b, 96, 8, 8): 8, (b, 128, 4, 4): 7,
              (b, 24, 32, 32): 6, (b, 64, 4, 4): 5, (b, 12, 32, 32): 4, (b, 16, 64, 64): 1, (b, 96, 4, 4): 1}
    totals = dict.fromkeys(("strided_view_ms", "rows_reduce_ms", "rows_matvec_ms", "rows_batch_stats_ms",
                            "wide_batch_stats_ms", "affine_batch_norm_ms", "affine_addcmul_ms"), 0.0)
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
            "rows_batch_stats_ms": lambda: torch.batch_norm_update_stats(x, None, None, 0.0),
            "wide_batch_stats_ms": lambda: _moments(x, _groups(x)),
            "affine_batch_norm_ms": lambda: torch.batch_norm(x, scale, shift, zeros, unit, False, 0.0, 1e-30, False),
            "affine_addcmul_ms": lambda: torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)),
        }
        for key, fn in variants.items():
            totals[key] += count * _ms(fn, cold=args.cold)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": b,
                      "cold": args.cold, "rows": rows_out,
                      "channels_last_teacher_layers": {k: round(v, 3) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
