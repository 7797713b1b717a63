"""Convert an original LLaVA-OneVision checkpoint (``lmms-lab/llava-onevision-qwen2-*``, as LLaVA-NeXT saves it) to
``LlavaOnevisionForConditionalGeneration`` in the llava-hf layout, offline, from a local folder.

The source folder holds a Qwen2 config with LLaVA-NeXT's ``mm_*`` fields (``mm_projector_type`` mlp2x_gelu,
``image_aspect_ratio`` anyres_max_N, ``mm_patch_merge_type`` spatial_unpad, ``image_grid_pinpoints``), the Qwen2
tokenizer and the weights: ``model.*`` (Qwen2), ``lm_head.weight`` (absent when tied to the embeddings),
``model.mm_projector.{0,2}.*``, ``model.image_newline`` and the tuned SigLIP tower
``model.vision_tower.vision_tower.vision_model.*``. LLaVA-NeXT's SigLIP tower deletes the last encoder layer and the
head, and reads the output of the layers left (so400m: 26 of 27); the converted tower keeps exactly those layers
(``vision_feature_layer=-1``), as llava-hf does. ``<image>`` and ``<video>`` become special tokens; Qwen2's
embedding has spare rows, so it is padded (like ``dymu.convert``) only when their ids fall outside.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import torch

from .convert import (EMBED_KEY, HEAD_KEY, IMAGE_TOKEN, TOWER_PREFIX, _assemble, _check_mm_hidden, _fit_vocabulary,
                      _load_tokenizer, _load_tower, _map_keys, _padded_rows, _quiet, _read_config, _read_weights,
                      _text_fields, TEXT_FIELDS, write_converted)
from .tokenizer import VIDEO_TOKEN
from .vision import DymuError

LAYOUT = "LLaVA-OneVision"
PROJECTOR = "mlp2x_gelu"  # the only projector transformers' OneVision has (linear -> GELU -> linear)
MERGE_TYPE = "spatial_unpad"  # base crop + unpadded grid with a newline per row: transformers' OneVision layout
ASPECT_RATIO = re.compile(r"anyres_max_\d+")  # AnyRes, grids above N crops' worth of tokens scaled down
PINPOINT_RANGE = re.compile(r"\((\d+)x(\d+)\)")  # "(1x1),...,(6x6)": crops per side, first to last
DROPPED_LAYERS = 1  # LLaVA-NeXT's SigLIP tower deletes its last encoder layer (and its head)
#: SigLIP towers LLaVA-NeXT names (end of mm_vision_tower) -> their geometry (dymu.models.PRESETS), used when the
#: checkpoint holds the tuned tower and the named one is not on this machine
KNOWN_TOWERS = {"siglip-so400m-patch14-384": "siglip-so400m-14-384"}
QWEN2_FIELDS = (*TEXT_FIELDS, "max_window_layers", "sliding_window", "use_sliding_window", "attention_dropout")
#: processor chat templates a source folder may carry (used instead of dymu's OneVision ChatML when present)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def convert_onevision(src, dst, vision_tower=None, overwrite: bool = False) -> Path:
    """Write ``dst`` so that ``LlavaOnevisionForConditionalGeneration.from_pretrained(dst)`` loads the ``src``
    OneVision model and ``dymu.models.load_processor(dst, full=True)`` its processor.

    ``vision_tower``: the original SigLIP folder (e.g. ``google/siglip-so400m-patch14-384``), needed when the checkpoint
    holds no tower weights, or to name the tower's geometry. ``dst`` must be absent or empty (``overwrite``: a model
    folder, replaced); the checkpoint is built beside it and put in place only once complete."""
    return write_converted(src, dst, lambda source, build: _convert(source, build, vision_tower), overwrite)


def _convert(src: Path, dst: Path, vision_tower) -> None:
    """The conversion of ``src`` written into the (new, empty) folder ``dst``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    from .models import onevision_processor_for

    original = _read_config(src)
    _check_onevision(original, src / "config.json", vision_tower)
    weights = _read_weights(src)
    tuned = {k[len(TOWER_PREFIX):]: weights.pop(k) for k in [k for k in weights if k.startswith(TOWER_PREFIX)]}
    tower_name = str(vision_tower if vision_tower is not None else original["mm_vision_tower"])
    vision_config, tower_state = _siglip_tower(tower_name, vision_tower is not None, tuned, src)
    _check_mm_hidden(original, vision_config, tower_name, src)

    state = {"model.vision_tower." + k: v for k, v in tower_state.items()}
    state.update(_map_keys(weights, src, LAYOUT))
    if EMBED_KEY not in state:
        raise DymuError(f"{src}: no model.embed_tokens.weight: not a LLaVA-OneVision (Qwen2) checkpoint")
    if HEAD_KEY not in state:  # tied embeddings: no lm_head saved
        state[HEAD_KEY] = state[EMBED_KEY].clone()
    dtype = state[EMBED_KEY].dtype
    vocab = state[EMBED_KEY].shape[0]

    tokenizer = _load_tokenizer(src, (IMAGE_TOKEN, VIDEO_TOKEN)) if any(src.glob("tokenizer*")) else None
    if tokenizer is None:
        raise DymuError(f"{src}: no Qwen2 tokenizer that loads (tokenizer.json, tokenizer_config.json, ...): the "
                        "processor needs the checkpoint's tokenizer there")
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    needed = max(image_id + 1, video_id + 1, len(tokenizer))
    rows = vocab if needed <= vocab else _padded_rows(needed)  # Qwen2's spare rows hold the new ids
    _fit_vocabulary(state, rows)
    state = {k: v.to(dtype) for k, v in state.items()}

    text = _text_fields(original, QWEN2_FIELDS)
    text["pad_token_id"] = tokenizer.pad_token_id
    tied = bool(text.get("tie_word_embeddings", False))
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=Qwen2Config(**text, vocab_size=rows), image_token_index=image_id,
        video_token_index=video_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=original["image_aspect_ratio"], projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_grid_pinpoints=grid_pinpoints(original.get("image_grid_pinpoints"), vision_config.image_size,
                                            src / "config.json"),
        tie_word_embeddings=tied)
    model = _assemble(LlavaOnevisionForConditionalGeneration, config, state, src, LAYOUT)
    model.config.dtype = dtype
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dst)

    processor = onevision_processor_for(config, tokenizer)  # SigLIP's 0.5 mean / std at the tower's size, as LLaVA-NeXT
    template = _source_chat_template(src)
    if template is not None:
        processor.chat_template = template
    processor.save_pretrained(dst)  # also writes the tokenizer files


