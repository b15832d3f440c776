"""nn.Modules over the peftkern ops."""

from .ia3 import IA3Linear
from .lora import LoraLinear

__all__ = ["IA3Linear", "LoraLinear"]
