"""The raw ops (torch.ops.peftkern.*) check their inputs in the op body and in the fake kernel, before any
kernel launch: a bad call raises a clear error naming the argument, on every backend, on meta tensors, and
under torch.compile while tracing. The launchers and reference functions an op would call are replaced by
ones that raise `Launched`, so a check that came too late (or not at all) shows as that error instead."""

from __future__ import annotations

import importlib

import pytest
import torch

import peftkern
import peftkern.ops.lora_4bit  # registers peftkern::lora_linear_4bit_decode
import peftkern.ops.lora_8bit  # registers peftkern::dequantize_8bit
from peftkern.ops import bottleneck_adapter, ia3_linear, lora_linear, prefix_attention

BACKENDS = ["torch", "triton"]
CHECK_ERRORS = (RuntimeError, ValueError, TypeError)  # what torch._check_with raises, by kind of mistake


class Launched(Exception):
    """A backend function ran: the op did not stop the bad call before its kernels."""


# The function each op body calls on either backend (peftkern.reference.<m> and peftkern.triton.<m>).
LAUNCHERS = {
    "lora_linear": ["lora_linear_fwd"],
    "lora_linear_backward": ["lora_linear_bwd"],
    "ia3_linear": ["ia3_linear_fwd"],
    "ia3_linear_backward": ["ia3_linear_bwd"],
    "bottleneck_adapter": ["bottleneck_adapter_fwd"],
    "bottleneck_adapter_backward": ["bottleneck_adapter_bwd"],
    "prefix_attention": ["prefix_attention_fwd"],
    "prefix_attention_backward": ["prefix_attention_bwd"],
    "dequantize_8bit": ["dequantize_8bit"],
}
MODULE = {"lora": "lora", "ia3": "ia3", "bottleneck": "adapter", "prefix": "prefix", "dequantize": "quant"}


@pytest.fixture
def no_launch(monkeypatch):
    """Every reference function and Triton launcher the ops call raises `Launched`."""
    for op, names in LAUNCHERS.items():
        method = MODULE[op.split("_")[0]]
        for pkg in ("reference", "triton"):
            mod = importlib.import_module(f"peftkern.{pkg}.{method}")
            for name in names:
                def boom(*a, _where=f"{pkg}.{method}.{name}", **k):
                    raise Launched(_where)

                monkeypatch.setattr(mod, name, boom)
    # The Triton kernels themselves, in case a launcher were reached some other way.
    from peftkern.triton import lora as tri

    for name in ("shrink", "gemm_lora", "lora_epilogue_", "adapter_grad", "dy_pass"):
        monkeypatch.setattr(tri, name, lambda *a, _n=name, **k: (_ for _ in ()).throw(Launched(_n)))


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


# ------------------------------------------------------------------------------------- good arguments


def good(op: str) -> dict:
    """Valid arguments of each raw op, by schema name (small CPU tensors)."""
    if op == "lora_linear":
        return dict(x=r(3, 5, 16), weight=r(8, 16), bias=r(8), lora_A=r(2, 16), lora_B=r(8, 2), scaling=0.5,
                    dropout_p=0.1, seed=torch.tensor(7))
    if op == "lora_linear_backward":
        return dict(dy=r(3, 5, 8), x=r(3, 5, 16), weight=r(8, 16), lora_A=r(2, 16), lora_B=r(8, 2), t=r(15, 2),
                    scaling=0.5, dropout_p=0.1, seed=torch.tensor(7), need_dx=True, need_ab=True, backend="torch")
    if op == "ia3_linear":
        return dict(x=r(3, 5, 16), weight=r(8, 16), bias=r(8), ia3_l=r(8), feedforward=False)
    if op == "ia3_linear_backward":
        return dict(dy=r(3, 5, 8), saved=r(3, 5, 8), weight=r(8, 16), ia3_l=r(8), feedforward=False, need_dx=True,
                    need_dl=True, backend="torch")
    if op == "bottleneck_adapter":
        return dict(x=r(3, 5, 16), down_weight=r(4, 16), down_bias=r(4), up_weight=r(16, 4), up_bias=r(16),
                    residual=r(3, 5, 16), activation="gelu", scaling=0.5)
    if op == "bottleneck_adapter_backward":
        return dict(dy=r(3, 5, 16), x=r(3, 5, 16), z=r(15, 4), down_weight=r(4, 16), up_weight=r(16, 4),
                    activation="gelu", scaling=0.5, has_residual=True, need_dx=True, need_params=True,
                    backend="torch")
    if op == "prefix_attention":
        return dict(q=r(2, 4, 5, 8), k=r(2, 2, 6, 8), v=r(2, 2, 6, 8), prefix_k=r(2, 3, 8), prefix_v=r(2, 3, 8),
                    key_padding_mask=torch.rand(2, 6) > 0.3, causal=True, softmax_scale=0.3)
    if op == "prefix_attention_backward":
        g = good("prefix_attention")
        q = g["q"]
        return dict(dout=r(*q.shape), q=q, k=g["k"], v=g["v"], prefix_k=g["prefix_k"], prefix_v=g["prefix_v"],
                    out=r(*q.shape), lse=r(2, 4, 5), key_padding_mask=g["key_padding_mask"], causal=True,
                    softmax_scale=0.3, backend="torch")
    if op == "dequantize_8bit":
        return dict(CB=i8(8, 16), SCB=r(8).abs(), dtype=torch.float16)
    raise KeyError(op)


