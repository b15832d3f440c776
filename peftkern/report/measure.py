"""`--measure`: a real training step of a scaled-down model of the same architecture on the current device,
beside the estimate for it: on CUDA the peak of `max_memory_allocated` over a step and the growth of
`memory_allocated` over the forward; on CPU the bytes saved for backward plus parameters, grads and AdamW."""

from __future__ import annotations

import contextlib
import warnings

import torch

from .._memory import saved_bytes
from .estimate import method_row
from .models import apply_method, build_model, eager_adapters, quant_state_tensors, use_peftkern
from .presets import ADAPTERS, METHOD_KEYS, Settings, config_summary, load_config, scaled_down, to_dtype
from .tracing import example_inputs, training_loss


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_step(config, method: str, batch: int, seq: int, dtype, device, settings: Settings,
                 peftkern: bool = False) -> dict:
    """Measured bytes of one AdamW training step of `config` (a small one) on `device`; `peftkern`: with the
    model routed through peftkern as `use_peftkern` does, else peft's path (adapters in plain torch)."""
    device = torch.device(device)
    dtype = to_dtype(dtype)
    torch.manual_seed(0)
    model, _ = apply_method(build_model(config, dtype, device=device, attn="sdpa"), config, method, settings)
    if peftkern:
        use_peftkern(model, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = example_inputs(config, batch, seq, device=device)
    eager = eager_adapters(model) if method in ADAPTERS and not peftkern else contextlib.nullcontext()
    res = {}
    with eager, warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def step():
            loss = training_loss(model, config, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        if device.type == "cuda":
            step()  # warm-up: optimizer state and grads exist from here on
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss = training_loss(model, config, inputs)
            torch.cuda.synchronize(device)
            res["activations"] = torch.cuda.memory_allocated(device) - before
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            del loss
            torch.cuda.synchronize(device)
            res["total"] = torch.cuda.max_memory_allocated(device)
            res["how"] = "CUDA max_memory_allocated over a step; activations = memory_allocated growth over forward"
        else:
            exclude = [*model.parameters(), *model.buffers()]
            res["activations"] = saved_bytes(lambda: training_loss(model, config, inputs), exclude)
            step()
            res["weights"] = _storage_bytes([*model.parameters(), *quant_state_tensors(model)])
            res["grads"] = _storage_bytes(p.grad for p in params)
            res["optimizer"] = _storage_bytes(v for s in opt.state.values() for v in s.values())
            res["total"] = res["weights"] + res["grads"] + res["optimizer"] + res["activations"]
            res["how"] = "CPU: peftkern._memory.saved_bytes of the forward + param/grad/optimizer bytes"
    return res


def measure(model: str, batch: int = 8, seq: int = 256, dtype="bfloat16", device=None,
            methods=METHOD_KEYS, settings: Settings | None = None) -> dict:
    """Estimate vs measured on a scaled-down model of `model` on `device` (default: cuda if available);
    methods that peftkern serves on that model are measured through peftkern too."""
    settings = settings or Settings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = scaled_down(load_config(model))
    rows = []
    for m in methods:
        est = method_row(small, m, batch, seq, dtype, settings, target=device.type)
        if "absent" in est:
            rows.append({"method": m, "note": "no row: " + est["absent"]})
            continue
        if "memory" not in est or est.get("note", "").startswith("n/a") or est["trainable"] == 0:
            rows.append({"method": m, "note": est.get("note", "n/a")})
            continue
        row = {"method": m, "estimate": est["memory"], "measured": measure_step(small, m, batch, seq, dtype,
                                                                                device, settings)}
        if est.get("served"):
            try:
                row["measured_peftkern"] = measure_step(small, m, batch, seq, dtype, device, settings, peftkern=True)
            except Exception as e:  # a kernel failing here is reported, not hidden
                row["measured_peftkern"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
    return {"model": model, "scaled_down": config_summary(small), "device": str(device), "batch": batch, "seq": seq,
            "dtype": str(to_dtype(dtype)).split(".")[-1], "rows": rows}
