"""nn.Modules over the peftkern ops."""

from .lora import LoraLinear

__all__ = ["LoraLinear"]
