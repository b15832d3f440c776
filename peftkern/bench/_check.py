"""Elementwise correctness of every peftkern row a benchmark posts.

A row may post a time only if its outputs hold on the inputs it was timed on. The rule is
flash-attention's (DESIGN.md, tests/_util.py): for the forward output and every gradient,

    max |peftkern - ref| <= 2 * max |torch in the same dtype - ref| + TINY * max(1, max |ref|)

where `ref` is the same math in fp64 (fp32 for the e2e model at half precision, where fp32 is exact
enough and fp64 attention would not fit), on the same inputs, with the kernel's own dropout mask.
A mean (|y| within 2%) cannot catch a kernel that drops the LoRA term: this can.

`rule(...)` returns the row fields: "check" (per tensor: err, torch_err, bound) and, when a tensor fails,
"error" naming it. The op benchmarks call `check_op`, the e2e benchmark `e2e_reference` + `e2e`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch

TINY = 1e-5


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def rule(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], same: dict[str, torch.Tensor],
         tiny: float = TINY) -> dict:
    """Row fields for outputs `got` against `ref` (high precision), bounded by `same` (torch in the same
    dtype). Keys of `ref` are the tensors checked; a missing or misshapen `got` tensor fails."""
    report, failed = {}, []
    for name, r in ref.items():
        g, s = got.get(name), same[name]
        if g is None or tuple(g.shape) != tuple(r.shape):
            failed.append(f"{name}: shape {None if g is None else tuple(g.shape)} != {tuple(r.shape)}")
            continue
        e_torch = max_err(s, r)
        scale = r.abs().max().item() if r.numel() else 0.0
        bound = 2 * e_torch + tiny * max(1.0, scale)
        finite = bool(torch.isfinite(g).all())
        err = max_err(g, r) if finite else float("inf")
        report[name] = {"err": err, "torch_err": e_torch, "bound": bound}
        if not err <= bound:
            failed.append(f"{name} max error {err:.3g} > 2 x torch's {e_torch:.3g} + tiny (bound {bound:.3g})")
    out: dict = {"check": report}
    if failed:
        out["error"] = ("elementwise check failed: " + "; ".join(failed))[:300]
    return out


def _grads(y: torch.Tensor, gy: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(y, list(leaves), gy, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, gs)]


def high(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp64 leaf copy of `t` (requires_grad kept), or None."""
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def check_op(run: Callable[[], torch.Tensor], reference: Callable[..., torch.Tensor],
             inputs: Sequence[torch.Tensor | None], names: Sequence[str], seed: int = 1234) -> dict:
    """Run the timed closure once (`run()` under torch.manual_seed(seed), reading `inputs`), then the
    `reference(*inputs)` composition in fp64 and in the inputs' own dtypes; compare the output and the
    gradient of every input that requires grad (names[i] names inputs[i]) with `rule`.

    `reference` must reproduce the provider's randomness itself (the LoRA benchmark passes the mask its
    kernel draws for the seed the op takes from torch's generator after manual_seed(seed))."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    lnames = [n for n, t in zip(names, inputs) if t is not None and t.requires_grad]
    torch.manual_seed(seed)
    y = run()
    gy = torch.randn_like(y)
    got = {"y": y.detach()}
    if leaves and y.requires_grad:
        got |= dict(zip(lnames, _grads(y, gy, leaves)))
    del y
    with contextlib.nullcontext() if len(got) > 1 else torch.no_grad():  # forward-only rows: no graph
        y_same = reference(*inputs)
        ins64 = [high(t) for t in inputs]
        y64 = reference(*ins64)
    ref, same = {"y": y64.detach()}, {"y": y_same.detach()}
    if len(got) > 1:
        leaves64 = [t for t in ins64 if t is not None and t.requires_grad]
        ref |= dict(zip(lnames, _grads(y64, gy.double(), leaves64)))
        same |= dict(zip(lnames, _grads(y_same, gy.to(y_same.dtype), leaves)))
    del y_same, y64, ins64
    return rule(got, ref, same)


# ----------------------------------------------------------------------------- end to end


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _e2e_outputs(model, ids) -> dict[str, torch.Tensor]:
    """Logits and every trainable gradient of one forward + backward with labels, in eval mode (no
    dropout: peft's masks and the kernels' differ) and use_cache=False (the training path)."""
    was_training = model.training
    params = _trainable(model)
    for _, p in params:
        p.grad = None
    model.eval()
    try:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        res = {"logits": out.logits.detach()}
        del out
        for n, p in params:
            res[n] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    finally:
        for _, p in params:
            p.grad = None
        model.train(was_training)
    return res


def e2e_reference(model, ids) -> dict:
    """peft's own outputs for `model` (not yet accelerated) on `ids`: in the model's dtype (the bound) and
    in high precision (fp64 for an fp32 model, else fp32) from a copy. Call before the first provider runs."""
    same = _e2e_outputs(model, ids)
    dtype = next(p for _, p in _trainable(model)).dtype if _trainable(model) else torch.float32
    base_dtype = next(model.parameters()).dtype
    hi = torch.float64 if base_dtype == torch.float32 or dtype == torch.float64 else torch.float32
    model_hi = copy.deepcopy(model).to(hi)
    try:
        ref = _e2e_outputs(model_hi, ids)
    finally:
        del model_hi
        if ids.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"same": same, "ref": ref}


def e2e(model, ids, reference: dict) -> dict:
    """Row fields for the accelerated `model` (same weights as when `reference` was taken)."""
    got = _e2e_outputs(model, ids)
    return rule(got, reference["ref"], reference["same"])
