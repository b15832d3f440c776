"""The CUDA extension for tests: one build in a test-specific cache, shared by tests/build (the build system)
and tests/test_<op>_cuda.py (each op's CUDA tests), and the `gpu` marker for tests that need a device.

The build goes to ``$PEFTKERN_TEST_CACHE_DIR`` or ``~/.cache/peftkern-test``, reused across runs (a user's
own cache is never touched). Tests that need it skip only when nvcc is absent or torch is a CPU-only build:
compiling needs no GPU, so the Meta kernels and the argument checks of the C++ ops run on any machine with nvcc.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from peftkern import _ext

CUDA = torch.cuda.is_available()
TEST_CACHE = Path(os.environ.get("PEFTKERN_TEST_CACHE_DIR", Path.home() / ".cache" / "peftkern-test"))
_needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def gpu(test):
    """A GPU-only test: marked `gpu` (conftest deselects it on a machine without CUDA) and skipped there
    when selected anyway (`-m gpu`)."""
    return pytest.mark.gpu(_needs_cuda(test))


def build_and_load() -> Iterator[tuple[Path, float]]:
    """Body of a module-scoped `built` fixture: build (or reuse) the extension in the test cache and load it;
    yields (the .so's path, seconds the build call took). The cache variables are restored afterwards."""
    if _ext.nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA extension cannot be built here")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build")
    saved = {k: os.environ.get(k) for k in ("PEFTKERN_CACHE_DIR", "PEFTKERN_NO_BUILD")}
    os.environ["PEFTKERN_CACHE_DIR"] = str(TEST_CACHE)
    os.environ.pop("PEFTKERN_NO_BUILD", None)
    try:
        t0 = time.perf_counter()
        so = _ext.build()
        seconds = time.perf_counter() - t0
        _ext.load(build_if_missing=False)
        yield so, seconds
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def subprocess_env() -> dict[str, str]:
    """Environment for a child Python that loads the test build (`_ext.load(build_if_missing=False)`)."""
    env = dict(os.environ, PEFTKERN_CACHE_DIR=str(TEST_CACHE))
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env
