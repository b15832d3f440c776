"""The peftkern ops (torch.library, namespace ``peftkern``), with their public Python wrappers."""

from .adapter import bottleneck_adapter
from .ia3 import ia3_linear
from .lora import lora_linear
from .prefix import prefix_attention

__all__ = ["bottleneck_adapter", "ia3_linear", "lora_linear", "prefix_attention"]
