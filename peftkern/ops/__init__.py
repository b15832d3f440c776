"""The peftkern ops (torch.library, namespace ``peftkern``), with their public Python wrappers."""

from .lora import lora_linear

__all__ = ["lora_linear"]
