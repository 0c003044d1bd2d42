"""Shared test settings.

Tests use one intra-op thread: the models are tiny, and several PyTorch processes each spinning
two OpenMP threads on a two-core machine slow each other down by orders of magnitude.
"""

import os
import traceback
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import diode  # noqa: E402

torch.set_num_threads(1)

# Where diode's own code and the tests live (not a folder's name: a clone called "diode" holds
# its virtual environment, third-party packages included).
_OURS = (str(Path(diode.__file__).resolve().parent) + os.sep, str(Path(__file__).resolve().parent) + os.sep)


class BlockingCopies(TorchFunctionMode):
    """Records `Tensor.to` / `Tensor.cuda` calls made by diode's code (or a test) that name a
    device without `non_blocking=True`: on a GPU each such host-to-device copy makes the host
    wait until the device is idle. On the CPU the copies are no-ops, but the calls are the same,
    so the tests see them there. Calls from third-party code (torchvision's or ultralytics' own
    losses) are theirs, not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            names_device = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
            blocking = not (kwargs.get("non_blocking") or any(a is True for a in args[1:]))
            if names_device and blocking:
                torch_dir = os.sep + "torch" + os.sep
                caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if torch_dir not in f.filename),
                              None)
                if caller is not None and str(Path(caller.filename).resolve()).startswith(_OURS):
                    # not third-party code (torchvision's or ultralytics' own losses)
                    self.calls.append(f"{func.__name__} at {'/'.join(Path(caller.filename).parts[-2:])}:{caller.lineno}")
        return func(*args, **kwargs)


@pytest.fixture
def blocking_copies():
    """The `BlockingCopies` probe class, checked to catch a blocking copy."""
    with BlockingCopies() as probe:
        torch.zeros(1).to("cpu")
        torch.zeros(1).to("cpu", non_blocking=True)
        torch.zeros(1).to(torch.float64)
    assert len(probe.calls) == 1, probe.calls
    return BlockingCopies
