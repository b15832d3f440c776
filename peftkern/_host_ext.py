"""peftkern's CPU host extension: the eager torch backend's fp32 LoRA linear as one C++ autograd node (csrc/host/).

Why: on the CPU, host time is the whole cost of a small layer, and a Python autograd.Function costs ~25 us per LoRA
call more than the same aten calls made from C++ (`peftkern bench overhead`; benchmarks/NOTES.md). The C++ node runs
exactly reference.lora.lora_linear_fwd_fp32 / _bwd_fp32 (same ops, same order, same mask: the same bits).

Built on first use (never at import) by torch's JIT builder (ninja and a C++ compiler) into
``<cache>/peftkern_host-torch<version>-py<version>``, under the flock the CUDA build holds (_ext._locked), so
concurrent processes build once. The meta is written last with the .so's sha256: a build killed midway is never
loaded, a damaged .so is rebuilt. ``PEFTKERN_NO_BUILD=1`` forbids building; ``PEFTKERN_HOST_EXT=0`` turns the path
off. When it cannot be built or loaded, the same math runs as a Python autograd.Function (ops/lora.py) and the reason
is logged once (``status()`` says it too).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

from . import _ext

log = logging.getLogger("peftkern")

NAME = "peftkern_host"
META_NAME = "build_meta.json"
_lock = threading.Lock()
_state: dict = {}  # "module": the loaded module or None, "why": why it is None


def enabled() -> bool:
    return os.environ.get("PEFTKERN_HOST_EXT", "1") not in ("0", "")


def source_dir() -> Path | None:
    root = _ext.csrc_dir()
    return None if root is None else root / _ext.HOST_DIR


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.cpp") if p.is_file())


def sources_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _sources(folder):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def build_dir() -> Path:
    import torch

    raw = f"{NAME}-torch{torch.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}"
    return _ext.cache_root() / re.sub(r"[^A-Za-z0-9._-]", "_", raw)


def _so(folder: Path) -> Path:
    return folder / f"{NAME}.so"


def _mismatch(folder: Path, src: Path) -> str | None:
    """Why the build in `folder` cannot be loaded (None: it can)."""
    import torch

    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError):
        return f"not built yet ({folder})"
    if meta.get("torch") != torch.__version__ or meta.get("python") != sys.version.split()[0]:
        return f"built for torch {meta.get('torch')} / Python {meta.get('python')}"
    if meta.get("sources_sha256") != sources_sha256(src):
        return "built from other sources"
    if _ext._file_sha256(_so(folder)) != meta.get("so_sha256"):
        return "damaged (its sha256 differs from the one recorded at build time)"
    return None


def build(verbose: bool = False) -> Path:
    """Compile csrc/host into the cache (a no-op when the cache holds this build) and return the .so's path.
    Raises RuntimeError when it cannot (no sources, no compiler or ninja, PEFTKERN_NO_BUILD=1)."""
    src = source_dir()
    if src is None or not _sources(src):
        raise RuntimeError("the host extension's sources (csrc/host) are not next to the package")
    folder = build_dir()
    with _ext._locked():
        why = _mismatch(folder, src)
        if why is None:
            return _so(folder)
        if _ext._no_build():
            raise RuntimeError(f"the host extension is {why} and PEFTKERN_NO_BUILD=1 forbids building it")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_NAME).unlink(missing_ok=True)
        _so(folder).unlink(missing_ok=True)  # stale, or half written by a killed build
        cpp = _builder()
        if _ext._uses_lock_file(cpp):  # torch < 2.14's lock file, left by a killed build (we hold the flock)
            (folder / "lock").unlink(missing_ok=True)
        versioner = getattr(cpp, "JIT_EXTENSION_VERSIONER", None)
        if versioner is not None and hasattr(versioner, "entries"):
            versioner.entries.pop(NAME, None)  # keyed by folder, not by torch's per-process versions
        log.info("peftkern: building the CPU host extension (once per torch version, ~30 s) in %s", folder)
        _ninja_on_path()
        t0 = time.perf_counter()
        try:
            cpp.load(name=NAME, sources=[str(p) for p in _sources(src)], extra_cflags=["-O2"],
                     build_directory=str(folder), verbose=verbose, with_cuda=False, is_python_module=False)
        except Exception as e:  # a compiler error, no ninja, no compiler: the caller falls back and says why
            raise RuntimeError(f"the host extension did not build: {str(e).strip().splitlines()[-1][:300]}") from e
        so = _so(folder)
        if not so.is_file():
            raise RuntimeError(f"the host extension's build finished but {so} is missing")
        meta = {"name": NAME, "torch": __import__("torch").__version__, "python": sys.version.split()[0],
                "sources_sha256": sources_sha256(src), "so_sha256": _ext._file_sha256(so),
                "build_seconds": round(time.perf_counter() - t0, 1),
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = folder / f"{META_NAME}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder / META_NAME)  # last: only a finished build has a meta
        log.info("peftkern: CPU host extension built in %.0f s", meta["build_seconds"])
        return so


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; a venv's pip-installed ninja is not there unless the venv is active."""
    here = str(Path(sys.executable).parent)
    if (Path(here) / "ninja").is_file() and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def _builder():
    """torch's JIT builder, imported without its note that a CUDA torch finds no CUDA runtime (on a CPU machine)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp
    finally:
        logger.setLevel(level)
    return cpp


def _import(so: Path):
    import torch  # noqa: F401 - libtorch must be loaded before the extension

    loader = importlib.machinery.ExtensionFileLoader(NAME, str(so))
    spec = importlib.util.spec_from_file_location(NAME, str(so), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def module():
    """The loaded extension (building it on first use), or None when the path is off or cannot be had; the reason is
    logged once and kept for status()."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        mod, why = None, None
        if not enabled():
            why = "off (PEFTKERN_HOST_EXT=0)"
        else:
            try:
                mod = _import(build())
            except (RuntimeError, OSError, ImportError) as e:
                why = str(e)
                log.warning("peftkern: CPU host extension unavailable (%s); fp32 LoRA calls on the torch backend run "
                            "the same math as a Python autograd.Function (more host time per call)", why)
        _state["why"] = why
        _state["module"] = mod
        return mod


def status() -> dict:
    """Whether the host path is built (for this torch and these sources) and loaded in this process, and why not;
    does not build."""
    src = source_dir()
    why_unbuilt = "no sources (csrc/host)" if src is None else _mismatch(build_dir(), src)
    return {"enabled": enabled(), "built": why_unbuilt is None, "why_not_built": why_unbuilt,
            "loaded": _state.get("module") is not None, "why_not": _state.get("why"), "build_dir": str(build_dir())}


@contextlib.contextmanager
def forced(mod):
    """Tests: run with `mod` as the host extension (None: the Python path), restoring the state after."""
    saved = dict(_state)
    _state.clear()
    _state.update(module=mod, why=None if mod is not None else "off (forced by a test)")
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)
