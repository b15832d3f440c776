"""Input checks shared by the ops: a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dim(s), got shape {tuple(t.shape)}")


def same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}: move them to one device")


def probability(name: str, p) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")


def number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")


def linear_base(x, weight, bias) -> tuple[int, int]:
    """Checks x (..., in), weight (out, in), bias (out,) or None as a frozen linear takes them;
    returns (out, in)."""
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    if bias is not None:
        tensor("bias", bias, ndim=1)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects in={in_f}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}: cast x to the base layer's dtype")
    if bias is not None:
        if bias.shape[0] != out_f:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}")
    return out_f, in_f


def _lora_linear_ok(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> bool:
    """The common, valid call, checked in a few attribute reads (the checks below name what is wrong)."""
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T) and isinstance(lora_B, T)):
        return False
    if type(scaling) not in (float, int) or type(dropout_p) not in (float, int) or not 0.0 <= dropout_p < 1.0:
        return False
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype or lora_A.dtype not in FLOAT_DTYPES:
        return False
    if lora_B.dtype != lora_A.dtype or x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return False
    (out_f, in_f), (r, a_in) = weight.shape, lora_A.shape
    if x.shape[-1] != in_f or a_in != in_f or lora_B.shape != (out_f, r) or not 1 <= r <= min(in_f, out_f):
        return False
    dev = x.device
    if weight.device != dev or lora_A.device != dev or lora_B.device != dev:
        return False
    return bias is None or (isinstance(bias, T) and bias.dtype == x.dtype and bias.shape == (out_f,)
                            and bias.device == dev)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    if _lora_linear_ok(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        return
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    if bias is not None:
        tensor("bias", bias, ndim=1)
    tensor("lora_A", lora_A, ndim=2)
    tensor("lora_B", lora_B, ndim=2)
    number("scaling", scaling)
    probability("dropout_p", dropout_p)
    same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    out_f, in_f = linear_base(x, weight, bias)
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}, expected (r, {in_f})")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected ({out_f}, {r}) (out, r)")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}: adapters share one dtype")
    if r < 1 or r > min(in_f, out_f):
        raise ValueError(f"rank r={r} (lora_A.shape[0]) must be in [1, min(in, out)={min(in_f, out_f)}]")
