"""LoRA's CUDA op, peftkern_cuda::lora_decode (csrc/lora/): its registration, Meta kernel and argument checks
on any machine with nvcc (no GPU needed), and on a GPU its numerics against an fp64 reference, raw and through
peftkern's cuda backend. Tests marked `gpu` are deselected without a CUDA device (tests/conftest.py).

The raw-op tests load the extension built in the test cache (tests/_cuda_ext.py); the backend test builds or
loads it where the cuda backend does (PEFTKERN_CACHE_DIR).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
from _cuda_ext import TEST_CACHE, build_and_load, gpu, subprocess_env
from _util import assert_close_rule

import peftkern
from peftkern.reference import lora as ref


@pytest.fixture(scope="module")
def built():
    yield from build_and_load()


# ---------------------------------------------------------------------------------------------
# No GPU needed: registration, Meta kernel, argument checks


def test_cpu_tensors_raise_clearly(built):
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    a = torch.randn(2, 8)
    b = torch.randn(4, 2)
    with pytest.raises((RuntimeError, NotImplementedError), match="CUDA"):
        torch.ops.peftkern_cuda.lora_decode(x, w, None, a, b, 1.0)


def test_meta_kernel(built):
    dev = "meta"
    x = torch.empty(3, 40, device=dev, dtype=torch.bfloat16)
    w = torch.empty(24, 40, device=dev, dtype=torch.bfloat16)
    bias = torch.empty(24, device=dev, dtype=torch.bfloat16)
    a = torch.empty(8, 40, device=dev, dtype=torch.float32)
    b = torch.empty(24, 8, device=dev, dtype=torch.float32)
    y, t = torch.ops.peftkern_cuda.lora_decode(x, w, bias, a, b, 0.5)
    assert y.shape == (3, 24) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    assert t.shape == (3, 8) and t.dtype == torch.float32
    with pytest.raises(RuntimeError, match="weight dtype"):
        torch.ops.peftkern_cuda.lora_decode(x, w.float(), bias, a, b, 0.5)
    with pytest.raises(RuntimeError, match="lora_A must be float32 or x's dtype"):
        torch.ops.peftkern_cuda.lora_decode(x, w, bias, a.half(), b.half(), 0.5)


def test_meta_kernel_opcheck(built):
    """The C++ Meta kernel (what torch.compile traces the op with) passes opcheck on meta tensors, dynamic
    shapes included, with no GPU."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("peftkern_cuda::lora_decode", "Meta")
    e = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, device="meta", dtype=dtype)
    args = (e(3, 40), e(24, 40), e(24), e(8, 40, dtype=torch.float32), e(24, 8, dtype=torch.float32), 0.5)
    overload = torch.ops.peftkern_cuda.lora_decode.default
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    assert torch.library.opcheck(overload, args, test_utils=checks) == dict.fromkeys(checks, "SUCCESS")
    outs = overload(*args)
    want = [((3, 24), torch.bfloat16), ((3, 8), torch.float32)]
    assert [(tuple(o.shape), o.dtype, o.device.type) for o in outs] == [(s, d, "meta") for s, d in want]


def test_cuda_kernel_argument_checks(built):
    """The CUDA kernel's checks run before it touches a device: call it on CPU tensors through the
    dispatcher's CUDA key (no GPU needed) and expect errors naming the argument."""
    op = torch.ops.peftkern_cuda.lora_decode.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, w, a, b = torch.randn(4, 32), torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    cases = [
        ("M <= 16", (torch.randn(17, 32), w, None, a, b)),
        ("lora_B must have shape", (x, w, None, a, b.T.contiguous())),
        ("r=129", (x, w, None, torch.randn(129, 32), torch.randn(16, 129))),
        ("weight must have shape", (x, torch.randn(16, 31), None, a, b)),
        ("bias must have shape", (x, w, torch.randn(15), a, b)),
        ("lora_B dtype", (x, w, None, a, b.double())),
        ("x must be a CUDA tensor", (x, w, None, a, b)),
    ]
    for expect, args in cases:
        with pytest.raises(RuntimeError, match=re.escape(expect)):
            op.redispatch(keys, *args, 1.0)


# ---------------------------------------------------------------------------------------------
# GPU: the raw op against fp64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _poison_allocator(nbytes: int):
    """Fill freed cache blocks with NaN so a kernel that skips an output element shows it."""
    p = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del p


def _inputs(M, K, N, r, dtype, adapter_dtype, with_bias, gen):
    dev = "cuda"
    x = torch.randn(M, K, generator=gen, device=dev).to(dtype)
    w = (torch.randn(N, K, generator=gen, device=dev) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, generator=gen, device=dev).to(dtype) if with_bias else None
    a = (torch.randn(r, K, generator=gen, device=dev) / math.sqrt(K)).to(adapter_dtype)
    bb = torch.randn(N, r, generator=gen, device=dev).to(adapter_dtype)
    return x, w, b, a, bb


