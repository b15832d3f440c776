"""peftkern: fused Triton and CUDA kernels for parameter-efficient fine-tuning.

Importing peftkern registers the torch ops; it compiles nothing (Triton kernels compile on first
call, the CUDA extension builds with `peftkern build` or on first use of the cuda backend).
"""

from . import nn, ops
from ._backend import BACKENDS, BackendUnavailable, requested_backend, use_backend
from .integrations.accelerate import accelerate, restore
from .integrations.adapters import AdapterConfig, add_adapters, load_adapters, remove_adapters, save_adapters
from .integrations.lora_group import projection_groups

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "AdapterConfig", "BackendUnavailable", "__version__", "accelerate", "add_adapters", "load_adapters",
    "nn", "ops", "projection_groups", "remove_adapters", "requested_backend", "restore", "save_adapters", "use_backend",
]
