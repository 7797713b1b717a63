"""Convert an original-LLaVA checkpoint (``liuhaotian/llava-v1.5-7b`` layout) to ``LlavaForConditionalGeneration``.

The source folder holds a Llama config with the LLaVA ``mm_*`` fields and the language model + projector weights
(``model.*``, ``lm_head.weight``, ``model.mm_projector.*``); the CLIP vision tower comes from ``mm_vision_tower``
(or the ``vision_tower`` argument). Like llava-hf, ``<image>`` gets its own id and the embedding / lm_head rows
are padded to a multiple of ``VOCAB_MULTIPLE`` (new rows: the mean of the existing rows).

The reading, renaming, vocabulary and destination helpers here also serve ``dymu.convert_onevision``.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .tokenizer import CHAT_TEMPLATE
from .vision import DymuError

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf: 32000 + <image> + <pad> -> 32064 rows
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_SELECT_LAYER = -2  # LLaVA-1.5 reads the penultimate CLIP layer
CLS_TOKENS = 1  # CLIP prepends one CLS token to the patch tokens
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> HF strategy
PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}  # mm_projector_type -> projector_hidden_act
#: Llama fields copied from the original config (everything else there is LLaVA training state).
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling",
               "rope_parameters",
               "attention_bias", "mlp_bias", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
               "tie_word_embeddings", "pretraining_tp")
PROJECTOR_KEYS = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",  # mlp2x_gelu
                  "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
                  "model.mm_projector.": "model.multi_modal_projector.linear_1."}  # linear (checked last)
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."  # a tuned tower saved inside the checkpoint
MODEL_KEYS = ("model.image_newline",)  # LLaVA-NeXT keys of the multimodal model itself (not the language model's)
EMBED_KEY, HEAD_KEY = "model.language_model.embed_tokens.weight", "lm_head.weight"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    index = next((src / name for name in WEIGHT_INDEXES if (src / name).is_file()), None)
    if index is not None:
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise DymuError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    weights = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights.update(load_file(file))
        else:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
    return weights


def _map_keys(weights: dict[str, torch.Tensor], src: Path, layout: str = "LLaVA") -> dict[str, torch.Tensor]:
    """Original key names (LLaVA / LLaVA-NeXT) -> transformers key names (``model.language_model.*``,
    ``model.multi_modal_projector.*``, ``model.vision_tower.*``, ``model.image_newline``, ``lm_head.*``)."""
    out = {}
    for key, value in weights.items():
        if key.endswith("rotary_emb.inv_freq"):  # buffer stored by old transformers versions
            continue
        if key.startswith(TOWER_PREFIX):
            out["model.vision_tower." + key[len(TOWER_PREFIX):]] = value
        elif key.startswith("model.mm_projector."):
            prefix = next(p for p in PROJECTOR_KEYS if key.startswith(p))
            out[PROJECTOR_KEYS[prefix] + key[len(prefix):]] = value
        elif key in MODEL_KEYS:
            out[key] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        else:
            out[key] = value
    if "model.multi_modal_projector.linear_1.weight" not in out:
        raise DymuError(f"{src}: no model.mm_projector.* weights: not an original-{layout} checkpoint")
    return out


def _identity_linear_2(state: dict[str, torch.Tensor]) -> None:
    """A ``linear`` projector in transformers' two-layer projector: act = identity, ``linear_2`` = identity."""
    width = state["model.multi_modal_projector.linear_1.weight"].shape[0]
    dtype = state["model.multi_modal_projector.linear_1.weight"].dtype
    state["model.multi_modal_projector.linear_2.weight"] = torch.eye(width, dtype=dtype)
    state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(width, dtype=dtype)