# ------------------------------------------------------------------------------------- bad arguments

META = torch.device("meta")
# op -> [(case id, change, match)]; a change maps argument names to new values.
BAD = {
    "lora_linear": [
        ("x-inner-dim", dict(x=r(3, 5, 15)), "x has 15 features"),
        ("x-0d", dict(x=torch.tensor(1.0)), "x must have at least 1 dim"),
        ("weight-3d", dict(weight=r(8, 16, 1)), "weight must be 2-D"),
        ("bias-shape", dict(bias=r(7)), r"bias has shape \(7,\)"),
        ("bias-2d", dict(bias=r(8, 1)), "bias must be 1-D"),
        ("lora_A-inner-dim", dict(lora_A=r(2, 15)), r"lora_A has shape \(2, 15\)"),
        ("lora_A-1d", dict(lora_A=r(16)), "lora_A must be 2-D"),
        ("lora_B-rank", dict(lora_B=r(8, 3)), r"lora_B has shape \(8, 3\)"),
        ("lora_B-out", dict(lora_B=r(9, 2)), r"lora_B has shape \(9, 2\)"),
        ("rank-0", dict(lora_A=r(0, 16), lora_B=r(8, 0)), "rank r=0"),
        ("x-float64", dict(x=r(3, 5, 16, dtype=torch.float64)), "x must be float32"),
        ("x-dtype", dict(x=r(3, 5, 16, dtype=torch.float16)), "x is torch.float16 but weight"),
        ("bias-dtype", dict(bias=r(8, dtype=torch.float16)), "bias is torch.float16 but weight"),
        ("adapter-dtypes", dict(lora_B=r(8, 2, dtype=torch.float16)), "lora_A is torch.float32 but lora_B"),
        ("dropout-1", dict(dropout_p=1.0), r"dropout_p must be a float in \[0, 1\)"),
        ("dropout-neg", dict(dropout_p=-0.1), "dropout_p must be"),
        ("dropout-nan", dict(dropout_p=float("nan")), "dropout_p must be"),
        ("seed-float", dict(seed=torch.tensor(7.0)), "seed must be an integer tensor"),
        ("seed-shape", dict(seed=torch.tensor([7, 8])), "seed must have one element"),
        ("weight-meta", dict(weight=r(8, 16).to(META)), "weight is on meta but x is on cpu"),
    ],
    "lora_linear_backward": [
        ("dy-out", dict(dy=r(3, 5, 7)), r"dy has shape \(3, 5, 7\)"),
        ("dy-lead", dict(dy=r(15, 8)), r"dy has shape \(15, 8\)"),
        ("x-inner-dim", dict(x=r(3, 5, 15)), "x has 15 features"),
        ("t-rank", dict(t=r(15, 3)), r"t has shape \(15, 3\)"),
        ("t-rows", dict(t=r(14, 2)), r"t has shape \(14, 2\)"),
        ("t-dtype", dict(t=r(15, 2, dtype=torch.float16)), "t must be the forward's 2-D float32"),
        ("t-1d", dict(t=r(30)), "t must be the forward's 2-D float32"),
        ("lora_A-inner-dim", dict(lora_A=r(2, 15)), "lora_A has shape"),
        ("lora_B-rank", dict(lora_B=r(8, 3)), "lora_B has shape"),
        ("dy-dtype", dict(dy=r(3, 5, 8, dtype=torch.float16)), "dy is torch.float16 but x"),
        ("dropout", dict(dropout_p=1.5), "dropout_p must be"),
        ("seed-shape", dict(seed=torch.tensor([7, 8])), "seed must have one element"),
        ("backend", dict(backend="tpu"), "unknown peftkern backend"),
        ("lora_B-meta", dict(lora_B=r(8, 2).to(META)), "lora_B is on meta"),
    ],
    "ia3_linear": [
        ("x-inner-dim", dict(x=r(3, 5, 15)), "x has 15 features"),
        ("l-out", dict(ia3_l=r(16)), r"ia3_l has shape \(16,\), expected \(8,\)"),
        ("l-in", dict(feedforward=True), r"ia3_l has shape \(8,\), expected \(16,\)"),
        ("l-2d", dict(ia3_l=r(8, 2)), "ia3_l must be 1-D"),
        ("weight-1d", dict(weight=r(8)), "weight must be 2-D"),
        ("bias-shape", dict(bias=r(7)), "bias has shape"),
        ("x-dtype", dict(x=r(3, 5, 16, dtype=torch.float16)), "x is torch.float16 but weight"),
        ("l-dtype", dict(ia3_l=r(8, dtype=torch.bfloat16)), "ia3_l is torch.bfloat16"),
        ("l-meta", dict(ia3_l=r(8).to(META)), "ia3_l is on meta"),
    ],
    "ia3_linear_backward": [
        ("dy-out", dict(dy=r(3, 5, 7), saved=r(3, 5, 7)), "dy has 7 features"),
        ("saved-shape", dict(saved=r(3, 4, 8)), r"saved has shape \(3, 4, 8\)"),
        ("saved-ff", dict(feedforward=True, ia3_l=r(16)), r"saved has shape \(3, 5, 8\), expected \(3, 5, 16\)"),
        ("saved-none", dict(saved=None), "saved is None but need_dl"),
        ("saved-dtype", dict(saved=r(3, 5, 8, dtype=torch.float16)), "saved is torch.float16 but dy"),
        ("l-shape", dict(ia3_l=r(16)), r"ia3_l has shape \(16,\)"),
        ("weight-1d", dict(weight=r(8)), "weight must be 2-D"),
        ("backend", dict(backend="tpu"), "unknown peftkern backend"),
        ("weight-meta", dict(weight=r(8, 16).to(META)), "weight is on meta"),
    ],
    "bottleneck_adapter": [
        ("x-inner-dim", dict(x=r(3, 5, 15), residual=None), r"down_weight has shape \(4, 16\), expected \(r, 15\)"),
        ("up_weight", dict(up_weight=r(4, 16)), r"up_weight has shape \(4, 16\), expected \(16, 4\)"),
        ("down_bias", dict(down_bias=r(5)), "down_bias has shape"),
        ("up_bias", dict(up_bias=r(15)), "up_bias has shape"),
        ("r-0", dict(down_weight=r(0, 16), up_weight=r(16, 0), down_bias=r(0)), "bottleneck r must be >= 1"),
        ("residual-shape", dict(residual=r(3, 5, 17)), "residual has shape"),
        ("residual-dtype", dict(residual=r(3, 5, 16, dtype=torch.float16)), "residual is torch.float16 but x"),
        ("adapter-dtypes", dict(up_weight=r(16, 4, dtype=torch.float16)), "up_weight is torch.float16 but down_w"),
        ("activation", dict(activation="tanh"), "activation must be one of"),
        ("up_weight-meta", dict(up_weight=r(16, 4).to(META)), "up_weight is on meta"),
    ],
    "bottleneck_adapter_backward": [
        ("dy-shape", dict(dy=r(3, 5, 15)), r"dy has shape \(3, 5, 15\)"),
        ("x-inner-dim", dict(x=r(3, 5, 15), dy=r(3, 5, 15)), "down_weight has shape"),
        ("z-shape", dict(z=r(15, 5)), r"z has shape \(15, 5\)"),
        ("z-rows", dict(z=r(16, 4)), r"z has shape \(16, 4\)"),
        ("z-dtype", dict(z=r(15, 4, dtype=torch.float16)), "z is torch.float16"),
        ("up_weight", dict(up_weight=r(16, 5)), "up_weight has shape"),
        ("activation", dict(activation="tanh"), "activation must be one of"),
        ("backend", dict(backend="tpu"), "unknown peftkern backend"),
        ("z-meta", dict(z=r(15, 4).to(META)), "z is on meta"),
    ],
    "prefix_attention": [
        ("q-3d", dict(q=r(4, 5, 8)), "q must be 4-D"),
        ("k-head-dim", dict(k=r(2, 2, 6, 7)), "k has shape"),
        ("k-batch", dict(k=r(3, 2, 6, 8), v=r(3, 2, 6, 8)), "k has shape"),
        ("v-shape", dict(v=r(2, 2, 5, 8)), "v has shape"),
        ("gqa", dict(k=r(2, 3, 6, 8), v=r(2, 3, 6, 8)), "not a multiple"),
        ("prefix-2d", dict(prefix_k=r(3, 8)), "prefix_k must be 3-D"),
        ("prefix-heads", dict(prefix_k=r(1, 3, 8), prefix_v=r(1, 3, 8)), "prefix_k has shape"),
        ("prefix-batch", dict(prefix_k=r(3, 2, 3, 8), prefix_v=r(3, 2, 3, 8)), "B=2"),
        ("prefix-P0", dict(prefix_k=r(2, 0, 8), prefix_v=r(2, 0, 8)), "P >= 1"),
        ("prefix_v", dict(prefix_v=r(2, 4, 8)), "prefix_v has shape"),
        ("dtype", dict(prefix_k=r(2, 3, 8, dtype=torch.float16)), "prefix_k is torch.float16 but q"),
        ("mask-dtype", dict(key_padding_mask=torch.ones(2, 6)), "key_padding_mask must be a bool"),
        ("mask-shape", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), r"expected \(B=2, S=6\)"),
        ("scale", dict(softmax_scale=-1.0), "softmax_scale must be > 0"),
        ("prefix-meta", dict(prefix_v=r(2, 3, 8).to(META)), "prefix_v is on meta"),
    ],
    "prefix_attention_backward": [
        ("dout-shape", dict(dout=r(2, 4, 5, 7)), r"dout has shape \(2, 4, 5, 7\)"),
        ("out-dtype", dict(out=r(2, 4, 5, 8, dtype=torch.float16)), "out is torch.float16 but q"),
        ("lse-shape", dict(lse=r(2, 4, 6)), r"lse has shape \(2, 4, 6\)"),
        ("lse-dtype", dict(lse=r(2, 4, 5, dtype=torch.float16)), "lse is torch.float16"),
        ("lse-strided", dict(lse=r(2, 4, 10)[..., ::2]), "lse must be contiguous"),
        ("k-head-dim", dict(k=r(2, 2, 6, 7)), "k has shape"),
        ("scale", dict(softmax_scale=0.0), "softmax_scale must be > 0"),
        ("backend", dict(backend="tpu"), "unknown peftkern backend"),
        ("lse-meta", dict(lse=r(2, 4, 5).to(META)), "lse is on meta"),
    ],
    "dequantize_8bit": [
        ("CB-float", dict(CB=r(8, 16)), "CB must be int8"),
        ("CB-uint8", dict(CB=i8(8, 16).view(torch.uint8)), "CB must be int8"),
        ("CB-1d", dict(CB=i8(128), SCB=r(128)), "CB must be 2-D"),
        ("CB-3d", dict(CB=i8(8, 16, 1)), "CB must be 2-D"),
        ("SCB-dtype", dict(SCB=r(8, dtype=torch.float16)), "SCB must be float32"),
        ("SCB-2d", dict(SCB=r(8, 1)), "SCB must be 1-D"),
        ("SCB-shape", dict(SCB=r(9)), r"SCB has shape \(9,\), expected \(8,\)"),
        ("dtype-float64", dict(dtype=torch.float64), "dtype must be float32, float16 or bfloat16"),
        ("dtype-int8", dict(dtype=torch.int8), "dtype must be float32, float16 or bfloat16"),
        ("SCB-meta", dict(SCB=r(8).to(META)), "SCB is on meta but CB is on cpu"),
    ],
}
CASES = [(op, cid) for op, cases in BAD.items() for cid, _, _ in cases]


