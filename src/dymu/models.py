"""Model presets (random-weight checkpoints of real architectures) and loading by path or hub id."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .vision import DymuError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

#: name -> (family, config kwargs). Geometry of the tiny presets is the real one (577 / 729 tokens),
#: only width and depth are small, so token counts in tests are the real ones.
PRESETS = {
    "clip-vit-l-14-336": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5),
    ),
    "siglip-so400m-14-384": (
        "siglip",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
             image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    ),
    "tiny-clip": (
        "clip",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5),
    ),
    "tiny-siglip": (
        "siglip",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
    ),
}


def build_preset(name: str, seed: int = 0, layers: int | None = None):
    """Return (model, image_processor) with random weights for a preset."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if name not in PRESETS:
        raise DymuError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    family, kwargs = PRESETS[name]
    kwargs = dict(kwargs)
    if layers is not None:
        if layers < 1:
            raise DymuError(f"--layers must be >= 1, got {layers}")
        kwargs["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**kwargs))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**kwargs))
    model.eval()
    return model, make_image_processor(family, kwargs["image_size"])


def make_image_processor(family: str, image_size: int):
    """The stock processor of the family (PIL backend: no torchvision needed)."""
    if family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)


def make_model(name: str, out_dir, seed: int = 0, layers: int | None = None) -> Path:
    model, processor = build_preset(name, seed=seed, layers=layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        f"# Random-weight {name} checkpoint (dymu make-model, seed {seed})\n\n"
        "Weights are random: merge behaviour and speed are representative, features are not.\n"
    )
    return out


def _looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def load_model(name_or_path, dtype: torch.dtype | None = None):
    """Load a vision encoder or LLaVA-style VLM with ``from_pretrained`` from a local folder or a hub id.

    Returns the model in eval mode. A full CLIP/SigLIP checkpoint (image + text) loads its vision side.
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise DymuError(f"model path is a file, expected a checkpoint folder: {name}")
    if not path.exists() and _looks_local(name):
        raise DymuError(f"model folder not found: {name}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DymuError(f"not a Hugging Face checkpoint folder (no config.json): {name}")
        name = str(path)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:  # hub or parsing failure: one clear line
        raise DymuError(f"cannot load model {name!r}: not a local checkpoint folder and not loadable from the hub ({type(exc).__name__})") from None
    model_class = _model_class(config.model_type, name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_class.from_pretrained(name, **kwargs)
    model.eval()
    return model


def _model_class(model_type: str, name: str):
    import transformers as T

    classes = {
        "clip_vision_model": T.CLIPVisionModel,
        "clip": T.CLIPVisionModel,
        "siglip_vision_model": T.SiglipVisionModel,
        "siglip": T.SiglipVisionModel,
        "llava": T.LlavaForConditionalGeneration,
        "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
    }
    if model_type not in classes:
        raise DymuError(f"{name}: unsupported model_type {model_type!r} (supported: {', '.join(classes)})")
    return classes[model_type]


def load_processor(name_or_path):
    """The image processor saved with a checkpoint (PIL backend when torchvision is absent)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(name_or_path))
    except Exception as exc:
        raise DymuError(f"cannot load the image processor of {name_or_path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def describe(model) -> str:
    from .vision import tower_info

    info = tower_info(model)
    return (
        f"{type(model).__name__}: {info.num_layers} layers, width {info.hidden_size}, "
        f"{info.image_size}px/{info.patch_size} -> {info.num_patches} patches{' + CLS' if info.protected else ''}, "
        f"read at layer {info.read_layer}"
    )


def config_json(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
