"""Build and load peftkern's CUDA C++ extension (the sources under ``csrc/``).

The extension is a plain shared library that registers ops in the ``peftkern_cuda`` namespace
(``torch.ops.peftkern_cuda.*``); it is compiled by torch's JIT builder (ninja) into a versioned
cache and loaded with ``torch.ops.load_library``. Nothing here builds or imports the builder at
import time.

Cache: ``$PEFTKERN_CACHE_DIR`` or ``~/.cache/peftkern``, one folder per torch version, torch CUDA
version and arch list (``$TORCH_CUDA_ARCH_LIST``, default ``8.0;9.0``), holding the ``.so`` and a
``build_meta.json`` (versions, nvcc, archs, sha256 of the sources, time). A build runs under an
``fcntl.flock`` on ``<cache>/build.lock``, so concurrent processes build once. The meta is written
last and records the .so's sha256: a build killed midway leaves no meta (so its files are never
loaded, and the next build starts clean), and a damaged .so is reported and rebuilt, never loaded.

``PEFTKERN_NO_BUILD=1`` forbids compiling: a missing or mismatched build is then an error that
says what the build was made for and what this process has.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path

log = logging.getLogger("peftkern")

EXT_NAME = "peftkern_cuda"
DEFAULT_ARCHS = "8.0;9.0"
META_NAME = "build_meta.json"
LOCK_NAME = "build.lock"
_SOURCE_SUFFIXES = (".cu", ".cpp")
_HASHED_SUFFIXES = (".cu", ".cpp", ".cuh", ".h", ".hpp")

_lock = threading.RLock()
_flock_depth = 0
_flock_file = None
_loaded_path: Path | None = None
_avail_cache: dict[bool, tuple[bool, str]] = {}


# ---------------------------------------------------------------------------------------------
# Locations and versions


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: ``peftkern/csrc`` in an installed wheel, else ``<repo>/csrc``. Each op
    registers its own CUDA ops from its folder (``csrc/<op>/``); ``csrc/include/peftkern`` holds the
    shared headers and marks the root."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "include" / "peftkern").is_dir():
            return cand
    return None


HOST_DIR = "host"  # csrc/host: the CPU host extension (_host_ext.py), not part of this build


def _source_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes
                  and p.relative_to(root).parts[0] != HOST_DIR)


def sources_sha256(root: Path | None = None) -> str | None:
    """sha256 over the relative paths and contents of every source and header under csrc."""
    root = root or csrc_dir()
    if root is None:
        return None
    h = hashlib.sha256()
    for p in _source_files(root, _HASHED_SUFFIXES):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def arch_list() -> str:
    """Normalised ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``), e.g. ``'8.0;9.0'``."""
    raw = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    parts = [p.strip() for p in re.split(r"[;\s]+", raw) if p.strip()]
    return ";".join(parts)


def cache_root() -> Path:
    env = os.environ.get("PEFTKERN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftkern"


def _torch_versions() -> tuple[str, str | None]:
    import torch

    return torch.__version__, torch.version.cuda


def _key(torch_version: str, cuda_version: str | None, archs: str) -> str:
    arch_key = "-".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs.split(";"))
    raw = f"{EXT_NAME}-torch{torch_version}-cuda{cuda_version or 'none'}-sm{arch_key}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


def build_dir() -> Path:
    """The cache folder for this torch / CUDA / arch list."""
    tv, cv = _torch_versions()
    return cache_root() / _key(tv, cv, arch_list())


def so_path() -> Path:
    return build_dir() / f"{EXT_NAME}.so"


def _file_sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _nvcc_home_from_dryrun(nvcc: str) -> Path | None:
    """Ask nvcc where it lives (works through wrapper scripts): ``_HERE_=<root>/bin``."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ _HERE_=(\S+)", out.stdout + out.stderr, re.MULTILINE)
    if m:
        home = Path(m.group(1)).resolve().parent
        if (home / "bin" / "nvcc").exists():
            return home
    return None


def _nvcc_home_from_script(script: Path) -> Path | None:
    """A wrapper script that execs the real nvcc: take the first ``/.../bin/nvcc`` it names."""
    try:
        text = script.read_text(errors="replace")[:65536]
    except OSError:
        return None
    for m in re.finditer(r"(/[^\s'\";|&]*?/bin/nvcc)\b", text):
        cand = Path(m.group(1))
        if cand.resolve() != script.resolve() and _is_elf(cand.resolve()):
            return cand.resolve().parent.parent
    return None