def bad(op: str, cid: str) -> tuple[dict, str]:
    change, match = next((c, m) for i, c, m in BAD[op] if i == cid)
    return good(op) | change, match


def call(op: str, kw: dict):
    return getattr(torch.ops.peftkern, op)(**kw)


def _meta(v):
    """v on the meta device with its strides (`.to` would make a strided view contiguous)."""
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=META)


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(BAD))
def test_good_call_reaches_the_backend(op, backend, no_launch):
    """The control: a valid call gets past the checks to the patched launcher of the chosen backend."""
    kw = good(op)
    if "backend" in kw:
        kw["backend"] = backend
    with peftkern.use_backend(backend), pytest.raises(Launched, match=("triton." if backend == "triton" else "ref")):
        call(op, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, cid", CASES)
def test_raw_op_rejects_before_launch(op, cid, backend, no_launch):
    kw, match = bad(op, cid)
    if "backend" in kw and cid != "backend":
        kw["backend"] = backend
    with peftkern.use_backend(backend), pytest.raises(CHECK_ERRORS, match=match):
        call(op, kw)


@pytest.mark.parametrize("op, cid", [c for c in CASES if not c[1].endswith("-meta")])
def test_fake_kernel_rejects(op, cid, no_launch):
    """Every tensor on the meta device: the fake kernel runs, and checks as the body does."""
    kw, match = bad(op, cid)
    kw = {k: _meta(v) for k, v in kw.items()}
    with pytest.raises(CHECK_ERRORS, match=match):
        call(op, kw)


@pytest.mark.parametrize("op", list(BAD))
def test_fake_kernel_takes_good_calls(op):
    out = call(op, {k: _meta(v) for k, v in good(op).items()})
    assert all(t.device.type == "meta" for t in (out if isinstance(out, (tuple, list)) else [out]))


WRAPPERS = {
    "lora_linear": lambda a: lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scaling"],
                                         a["dropout_p"]),
    "ia3_linear": lambda a: ia3_linear(a["x"], a["weight"], a["bias"], a["ia3_l"], a["feedforward"]),
    "bottleneck_adapter": lambda a: bottleneck_adapter(a["x"], a["down_weight"], a["down_bias"], a["up_weight"],
                                                       a["up_bias"], a["residual"], a["activation"], a["scaling"]),
    "prefix_attention": lambda a: prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], a["causal"],
                                                   a["key_padding_mask"], a["softmax_scale"]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, cid", [c for c in CASES if c[0] in WRAPPERS and not c[1].startswith("seed")])
