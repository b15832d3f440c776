"""Per-kernel breakdown of the Triton LoRA forward/backward on a GPU, beside cuBLAS for the same GEMMs.

    python benchmarks/profile_lora.py [--m 8192 --d 4096 --r 16 --p 0.1]
Prints each launch's median time, its byte / FLOP floor on this device, and the tuned configs.
"""

import argparse

import torch
from triton.testing import do_bench

from peftkern.triton import lora as tri


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.1)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    M, D, R, p = a.m, a.d, a.r, a.p
    x = torch.randn(M, D, device=dev, dtype=dt)
    w = torch.randn(D, D, device=dev, dtype=dt) / 64
    b = torch.randn(D, device=dev, dtype=dt)
    A = torch.randn(R, D, device=dev) / 64
    B = torch.randn(D, R, device=dev) / 4
    dy = torch.randn(M, D, device=dev, dtype=dt)
    prec = "tf32"
    t = tri.shrink(x, A.stride(), A, R, 1 / (1 - p), p, 7, prec)
    runs = {
        "cublas x@W.T (+bias)": lambda: torch.nn.functional.linear(x, w, b),
        "cublas dy@W": lambda: dy @ w,
        "fwd shrink t=drop(x)A^T": lambda: tri.shrink(x, A.stride(), A, R, 1 / (1 - p), p, 7, prec),
        "fwd shrink (no dropout)": lambda: tri.shrink(x, A.stride(), A, R, 1.0, 0.0, 7, prec),
        "fwd gemm+lora epilogue": lambda: tri.gemm_lora(x, w, w.stride(), t, B, B.stride(), b, dt, D, 2.0, 0.0, None),
        "bwd shrink dt=s*dy B": lambda: tri.shrink(dy, (B.stride(1), B.stride(0)), B, R, 2.0, 0.0, None, prec),
        "bwd gemm dx (+dropout epi)": lambda: tri.gemm_lora(dy, w, (w.stride(1), w.stride(0)), t, A,
                                                            (A.stride(1), A.stride(0)), None, dt, D, 1.1, p, 7),
        "bwd adapter_grad dA (dropout)": lambda: tri.adapter_grad(x, t, 1.1, p, 7, prec),
        "bwd adapter_grad dB": lambda: tri.adapter_grad(dy, t, 2.0, 0.0, None, prec),
    }
    bw = 3.0e12  # measured D2D copy on this H100 (KINDS.md), bytes read + written per second
    print(f"M={M} D={D} r={R} p={p} bf16 on {torch.cuda.get_device_name()}")
    for name, fn in runs.items():
        ms = do_bench(fn, warmup=25, rep=100)
        print(f"{name:<30}{ms * 1e3:9.1f} us   (one read of an MxD bf16 tensor: {M * D * 2 / bw * 1e6:.0f} us;"
              f" GEMM at 750 TF: {2 * M * D * D / 750e12 * 1e6:.0f} us)")
    for k in (tri._gemm_lora_kernel, tri._shrink_kernel, tri._adapter_grad_kernel):
        cache = getattr(k, "cache", {})
        for key, cfg in cache.items():
            print(f"{getattr(k.fn, '__name__', k.fn.fn.__name__)}: {key[:4]} -> {cfg}")


if __name__ == "__main__":
    main()