def _reference(x, w, b, a, bb, s):
    d = torch.float64
    t = x.to(d) @ a.to(d).T
    y = x.to(d) @ w.to(d).T + s * (t @ bb.to(d).T)
    if b is not None:
        y = y + b.to(d)
    return y, t


def _torch_same_dtype(x, w, b, a, bb, s):
    """What eager torch / peft computes: base in x's dtype, the LoRA branch in the adapters' dtype."""
    base = torch.nn.functional.linear(x, w, b)
    t = torch.nn.functional.linear(x.to(a.dtype), a)
    lora = torch.nn.functional.linear(t, bb) * s
    return (base + lora.to(x.dtype)), t.float()


def _check(M, K, N, r, dtype, adapter_dtype, with_bias, s=0.5, misalign=False):
    gen = torch.Generator(device="cuda").manual_seed(1000 * M + 7 * K + N + r)
    x, w, b, a, bb = _inputs(M, K, N, r, dtype, adapter_dtype, with_bias, gen)
    if misalign:  # same values, data pointers off 16-byte alignment (still contiguous)
        def shift(t):
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            v = buf[1:].view(t.shape)
            v.copy_(t)
            return v
        x, w, a, bb = shift(x), shift(w), shift(a), shift(bb)
        assert x.data_ptr() % 16 != 0
    y_ref, t_ref = _reference(x, w, b, a, bb, s)
    y_t, t_t = _torch_same_dtype(x, w, b, a, bb, s)
    _poison_allocator(4 * (M * N + M * r) * 4)
    y, t = torch.ops.peftkern_cuda.lora_decode(x, w, b, a, bb, s)
    torch.cuda.synchronize()
    assert y.shape == (M, N) and y.dtype == dtype
    assert t.shape == (M, r) and t.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(t).all()
    scale = 1.0 + y_ref.abs().max().item()
    err = (y.double() - y_ref).abs().max().item()
    err_t = (y_t.double() - y_ref).abs().max().item()
    assert err <= 2 * err_t + 1e-5 * scale, (err, err_t)
    tscale = 1.0 + t_ref.abs().max().item()
    errt = (t.double() - t_ref).abs().max().item()
    errt_t = (t_t.double() - t_ref).abs().max().item()
    assert errt <= 2 * errt_t + 1e-5 * tscale, (errt, errt_t)


_DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (x dtype, adapter): the kernel's (T, TA) instantiations; for fp32 x "same" is "fp32" again.
_KINDS = [(d, a) for d in DTYPES for a in ("fp32", "same") if not (d == torch.float32 and a == "same")]


def _decode_cases():
    """The cases of the decode kernel that differ, not their cross product: every (x dtype, adapter dtype)
    x M bucket edge (1; 5, a partly zero 8-row bucket; 16) x bias, at in=100 (a scalar tail after the
    16-byte vectors of a half x), out=72, r=8; then every in x out x r edge at bf16 x with fp32 adapters
    (peft's usual case), M=5, with bias. test_lora_decode_awkward_shapes adds the odd shapes per dtype."""
    kinds = [(M, 100, 72, 8, d, a, b) for d, a in _KINDS for M in (1, 5, 16) for b in (True, False)]
    shapes = [(5, K, N, r, torch.bfloat16, "fp32", True)
              for K in (100, 4096) for N in (72, 4096) for r in (1, 8, 16, 64)]
    params = []
    for M, K, N, r, dtype, adapter, bias in dict.fromkeys(kinds + shapes):
        case_id = f"M{M}-K{K}-N{N}-r{r}-{_DTYPE_IDS[dtype]}-{adapter}-{'bias' if bias else 'nobias'}"
        params.append(pytest.param(M, K, N, r, dtype, adapter, bias, id=case_id))
    return params


@gpu
@pytest.mark.parametrize(("M", "K", "N", "r", "dtype", "adapter", "with_bias"), _decode_cases())
def test_lora_decode_matches_fp64(built, M, K, N, r, dtype, adapter, with_bias):
    adapter_dtype = torch.float32 if adapter == "fp32" else dtype
    _check(M, K, N, r, dtype, adapter_dtype, with_bias)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    ("M", "K", "N", "r", "misalign"),
    [
        (3, 37, 50, 5, False),  # odd `in`: scalar tails, rows not 16-byte aligned
        (2, 1001, 33, 3, True),  # misaligned base pointers
        (16, 8, 5, 128, False),  # r at its maximum
        (16, 14336, 300, 16, False),  # x tiled along `in` (does not fit shared memory at once)
        (7, 4096, 14336, 32, False),  # several row rounds per block
        (1, 1, 1, 1, False),
    ],
)
def test_lora_decode_awkward_shapes(built, M, K, N, r, misalign, dtype):
    for adapter_dtype in {torch.float32, dtype}:
        _check(M, K, N, r, dtype, adapter_dtype, True, s=2.0, misalign=misalign)


