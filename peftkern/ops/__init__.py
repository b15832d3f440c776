"""The peftkern ops (torch.library, namespace ``peftkern``), with their public Python wrappers."""

from .adapter import bottleneck_adapter
from .dora import dora_linear
from .ia3 import ia3_linear
from .lora import lora_linear
from .prefix import prefix_attention

__all__ = ["bottleneck_adapter", "dora_linear", "ia3_linear", "lora_linear", "prefix_attention"]
