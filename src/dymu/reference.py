"""Import thresholds released with the DyMU reference code (open_clip threshold checkpoints).

The reference saves ``torch.save({"name": model_name, "state_dict": state_dict})`` where the state dict
(possibly with a DDP ``module.`` prefix) holds one 0-dim ``threshold`` buffer per block:

* ``visual.transformer.resblocks.{i}.threshold``  OpenAI CLIP ViT (open_clip)      -> HF CLIPVisionModel
* ``visual.trunk.blocks.{i}.threshold``           SigLIP via timm (open_clip)      -> HF SiglipVisionModel
* ``vision_model.encoder.layers.{i}.threshold``   SigLIP SO400M, LLaVA-OneVision   -> HF SiglipVisionModel

Block i of those encoders is layer i of the HF model. Geometry (width, image and patch size) is read
from the weights stored next to the thresholds when present, else from the model name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .thresholds import Thresholds
from .vision import DymuError

#: initial value of the reference's threshold buffers; a block still holding it never merged
REFERENCE_UNSET = 1.0
_BLOCK_PATTERNS = {
    "clip_vision_model": re.compile(r"^(?:module\.)?visual\.transformer\.resblocks\.(\d+)\.threshold$"),
    "siglip_vision_model": re.compile(r"^(?:module\.)?(?:visual\.trunk\.blocks|vision_model\.encoder\.layers)\.(\d+)\.threshold$"),
}
#: model-name fragments -> (hidden_size, image_size, patch_size), for checkpoints that carry no weights
_KNOWN_GEOMETRY = {
    "ViT-L-14-336": (1024, 336, 14),
    "ViT-B-16-SigLIP-384": (768, 384, 16),
    "SO400M": (1152, 384, 14),
    "so400m-patch14-384": (1152, 384, 14),
}
#: weight names (without the DDP prefix) -> how to read (hidden, patch) from the patch-embedding conv
_PATCH_WEIGHTS = ("visual.conv1.weight", "visual.trunk.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight")
_POSITION_WEIGHTS = ("visual.positional_embedding", "visual.trunk.pos_embed", "vision_model.embeddings.position_embedding.weight")


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _geometry(state: dict, name: str, has_cls: bool) -> dict:
    geometry: dict = {}
    for key in _PATCH_WEIGHTS:
        if key in state and getattr(state[key], "dim", lambda: 0)() == 4:
            hidden, _, patch, _ = state[key].shape
            geometry.update(hidden_size=int(hidden), patch_size=int(patch))
    for key in _POSITION_WEIGHTS:
        if key in state and "patch_size" in geometry:
            tokens = state[key].shape[-2] - (1 if has_cls else 0)
            side = int(math.isqrt(tokens))
            if side * side == tokens:
                geometry["image_size"] = side * geometry["patch_size"]
    if len(geometry) < 3:
        for fragment, (hidden, image, patch) in _KNOWN_GEOMETRY.items():
            if fragment.lower() in name.lower():
                geometry = {"hidden_size": hidden, "image_size": image, "patch_size": patch} | geometry
                break
    return geometry


def _target_and_schedule(name: str, num_patches: int | None):
    match = re.search(r"(\d+)out(?:[-_](reverse[-_]linear|linear))?", name)
    if not match:
        return None, None
    return int(match.group(1)), (match.group(2) or "constant").replace("_", "-")


def import_reference(path, num_layers: int | None = None) -> Thresholds:
    """Read a reference threshold checkpoint. ``num_layers`` keeps only the first layers (OneVision drops its last)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DymuError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DymuError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None
    name = ""
    if isinstance(data, dict) and "state_dict" in data:
        name = str(data.get("name", "") or "")
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise DymuError(f"{path}: expected a state dict (optionally under \"state_dict\"), found {type(data).__name__}")
    found: dict[str, dict[int, float]] = {}
    for key, value in data.items():
        for model_type, pattern in _BLOCK_PATTERNS.items():
            match = pattern.match(key)
            if match:
                found.setdefault(model_type, {})[int(match.group(1))] = float(torch.as_tensor(value).float())
    if not found:
        raise DymuError(f"{path}: no per-block '...threshold' entries found (is this a DyMU threshold checkpoint?)")
    if len(found) > 1:
        raise DymuError(f"{path}: thresholds for several encoders found ({', '.join(found)})")
    model_type, blocks = next(iter(found.items()))
    count = max(blocks) + 1
    if sorted(blocks) != list(range(count)):
        missing = sorted(set(range(count)) - set(blocks))
        raise DymuError(f"{path}: thresholds missing for blocks {missing}")
    # 1.0 is the reference's "never updated" sentinel (layers whose schedule value is 0): never merge.
    values = [math.inf if blocks[i] == REFERENCE_UNSET else blocks[i] for i in range(count)]
    if num_layers is not None:
        if not 1 <= num_layers <= count:
            raise DymuError(f"--num-layers must be between 1 and {count}, got {num_layers}")
        values = values[:num_layers]
    has_cls = model_type == "clip_vision_model"
    state = {_strip(k): v for k, v in data.items()}
    identity = {"model_type": model_type, "num_layers": len(values), "has_cls": has_cls, "name_or_path": name or path.name}
    identity |= _geometry(state, name, has_cls)
    target, schedule = _target_and_schedule(name, None)
    return Thresholds(values=values, model=identity, schedule=schedule, target_tokens=target,
                      images={}, source=f"imported from reference checkpoint {path.name}")
