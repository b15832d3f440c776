"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """Autotune on a GPU; one config under the interpreter (it cannot benchmark configs there).
    PEFTKERN_TUNE=0 keeps only the first GPU config: test suites hit many shapes, and tuning each
    costs compiles, not coverage."""
    if INTERPRET:
        return [interp]
    return gpu[:1] if os.environ.get("PEFTKERN_TUNE", "1") == "0" else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands must not silently drop to TF32: torch's matmul default is full fp32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Triton's interpreter multiplies bf16 bits as integers in tl.dot (triton#11584): upcast there."""
    return INTERPRET and dtype == torch.bfloat16


def m_key(M: int) -> int:
    """Autotune key for the row count: tiles tuned on a decode step (M=1) must not serve training."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (get_device_properties costs microseconds per call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _gemm_cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# GEMM tiles sized for A100 / H100 at LLM shapes (K, N in the thousands), plus narrow tiles for small
# M. Every BLOCK_M is a multiple of 16 (IA3's per-16-row partial sums rely on it).
GEMM_CONFIGS = configs(
    [
        _gemm_cfg(128, 256, 64, 8, 3),
        _gemm_cfg(256, 128, 64, 8, 3),
        _gemm_cfg(128, 128, 64, 8, 4),
        _gemm_cfg(128, 128, 64, 4, 4),
        _gemm_cfg(64, 128, 64, 4, 4),
        _gemm_cfg(128, 64, 64, 4, 4),
        _gemm_cfg(64, 64, 64, 4, 4),
        _gemm_cfg(16, 128, 128, 4, 4),
    ],
    _gemm_cfg(32, 32, 32, 4, 1),
)


@triton.jit
def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: programs sharing the same columns of the
    second operand run together, so its tiles stay in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m
