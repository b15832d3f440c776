"""The harness every op microbenchmark runs on (`peftkern bench lora|ia3|adapter|prefix`).

An op's bench module is a spec: its cases (PRESETS, QUICK), the shape fields of its rows, and per case a
`Setup`: the activations the providers read, the baselines (peft's layer or the eager composition,
torch.compile of it, the floor), the peftkern call (run once per backend), the elementwise check of a peftkern
row (bench/_check.py) and the work per forward (FLOPs, the byte floor). This module does the rest the same way
for every op: one row per provider and case, skipped providers with the reason, each peftkern row checked before
it is timed (`_timing.provider_rows`), training rows timed fwd / bwd / full with saved and peak bytes
(`_timing.measure_train`), inference rows timed forward-only under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _backend
from ._timing import cuda_why_not, measure_train, provider_rows, triton_why_not

COMPILE_SKIPPED = "skipped on CPU (slow to compile; pass --compile)"


@dataclass
class Provider:
    """A provider with its own activations instead of the case's (e.g. keys already concatenated)."""

    fn: Callable
    inputs: Sequence[torch.Tensor | None]


@dataclass
class Setup:
    """One case of an op benchmark, as its spec builds it.

    inputs: the activations every provider is called with (`fn(*inputs)`); each check and each timing gets
        fresh leaves of them (same storage), requiring grad in training cases.
    baselines: name -> provider (a callable on `inputs`, a `Provider`, or a string: why it is skipped), in the
        order of the rows; they are timed, never checked.
    op: the peftkern call on `inputs`; a `peftkern-<backend>` row each, checked then timed.
    check: (provider name, run, leaves) -> row fields, `_check.check_op`'s: `run()` calls the provider on
        `leaves` (under no_grad in inference cases).
    params: the tensors the providers read besides `inputs` (weights, adapters): their gradients are cleared
        between timed runs and they are not counted as saved activations.
    train: a training step (fwd / bwd / full) or inference (forward under no_grad).
    count_saved_inputs: whether autograd saving the inputs counts in saved_bytes (False where the inputs are
        what the step keeps anyway, like attention's q / k / v).
    cuda_refused: why the cuda backend does not take this case (its kernel's limits), or None.
    work: fields added to timed training rows (flops_fwd, bytes_fwd_min).
    """

    inputs: Sequence[torch.Tensor | None]
    baselines: dict[str, Callable | Provider | str]
    op: Callable
    check: Callable[[str, Callable[[], torch.Tensor], list], dict]
    params: Sequence[torch.Tensor | None] = ()
    train: bool = True
    count_saved_inputs: bool = True
    cuda_refused: str | None = None
    work: dict[str, int] = field(default_factory=dict)


@dataclass
class OpSpec:
    """What makes one op's benchmark: `op` (the rows' op field), `presets` / `quick` (preset name -> cases,
    each with a `name`; quick presets fall back to the full one), `shape(case)` (the rows' shape fields; the
    dtype is added after them), `setup(case, dtype, device, compile_baseline) -> Setup`, and `notes` (provider
    -> a note on its rows)."""

    op: str
    presets: dict[str, list]
    quick: dict[str, list]
    shape: Callable[[Any], dict]
    setup: Callable[..., Setup]
    notes: dict[str, str] = field(default_factory=dict)


def compiled(enabled: bool, target: Callable, call: Callable | None = None) -> Callable | str:
    """torch.compile of `target` as a baseline provider (`call(compiled, *inputs)` when given, else the
    compiled callable itself), or why it is skipped."""
    if not enabled:
        return COMPILE_SKIPPED
    fn = torch.compile(target)
    if call is None:
        return fn
    return lambda *a: call(fn, *a)


def run(spec: OpSpec, preset: str, dtype, device, quick: bool, timeit, peak_bytes, progress,
        compile_baseline: bool) -> list[dict]:
    """The rows of `spec`'s benchmark: the signature of every op module's `run` (peftkern/cli.py calls it)."""
    rows = []
    for case in (spec.quick.get(preset) if quick else None) or spec.presets[preset]:
        setup = spec.setup(case, dtype, device, compile_baseline)
        shape = spec.shape(case) | {"dtype": str(dtype).split(".")[-1]}
        provs = dict(setup.baselines)
        for name in _backend.BACKENDS:
            provs[f"peftkern-{name}"] = _why_not(name, setup, device) or _bound(name, setup.op)

        def measure(prov, setup=setup):
            return _measure(prov, setup, device, quick, timeit, peak_bytes)

        def check(name, prov, setup=setup):
            fn, ins = _resolve(prov, setup)
            leaves = _leaves(ins, setup.train)

            def run():
                if setup.train:
                    return fn(*leaves)
                with torch.no_grad():
                    return fn(*leaves)

            return setup.check(name, run, leaves)

        case_rows = provider_rows(spec.op, case.name, shape, provs, measure, progress, check=check)
        for row in case_rows:
            if row["provider"] in spec.notes:
                row["note"] = spec.notes[row["provider"]]
        rows += case_rows
    return rows


def _why_not(name: str, setup: Setup, device) -> str | None:
    if name == "triton":
        return triton_why_not(device)
    if name == "cuda":
        if device.type == "cuda" and setup.cuda_refused:
            return setup.cuda_refused
        return cuda_why_not(device)
    return None


def _bound(backend: str, fn: Callable) -> Callable:
    def run(*inputs):
        with _backend.use_backend(backend):
            return fn(*inputs)

    return run


def _resolve(prov, setup: Setup) -> tuple[Callable, Sequence[torch.Tensor | None]]:
    if isinstance(prov, Provider):
        return prov.fn, prov.inputs
    return prov, setup.inputs


def _leaves(inputs, requires_grad: bool) -> list[torch.Tensor | None]:
    """Fresh leaves over the inputs' storage: no gradient or graph carries over between providers."""
    return [None if t is None else t.detach().requires_grad_(requires_grad) for t in inputs]


def _measure(prov, setup: Setup, device, quick: bool, timeit, peak_bytes) -> dict:
    fn, ins = _resolve(prov, setup)
    if not setup.train:
        with torch.no_grad():
            return {"fwd": timeit(lambda: fn(*ins), device, quick)}
    leaves = _leaves(ins, True)
    live = [t for t in leaves if t is not None]
    params = [p for p in setup.params if p is not None]
    grads = [*live, *[p for p in params if p.requires_grad]]
    exclude = params if setup.count_saved_inputs else [*live, *params]
    res = measure_train(lambda: fn(*leaves), grads, exclude, device, quick, timeit, peak_bytes)
    return res | setup.work