def test_wrapper_and_raw_op_say_the_same(op, cid, backend, no_launch):
    """One set of checks: the public function and the raw op raise the same error type and message (the
    LoRA wrapper's eager path, which bypasses the op, included)."""
    kw, _ = bad(op, cid)
    with peftkern.use_backend(backend):
        with pytest.raises(CHECK_ERRORS) as raw:
            call(op, kw)
        with pytest.raises(CHECK_ERRORS) as wrapped:
            WRAPPERS[op](kw)
    assert type(raw.value) is type(wrapped.value) and str(raw.value) == str(wrapped.value)


def test_compile_rejects_a_bad_shape_while_tracing(no_launch):
    """torch.compile(fullgraph=True) runs the fake kernel on fake tensors: the bad inner dim is refused at trace
    time, before anything runs (the launchers would raise `Launched`)."""
    torch._dynamo.reset()
    kw, match = bad("lora_linear", "x-inner-dim")

    def f(x, weight, bias, lora_A, lora_B):
        y, _ = torch.ops.peftkern.lora_linear(x, weight, bias, lora_A, lora_B, 0.5, 0.0, None)
        return y.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (kw["x"], kw["weight"], kw["bias"], kw["lora_A"], kw["lora_B"])
    with peftkern.use_backend("triton"), pytest.raises(RuntimeError, match=match) as e:
        compiled(*args)
    assert "Launched" not in repr(e.value)
    # The same function with good shapes compiles and reaches the (patched) launcher only when run.
    torch._dynamo.reset()
    good_args = (r(3, 5, 16), *args[1:])
    with peftkern.use_backend("triton"), pytest.raises(Launched):
        torch.compile(f, fullgraph=True, backend="aot_eager")(*good_args)


