"""nn.Modules over the peftkern ops."""

from .adapter import BottleneckAdapter
from .ia3 import IA3Linear
from .lora import LoraLinear

__all__ = ["BottleneckAdapter", "IA3Linear", "LoraLinear"]
