"""Backend choice: which implementation of an op runs a call.

Order of authority: `use_backend(...)` context > PEFTKERN_BACKEND env var > "auto".
"auto" picks by device: CUDA tensors try cuda (only if the extension is already built: auto never
starts a multi-minute compile), then triton, then torch; CPU tensors use torch. A backend that
cannot take a call says why; the call then falls back to the next backend in that order and the
fallback is logged once per (op, backend, reason): at WARNING when the user named the backend or
when a CUDA tensor lands on the torch reference, at INFO for auto's ordinary choices (cuda -> triton).
PEFTKERN_STRICT=1 turns a fallback from an explicitly requested backend into an error, so a test can
prove which kernel ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("peftkern")

BACKENDS = ("torch", "triton", "cuda")
_NAMES = frozenset((*BACKENDS, "auto"))
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftkern_backend", default=None)
_logged: set[tuple[str, str, str]] = set()


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend cannot take a call and strict mode forbids falling back."""


def _check_name(name: str) -> str:
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown peftkern backend {name!r}: choose one of {BACKENDS + ('auto',)}")
    return name


# os.environ.get costs ~1 us (key encoding, Mapping.get); the ops read three variables per call. On POSIX the
# decoded mapping is os.environ._data (bytes keys), kept in sync by every os.environ write, so read it there.
_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _env(name: str, default: str) -> str:
    if _ENV is None:
        return os.environ.get(name, default)
    v = _ENV.get(name.encode())
    return default if v is None else os.fsdecode(v)


def requested_backend() -> str:
    """The backend the user asked for: 'torch', 'triton', 'cuda' or 'auto'."""
    name = _requested.get()
    if name is None:
        name = _env("PEFTKERN_BACKEND", "auto")
        if name != "auto":
            name = name.strip().lower() or "auto"
    return name if name in _NAMES else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on backend `name` ('torch', 'triton', 'cuda' or 'auto')."""
    token = _requested.set(_check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


def strict() -> bool:
    return _env("PEFTKERN_STRICT", "0") == "1"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on `device_type`, or None when autocast is off there (or the
    device type has no autocast, e.g. meta)."""
    # torch.compile on torch 2.11 cannot trace is_autocast_available (a graph break); the device types it
    # compiles for (cpu, cuda) have autocast, so the check is only needed in eager mode (meta tensors).
    if not torch.compiler.is_compiling():
        if not torch._C._is_any_autocast_enabled():  # the common eager case in one call
            return None
        if not torch.amp.is_autocast_available(device_type):
            return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return _env("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton is not importable ({e})"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    """Why Triton cannot run on `device`, or None when it can."""
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors need TRITON_INTERPRET=1 to run Triton kernels"
    return f"Triton kernels do not run on {device.type} tensors"


def cuda_unavailable(device: torch.device, build_if_missing: bool) -> str | None:
    """Why the CUDA C++ extension cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device.type} tensors"
    from . import _ext

    ok, why = _ext.available(build_if_missing=build_if_missing)
    return None if ok else why


def backward_backend(cuda_backward: bool) -> str:
    """The backend a backward op should use, captured while the forward runs (autograd runs CUDA
    backward on its own thread, where use_backend() is not set; a compiled backward bakes it in as
    an op argument). Ops whose backward has no CUDA C++ kernel run the Triton backward for "cuda":
    that is the cuda backend's design, not a fallback."""
    req = requested_backend()
    return "triton" if req == "cuda" and not cuda_backward else req


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)


def dispatch(op: str, device: torch.device, impls: dict[str, Callable[[], str | None]],
             requested: str | None = None) -> str:
    """Pick the backend for one call of `op`.

    `impls` maps backend name -> a function returning None if that backend can take this call,
    else the reason it cannot. `requested` overrides the context/env choice (backward ops pass the
    forward's: autograd runs CUDA backward on its own thread, where use_backend() is not set).
    Returns the chosen name.
    """
    req = _check_name(requested) if requested else requested_backend()
    order = _auto_order(device) if req == "auto" else (req, *[b for b in _auto_order(device) if b != req])
    if "torch" not in order:
        order = (*order, "torch")
    reasons = []
    for name in order:
        if name not in impls:
            why = f"{op} has no {name} implementation"
        elif name == "cuda":
            why = cuda_unavailable(device, build_if_missing=(req == "cuda")) or impls[name]()
        elif name == "triton":
            why = triton_unavailable(device) or impls[name]()
        else:
            why = impls[name]()
        if why is None:
            if reasons:
                _note_fallback(op, req, name, reasons, device)
            return name
        reasons.append((name, why))
    raise BackendUnavailable(f"peftkern.{op}: no backend can take this call: {reasons}")


_ENV_KEYS = (b"PEFTKERN_BACKEND", b"PEFTKERN_STRICT", b"TRITON_INTERPRET")


def choice_key():
    """Everything a backend choice depends on besides the device and the op: the use_backend request and the raw
    PEFTKERN_BACKEND / PEFTKERN_STRICT / TRITON_INTERPRET values. Cheap enough to build per call (an eager op
    looks its backends up by it instead of choosing them again)."""
    if _ENV is None:
        return _requested.get(), *(os.environ.get(k.decode()) for k in _ENV_KEYS)
    return _requested.get(), _ENV.get(_ENV_KEYS[0]), _ENV.get(_ENV_KEYS[1]), _ENV.get(_ENV_KEYS[2])


def _note_fallback(op: str, req: str, chosen: str, reasons: list[tuple[str, str]], device) -> None:
    explicit = req != "auto"
    first, why = reasons[0]
    if explicit and strict():
        raise BackendUnavailable(f"peftkern.{op}: backend {first!r} cannot take this call: {why}")
    key = (op, first, why)
    if key in _logged:
        return
    _logged.add(key)
    level = logging.WARNING if explicit or (chosen == "torch" and device.type == "cuda") else logging.INFO
    log.log(level, "peftkern.%s: %s backend cannot take this call (%s); using %s", op, first, why, chosen)