def test_strided_vectors_read_right_on_triton():
    """bias / ia3_l / adapter biases that are strided views: the Triton kernels read vectors with unit stride, so
    the ops hand them a contiguous copy (they read the wrong entries before)."""
    torch.manual_seed(0)
    x, w, a, bb = r(5, 16), r(8, 16), r(2, 16), r(8, 2)
    vec = lambda n: r(2 * n)[::2]
    bias, l_out, dw, uw, db, ub, xa = vec(8), vec(8), r(4, 8), r(8, 4), vec(4), vec(8), r(5, 8)
    calls = {
        "lora": lambda: lora_linear(x, w, bias, a, bb, 0.5),
        "ia3": lambda: ia3_linear(x, w, bias, l_out, False),
        "adapter": lambda: bottleneck_adapter(xa, dw, db, uw, ub, None, "relu", 0.5),
    }
    for name, f in calls.items():
        with peftkern.use_backend("torch"):
            want = f()
        with peftkern.use_backend("triton"):
            got = f()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def _decode_args(**bad):
    """Valid torch.ops.peftkern.lora_linear_4bit_decode arguments for a (6, 8) weight (24 packed bytes, blocksize 16),
    with `bad` replacing some."""
    args = dict(x=r(2, 8), data=torch.zeros(24, dtype=torch.uint8), code=r(16), absmax=r(3), code2=None,
                absmax2=None, offset=None, shape=[6, 8], blocksize=16, blocksize2=0, mid_dtype=torch.float32,
                bias=r(6), lora_A=r(2, 8), lora_B=r(6, 2), scaling=0.5)
    return {**args, **bad}


