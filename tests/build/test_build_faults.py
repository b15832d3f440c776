"""The CUDA extension's cache under faults: a build killed midway, two processes building at once, a
damaged .so. No nvcc: torch's real JIT builder runs (its locking, its loading of the result) with only
its ninja step replaced by a fake that writes a tiny C shared library, in two halves, into the build
folder. Each process that builds runs in a subprocess, so a build that would wait forever fails the
test by its time-out instead of hanging the suite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from peftkern import _ext

ROOT = Path(__file__).resolve().parents[2]

# Run at the top of each subprocess: peftkern builds with a fake ninja step and no toolkit.
_PRELUDE = textwrap.dedent(r"""
    import os, sys, time
    from pathlib import Path
    import torch
    import torch.utils.cpp_extension as cpp
    from peftkern import _ext

    TINY = Path(os.environ["FAKE_TINY_SO"])
    LOG = Path(os.environ["FAKE_BUILD_LOG"])
    HANG = os.environ.get("FAKE_HANG_AFTER_HALF") == "1"
    READY = Path(os.environ["FAKE_READY"])

    def fake_ninja(name, *args, build_directory=None, **kwargs):
        so = Path(build_directory) / (name + ".so")
        if so.exists():  # as a ninja whose log vouches for an existing output: up to date, not rebuilt
            return
        data = TINY.read_bytes()
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()}\n")
        with open(so, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            READY.touch()
            if HANG:
                time.sleep(600)  # killed here
            else:
                time.sleep(0.5)  # long enough for a second process to come knocking
            f.write(data[len(data) // 2:])

    cpp._write_ninja_file_and_build_library = fake_ninja
    _ext.cuda_home = lambda: "/nonexistent-cuda"
    _ext.nvcc_path = lambda: "/nonexistent-cuda/bin/nvcc"
    _ext.nvcc_version = lambda: "0.0-fake"
    _ext._make_shim_include = lambda dest, home: None
    _ext._torch_versions = lambda: (torch.__version__, torch.version.cuda or "fake")
""")


@pytest.fixture(scope="module")
def tiny_so(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to make the fake extension")
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.c").write_text("int peftkern_fake_extension(void) { return 42; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "tiny.so"), str(d / "tiny.c")], check=True)
    return d / "tiny.so"


@pytest.fixture
def env(tmp_path, tiny_so, monkeypatch):
    """Environment for the subprocesses, and this process pointed at the same cache."""
    e = dict(os.environ, PEFTKERN_CACHE_DIR=str(tmp_path / "cache"), FAKE_TINY_SO=str(tiny_so),
             FAKE_BUILD_LOG=str(tmp_path / "builds.log"), FAKE_READY=str(tmp_path / "ready"))
    e.pop("PEFTKERN_NO_BUILD", None)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    monkeypatch.setenv("PEFTKERN_CACHE_DIR", e["PEFTKERN_CACHE_DIR"])
    monkeypatch.delenv("PEFTKERN_NO_BUILD", raising=False)
    monkeypatch.setattr(_ext, "_loaded_path", None)
    monkeypatch.setattr(_ext, "_avail_cache", {})
    monkeypatch.setattr(_ext, "_torch_versions", lambda: (torch.__version__, torch.version.cuda or "fake"))
    return e


def _spawn(env, body, **extra):
    return subprocess.Popen([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], env={**env, **extra},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=180):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the build did not finish in {timeout} s (waiting on a dead build's lock?)\n{err[-3000:]}")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{out}\n{err[-3000:]}"
    return out


def _wait_for(path, proc, what):
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"{what} exited early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def _builds(env):
    log = Path(env["FAKE_BUILD_LOG"])
    return log.read_text().split() if log.exists() else []


_BUILD_AND_LOAD = """
    so = _ext.load()
    assert _ext.is_loaded()
    import ctypes
    assert ctypes.CDLL(str(so)).peftkern_fake_extension() == 42
    print("loaded", so)
"""


def test_killed_build_leaves_nothing_loadable_and_the_next_build_succeeds(env, tiny_so):
    victim = _spawn(env, "_ext.build()\n", FAKE_HANG_AFTER_HALF="1")
    _wait_for(Path(env["FAKE_READY"]), victim, "the first build")
    victim.kill()  # SIGKILL: no cleanup of any kind runs
    victim.communicate()
    folder = _ext.build_dir()
    so = folder / f"{_ext.EXT_NAME}.so"
    assert so.is_file() and so.stat().st_size < tiny_so.stat().st_size  # the half-written library
    assert _ext.read_meta(folder) is None
    st = _ext.status()
    assert not st["built"] and not st["up_to_date"] and "not built" in st["stale_reason"]

    # Loading without building refuses it with the reason, never dlopens the half library.
    with pytest.raises(RuntimeError, match="not built"):
        _ext.load(build_if_missing=False)
    os.environ["PEFTKERN_NO_BUILD"] = "1"
    try:
        with pytest.raises(RuntimeError, match="PEFTKERN_NO_BUILD=1 forbids building"):
            _ext.load()
    finally:
        del os.environ["PEFTKERN_NO_BUILD"]
    assert not _ext.is_loaded() or _ext._loaded_path is None

    # The next build runs (through torch's own lock, which the killed build held) and loads a whole .so.
    Path(env["FAKE_READY"]).unlink()
    out = _finish(_spawn(env, _BUILD_AND_LOAD))
    assert "loaded" in out
    assert len(_builds(env)) == 2
    assert so.read_bytes() == tiny_so.read_bytes()
    meta = _ext.read_meta(folder)
    assert meta is not None and meta["so_sha256"] and _ext.status()["up_to_date"]


def test_two_processes_build_once(env, tiny_so):
    first = _spawn(env, _BUILD_AND_LOAD)
    _wait_for(Path(env["FAKE_READY"]), first, "the first build")
    second = _spawn(env, _BUILD_AND_LOAD)  # starts while the first is mid-build: waits on the cache lock
    outs = [_finish(first), _finish(second)]
    assert all("loaded" in o for o in outs)
    assert len(_builds(env)) == 1, "the second process must reuse the first one's build, not build again"
    so = _ext.build_dir() / f"{_ext.EXT_NAME}.so"
    assert so.read_bytes() == tiny_so.read_bytes()
    assert outs[0].split()[-1] == outs[1].split()[-1] == str(so)
    assert _ext.status()["up_to_date"]


def test_damaged_so_is_reported_and_rebuilt(env, tiny_so):
    _finish(_spawn(env, "_ext.build()\n"))
    folder = _ext.build_dir()
    so = folder / f"{_ext.EXT_NAME}.so"
    good = so.read_bytes()
    so.write_bytes(b"\0" * len(good))  # same size, not a library any more

    st = _ext.status()
    assert not st["up_to_date"] and "damaged" in st["stale_reason"]
    with pytest.raises(RuntimeError, match=r"is damaged .* run 'peftkern build'"):
        _ext.load(build_if_missing=False)
    os.environ["PEFTKERN_NO_BUILD"] = "1"
    try:
        with pytest.raises(RuntimeError, match="damaged"):
            _ext.load()
    finally:
        del os.environ["PEFTKERN_NO_BUILD"]

    # Building is allowed: load() rebuilds it and loads the whole library.
    _finish(_spawn(env, _BUILD_AND_LOAD))
    assert len(_builds(env)) == 2 and so.read_bytes() == good and _ext.status()["up_to_date"]


def test_damaged_so_from_a_build_without_its_checksum(env, tiny_so):
    """A build recorded before so_sha256 existed: the damage shows when loading, as a clear error."""
    _finish(_spawn(env, "_ext.build()\n"))
    folder = _ext.build_dir()
    meta = json.loads((folder / _ext.META_NAME).read_text())
    del meta["so_sha256"]
    (folder / _ext.META_NAME).write_text(json.dumps(meta))
    so = folder / f"{_ext.EXT_NAME}.so"
    so.write_bytes(so.read_bytes()[:100])
    assert _ext.status()["up_to_date"]  # nothing to compare against without loading
    with pytest.raises(RuntimeError, match=r"could not be loaded .* run 'peftkern build --force'"):
        _ext.load(build_if_missing=False)
    assert _ext._loaded_path is None