@cache
def _cuda_home_cached(env_home: str | None, path_env: str | None) -> str | None:
    if env_home:
        if (Path(env_home) / "bin" / "nvcc").exists():
            return env_home
        log.warning("peftkern: CUDA_HOME/CUDA_PATH=%s has no bin/nvcc; looking elsewhere", env_home)
    nvcc = shutil.which("nvcc", path=path_env)
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_elf(real):
            return str(real.parent.parent)
        # A wrapper script (torch would take its folder's parent, e.g. /usr/local, as CUDA_HOME).
        home = _nvcc_home_from_dryrun(nvcc) or _nvcc_home_from_script(real)
        if home is not None:
            return str(home)
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        return str(default.resolve())
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the real nvcc's root (through wrapper
    scripts), else /usr/local/cuda. None when no nvcc is found."""
    env_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return _cuda_home_cached(env_home, os.environ.get("PATH"))


def nvcc_path() -> str | None:
    home = cuda_home()
    if home is None:
        return None
    p = Path(home) / "bin" / "nvcc"
    return str(p) if p.exists() else None


@cache
def _nvcc_version_of(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\S+?),\s*V(\S+)", out)
    return m.group(2) if m else None


def nvcc_version() -> str | None:
    """e.g. ``'13.0.88'``, or None when nvcc is not found."""
    nvcc = nvcc_path()
    return _nvcc_version_of(nvcc) if nvcc else None


def _pip_cuda_include_dirs() -> list[Path]:
    """Include folders of the pip ``nvidia`` packages (``nvidia/cu13/include`` for CUDA 13 wheels,
    ``nvidia/<lib>/include`` for CUDA 12 wheels), found through the namespace package."""
    try:
        import nvidia  # namespace package shipped by torch's CUDA wheels
    except ImportError:
        return []
    dirs: list[Path] = []
    for base in map(Path, getattr(nvidia, "__path__", [])):
        for cand in sorted(base.glob("cu*/include")) + sorted(base.glob("*/include")):
            if cand.is_dir() and cand not in dirs:
                dirs.append(cand)
    return dirs


def _make_shim_include(dest: Path, home: str) -> Path | None:
    """torch's CUDA headers include cuBLAS/cuSPARSE/... headers that a bare toolkit may lack, while
    the pip ``nvidia`` wheels ship them. Link only the headers the toolkit lacks into one folder,
    so the toolkit's own runtime headers are never shadowed by another version's."""
    toolkit_inc = Path(home) / "include"
    if dest.exists():
        shutil.rmtree(dest)
    linked = 0
    for inc in _pip_cuda_include_dirs():
        for entry in inc.iterdir():
            if (toolkit_inc / entry.name).exists() or (dest / entry.name).exists():
                continue
            dest.mkdir(parents=True, exist_ok=True)
            (dest / entry.name).symlink_to(entry)
            linked += 1
    if linked:
        log.debug("peftkern: %d CUDA headers taken from the pip nvidia packages via %s", linked, dest)
        return dest
    return None


# ---------------------------------------------------------------------------------------------
# Meta, locking


def read_meta(folder: Path | None = None) -> dict | None:
    path = (folder or build_dir()) / META_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _current_identity() -> dict:
    tv, cv = _torch_versions()
    return {"torch": tv, "torch_cuda": cv, "archs": arch_list()}


def _mismatch(meta: dict | None, folder: Path) -> str | None:
    """Why the build in `folder` cannot be used by this process, or None when it can."""
    cur = _current_identity()
    so = folder / f"{EXT_NAME}.so"
    if meta is None or not so.is_file():
        other = None if meta is not None else _newest_other_meta(folder)
        if other is not None:
            return _versions_message(other, cur)
        return f"peftkern CUDA extension is not built (nothing in {folder}): run 'peftkern build'"
    if any(meta.get(k) != cur[k] for k in ("torch", "torch_cuda", "archs")):
        return _versions_message(meta, cur)
    src = sources_sha256()
    if src is not None and meta.get("sources_sha256") != src:
        return (f"peftkern CUDA extension in {folder} was built from other csrc sources "
                f"(sha256 {str(meta.get('sources_sha256'))[:12]}, sources now {src[:12]}): "
                "run 'peftkern build'")
    want = meta.get("so_sha256")  # absent in builds made before it was recorded
    if want is not None and _file_sha256(so) != want:
        return (f"peftkern CUDA extension {so} is damaged (its sha256 differs from the one recorded when it "
                "was built): run 'peftkern build' to rebuild it")
    return None


def _versions_message(meta: dict, cur: dict) -> str:
    return (f"peftkern CUDA extension was built for torch {meta.get('torch')} / CUDA {meta.get('torch_cuda')} "
            f"(archs {meta.get('archs')}), you have torch {cur['torch']} / CUDA {cur['torch_cuda']} "
            f"(archs {cur['archs']}): run 'peftkern build'")


def _newest_other_meta(folder: Path) -> dict | None:
    root = folder.parent
    metas = []
    with contextlib.suppress(OSError):
        for p in root.glob(f"{EXT_NAME}-*/{META_NAME}"):
            if p.parent != folder and (p.parent / f"{EXT_NAME}.so").is_file():
                metas.append((p.stat().st_mtime, p))
    for _, p in sorted(metas, reverse=True):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(p.read_text())
    return None


class BuildBusy(RuntimeError):
    """Another process holds the build lock and the caller chose not to wait."""


def _flock_nb(f, patience_s: float) -> None:
    """Take the lock without blocking, retrying for up to `patience_s`; BlockingIOError if still held."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


