"""Test setup: on a machine without CUDA the Triton kernels run under the interpreter."""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must be set before any @triton.jit runs its decorator (peftkern.triton imports lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must prove which kernel ran: a backend that cannot take a call raises instead of falling back.
os.environ.setdefault("PEFTKERN_STRICT", "1")
# A fresh compile cache per run: torch's AOTAutograd cache keys a graph on the forward ops but not on a
# custom op's registered backward, so a graph cached before an op's backward changed would replay it.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftkern-inductor-")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_empty():
    """torch.empty returns NaN-filled memory: an element a kernel forgets to write fails the test."""
    import torch.utils.deterministic as det

    old = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    det.fill_uninitialized_memory = old[1]


def pytest_collection_modifyitems(config, items):
    """Without a CUDA device, tests marked `gpu` are deselected rather than skipped, so the summary's skips
    are the real ones. An explicit `-m` decides for itself (`-m gpu` selects them; they then skip), and so
    does the Triton-interpreter rehearsal of tests/gpu (PEFTKERN_REHEARSE=1, benchmarks/gpu_check.sh)."""
    if ON_GPU or config.getoption("markexpr") or os.environ.get("PEFTKERN_REHEARSE") == "1":
        return
    gpu_only = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_only:
        config.hook.pytest_deselected(items=gpu_only)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