DECODE_BAD = {
    "x int": dict(x=torch.zeros(2, 8, dtype=torch.int32)),
    "x features": dict(x=r(2, 7)),
    "data dtype": dict(data=torch.zeros(24, dtype=torch.int8)),
    "data too short": dict(data=torch.zeros(23, dtype=torch.uint8)),
    "code size": dict(code=r(8)),
    "bias shape": dict(bias=r(5)),
    "bias dtype": dict(bias=r(6, dtype=torch.float16)),
    "lora_A in": dict(lora_A=r(2, 7)),
    "lora_B rank": dict(lora_B=r(6, 3)),
    "scaling type": dict(scaling="0.5"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DECODE_BAD))
def test_lora_linear_4bit_decode_rejects_before_launch(case, backend, monkeypatch):
    from peftkern.reference import quant as ref_quant
    from peftkern.triton import quant as tri_quant

    for mod, name in ((tri_quant, "lora_linear_4bit_decode"), (ref_quant, "dequantize_4bit")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: (_ for _ in ()).throw(Launched(_n)))
    with peftkern.use_backend(backend), pytest.raises(CHECK_ERRORS):
        torch.ops.peftkern.lora_linear_4bit_decode(**_decode_args(**DECODE_BAD[case]))
    with pytest.raises(CHECK_ERRORS):  # the fake kernel checks the same on meta tensors
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v
                for k, v in _decode_args(**DECODE_BAD[case]).items()}
        torch.ops.peftkern.lora_linear_4bit_decode(**meta)


def test_lora_linear_4bit_decode_valid_call_launches(monkeypatch):
    """The valid arguments above reach the launcher: the cases above fail for their one bad argument."""
    from peftkern.reference import quant as ref_quant

    monkeypatch.setattr(ref_quant, "dequantize_4bit", lambda *a, **k: (_ for _ in ()).throw(Launched("ref")))
    with peftkern.use_backend("torch"), pytest.raises(Launched):
        torch.ops.peftkern.lora_linear_4bit_decode(**_decode_args())