_BUSY_WAIT_S = 2.0  # wait=False still rides out a short hold (another process loading, not building)


@contextlib.contextmanager
def _locked(wait: bool = True):
    """In-process RLock plus an fcntl.flock on <cache>/build.lock, re-entrant within a process.
    With wait=False a lock another process holds for more than _BUSY_WAIT_S raises BuildBusy."""
    global _flock_depth, _flock_file
    with _lock:
        if _flock_depth == 0:
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            f = open(root / LOCK_NAME, "a+")  # noqa: SIM115 - held across the context
            try:
                _flock_nb(f, 0.0 if wait else _BUSY_WAIT_S)
            except BlockingIOError:
                if not wait:
                    f.close()
                    raise BuildBusy(f"another process holds the CUDA extension's build lock ({root / LOCK_NAME}): "
                                    "it is building it") from None
                log.info("peftkern: waiting for another process building the CUDA extension (%s)",
                         root / LOCK_NAME)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            _flock_file = f
        _flock_depth += 1
        try:
            yield
        finally:
            _flock_depth -= 1
            if _flock_depth == 0 and _flock_file is not None:
                fcntl.flock(_flock_file.fileno(), fcntl.LOCK_UN)
                _flock_file.close()
                _flock_file = None


# ---------------------------------------------------------------------------------------------
# Build / load


def _cpp_extension(home: str):
    """Import torch's builder with CUDA_HOME fixed (torch guesses it from `which nvcc` at import,
    which is wrong when nvcc is a wrapper script)."""
    os.environ.setdefault("CUDA_HOME", home)
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = home
    return cpp


