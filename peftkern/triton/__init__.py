"""Triton kernels and their launchers (no autograd glue: that lives in peftkern.ops)."""