def _check_onevision(original: dict, config_file: Path, vision_tower) -> None:
    """One line when ``original`` is not a LLaVA-NeXT OneVision config this converter covers."""
    if "mm_vision_tower" not in original and vision_tower is None:
        raise DymuError(f"{config_file}: not an original LLaVA-OneVision config (no mm_vision_tower)")
    aspect = original.get("image_aspect_ratio")
    if not isinstance(aspect, str) or not ASPECT_RATIO.fullmatch(aspect):
        raise DymuError(f"{config_file}: not a LLaVA-OneVision checkpoint: image_aspect_ratio={aspect!r}, OneVision "
                        "uses anyres_max_N (an original LLaVA-1.5 checkpoint converts with dymu convert-llava)")
    merge, projector = original.get("mm_patch_merge_type"), original.get("mm_projector_type")
    if merge != MERGE_TYPE or projector != PROJECTOR:
        raise DymuError(f"{config_file}: mm_patch_merge_type={merge!r}, mm_projector_type={projector!r}: transformers' "
                        f"OneVision has only {MERGE_TYPE!r} and {PROJECTOR!r}")


def grid_pinpoints(value, crop: int, where) -> list[list[int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints`` as transformers reads them: ``[height, width]`` pairs in pixels.

    LLaVA-NeXT's pairs are ``(width, height)``: a list, a Python literal string, or a range string
    ``"(1x1),...,(6x6)"`` in crops of ``crop`` pixels (every ``(i, j)`` from the first pair to the last, i outer)."""
    pairs = value
    if isinstance(value, str):
        ends = PINPOINT_RANGE.findall(value)
        if ends:
            (first_w, first_h), (last_w, last_h) = [tuple(map(int, end)) for end in (ends[0], ends[-1])]
            pairs = [(i * crop, j * crop) for i in range(first_w, last_w + 1) for j in range(first_h, last_h + 1)]
        else:
            try:
                pairs = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pairs = None
    if not _is_pairs(pairs):
        raise DymuError(f"{where}: image_grid_pinpoints={value!r} is no list of (width, height) pairs nor a range "
                        "like '(1x1),...,(6x6)'")
    return [[int(height), int(width)] for width, height in pairs]


def _is_pairs(pairs) -> bool:
    return (isinstance(pairs, (list, tuple)) and len(pairs) > 0
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
                    for p in pairs))


def _siglip_tower(name: str, explicit: bool, tuned: dict[str, torch.Tensor], src: Path):
    """(SigLIP vision config of the layers OneVision reads, their weights): the tuned tower of the checkpoint when it
    holds one (its geometry from ``name``'s config, or the known geometry of the tower LLaVA-NeXT names), else the
    tower ``name`` itself; both cut to the layers LLaVA-NeXT keeps, without the head."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if tuned:
        config, weights = _tower_config(name, explicit, src), tuned
    else:
        if not explicit and not Path(name).is_dir():
            hint = f"{src}: no vision tower weights ({TOWER_PREFIX}*) and mm_vision_tower={name!r} is no local folder"
            try:
                with _quiet():
                    tower = SiglipVisionModel.from_pretrained(name, local_files_only=True)
            except (OSError, ValueError, KeyError) as error:
                raise DymuError(f"{hint}: pass --vision-tower DIR (the SigLIP checkpoint folder)") from error
        else:
            tower = _load_tower(SiglipVisionModel, name, src, "SigLIP")
        config, weights = tower.config, tower.state_dict()
    depth = config.num_hidden_layers - DROPPED_LAYERS
    kept = SiglipVisionConfig(**{**config.to_dict(), "num_hidden_layers": depth, "vision_use_head": False})
    return kept, {k: v for k, v in weights.items() if _tower_key_kept(k, depth)}


def _tower_key_kept(key: str, depth: int) -> bool:
    """Whether a SigLIP weight belongs to the first ``depth`` layers (or embeddings / post_layernorm), not the head."""
    if key.startswith("head."):
        return False
    match = re.match(r"encoder\.layers\.(\d+)\.", key)
    return match is None or int(match.group(1)) < depth


def _tower_config(name: str, explicit: bool, src: Path):
    """The original SigLIP's config: from ``name`` (folder, or the hub cache) or, failing that, LLaVA-NeXT's known
    tower of that name."""
    from transformers import SiglipVisionConfig

    from .models import PRESETS

    try:
        with _quiet():
            return SiglipVisionConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        known = next((preset for suffix, preset in KNOWN_TOWERS.items() if name.rstrip("/").endswith(suffix)), None)
        if explicit or known is None:
            raise DymuError(f"vision tower {name!r} (for {src}) is not loadable offline and its geometry is unknown: "
                            f"pass --vision-tower DIR (the SigLIP checkpoint folder) ({type(error).__name__})") from error
        return SiglipVisionConfig(**PRESETS[known][1])


def _source_chat_template(src: Path) -> str | None:
    """A processor chat template shipped in ``src`` (None: the processor keeps dymu's OneVision ChatML)."""
    for name in CHAT_TEMPLATE_FILES:
        path = src / name
        if path.is_file():
            try:
                return json.loads(path.read_text())["chat_template"] if path.suffix == ".json" else path.read_text()
            except (ValueError, KeyError, TypeError) as error:
                raise DymuError(f"{path}: not a chat template file ({type(error).__name__})") from error
    return None
