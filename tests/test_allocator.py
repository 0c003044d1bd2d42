"""glibc malloc tuning (diode.allocator): freed activation-size blocks are reused, not faulted back in."""

import os
import subprocess
import sys

import pytest

from diode.allocator import keep_freed_memory

_PROBE = r"""
import resource, sys
import torch
from diode.allocator import keep_freed_memory
tuned = keep_freed_memory()
def cycle():  # the shape of a loop's allocations: glibc returns the freed top of its heap
    big = torch.empty(30 << 20, dtype=torch.uint8)
    big.fill_(1)  # touch every page
    del big  # a mapped block freed: glibc raises its thresholds to its size
    parts = [torch.empty(12 << 20, dtype=torch.uint8).fill_(1) for _ in range(6)]  # from the heap
    del parts  # 72 MiB free at the top of the heap: beyond the (raised) trim threshold
for _ in range(10):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _probe(env_value: str | None) -> tuple[bool, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DIODE_MALLOC_TUNING", None)
    if env_value is not None:
        env["DIODE_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", float(faults)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="malloc tuning is for Linux with glibc")


@glibc
def test_tuned_process_reuses_freed_blocks():
    tuned, faults = _probe(None)
    assert tuned
    # 102 MiB (26k pages) allocated and freed per cycle. Untuned, glibc may hand the top of its
    # heap back and fault it in again every cycle (15k faults per cycle in some runs here, 0 in
    # others: it depends on where small Python objects landed); tuned, the process keeps it.
    assert faults < 100, faults


@glibc
def test_environment_switch_turns_it_off():
    tuned, _ = _probe("0")
    assert not tuned


def test_idempotent_in_process():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
