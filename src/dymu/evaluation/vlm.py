"""Loading the model an evaluation runs (no lmms-eval needed)."""

from __future__ import annotations

from ..errors import DymuError


def load_vlm(pretrained: str, dtype=None):
    """(model, processor) of a LLaVA-1.5 or LLaVA-OneVision checkpoint; a model dymu cannot generate with is refused
    in one line."""
    from ..llava import is_vlm, supports_language_side
    from ..models import load_model, load_processor

    model = load_model(pretrained, dtype=dtype)
    if not (is_vlm(model) and supports_language_side(model)):
        raise DymuError(f"{pretrained}: {type(model).__name__} is not a VLM dymu evaluates (LLaVA-1.5, "
                        "LlavaForConditionalGeneration, or LLaVA-OneVision, LlavaOnevisionForConditionalGeneration)")
    processor = load_processor(pretrained, full=True)
    processor.tokenizer.padding_side = "left"
    return model, processor
