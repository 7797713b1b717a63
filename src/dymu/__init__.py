"""dymu: dynamic visual-token merging (DyMU) for Hugging Face vision-language models."""

from .api import Encoding, apply, encode, is_applied, remove, tome_r_for
from .thresholds import Thresholds, ThresholdsError
from .errors import DymuError

__all__ = ["apply", "remove", "encode", "is_applied", "Encoding", "Thresholds", "ThresholdsError", "DymuError", "tome_r_for", "find_thresholds", "prepare_inputs", "from_pretrained"]
__version__ = "0.1.0"


def prepare_inputs(model, processor, images, text, **processor_kwargs):
    """Compact-mode inputs (``vtu="none"``). See ``dymu.llava.prepare_inputs``."""
    from .llava import prepare_inputs as _prepare

    return _prepare(model, processor, images, text, **processor_kwargs)


def from_pretrained(name_or_path, **kwargs):
    """Load a checkpoint with ``from_pretrained``; apply DyMU from its config.json ``"dymu"`` section."""
    from .models import from_pretrained as _load

    return _load(name_or_path, **kwargs)


def find_thresholds(*args, **kwargs):
    """See ``dymu.finder.find_thresholds``."""
    from .finder import find_thresholds as _find

    return _find(*args, **kwargs)
