"""Shared test settings.

Tests use one intra-op thread: the models are tiny, and several PyTorch processes each spinning
two OpenMP threads on a two-core machine slow each other down by orders of magnitude.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