def _uses_lock_file(cpp) -> bool:
    """Whether torch's builder waits on the mere existence of ``<build dir>/lock`` (FileBaton)."""
    return getattr(cpp, "FileBaton", None) is not None and getattr(cpp, "FileLock", None) is None


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile csrc/ for the archs in $TORCH_CUDA_ARCH_LIST (default 8.0;9.0) into the cache and
    return the path of the .so. A no-op when the cache holds a build for this torch / CUDA / archs
    / sources (unless `force`). As a side effect of torch's builder, a build that ran also loads
    the library into this process (a rebuilt .so replaces one loaded earlier only after a restart).
    Raises RuntimeError when nothing can be built (no nvcc, CPU-only torch, no sources)."""
    global _loaded_path
    tv, cv = _torch_versions()
    if cv is None:
        raise RuntimeError(f"peftkern CUDA extension needs a CUDA build of torch; torch {tv} is CPU-only")
    src_root = csrc_dir()
    if src_root is None:
        raise RuntimeError("peftkern CUDA extension sources (csrc/) not found next to the package")
    folder = build_dir()
    so = folder / f"{EXT_NAME}.so"
    with _locked():
        if not force and _mismatch(read_meta(folder), folder) is None:
            log.debug("peftkern: CUDA extension up to date in %s", folder)
            return so
        home = cuda_home()
        if home is None or nvcc_path() is None:
            raise RuntimeError("peftkern CUDA extension cannot be built: nvcc not found (set CUDA_HOME to the "
                               "CUDA toolkit root, or put nvcc on PATH)")
        if is_loaded():
            log.warning("peftkern: rebuilding the CUDA extension while a build is loaded in this process; "
                        "the new build takes effect after a restart")
        _avail_cache.clear()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_NAME).unlink(missing_ok=True)
        # The .so is stale or was left by a build killed midway (half written, maybe newer than its
        # objects): never let the builder take it as up to date. Objects are kept (ninja recompiles
        # those its log does not vouch for) unless `force`.
        so.unlink(missing_ok=True)
        if force:
            for p in folder.glob("*.o"):
                p.unlink(missing_ok=True)
        cpp = _cpp_extension(home)
        # torch < 2.14 guards its builder with a lock *file* (FileBaton) that a killed build leaves
        # behind, after which every build waits on it forever (newer torch holds an OS lock instead).
        # We hold the flock on the cache, so no other peftkern build runs here: the file is a dead build's.
        stale = folder / "lock"
        if _uses_lock_file(cpp) and stale.exists():
            log.warning("peftkern: removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        include_dirs = [str(src_root / "include")]
        shim = _make_shim_include(folder / "shim_include", home)
        if shim is not None:
            include_dirs.append(str(shim))
        sources = [str(p) for p in _source_files(src_root, _SOURCE_SUFFIXES)]
        archs = arch_list()
        nvcc_ver = nvcc_version()
        log.info("peftkern: building the CUDA extension (%d sources, archs %s, nvcc %s) in %s; this takes "
                 "a few minutes", len(sources), archs, nvcc_ver, folder)
        # torch's builder keeps per-process versions of an extension name (name_v1, ... when its
        # inputs change); we key builds by folder instead, so start it afresh each time.
        versioner = getattr(cpp, "JIT_EXTENSION_VERSIONER", None)
        if versioner is not None and hasattr(versioner, "entries"):
            versioner.entries.pop(EXT_NAME, None)
        old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        t0 = time.perf_counter()
        try:
            cpp.load(
                name=EXT_NAME,
                sources=sources,
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo", "--threads=2"],
                extra_include_paths=include_dirs,
                build_directory=str(folder),
                verbose=verbose,
                with_cuda=True,
                is_python_module=False,
            )
        finally:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
        seconds = time.perf_counter() - t0
        if not so.is_file():
            raise RuntimeError(f"peftkern CUDA extension build finished but {so} is missing")
        _loaded_path = so
        meta = {
            "name": EXT_NAME,
            "torch": tv,
            "torch_cuda": cv,
            "nvcc": nvcc_ver,
            "cuda_home": home,
            "archs": archs,
            "sources_sha256": sources_sha256(src_root),
            "sources": [Path(s).relative_to(src_root).as_posix() for s in sources],
            "python": sys.version.split()[0],
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 1),
            "so": so.name,
            "so_bytes": so.stat().st_size,
            "so_sha256": _file_sha256(so),
        }
        tmp = folder / f"{META_NAME}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder / META_NAME)
        log.info("peftkern: CUDA extension built in %.0f s (%s, %.1f MB)", seconds, so, so.stat().st_size / 1e6)
        return so


def _no_build() -> bool:
    return os.environ.get("PEFTKERN_NO_BUILD", "0") not in ("", "0")


def load(build_if_missing: bool = True, wait: bool | None = None) -> Path:
    """Load the extension into this process (idempotent; thread- and process-safe) and return the
    .so path, building it first when missing or stale (unless PEFTKERN_NO_BUILD=1 or
    `build_if_missing` is False, which raise RuntimeError saying why). `wait` (default:
    `build_if_missing`) False: do not wait for another process's build either, raise BuildBusy."""
    global _loaded_path
    import torch

    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        folder = build_dir()
        with _locked(wait=build_if_missing if wait is None else wait):
            why = _mismatch(read_meta(folder), folder)
            if why is not None:
                if _no_build():
                    raise RuntimeError(f"{why} (PEFTKERN_NO_BUILD=1 forbids building here)")
                if not build_if_missing:
                    raise RuntimeError(why)
                build()
            so = folder / f"{EXT_NAME}.so"
            try:
                torch.ops.load_library(str(so))
            except OSError as e:
                raise RuntimeError(f"peftkern CUDA extension {so} could not be loaded ({e}): the cached build is "
                                   "damaged or was made on another system; run 'peftkern build --force' to "
                                   "rebuild it") from e
        _loaded_path = so
        _avail_cache.clear()
        log.debug("peftkern: loaded %s", so)
        return so


