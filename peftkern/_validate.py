"""Input checks shared by the ops: a clear error naming the argument, before any kernel runs.

One set of checks serves three callers, so an error reads the same whichever way a call arrives:
  * the public wrappers (peftkern.ops.<name>), which first check what only Python sees (a list where a
    tensor belongs, a tensor where a float belongs);
  * the custom-op bodies (torch.ops.peftkern.<name> called directly), before any backend launches;
  * the fake (meta) kernels, so torch.compile rejects a bad call while tracing.
Every condition goes through `_req`, i.e. `torch._check_with`: on concrete shapes it is one identity test
when the condition holds, and under torch.compile a symbolic condition becomes a guard or a runtime
assert instead of a data-dependent error. ValueError for a wrong shape or value, TypeError for a wrong
type or dtype, as the wrappers always raised.
"""

from __future__ import annotations

import torch

from .reference.adapter import ACTIVATIONS, compute_dtype

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _req(cond, err: type[Exception], msg) -> None:
    """torch._check_with(err, cond, msg), for a condition that is almost always a plain True."""
    if cond is True:
        return
    # torch 2.11 takes only a callable message (a str raises TypeError there)
    torch._check_with(err, cond, msg if callable(msg) else lambda: msg)


def _shape(t) -> tuple:
    return tuple(t.shape)


def _dims_equal(t, want, err_msg) -> None:
    """t.shape == want, dim by dim (a tuple compare would force symbolic dims to concrete values)."""
    _req(t.dim() == len(want), ValueError, err_msg)
    for got, w in zip(t.shape, want):
        _req(got == w, ValueError, err_msg)


def tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _req(t.dtype in FLOAT_DTYPES, TypeError, lambda: f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if ndim is not None:
        _req(t.dim() == ndim, ValueError, lambda: f"{name} must be {ndim}-D, got shape {_shape(t)}")
    if min_ndim is not None:
        _req(t.dim() >= min_ndim, ValueError,
             lambda: f"{name} must have at least {min_ndim} dim(s), got shape {_shape(t)}")


def same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        _req(dev == first, ValueError,
             lambda name=name, dev=dev: f"{name} is on {dev} but {first_name} is on {first}: move them to one device")


def probability(name: str, p) -> None:
    _req(isinstance(p, (int, float)) and 0.0 <= float(p) < 1.0, ValueError,
         lambda: f"{name} must be a float in [0, 1), got {p!r}")


def number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")


def flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _seed_ok(s) -> bool:
    return s is None or (isinstance(s, torch.Tensor) and s.dtype in _INT_DTYPES and s.numel() == 1)


def seed(name: str, s) -> None:
    """A dropout seed: None or a one-element integer tensor (on any device: it is read on the host)."""
    if s is None:
        return
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(s).__name__}")
    _req(s.dtype in _INT_DTYPES, TypeError, lambda: f"{name} must be an integer tensor, got {s.dtype}")
    _req(s.numel() == 1, ValueError, lambda: f"{name} must have one element, got shape {_shape(s)}")


def backend_name(name) -> None:
    """The `backend` argument of a backward op (the one requested around the forward)."""
    from ._backend import BACKENDS

    _req(name in (*BACKENDS, "auto"), ValueError,
         lambda: f"unknown peftkern backend {name!r}: choose one of {BACKENDS + ('auto',)}")


def linear_base(x, weight, bias) -> tuple[int, int]:
    """Checks x (..., in), weight (out, in), bias (out,) or None as a frozen linear takes them;
    returns (out, in)."""
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    if bias is not None:
        tensor("bias", bias, ndim=1)
    out_f, in_f = weight.shape
    _req(x.shape[-1] == in_f, ValueError,
         lambda: f"x has {x.shape[-1]} features in its last dim but weight expects in={in_f}")
    _req(x.dtype == weight.dtype, TypeError,
         lambda: f"x is {x.dtype} but weight is {weight.dtype}: cast x to the base layer's dtype")
    if bias is not None:
        _req(bias.shape[0] == out_f, ValueError, lambda: f"bias has shape {_shape(bias)}, expected ({out_f},)")
        _req(bias.dtype == weight.dtype, TypeError, lambda: f"bias is {bias.dtype} but weight is {weight.dtype}")
    return out_f, in_f


