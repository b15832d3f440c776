"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter."""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before any @triton.jit runs its decorator (peftkern.triton imports lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must prove which kernel ran: a backend that cannot take a call raises instead of falling back.
os.environ.setdefault("PEFTKERN_STRICT", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