def is_loaded() -> bool:
    """Whether the peftkern_cuda ops are registered in this process (by load() or otherwise)."""
    if _loaded_path is not None:
        return True
    if "torch" not in sys.modules:
        return False
    import torch

    try:
        return bool(torch._C._dispatch_has_kernel(f"{EXT_NAME}::lora_decode"))
    except (AttributeError, RuntimeError):
        try:
            torch.ops.peftkern_cuda.lora_decode  # noqa: B018
            return True
        except (AttributeError, RuntimeError):
            return False


def status() -> dict:
    """What `peftkern info` shows about the CUDA backend. Never builds or loads."""
    import torch

    tv, cv = _torch_versions()
    folder = build_dir()
    meta = read_meta(folder)
    so = folder / f"{EXT_NAME}.so"
    mismatch = _mismatch(meta, folder)
    nvcc = nvcc_path()
    cuda_ok = torch.cuda.is_available()
    loaded = is_loaded()
    why_not = None
    if not cuda_ok:
        why_not = "no CUDA device (torch.cuda.is_available() is False)"
    elif cv is None:
        why_not = f"torch {tv} is a CPU-only build"
    elif not loaded and mismatch is not None:
        if _no_build():
            why_not = f"{mismatch} (PEFTKERN_NO_BUILD=1 forbids building here)"
        elif nvcc is None:
            why_not = f"{mismatch}; and no nvcc is found to build it (set CUDA_HOME)"
    return {
        "torch": tv,
        "torch_cuda": cv,
        "archs": arch_list(),
        "cuda_home": cuda_home(),
        "nvcc": nvcc,
        "nvcc_version": nvcc_version() if nvcc else None,
        "sources": str(csrc_dir()) if csrc_dir() else None,
        "cache_dir": str(cache_root()),
        "build_dir": str(folder),
        "built": so.is_file() and meta is not None,
        "up_to_date": mismatch is None,
        "stale_reason": mismatch,
        "meta": meta,
        "so_path": str(so) if so.is_file() else None,
        "so_bytes": so.stat().st_size if so.is_file() else None,
        "loaded": loaded,
        "no_build": _no_build(),
        "cuda_available": cuda_ok,
        "why_not": why_not,
    }


def available(build_if_missing: bool = False) -> tuple[bool, str]:
    """(True, "") when the CUDA ops can be called now: a CUDA device is present and the extension
    is loaded (loading a matching build from the cache, or building it when `build_if_missing`).
    Else (False, reason). Results are cached for the process (a failed build is not retried), except
    "another process is building it", which the next call checks again."""
    with _lock:
        if build_if_missing in _avail_cache:
            return _avail_cache[build_if_missing]
        import torch

        if not torch.cuda.is_available():
            res = (False, "no CUDA device (torch.cuda.is_available() is False)")
        elif _loaded_path is not None:
            res = (True, "")
        else:
            try:
                # An explicit cuda request waits for another process's build; auto dispatch does not.
                load(build_if_missing=build_if_missing and not _no_build(), wait=build_if_missing)
                res = (True, "")
            except BuildBusy as e:  # auto dispatch must not stall a training step on someone's build
                return False, str(e)
            except Exception as e:  # build/load failures become a reason, not a crash
                reason = str(e)
                if not build_if_missing and "not built" in reason:
                    reason += " (or select PEFTKERN_BACKEND=cuda to build it on first use)"
                log.debug("peftkern: cuda backend unavailable: %s", reason)
                res = (False, reason)
        _avail_cache[build_if_missing] = res
        return res
