"""VTW's choice of the withdrawal layer K (decoder_pruning_spec.md §3.3): the KL criterion on a few samples.

For every candidate k, the model withdraws all visual tokens before layer k and predicts the first answer token;
KL_k = KL(p_k || p_full) = Σ p_k (log p_k − log p_full) against the model without withdrawal, averaged over the
samples. K is the *first* candidate whose mean KL is at most the threshold (not the minimum); when none is, no
layer qualifies and K = the number of layers (never withdraw). The model keeps whatever merging (DToMe + VTU)
it was applied with: p_full is that model without pruning.

Result file (JSON): ``{"format": "dymu-vtw-calibration", "version": 1, "model": {..., "fingerprint": {"config",
"weights"}}, "k": 16,
"kl": {"5": 0.8, ...}, "threshold": 0.003, "samples": 20, "prompt": "..."}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .vision import DymuError

FORMAT = "dymu-vtw-calibration"
VERSION = 1
#: VTW's threshold for LLaVA-1.5-7B (the official code also uses it as the fallback)
DEFAULT_KL_THRESHOLD = 0.003
#: VTW's first candidate layer (the official code probes k = 5 .. T-1); shallower models start at 1
DEFAULT_FIRST_LAYER = 5
DEFAULT_SAMPLES = 20
DEFAULT_PROMPT = "Describe the image."


@dataclass
class VtwCalibration:
    k: int  # first layer without visual tokens (= the number of layers when none qualifies)
    kl: dict  # candidate layer -> mean KL(p_k || p_full)
    threshold: float
    samples: int
    prompt: str
    model: dict  # language-model identity: model_type, num_layers, hidden_size, vocab_size, name_or_path

    @property
    def spec(self) -> str:
        return f"vtw:k={self.k}"

    def save(self, path) -> None:
        """Write the result file (through a temporary file: a failed write leaves the old one whole)."""
        from .files import atomic_write_json

        data = {"format": FORMAT, "version": VERSION, **asdict(self), "kl": {str(k): v for k, v in self.kl.items()}}
        atomic_write_json(Path(path), data, indent=2)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from logits (batch, vocab), in float64."""
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def choose_layer(kl: dict, threshold: float, num_layers: int) -> int:
    """The first candidate (ascending) whose mean KL is at most ``threshold``; ``num_layers`` when none is."""
    return next((k for k in sorted(kl) if kl[k] <= threshold), num_layers)


def language_identity(model) -> dict:
    """The language model's shape, where it was loaded from, and the whole VLM's fingerprint (config, weights)."""
    from .files import model_fingerprint

    text = model.config.text_config
    return {"model_type": text.model_type, "num_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
            "vocab_size": text.vocab_size, "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
            "fingerprint": model_fingerprint(model)}


def calibrate_vtw(model, processor, images, prompt: str = DEFAULT_PROMPT, threshold: float = DEFAULT_KL_THRESHOLD,
                  first_layer: int | None = None, batch_size: int = 8, progress: bool = True) -> VtwCalibration:
    """Choose VTW's K for ``model`` (a LLaVA-1.5, merged or not) on ``images`` (PIL images) with one prompt.

    The prompt is wrapped with the processor's chat template unless it holds ``<image>``. Candidates are
    ``first_layer .. T-1``; by default ``DEFAULT_FIRST_LAYER`` (VTW's own), or 1 for a model with no more layers
    than that. A ``first_layer`` outside 1..T-1 is refused.
    """
    from tqdm.auto import tqdm

    from .api import apply, encoder_merging, is_applied
    from .llava import chat_prompt, get_vlm_patch, model_inputs

    patch = get_vlm_patch(model)
    if patch is None or not is_applied(model):
        raise DymuError("calibrate_vtw needs a LLaVA model patched by dymu.apply (thresholds may be None)")
    if not images:
        raise DymuError("calibrate_vtw needs at least one image")
    merging = encoder_merging(model)  # DToMe thresholds or ToMe's r, re-applied with each candidate
    vtu, prune = patch.state.vtu, patch.state.language.prune
    layers = model.config.text_config.num_hidden_layers
    if first_layer is None:
        first = DEFAULT_FIRST_LAYER if DEFAULT_FIRST_LAYER < layers else 1
    elif not 1 <= first_layer < layers:
        raise DymuError(f"--first-layer {first_layer}: the language model has {layers} layers, so VTW's candidates are "
                        f"1..{layers - 1}")
    else:
        first = first_layer
    candidates = list(range(first, layers))
    text = chat_prompt(processor, prompt, 1)
    sums = {k: 0.0 for k in candidates}
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="calibrating VTW", unit="batch", disable=not progress):
            chunk = images[start : start + batch_size]
            apply(model, **merging, vtu=vtu)
            inputs = model_inputs(model, processor, chunk, [text] * len(chunk))
            full = _last_logits(model, inputs)
            for k in candidates:
                apply(model, **merging, vtu=vtu, prune=f"vtw:k={k}")
                sums[k] += float(kl_divergence(_last_logits(model, inputs), full).sum())
    finally:
        apply(model, **merging, vtu=vtu, prune=prune)
    kl = {k: sums[k] / len(images) for k in candidates}
    return VtwCalibration(k=choose_layer(kl, threshold, layers), kl=kl, threshold=threshold, samples=len(images),
                          prompt=text, model=language_identity(model))


def _last_logits(model, inputs: dict) -> torch.Tensor:
    """Next-token logits at the last prompt position, no cache: (batch, vocab)."""
    with torch.no_grad():
        return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