# ------------------------------------------------------------------------------------------------ LoRA


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
    if x.shape[-1] != in_f or a_in != in_f or lora_B.shape != (out_f, r) or r < 1:
        return False
    dev = x.device
    if weight.device != dev or lora_A.device != dev or lora_B.device != dev:
        return False
    return bias is None or (isinstance(bias, T) and bias.dtype == x.dtype and bias.shape == (out_f,)
                            and bias.device == dev)


def _lora_adapters(lora_A, lora_B, out_f, in_f) -> None:
    r = lora_A.shape[0]
    _req(lora_A.shape[1] == in_f, ValueError, lambda: f"lora_A has shape {_shape(lora_A)}, expected (r, {in_f})")
    _dims_equal(lora_B, (out_f, r), lambda: f"lora_B has shape {_shape(lora_B)}, expected ({out_f}, {r}) (out, r)")
    _req(lora_A.dtype == lora_B.dtype, TypeError,
         lambda: f"lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}: adapters share one dtype")
    # Any rank peft accepts: r may exceed min(in, out) (the product is then not full rank; the math is the same).
    _req(r >= 1, ValueError, lambda: f"rank r={r} (lora_A.shape[0]) must be >= 1")


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """peftkern.ops.lora_linear / peftkern::lora_linear: the common valid call in a few attribute reads, else
    every check (the first failing one raises)."""
    if not _lora_linear_ok(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
        lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)


def lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
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
    _lora_adapters(lora_A, lora_B, out_f, in_f)


def _lora_linear_backward_ok(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, dropout_seed) -> bool:
    T = torch.Tensor
    if not (isinstance(dy, T) and isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T)
            and isinstance(lora_B, T) and isinstance(t, T) and _seed_ok(dropout_seed)):
        return False
    if type(scaling) not in (float, int) or type(dropout_p) not in (float, int) or not 0.0 <= dropout_p < 1.0:
        return False
    dt = x.dtype
    if dt not in FLOAT_DTYPES or weight.dtype != dt or dy.dtype != dt or lora_A.dtype not in FLOAT_DTYPES:
        return False
    if lora_B.dtype != lora_A.dtype or t.dtype != torch.float32:
        return False
    if x.dim() < 1 or dy.dim() != x.dim() or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return False
    (out_f, in_f), (r, a_in) = weight.shape, lora_A.shape
    if x.shape[-1] != in_f or a_in != in_f or lora_B.shape != (out_f, r) or r < 1:
        return False
    lead = x.shape[:-1]
    if dy.shape[-1] != out_f or dy.shape[:-1] != lead or t.shape != (lead.numel(), r):
        return False
    dev = x.device
    return (dy.device == dev and weight.device == dev and lora_A.device == dev and lora_B.device == dev
            and t.device == dev)


def lora_linear_backward(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, dropout_seed) -> None:
    if not _lora_linear_backward_ok(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, dropout_seed):
        lora_linear_backward_args(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, dropout_seed)


