"""Compile the quantised-base Triton kernels (4-bit / 8-bit dequantisation, the 4-bit decode GEMV) for sm_90a with
no GPU: the interpreter runs their semantics but never lowers them (type and lowering errors would first show on a
GPU). A subprocess without TRITON_INTERPRET, as tests/test_lora_gpu_compile.py."""

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from peftkern.triton import quant as tri

PTRS = {"x_ptr": "*bf16", "a_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8", "code2_ptr": "*fp32",
        "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "t_ptr": "*fp32", "u_ptr": "*fp32", "bias_ptr": "*bf16",
        "out_ptr": "*bf16", "cb_ptr": "*i8", "scb_ptr": "*fp32", "scaling": "fp32"}

def compile_(f, const, warps=4, stages=2):
    sig = {n: "constexpr" if n in const else PTRS.get(n, "i32") for n in f.arg_names}
    return triton.compile(ASTSource(fn=f, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})

for nested in (False, True):
    compile_(tri._dequant4_kernel, {"NESTED": nested, "MID": triton.language.bfloat16, "BLOCK": 1024})
    for x_bf16, prec in ((True, "tf32"), (False, "ieee")):
        compile_(tri._lora4_decode_kernel, {"NESTED": nested, "HAS_BIAS": True, "MID_BF16": True, "MID_FP16": False,
                                            "X_BF16": x_bf16, "X_FP16": False, "PREC": prec,
                                            **tri._DECODE_BLOCKS})
print("compiled")
'''


def test_quant_kernels_lower_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("this Triton build has no CUDA compiler tools")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
