"""The DA-SAM3 model: `from dasam3.models import DASAM3, DASAM3Config`."""

from .config import DASAM3Config, MoEConfig
from .dasam3 import VARIANTS, DASAM3

__all__ = ["DASAM3", "DASAM3Config", "MoEConfig", "VARIANTS"]