def lora_linear_backward_args(dy, x, weight, lora_A, lora_B, t, scaling, dropout_p, dropout_seed) -> None:
    """peftkern::lora_linear_backward: dy (..., out) as the forward's y, x (..., in), t (M, r) fp32."""
    tensor("dy", dy, min_ndim=1)
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    tensor("lora_A", lora_A, ndim=2)
    tensor("lora_B", lora_B, ndim=2)
    _req(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 2, TypeError,
         lambda: f"t must be the forward's 2-D float32 (M, r) tensor, got {getattr(t, 'dtype', t)!r}")
    number("scaling", scaling)
    probability("dropout_p", dropout_p)
    seed("seed", dropout_seed)
    same_device(dy=dy, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, t=t)
    out_f, in_f = linear_base(x, weight, None)
    _lora_adapters(lora_A, lora_B, out_f, in_f)
    _dims_equal(dy, (*x.shape[:-1], out_f), lambda: f"dy has shape {_shape(dy)}, expected {(*_shape(x)[:-1], out_f)}"
                                                    " (x's leading dims, out)")
    _req(dy.dtype == x.dtype, TypeError, lambda: f"dy is {dy.dtype} but x is {x.dtype}")
    m = x.shape[:-1].numel()
    _dims_equal(t, (m, lora_A.shape[0]), lambda: f"t has shape {_shape(t)}, expected ({m}, {lora_A.shape[0]}) (M, r)")


# ----------------------------------------------------------------------------------- 8-bit dequantisation


def _dequantize_8bit_ok(CB, SCB, dtype) -> bool:
    T = torch.Tensor
    if not (isinstance(CB, T) and isinstance(SCB, T)) or dtype not in FLOAT_DTYPES:
        return False
    if CB.dtype != torch.int8 or SCB.dtype != torch.float32 or CB.dim() != 2 or SCB.dim() != 1:
        return False
    return SCB.shape[0] == CB.shape[0] and SCB.device == CB.device


def dequantize_8bit(CB, SCB, dtype) -> None:
    """peftkern::dequantize_8bit: CB (out, in) int8, SCB (out,) float32 on CB's device, dtype a float dtype. The
    common valid call in a few attribute reads, else every check (the first failing one raises)."""
    if not _dequantize_8bit_ok(CB, SCB, dtype):
        dequantize_8bit_args(CB, SCB, dtype)