@gpu
def test_lora_decode_empty_and_stream(built):
    dev = "cuda"
    w = torch.randn(16, 32, device=dev)
    a = torch.randn(4, 32, device=dev)
    bb = torch.randn(16, 4, device=dev)
    y, t = torch.ops.peftkern_cuda.lora_decode(torch.randn(0, 32, device=dev), w, None, a, bb, 1.0)
    assert y.shape == (0, 16) and t.shape == (0, 4)
    x = torch.randn(4, 32, device=dev)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y1, t1 = torch.ops.peftkern_cuda.lora_decode(x, w, None, a, bb, 1.0)
    s.synchronize()
    y0, t0 = _reference(x, w, None, a, bb, 1.0)
    torch.testing.assert_close(y1.double(), y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t1.double(), t0, rtol=1e-4, atol=1e-4)


@gpu
def test_lora_decode_opcheck(built):
    dev = "cuda"
    args = (torch.randn(3, 64, device=dev, dtype=torch.bfloat16), torch.randn(48, 64, device=dev,
            dtype=torch.bfloat16), torch.randn(48, device=dev, dtype=torch.bfloat16),
            torch.randn(8, 64, device=dev), torch.randn(48, 8, device=dev), 0.25)
    torch.library.opcheck(torch.ops.peftkern_cuda.lora_decode.default, args,
                          test_utils=("test_schema", "test_faketensor"))


_BAD_ARGS_SCRIPT = r"""
import torch
from peftkern import _ext
_ext.load(build_if_missing=False)
op = torch.ops.peftkern_cuda.lora_decode
dev = "cuda"
x = torch.randn(17, 32, device=dev)
w = torch.randn(16, 32, device=dev)
a = torch.randn(4, 32, device=dev)
bb = torch.randn(16, 4, device=dev)
cases = [
    ("M <= 16", lambda: op(x, w, None, a, bb, 1.0)),
    ("lora_B must have shape", lambda: op(x[:4], w, None, a, bb.T.contiguous(), 1.0)),
    ("r=129", lambda: op(x[:4], w, None, torch.randn(129, 32, device=dev), torch.randn(16, 129, device=dev), 1.0)),
    ("x must be contiguous", lambda: op(torch.randn(32, 4, device=dev).T, w, None, a, bb, 1.0)),
    ("lora_A is on cpu", lambda: op(x[:4], w, None, a.cpu(), bb, 1.0)),
]
for expect, call in cases:
    try:
        call()
    except RuntimeError as e:
        assert expect in str(e), (expect, str(e))
        print("ok:", expect, flush=True)
    else:
        raise AssertionError("no error for " + expect)
"""


@gpu
def test_lora_decode_rejects_bad_args(built):
    # In a subprocess: one H100 run (torch 2.11) crashed the interpreter on the first of these calls
    # instead of raising; a crash must fail this test, not end the whole session.
    res = subprocess.run([sys.executable, "-c", _BAD_ARGS_SCRIPT], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    assert res.stdout.count("ok:") == 5


@gpu
def test_lora_decode_pdl_off_matches(built):
    """The main kernel waits for the shrink kernel through programmatic dependent launch on sm_90;
    with it turned off (PEFTKERN_NO_PDL=1, read once per process) the results must be identical."""
    from safetensors.torch import load_file

    code = r"""
import torch
from peftkern import _ext
_ext.load(build_if_missing=False)
g = torch.Generator(device="cuda").manual_seed(5)
x = torch.randn(4, 4096, device="cuda", generator=g).bfloat16()
w = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16()
a = torch.randn(64, 4096, device="cuda", generator=g)
b = torch.randn(4096, 64, device="cuda", generator=g)
y, t = torch.ops.peftkern_cuda.lora_decode(x, w, None, a, b, 0.5)
from safetensors.torch import save_file
save_file({"y": y.cpu(), "t": t.cpu()}, OUT)
"""
    outs = []
    for no_pdl in ("0", "1"):
        out = TEST_CACHE / f"pdl_{no_pdl}.safetensors"
        env = dict(subprocess_env(), PEFTKERN_NO_PDL=no_pdl)
        res = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + code], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        outs.append(load_file(str(out)))
    assert torch.equal(outs[0]["y"], outs[1]["y"]) and torch.equal(outs[0]["t"], outs[1]["t"])


# ---------------------------------------------------------------------------------------------
# GPU: through peftkern's cuda backend


@gpu
@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adapter_fp32", [False, True])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_cuda_decode_forward(dtype, adapter_fp32, m):
    ad = torch.float32 if adapter_fp32 else dtype
    x, w, b, a, bb = _inputs(m, 4096, 4096, 16, dtype, ad, True, torch.Generator(device="cuda").manual_seed(m))
    with torch.no_grad(), peftkern.use_backend("cuda"):
        y = peftkern.ops.lora_linear(x, w, b, a, bb, 0.5)
    with torch.no_grad():
        y64 = ref.lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), 0.5)
        assert_close_rule("y", y, y64, ref.lora_linear(x, w, b, a, bb, 0.5))
