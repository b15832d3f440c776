"""One report row per method: trainable parameters (peft's own count where peft has the method), and the
memory of one AdamW step (weights, grads, optimizer state, activations traced on meta) through peft / eager
and through peftkern, where `peftkern.accelerate` or `peftkern.add_adapters` really serves the model."""

from __future__ import annotations

import collections
import contextlib
import dataclasses

from torch import nn

from .models import (
    apply_method,
    build_model,
    eager_adapters,
    quant_state_tensors,
    trainable_parameters,
    use_peftkern,
    why_unavailable,
)
from .presets import ADAPTERS, BY_KEY, METHOD_KEYS, Settings, config_summary, load_config, max_tokens, to_dtype
from .tracing import traced_activation_bytes


def memory_parts(model: nn.Module, target: str) -> dict:
    """weights (every parameter in its dtype; a 4-bit weight packed, plus its quantisation state), grads and AdamW's
    exp_avg + exp_avg_sq per trainable parameter (on CPU also the 4-byte `step` per parameter tensor; on CUDA it
    stays on the host)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    tbytes = sum(p.numel() * p.element_size() for p in trainable)
    qstate = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in quant_state_tensors(model)}
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()) + sum(qstate.values()),
        "grads": tbytes,
        "optimizer": 2 * tbytes + (4 * len(trainable) if target == "cpu" else 0),
    }


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def method_row(config, method: str, batch: int, seq: int, dtype, settings: Settings | None = None,
               target: str = "cuda", base_params: int | None = None, memory: bool = True) -> dict:
    """One report row: counts, memory estimate (peft/eager and peftkern) and the serving kernel. `served`
    / `sites`: calls of the kernel in the traced forward / sites it should serve. A method this environment cannot
    build (QLoRA without bitsandbytes) is a row with only `absent`: why."""
    settings = settings or Settings()
    dtype = to_dtype(dtype)
    meth = BY_KEY[method]
    row = {"method": method, "name": meth.name, "kernel": meth.kernel or "none needed"}
    why = why_unavailable(method)
    if why is not None:
        return row | {"absent": why}
    if base_params is None:
        base_params = _n_params(build_model(config, dtype))
    try:
        model, setting = apply_method(build_model(config, dtype), config, method, settings)
    except Exception as e:  # a method the architecture cannot take is a row saying why
        return row | {"setting": "", "note": f"n/a: {type(e).__name__}: {e}"[:200]}
    row["setting"] = setting
    row["trainable"] = trainable_parameters(model)
    row["percent"] = 100.0 * row["trainable"] / base_params
    if not memory:
        return row
    mem = memory_parts(model, target)
    extra = settings.num_virtual_tokens if method == "prompt" else 0
    limit = max_tokens(config)
    if row["trainable"] == 0:
        row["note"] = "nothing to train"
        mem["activations"] = mem["activations_peftkern"] = 0
    elif limit is not None and seq + extra > limit:
        row["note"] = f"n/a: {seq}+{extra} tokens > {limit} positions"
        row["memory"] = mem
        return row
    else:
        with eager_adapters(model) if method in ADAPTERS else contextlib.nullcontext():
            mem["activations"] = traced_activation_bytes(model, config, batch, seq, target)
        mem["activations_peftkern"] = mem["activations"]
        if meth.kernel:
            sites, why = use_peftkern(model, method)
            calls: collections.Counter = collections.Counter()
            try:
                act = traced_activation_bytes(model, config, batch, seq, target, calls)
            except Exception as e:  # the integration took the model but its forward fails: not served
                calls.clear()
                why.append(f"its training forward fails: {type(e).__name__}: {e}"[:200])
            row["served"], row["sites"] = min(calls[op] for op in meth.ops), sites
            if row["served"]:
                mem["activations_peftkern"] = act
            if row["served"] < sites or why:
                row["note"] = _not_served(meth.kernel, row["served"], sites, why)
    fixed = mem["weights"] + mem["grads"] + mem["optimizer"]
    mem["total"] = fixed + mem["activations"]
    mem["total_peftkern"] = fixed + mem["activations_peftkern"]
    row["memory"] = mem
    return row


def _not_served(kernel: str, served: int, sites: int, why: list[str]) -> str:
    if served >= sites:
        return "; ".join(why)
    what = (f"{kernel} does not serve this model" if not served else
            f"{kernel} serves {served} of {sites} sites, the others run peft's forward")
    return what + (f" ({'; '.join(why)})" if why else "")


def _safe_row(config, method, *args) -> dict:
    """method_row, or a row saying why it failed: one method must not take the whole report down."""
    try:
        return method_row(config, method, *args)
    except Exception as e:  # reported in the row, not hidden
        meth = BY_KEY[method]
        return {"method": method, "name": meth.name, "kernel": meth.kernel or "none needed", "setting": "",
                "note": f"n/a: failed: {type(e).__name__}: {e}"[:200]}


def report(model: str, batch: int = 8, seq: int = 256, dtype="bfloat16", target: str = "cuda",
           methods=METHOD_KEYS, settings: Settings | None = None, memory: bool = True) -> dict:
    """The whole report for `model` (preset or config JSON path) as a dict."""
    config = load_config(model)
    settings = settings or Settings()
    dt = to_dtype(dtype)
    base_params = _n_params(build_model(config, dt))
    rows = [_safe_row(config, m, batch, seq, dt, settings, target, base_params, memory) for m in methods]
    return {"model": model, "config": config_summary(config), "base_params": base_params, "batch": batch,
            "seq": seq, "dtype": str(dt).split(".")[-1], "target": target, "settings": dataclasses.asdict(settings),
            "rows": [r for r in rows if "absent" not in r],
            "absent": {r["method"]: r["absent"] for r in rows if "absent" in r}}
