"""The teacher's bare forward + backward (loss on one-box targets, gradient to the images) alone in
a fresh process: what `synthesis_overhead.py` divides by, without the synthesis loop in the same
process. Run it several times to see the spread from one process to the next. Prints JSON;
`--profile` adds the operations that take the most time in one more round (torch.profiler, self
time per pass), which shows where the spread lives.

    OMP_NUM_THREADS=2 python benchmarks/teacher_pass.py --channels-last --profile
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _timing import bare_pass_seconds

from diode.allocator import keep_freed_memory
from diode.detectors.checkpoint import load_detector
from diode.synthesis.targets import sample_one_box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="shapes-teacher")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=10, help="passes per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true", help="teacher in channels_last (images NCHW)")
    parser.add_argument("--profile", action="store_true", help="also report the top operations' self time per pass")
    args = parser.parse_args()
    keep_freed_memory()
    teacher = load_detector(args.teacher, device=torch.device("cpu"))[0]
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    targets = sample_one_box(args.batch_size, teacher.image_size, teacher.num_classes, gen)
    images = torch.rand(args.batch_size, 3, *teacher.image_size, generator=gen)

    def passes() -> float:
        return bare_pass_seconds(teacher, images, targets, args.iterations)

    passes()  # warm-up
    times = [passes() for _ in range(args.rounds)]
    top_ops = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            passes()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        top_ops = {e.key: round(e.self_cpu_time_total / args.iterations / 1e3, 2) for e in ops}
    print(json.dumps({"bare_forward_backward_s": round(statistics.median(times), 5),
                      "rounds_s": [round(t, 5) for t in times], "batch_size": args.batch_size,
                      "channels_last": args.channels_last, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "top_ops_ms": top_ops}))


if __name__ == "__main__":
    main()
