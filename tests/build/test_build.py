"""The CUDA extension builds, caches, loads and reports mismatches (the build system only: each op's
tests of its C++ ops, Meta kernels and numerics are in tests/test_<op>_cuda.py).

The build goes to a test-specific cache (``$PEFTKERN_TEST_CACHE_DIR`` or
``~/.cache/peftkern-test``, see tests/_cuda_ext.py), reused across runs. Skipped only when nvcc is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from _cuda_ext import build_and_load

from peftkern import _ext

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def built():
    """Build (or reuse) the extension in the test cache; yields (so path, seconds the call took)."""
    yield from build_and_load()


@pytest.fixture
def fresh_state(monkeypatch):
    """Make _ext forget that it loaded the library (the library itself stays loaded)."""
    monkeypatch.setattr(_ext, "_loaded_path", None)
    monkeypatch.setattr(_ext, "_avail_cache", {})


def test_so_exists_and_loads(built):
    so, _ = built
    assert so.is_file() and so.stat().st_size > 0
    assert so.parent == _ext.build_dir()
    torch.ops.load_library(str(so))  # idempotent
    assert _ext.is_loaded()
    assert hasattr(torch.ops.peftkern_cuda, "lora_decode")
    st = _ext.status()
    assert st["loaded"] and st["built"] and st["up_to_date"] and st["so_path"] == str(so)
    assert st["nvcc_version"] == _ext.nvcc_version()
    if not CUDA:
        assert "no CUDA device" in st["why_not"]


def test_build_meta(built):
    so, _ = built
    meta = json.loads((so.parent / _ext.META_NAME).read_text())
    assert meta["torch"] == torch.__version__
    assert meta["torch_cuda"] == torch.version.cuda
    assert meta["archs"] == _ext.arch_list()
    assert meta["nvcc"] == _ext.nvcc_version() and meta["nvcc"]
    assert meta["sources_sha256"] == _ext.sources_sha256()
    assert meta["so"] == so.name
    assert {"lora/lora.cpp", "lora/lora_decode.cu", "ia3/ia3.cu", "adapter/adapter.cu",
            "prefix/prefix.cu"} <= set(meta["sources"])
    assert all(s.count("/") == 1 for s in meta["sources"]), "each op's sources (and registration) in csrc/<op>/"
    assert meta["built_at"]


def test_second_build_is_a_noop(built):
    so, _ = built
    before = so.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert _ext.build() == so
    assert time.perf_counter() - t0 < 5.0
    assert so.stat().st_mtime_ns == before


def test_mismatch_message_under_no_build(built, fresh_state, monkeypatch):
    so, _ = built
    meta_path = so.parent / _ext.META_NAME
    original = meta_path.read_text()
    meta = json.loads(original)
    meta["torch"] = "0.0.1+tampered"
    meta["torch_cuda"] = "9.9"
    monkeypatch.setenv("PEFTKERN_NO_BUILD", "1")
    try:
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(RuntimeError) as ei:
            _ext.load()
        msg = str(ei.value)
        assert "built for torch 0.0.1+tampered / CUDA 9.9" in msg
        assert f"you have torch {torch.__version__} / CUDA {torch.version.cuda}" in msg
        assert "peftkern build" in msg
        assert _ext.status()["up_to_date"] is False
        # build() must refuse nothing here but must not be reached: load never compiles under NO_BUILD.
        assert so.stat().st_size > 0
    finally:
        meta_path.write_text(original)
    assert _ext.status()["up_to_date"]


def test_mismatch_other_archs_names_the_existing_build(built, fresh_state, monkeypatch):
    archs = _ext.arch_list()
    other = "8.6" if archs == "7.5" else "7.5"
    monkeypatch.setenv("PEFTKERN_NO_BUILD", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", other)
    assert not _ext.build_dir().exists()
    with pytest.raises(RuntimeError, match=rf"\(archs {re.escape(archs)}\), you have torch .* \(archs {other}\)"):
        _ext.load()
    ok, why = _ext.available()
    assert not ok and why


def test_load_without_build_does_not_wait_for_another_build(tmp_path, fresh_state, monkeypatch):
    """Auto dispatch loads without building: a build lock held by another process must make it give
    up at once (and ask again next time), not stall the caller for the length of a build."""
    import fcntl

    monkeypatch.setenv("PEFTKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with open(tmp_path / _ext.LOCK_NAME, "a+") as other:  # another open file: flock conflicts as across processes
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        t0 = time.perf_counter()
        with pytest.raises(_ext.BuildBusy, match="another process holds"):
            _ext.load(build_if_missing=False)
        ok, why = _ext.available(build_if_missing=False)
        assert not ok and "another process holds" in why
        assert time.perf_counter() - t0 < 5
        assert False not in _ext._avail_cache  # not cached: the next call checks again
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    ok, why = _ext.available(build_if_missing=False)  # lock free now: the real reason (nothing built here)
    assert not ok and "another process" not in why


def test_cuda_home_through_wrapper_script(tmp_path, monkeypatch):
    real = _ext.nvcc_path()
    if real is None:
        pytest.skip("nvcc not found")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert Path(_ext.cuda_home()).resolve() == Path(real).resolve().parent.parent
    assert shutil.which("nvcc") == str(wrapper)