def dequantize_8bit_args(CB, SCB, dtype) -> None:
    for name, t in (("CB", CB), ("SCB", SCB)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _req(CB.dtype == torch.int8, TypeError,
         lambda: f"CB must be int8 (bitsandbytes' quantised Linear8bitLt weight), got {CB.dtype}")
    _req(CB.dim() == 2, ValueError, lambda: f"CB must be 2-D (out, in), got shape {_shape(CB)}")
    _req(SCB.dtype == torch.float32, TypeError, lambda: f"SCB must be float32 (one absmax per row), got {SCB.dtype}")
    _req(SCB.dim() == 1, ValueError, lambda: f"SCB must be 1-D (out,), got shape {_shape(SCB)}")
    _req(SCB.shape[0] == CB.shape[0], ValueError,
         lambda: f"SCB has shape {_shape(SCB)}, expected ({CB.shape[0]},): one scale per row of CB")
    same_device(CB=CB, SCB=SCB)
    _req(dtype in FLOAT_DTYPES, TypeError, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")


def lora_linear_4bit_decode(x, data, code, absmax, shape, bias, lora_A, lora_B, scaling) -> None:
    """peftkern::lora_linear_4bit_decode: x (..., in) float, packed 4-bit `data` (uint8, at least ceil(out·in/2)
    bytes) of an (out, in) weight with a 16-entry code table and fp32 absmax, bias (out,) in x's dtype or None,
    lora_A (r, in), lora_B (out, r), all on x's device."""
    tensor("x", x, min_ndim=1)
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    _req(data.dtype == torch.uint8, TypeError, lambda: f"data must be uint8 (two 4-bit codes a byte), got {data.dtype}")
    _req(len(shape) == 2, ValueError, lambda: f"shape must be (out, in), got {list(shape)}")
    out_f, in_f = shape
    _req(data.numel() * 2 >= out_f * in_f, ValueError,
         lambda: f"data has {data.numel()} bytes, an ({out_f}, {in_f}) weight needs {(out_f * in_f + 1) // 2}")
    _req(isinstance(code, torch.Tensor) and code.numel() == 16, ValueError, "code must be a 16-entry tensor")
    _req(isinstance(absmax, torch.Tensor) and absmax.dtype in (torch.float32, torch.uint8), TypeError,
         "absmax must be float32 (or uint8 with double quantisation)")
    if bias is not None:
        tensor("bias", bias, ndim=1)
        _req(bias.shape[0] == out_f and bias.dtype == x.dtype, ValueError,
             lambda: f"bias must be ({out_f},) in x's dtype {x.dtype}, got {_shape(bias)} {bias.dtype}")
    tensor("lora_A", lora_A, ndim=2)
    tensor("lora_B", lora_B, ndim=2)
    number("scaling", scaling)
    _req(x.shape[-1] == in_f, ValueError, lambda: f"x has {x.shape[-1]} features in its last dim, the weight {in_f}")
    _lora_adapters(lora_A, lora_B, out_f, in_f)
    same_device(x=x, data=data, absmax=absmax, bias=bias, lora_A=lora_A, lora_B=lora_B)


# ------------------------------------------------------------------------------------------------- IA3


def _ia3_l(ia3_l, x_dtype, want, feedforward) -> None:
    def msg():
        what = "in (feedforward=True scales the input)" if feedforward else "out (feedforward=False scales the output)"
        return f"ia3_l has shape {_shape(ia3_l)}, expected ({want},) = {what}"

    _req(ia3_l.shape[0] == want, ValueError, msg)
    _req(ia3_l.dtype in (torch.float32, x_dtype), TypeError,
         lambda: f"ia3_l is {ia3_l.dtype}: it must be float32 or x's dtype ({x_dtype})")


def _ia3_linear_ok(x, weight, bias, ia3_l, feedforward) -> bool:
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(weight, T) and isinstance(ia3_l, T)) or type(feedforward) is not bool:
        return False
    dt = x.dtype
    if dt not in FLOAT_DTYPES or weight.dtype != dt or ia3_l.dtype not in (torch.float32, dt):
        return False
    if x.dim() < 1 or weight.dim() != 2 or ia3_l.dim() != 1:
        return False
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f or ia3_l.shape[0] != (in_f if feedforward else out_f):
        return False
    dev = x.device
    if weight.device != dev or ia3_l.device != dev:
        return False
    return bias is None or (isinstance(bias, T) and bias.dtype == dt and bias.shape == (out_f,) and bias.device == dev)


def ia3_linear(x, weight, bias, ia3_l, feedforward) -> None:
    """peftkern.ops.ia3_linear / peftkern::ia3_linear: the common valid call in a few attribute reads, else every
    check (the first failing one raises)."""
    if not _ia3_linear_ok(x, weight, bias, ia3_l, feedforward):
        ia3_linear_args(x, weight, bias, ia3_l, feedforward)


def ia3_linear_args(x, weight, bias, ia3_l, feedforward) -> None:
    tensor("x", x, min_ndim=1)
    tensor("weight", weight, ndim=2)
    if bias is not None:
        tensor("bias", bias, ndim=1)
    tensor("ia3_l", ia3_l, ndim=1)
    flag("feedforward", feedforward)
    same_device(x=x, weight=weight, bias=bias, ia3_l=ia3_l)
    out_f, in_f = linear_base(x, weight, bias)
    _ia3_l(ia3_l, x.dtype, in_f if feedforward else out_f, feedforward)


def _ia3_linear_backward_ok(dy, saved, weight, ia3_l, feedforward, need_dl) -> bool:
    T = torch.Tensor
    if not (isinstance(dy, T) and isinstance(weight, T) and isinstance(ia3_l, T)) or type(feedforward) is not bool:
        return False
    dt = dy.dtype
    if dt not in FLOAT_DTYPES or weight.dtype != dt or ia3_l.dtype not in (torch.float32, dt):
        return False
    if dy.dim() < 1 or weight.dim() != 2 or ia3_l.dim() != 1:
        return False
    out_f, in_f = weight.shape
    n = in_f if feedforward else out_f
    if dy.shape[-1] != out_f or ia3_l.shape[0] != n:
        return False
    dev = dy.device
    if weight.device != dev or ia3_l.device != dev:
        return False
    if saved is None:
        return not need_dl
    return (isinstance(saved, T) and saved.dtype == dt and saved.dim() == dy.dim() and saved.shape[-1] == n
            and saved.shape[:-1] == dy.shape[:-1] and saved.device == dev)


def ia3_linear_backward(dy, saved, weight, ia3_l, feedforward, need_dl) -> None:
    if not _ia3_linear_backward_ok(dy, saved, weight, ia3_l, feedforward, need_dl):
        ia3_linear_backward_args(dy, saved, weight, ia3_l, feedforward, need_dl)


def ia3_linear_backward_args(dy, saved, weight, ia3_l, feedforward, need_dl) -> None:
    """peftkern::ia3_linear_backward: dy (..., out); saved = the forward's y (..., out), or x (..., in) when
    feedforward; saved may be None only when need_dl is False."""
    tensor("dy", dy, min_ndim=1)
    tensor("weight", weight, ndim=2)
    tensor("ia3_l", ia3_l, ndim=1)
    flag("feedforward", feedforward)
    if saved is None:
        _req(not need_dl, ValueError, lambda: "saved is None but need_dl is True: dl reads the saved y (or x)")
    else:
        tensor("saved", saved, min_ndim=1)
    same_device(dy=dy, saved=saved, weight=weight, ia3_l=ia3_l)
    out_f, in_f = weight.shape
    _req(dy.shape[-1] == out_f, ValueError, lambda: f"dy has {dy.shape[-1]} features but weight has out={out_f}")
    _req(dy.dtype == weight.dtype, TypeError, lambda: f"dy is {dy.dtype} but weight is {weight.dtype}")
    if saved is not None:
        want = (*dy.shape[:-1], in_f if feedforward else out_f)
        _dims_equal(saved, want, lambda: f"saved has shape {_shape(saved)}, expected {tuple(want)} "
                                         f"({'x' if feedforward else 'y'} of the forward)")
        _req(saved.dtype == dy.dtype, TypeError, lambda: f"saved is {saved.dtype} but dy is {dy.dtype}")
    _ia3_l(ia3_l, dy.dtype, in_f if feedforward else out_f, feedforward)


# ---------------------------------------------------------------------------------- bottleneck adapter


def _adapter_weights(x, down_weight, up_weight, down_bias=None, up_bias=None) -> None:
    d = x.shape[-1]
    r = down_weight.shape[0]
    _req(r >= 1, ValueError, lambda: f"down_weight has shape {_shape(down_weight)}: the bottleneck r must be >= 1")
    _req(down_weight.shape[1] == d, ValueError,
         lambda: f"down_weight has shape {_shape(down_weight)}, expected (r, {d}) for x with d={d}")
    _dims_equal(up_weight, (d, r), lambda: f"up_weight has shape {_shape(up_weight)}, expected ({d}, {r}) (d, r)")
    if down_bias is not None:
        _dims_equal(down_bias, (r,), lambda: f"down_bias has shape {_shape(down_bias)}, expected ({r},)")
    if up_bias is not None:
        _dims_equal(up_bias, (d,), lambda: f"up_bias has shape {_shape(up_bias)}, expected ({d},)")


def _adapter_dtypes(x, down_weight, up_weight, down_bias=None, up_bias=None) -> None:
    pdt = down_weight.dtype
    for name, t in (("up_weight", up_weight), ("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None:
            _req(t.dtype == pdt, TypeError, lambda name=name, t=t:
                 f"{name} is {t.dtype} but down_weight is {pdt}: the adapter tensors share one dtype")
    _req(pdt in (x.dtype, torch.float32), TypeError,
         lambda: f"adapter tensors are {pdt} but x is {x.dtype}: use x's dtype or float32 for the adapter")


def _activation(activation) -> None:
    _req(activation in ACTIVATIONS, ValueError, lambda: f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _bottleneck_adapter_ok(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling) -> bool:
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(down_weight, T) and isinstance(up_weight, T)):
        return False
    if type(scaling) not in (float, int) or type(activation) is not str or activation not in ACTIVATIONS:
        return False
    dt, pdt = x.dtype, down_weight.dtype
    if dt not in FLOAT_DTYPES or pdt not in (dt, torch.float32) or up_weight.dtype != pdt:
        return False
    if x.dim() < 1 or down_weight.dim() != 2 or up_weight.dim() != 2:
        return False
    r, d = down_weight.shape
    if r < 1 or x.shape[-1] != d or up_weight.shape != (d, r):
        return False
    dev = x.device
    if down_weight.device != dev or up_weight.device != dev:
        return False
    if down_bias is not None and not (isinstance(down_bias, T) and down_bias.dtype == pdt
                                      and down_bias.shape == (r,) and down_bias.device == dev):
        return False
    if up_bias is not None and not (isinstance(up_bias, T) and up_bias.dtype == pdt and up_bias.shape == (d,)
                                    and up_bias.device == dev):
        return False
    return residual is None or (isinstance(residual, T) and residual.dtype == dt and residual.shape == x.shape
                                and residual.device == dev)


def bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling) -> None:
    """peftkern.ops.bottleneck_adapter / peftkern::bottleneck_adapter: the common valid call in a few attribute
    reads, else every check (the first failing one raises)."""
    if not _bottleneck_adapter_ok(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling):
        bottleneck_adapter_args(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling)


def bottleneck_adapter_args(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling) -> None:
    tensor("x", x, min_ndim=1)
    tensor("down_weight", down_weight, ndim=2)
    tensor("up_weight", up_weight, ndim=2)
    if down_bias is not None:
        tensor("down_bias", down_bias, ndim=1)
    if up_bias is not None:
        tensor("up_bias", up_bias, ndim=1)
    if residual is not None:
        tensor("residual", residual)
    number("scaling", scaling)
    _activation(activation)
    same_device(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias,
                residual=residual)
    _adapter_weights(x, down_weight, up_weight, down_bias, up_bias)
    if residual is not None:
        _dims_equal(residual, _shape(x), lambda: f"residual has shape {_shape(residual)} but x has {_shape(x)}")
        _req(residual.dtype == x.dtype, TypeError,
             lambda: f"residual is {residual.dtype} but x is {x.dtype}: they must share a dtype")
    _adapter_dtypes(x, down_weight, up_weight, down_bias, up_bias)


def _bottleneck_adapter_backward_ok(dy, x, z, down_weight, up_weight, activation, scaling) -> bool:
    T = torch.Tensor
    if not (isinstance(dy, T) and isinstance(x, T) and isinstance(z, T) and isinstance(down_weight, T)
            and isinstance(up_weight, T)):
        return False
    if type(scaling) not in (float, int) or type(activation) is not str or activation not in ACTIVATIONS:
        return False
    dt, pdt = x.dtype, down_weight.dtype
    if dt not in FLOAT_DTYPES or dy.dtype != dt or pdt not in (dt, torch.float32) or up_weight.dtype != pdt:
        return False
    if z.dtype != (torch.float32 if pdt == torch.float32 else dt):
        return False
    if x.dim() < 1 or down_weight.dim() != 2 or up_weight.dim() != 2 or z.dim() != 2:
        return False
    r, d = down_weight.shape
    if r < 1 or x.shape[-1] != d or up_weight.shape != (d, r) or dy.shape != x.shape:
        return False
    if z.shape != (x.shape[:-1].numel(), r):
        return False
    dev = x.device
    return dy.device == dev and z.device == dev and down_weight.device == dev and up_weight.device == dev


def bottleneck_adapter_backward(dy, x, z, down_weight, up_weight, activation, scaling) -> None:
    if not _bottleneck_adapter_backward_ok(dy, x, z, down_weight, up_weight, activation, scaling):
        bottleneck_adapter_backward_args(dy, x, z, down_weight, up_weight, activation, scaling)


def bottleneck_adapter_backward_args(dy, x, z, down_weight, up_weight, activation, scaling) -> None:
    """peftkern::bottleneck_adapter_backward: dy like x, z (M, r) in the compute dtype (the forward's)."""
    tensor("dy", dy, min_ndim=1)
    tensor("x", x, min_ndim=1)
    tensor("z", z, ndim=2)
    tensor("down_weight", down_weight, ndim=2)
    tensor("up_weight", up_weight, ndim=2)
    number("scaling", scaling)
    _activation(activation)
    same_device(dy=dy, x=x, z=z, down_weight=down_weight, up_weight=up_weight)
    _adapter_weights(x, down_weight, up_weight)
    _dims_equal(dy, _shape(x), lambda: f"dy has shape {_shape(dy)} but x has {_shape(x)}")
    _req(dy.dtype == x.dtype, TypeError, lambda: f"dy is {dy.dtype} but x is {x.dtype}")
    _adapter_dtypes(x, down_weight, up_weight)
    m, r = x.shape[:-1].numel(), down_weight.shape[0]
    _dims_equal(z, (m, r), lambda: f"z has shape {_shape(z)}, expected ({m}, {r}) (M, r)")
    cdt = compute_dtype(x.dtype, down_weight.dtype)
    _req(z.dtype == cdt, TypeError, lambda: f"z is {z.dtype}, expected the compute dtype {cdt}")


# ----------------------------------------------------------------------------------------------- prefix


def _prefix_attention_ok(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale) -> bool:
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T) and isinstance(prefix_k, T)
            and isinstance(prefix_v, T)) or type(causal) is not bool:
        return False
    if softmax_scale is not None and not (type(softmax_scale) in (float, int) and softmax_scale > 0):
        return False
    dt = q.dtype
    if dt not in FLOAT_DTYPES or k.dtype != dt or v.dtype != dt or prefix_k.dtype != dt or prefix_v.dtype != dt:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or prefix_v.shape != prefix_k.shape:
        return False
    B, H, L, D = q.shape
    b, hkv, S, d = k.shape
    if b != B or d != D or hkv < 1 or H % hkv:
        return False
    if prefix_k.dim() == 3:
        if prefix_k.shape[0] != hkv:
            return False
    elif prefix_k.dim() != 4 or prefix_k.shape[0] != B or prefix_k.shape[1] != hkv:
        return False
    if prefix_k.shape[-1] != D or prefix_k.shape[-2] < 1:
        return False
    dev = q.device
    if k.device != dev or v.device != dev or prefix_k.device != dev or prefix_v.device != dev:
        return False
    m = key_padding_mask
    return m is None or (isinstance(m, T) and m.dtype == torch.bool and m.shape == (B, S) and m.device == dev)


