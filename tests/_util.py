"""Shared test helpers: device, dtypes per device, and the error rule for comparing kernels."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 tl.dot is wrong under Triton's interpreter: bf16 is covered on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor,
                      tiny: float = 1e-5) -> None:
    """flash-attention's rule: the kernel's error vs an fp64 oracle is at most twice the error of
    PyTorch computing the same thing in the same dtype, plus a tiny absolute slack."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    e_got, e_torch = max_err(got, ref64), max_err(same_dtype, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * e_torch + tiny * max(1.0, scale)
    assert e_got <= bound, f"{name}: error {e_got:.3g} > 2 x torch's {e_torch:.3g} + tiny (bound {bound:.3g})"