@contextmanager
def _quiet():
    """Silence transformers' load reports (unused keys, model_type mismatch) and its deprecation notes about the
    original config's fields, all expected here."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(verbosity)


def _load_tower(model_class, name: str, src: Path, family: str = "CLIP"):
    """The vision tower ``name`` (a folder or a hub id) as a ``model_class`` (a full CLIP / SigLIP checkpoint: its
    vision side)."""
    try:
        with _quiet():  # a full CLIPModel / SiglipModel folder: its text-tower keys are expected to be unused
            return model_class.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise DymuError(f"vision tower {name!r} (for {src}) is not loadable offline; pass vision_tower=<local {family} "
                        f"folder> ({type(error).__name__})") from error


def _load_tokenizer(src: Path, placeholders: tuple[str, ...] = (IMAGE_TOKEN,)):
    """The tokenizer in ``src`` with the ``placeholders`` added as special tokens where missing (and a pad token);
    None (with a warning) when ``src`` holds none that loads."""
    from transformers import AddedToken, AutoTokenizer

    try:
        with _quiet():  # the source config.json has a model_type transformers does not know
            tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as error:  # noqa: BLE001 - any failure means "no usable tokenizer"
        warnings.warn(f"{src}: no usable tokenizer ({type(error).__name__}); writing no processor", stacklevel=4)
        return None
    for token in placeholders:
        if token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _pad_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - matrix.shape[0]
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix, mean.expand(extra, -1)]) if extra > 0 else matrix


def _padded_rows(needed: int) -> int:
    """Vocabulary rows for ``needed`` token ids: the next multiple of ``VOCAB_MULTIPLE``."""
    return math.ceil(needed / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _fit_vocabulary(state: dict[str, torch.Tensor], rows: int) -> None:
    """Pad the embedding and lm_head rows of ``state`` to ``rows`` (new rows: the mean of the existing rows)."""
    for key in (EMBED_KEY, HEAD_KEY):
        if key in state:
            state[key] = _pad_rows(state[key], rows)


def _text_fields(original: dict, fields: tuple[str, ...] = TEXT_FIELDS) -> dict:
    """The language-model fields of an original config (None values dropped, KV heads default to heads)."""
    text = {k: original[k] for k in fields if original.get(k) is not None}
    text.setdefault("num_key_value_heads", text.get("num_attention_heads"))
    return text


def _assemble(model_class, config, state: dict[str, torch.Tensor], src: Path, layout: str):
    """A ``model_class`` of ``config`` holding exactly ``state`` (built on the meta device: no second copy)."""
    with torch.device("meta"):
        model = model_class(config)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shapes that do not fit the config
        first = str(error).split("size mismatch for ", 1)[-1].splitlines()[0].strip()
        raise DymuError(f"{src}: weights do not match the {layout} layout ({first})") from error
    if result.missing_keys or result.unexpected_keys:
        raise DymuError(f"{src}: weights do not match the {layout} layout (missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    return model


def _read_config(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise DymuError(f"{src}: no config.json")
    return json.loads((src / "config.json").read_text())


def write_converted(src, dst, convert, overwrite: bool) -> Path:
    """Run ``convert(src, folder)`` into a new folder beside ``dst`` and put it in place once complete (a failure
    leaves ``dst`` as it was). ``dst`` must be absent or empty (``overwrite``: a model folder, replaced), outside
    ``src``; it is locked meanwhile."""
    from .files import Lock
    from .models import _built_beside, _check_out_dir

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DymuError(f"{src}: no such folder")
    if dst.exists() and not dst.is_dir():
        raise DymuError(f"{dst} is a file, not a folder")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents or dst.resolve() in src.resolve().parents:
        raise DymuError(f"{dst}: the destination must be outside the source folder (and not hold it)")
    _check_out_dir(dst, overwrite)
    dst.resolve().parent.mkdir(parents=True, exist_ok=True)
    with Lock(dst, f"folder {dst}"), _built_beside(dst) as build:
        convert(src, build)
    return dst


def _image_processor(tower_dir: Path | None, image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if tower_dir is not None and (tower_dir / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(tower_dir)
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def convert_llava(src, dst, vision_tower=None, overwrite: bool = False) -> Path:
    """Write ``dst`` so that ``LlavaForConditionalGeneration.from_pretrained(dst)`` loads the ``src`` LLaVA model.

    ``dst`` must be absent or empty (``overwrite``: a model folder, replaced); the checkpoint is built beside it and
    put in place only once complete, so a failure leaves ``dst`` as it was."""
    return write_converted(src, dst, lambda source, build: _convert(source, build, vision_tower), overwrite)


def _convert(src: Path, dst: Path, vision_tower) -> None:
    """The conversion of ``src`` written into the (new, empty) folder ``dst``."""
    from transformers import CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    original = _read_config(src)
    if "mm_vision_tower" not in original and vision_tower is None:
        raise DymuError(f"{src / 'config.json'}: not an original-LLaVA config (no mm_vision_tower)")
    projector = original.get("mm_projector_type", "linear")
    feature = original.get("mm_vision_select_feature", "patch")
    if projector not in PROJECTOR_ACT or feature not in SELECT_STRATEGY:
        raise DymuError(f"{src / 'config.json'}: unsupported mm_projector_type={projector!r} or "
                        f"mm_vision_select_feature={feature!r}")

    tower_name = str(vision_tower if vision_tower is not None else original["mm_vision_tower"])
    tower = _load_tower(CLIPVisionModel, tower_name, src)
    vision_config = tower.config
    _check_mm_hidden(original, vision_config, tower_name, src)

    state = {"model.vision_tower." + k: v for k, v in tower.state_dict().items()}
    state.update(_map_keys(_read_weights(src), src))  # a tower tuned in the checkpoint wins
    if projector == "linear":
        _identity_linear_2(state)
    if EMBED_KEY not in state:
        raise DymuError(f"{src}: no model.embed_tokens.weight: not a LLaVA-Llama checkpoint")
    dtype = state[EMBED_KEY].dtype
    vocab = state[EMBED_KEY].shape[0]

    tokenizer = _load_tokenizer(src) if any(src.glob("tokenizer*")) else None
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else vocab
    rows = _padded_rows(max(vocab, image_token_index + 1, len(tokenizer) if tokenizer is not None else 0))
    _fit_vocabulary(state, rows)
    state = {k: v.to(dtype) for k, v in state.items()}

    text = _text_fields(original)
    if tokenizer is not None:
        text["pad_token_id"] = tokenizer.pad_token_id
    text_config = LlamaConfig(**text, vocab_size=rows)
    strategy = SELECT_STRATEGY[feature]
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    image_tokens = patches + (CLS_TOKENS if strategy == "full" else 0)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_index,
                         vision_feature_layer=original.get("mm_vision_select_layer", DEFAULT_SELECT_LAYER),
                         vision_feature_select_strategy=strategy, projector_hidden_act=PROJECTOR_ACT[projector],
                         multimodal_projector_bias=True, image_seq_length=image_tokens)
    model = _assemble(LlavaForConditionalGeneration, config, state, src, "LLaVA")
    model.config.dtype = dtype
    model.save_pretrained(dst)

    if tokenizer is None:
        warnings.warn(f"{src}: no tokenizer; wrote weights and config only (image_token_index={image_token_index}, "
                      "no processor)", stacklevel=2)
        return
    tower_dir = Path(tower_name) if Path(tower_name).is_dir() else None
    processor = LlavaProcessor(image_processor=_image_processor(tower_dir, vision_config.image_size), tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=CLS_TOKENS, image_token=IMAGE_TOKEN,
                               chat_template=CHAT_TEMPLATE)  # LLaVA-1.5's "USER: <image>\n... ASSISTANT:" format
    processor.save_pretrained(dst)  # also writes the tokenizer files


def _check_mm_hidden(original: dict, vision_config, tower_name: str, src: Path) -> None:
    mm_hidden = original.get("mm_hidden_size", vision_config.hidden_size)
    if mm_hidden != vision_config.hidden_size:
        raise DymuError(f"{src}: mm_hidden_size={mm_hidden} but vision tower {tower_name!r} has hidden_size="
                        f"{vision_config.hidden_size}")