def prefix_attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale) -> None:
    """peftkern.ops.prefix_attention / peftkern::prefix_attention: the common valid call in a few attribute
    reads, else every check (the first failing one raises)."""
    if not _prefix_attention_ok(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale):
        prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)


def prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale) -> None:
    tensor("q", q, ndim=4)
    tensor("k", k, ndim=4)
    tensor("v", v, ndim=4)
    tensor("prefix_k", prefix_k)
    tensor("prefix_v", prefix_v)
    if key_padding_mask is not None and not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError("key_padding_mask must be a bool tensor (True = attend)")
    same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, key_padding_mask=key_padding_mask)
    B, H, L, D = q.shape
    _req(k.shape[0] == B, ValueError, lambda: f"k has shape {_shape(k)}, expected (B={B}, Hkv, S, D={D})")
    _req(k.shape[3] == D, ValueError, lambda: f"k has shape {_shape(k)}, expected (B={B}, Hkv, S, D={D})")
    Hkv, S = k.shape[1], k.shape[2]
    _dims_equal(v, _shape(k), lambda: f"v has shape {_shape(v)} but k has {_shape(k)}: they must match")
    _req(Hkv >= 1, ValueError, lambda: f"k has Hkv={Hkv} heads: attention needs at least one")
    _req(H % Hkv == 0, ValueError,
         lambda: f"q has H={H} heads, not a multiple of the Hkv={Hkv} heads of k (GQA needs H % Hkv == 0)")
    _req(prefix_k.dim() in (3, 4), ValueError,
         lambda: f"prefix_k must be 3-D (Hkv, P, D) or 4-D (B, Hkv, P, D), got shape {_shape(prefix_k)}")
    shared = prefix_k.dim() == 3
    lead = (Hkv,) if shared else (B, Hkv)
    want = "(Hkv, P, D)" if shared else "(B, Hkv, P, D)"
    _dims_equal(prefix_k, (*lead, prefix_k.shape[-2], D),
                lambda: f"prefix_k has shape {_shape(prefix_k)}, expected {want} with B={B}, Hkv={Hkv}, D={D}")
    _req(prefix_k.shape[-2] >= 1, ValueError, "prefix_k has P=0 prefix positions: prefix attention needs P >= 1")
    _dims_equal(prefix_v, _shape(prefix_k),
                lambda: f"prefix_v has shape {_shape(prefix_v)} but prefix_k has {_shape(prefix_k)}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _req(t.dtype == q.dtype, TypeError, lambda name=name, t=t:
             f"{name} is {t.dtype} but q is {q.dtype}: q, k, v and the prefix share one dtype")
    if key_padding_mask is not None:
        _req(key_padding_mask.dtype == torch.bool, TypeError, "key_padding_mask must be a bool tensor (True = attend)")
        _dims_equal(key_padding_mask, (B, S),
                    lambda: f"key_padding_mask has shape {_shape(key_padding_mask)}, expected (B={B}, S={S})")
    flag("causal", causal)
    if softmax_scale is not None:
        number("softmax_scale", softmax_scale)
        _req(softmax_scale > 0, ValueError, lambda: f"softmax_scale must be > 0, got {softmax_scale}")


def prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal,
                              softmax_scale) -> None:
    T = torch.Tensor
    if (_prefix_attention_ok(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)
            and isinstance(dout, T) and isinstance(out, T) and isinstance(lse, T)
            and dout.dtype == q.dtype and out.dtype == q.dtype and lse.dtype == torch.float32
            and dout.shape == q.shape and out.shape == q.shape and lse.shape == q.shape[:3] and lse.is_contiguous()
            and dout.device == q.device and out.device == q.device and lse.device == q.device):
        return
    prefix_attention_backward_args(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal,
                                   softmax_scale)


def prefix_attention_backward_args(dout, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, causal,
                              softmax_scale) -> None:
    """peftkern::prefix_attention_backward: the forward's checks, then dout and out like q, lse (B, H, L) fp32
    contiguous (the kernels index it by row)."""
    prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, softmax_scale)
    tensor("dout", dout, ndim=4)
    tensor("out", out, ndim=4)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    same_device(q=q, dout=dout, out=out, lse=lse)
    for name, t in (("dout", dout), ("out", out)):
        _dims_equal(t, _shape(q), lambda name=name, t=t: f"{name} has shape {_shape(t)} but q has {_shape(q)}")
        _req(t.dtype == q.dtype, TypeError, lambda name=name, t=t: f"{name} is {t.dtype} but q is {q.dtype}")
    _dims_equal(lse, _shape(q)[:3], lambda: f"lse has shape {_shape(lse)}, expected {_shape(q)[:3]} (B, H, L)")
    _req(lse.dtype == torch.float32, TypeError, lambda: f"lse is {lse.dtype}: it must be the forward's float32 lse")
    _req(lse.is_contiguous(), ValueError, lambda: "lse must be contiguous (the forward returns it so)")
