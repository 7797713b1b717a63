"""dymu: dynamic visual-token merging (DyMU) for Hugging Face vision-language models."""

from .api import Encoding, apply, encode, is_applied, remove
from .thresholds import Thresholds, ThresholdsError
from .vision import DymuError

__all__ = ["apply", "remove", "encode", "is_applied", "Encoding", "Thresholds", "ThresholdsError", "DymuError", "find_thresholds"]
__version__ = "0.1.0"


def find_thresholds(*args, **kwargs):
    """See ``dymu.finder.find_thresholds``."""
    from .finder import find_thresholds as _find

    return _find(*args, **kwargs)
