"""Model presets (random-weight checkpoints of real architectures) and loading by path or hub id."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from .vision import DymuError

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
#: vision tower model_type -> (make_image_processor family, name in messages, its pixel normalisation)
TOWER_FAMILIES = {
    "clip_vision_model": ("clip", "CLIP", "OpenAI CLIP mean/std"),
    "siglip_vision_model": ("siglip", "SigLIP", "mean/std 0.5"),
}
#: files a checkpoint keeps its image processor settings in (a multimodal processor nests them in the second)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

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


#: LLaVA presets: vision preset + Llama text config. ``--layers`` cuts the language model's depth.
LLAVA_PRESETS = {
    "llava-1.5-7b": (
        "clip-vit-l-14-336",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
    ),
    "tiny-llava": (
        "tiny-clip",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=576, max_position_embeddings=2048, rms_norm_eps=1e-5),
    ),
}
#: LLaVA-OneVision presets (``LlavaOnevisionForConditionalGeneration``, llava-hf layout): vision preset, the tower
#: depth OneVision keeps (llava-hf drops SigLIP's last layer and its head; None: the preset's), Qwen2 text config.
#: ``--layers`` cuts the language model's depth. The tiny one has grouped-query attention (4 heads, 1 KV head).
ONEVISION_PRESETS = {
    "llava-onevision-qwen2-7b": (
        "siglip-so400m-14-384", 26,
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6),
    ),
    "tiny-llava-onevision": (
        "tiny-siglip", None,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             vocab_size=576, max_position_embeddings=32768, rms_norm_eps=1e-6),
    ),
}
#: OneVision's AnyRes setting: at most 9 grid crops' worth of tokens (larger grids are bilinearly scaled down)
ONEVISION_ASPECT_RATIO = "anyres_max_9"
ALL_PRESETS = (*PRESETS, *LLAVA_PRESETS, *ONEVISION_PRESETS)


def llava_preset_config(name: str, tokenizer, layers: int | None = None):
    """The LlavaConfig of a LLaVA preset whose token ids are ``tokenizer``'s (``dymu.tokenizer.build_tokenizer``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_name, text_kwargs = LLAVA_PRESETS[name]
    vision_kwargs = PRESETS[vision_name][1]
    text = LlamaConfig(**_text_depth(name, text_kwargs, layers, tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision_kwargs), text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=(336 // 14) ** 2)


def build_llava_preset(name: str, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None):
    """Return (LlavaForConditionalGeneration, LlavaProcessor) with random weights and a real tokenizer."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from .tokenizer import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    config = llava_preset_config(name, tokenizer, layers)
    vision_kwargs = PRESETS[LLAVA_PRESETS[name][0]][1]
    model = _random_model(LlavaForConditionalGeneration, config, seed, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=make_image_processor("clip", vision_kwargs["image_size"]), tokenizer=tokenizer,
                               patch_size=vision_kwargs["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model, processor


def _text_depth(name: str, text_kwargs: dict, layers: int | None, tokenizer) -> dict:
    text_kwargs = dict(text_kwargs)
    if layers is not None:
        if layers < 1:
            raise DymuError(f"--layers must be >= 1, got {layers}")
        text_kwargs["num_hidden_layers"] = layers
    if len(tokenizer) > text_kwargs["vocab_size"]:
        raise DymuError(f"{name}: tokenizer has {len(tokenizer)} tokens, more than the vocabulary {text_kwargs['vocab_size']}")
    return text_kwargs


def onevision_preset_config(name: str, tokenizer, layers: int | None = None):
    """The LlavaOnevisionConfig of a OneVision preset whose token ids are ``tokenizer``'s (built with ``video=True``)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision_name, tower_layers, text_kwargs = ONEVISION_PRESETS[name]
    vision_kwargs = dict(PRESETS[vision_name][1], vision_use_head=False)
    if tower_layers is not None:
        vision_kwargs["num_hidden_layers"] = tower_layers
    text = Qwen2Config(**_text_depth(name, text_kwargs, layers, tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision_kwargs), text_config=text,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT_RATIO)


def onevision_processor_for(config, tokenizer, image_processor=None):
    """The stock ``LlavaOnevisionProcessor`` of a OneVision config (PIL image backend, no torchvision)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from .compat import onevision_processor
    from .tokenizer import ONEVISION_CHAT_TEMPLATE

    vision = config.vision_config
    if image_processor is None:
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": vision.image_size, "width": vision.image_size}, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
            image_grid_pinpoints=config.image_grid_pinpoints)
    return onevision_processor(image_processor, tokenizer, num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               vision_aspect_ratio=config.vision_aspect_ratio, chat_template=ONEVISION_CHAT_TEMPLATE)


def build_onevision_preset(name: str, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None):
    """Return (LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor) with random weights."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer(video=True)
    config = onevision_preset_config(name, tokenizer, layers)
    model = _random_model(LlavaOnevisionForConditionalGeneration, config, seed, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, onevision_processor_for(config, tokenizer)


def _random_model(model_class, config, seed: int, dtype: torch.dtype | None):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        return model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)


def build_preset(name: str, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None):
    """Return (model, processor) with random weights for a preset (an image processor for bare encoders)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if name in LLAVA_PRESETS:
        return build_llava_preset(name, seed=seed, layers=layers, dtype=dtype)
    if name in ONEVISION_PRESETS:
        return build_onevision_preset(name, seed=seed, layers=layers, dtype=dtype)
    if name not in PRESETS:
        raise DymuError(f"unknown preset {name!r}; choose one of: {', '.join(ALL_PRESETS)}")
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
    if dtype is not None:
        model = model.to(dtype)
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


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Files of another checkpoint (processor, tokenizer) must not mix with a new one: ``out`` must be empty, or
    (``overwrite``) a model checkpoint (it has a config.json) that is not the current folder nor holds it."""
    if out.exists() and not out.is_dir():
        raise DymuError(f"{out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DymuError(f"{out} is not empty: pass --overwrite to replace its contents, or choose another folder")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise DymuError(f"{out} is the current folder or holds it: --overwrite replaces only a model folder elsewhere; "
                        "choose another folder")
    if not (out / "config.json").is_file():
        raise DymuError(f"{out} has no config.json, so it is no model checkpoint: --overwrite replaces only a model "
                        "folder; choose another folder")


def make_model(name: str, out_dir, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None,
               overwrite: bool = False) -> Path:
    """Write a preset checkpoint into ``out_dir``, which must be empty or absent (``overwrite``: a model folder,
    replaced). The checkpoint is built in a temporary folder beside it and put in place only once complete, so a
    failure leaves ``out_dir`` as it was."""
    from .files import Lock

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    Path(os.path.abspath(out)).parent.mkdir(parents=True, exist_ok=True)
    with Lock(out, f"folder {out}"):
        model, processor = build_preset(name, seed=seed, layers=layers, dtype=dtype)
        with _built_beside(out) as build:
            model.save_pretrained(build)
            processor.save_pretrained(build)
            (build / "README.md").write_text(
                f"# Random-weight {name} checkpoint (dymu make-model, seed {seed})\n\n"
                "Weights are random: merge behaviour and speed are representative, features are not.\n"
            )
            _same_mode_as(build, build / "README.md")
    return out


@contextlib.contextmanager
def _built_beside(out: Path):
    """A temporary folder beside ``out`` to build in; on success its files replace ``out`` (an absent or empty
    folder gets them moved in; a non-empty one is swapped for the new folder, then deleted); on failure it goes."""
    from .files import default_mode

    out = Path(os.path.abspath(out))  # "." has no name of its own
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".new", dir=out.parent))
    try:
        yield build
        os.chmod(build, default_mode() | 0o111)  # mkdtemp's folder is private (0700); a model folder is not
        if not out.exists():
            os.rename(build, out)
        elif not any(out.iterdir()):
            _move_into(build, out)
        else:
            _swap(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _move_into(build: Path, out: Path) -> None:
    """Move the files of ``build`` into the empty folder ``out`` (the current folder, say); undone on failure."""
    moved = []
    try:
        for item in sorted(build.iterdir()):
            os.rename(item, out / item.name)
            moved.append(item.name)
    except BaseException:
        for item in moved:
            os.rename(out / item, build / item)
        raise


def _swap(build: Path, out: Path) -> None:
    """Put the folder ``build`` in the place of ``out``, then delete the old one (only a link, if ``out`` is one)."""
    old = build.with_suffix(".old")
    os.rename(out, old)
    try:
        os.rename(build, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def _same_mode_as(folder: Path, reference: Path) -> None:
    """Give every file of ``folder`` the permissions of ``reference`` (a file written the ordinary way, so the user's
    umask applies): safetensors writes its weights 0600, where the user's other files are, e.g., 0644."""
    mode = reference.stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _looks_local(name: str) -> bool:
    """Meant as a local folder: a form no hub id takes (hub ids are ``name`` or ``org/name``), or ``org/name``
    whose ``org`` is a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return "/" in name and Path(name).parent.is_dir()


def _hub_unreachable(name: str) -> bool:
    """HF_HUB_OFFLINE=1 and no copy of ``name`` in the local hub cache: loading it can only fail."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    return is_offline_mode() and not isinstance(try_to_load_from_cache(name, "config.json"), str)


def _checked_name(name: str, what: str) -> Path:
    """Fail at once, one line, for a name that can only fail to load: a file, a missing local folder, or (with
    HF_HUB_OFFLINE=1) a hub id absent from the hub cache. Returns the name as a path."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise DymuError(f"{what} path is a file, expected a checkpoint folder: {name}")
    if not path.exists() and _looks_local(name):
        raise DymuError(f"{what} folder not found: {name}")
    if not path.exists() and _hub_unreachable(name):
        raise DymuError(f"{what} {name!r} not found: no such local folder, and HF_HUB_OFFLINE=1 with no copy in the hub cache")
    return path


def load_model(name_or_path, dtype: torch.dtype | None = None):
    """Load a vision encoder or LLaVA-style VLM with ``from_pretrained`` from a local folder or a hub id.

    Returns the model in eval mode. A full CLIP/SigLIP checkpoint (image + text) loads its vision side.
    """
    name, config = load_config(name_or_path)
    model_class = _model_class(config.model_type, name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = model_class.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError:
        files = ", ".join(sorted(p.name for p in Path(name).glob("*.bin"))) or "its .bin weights"
        raise DymuError(f"{name}: refused to load {files}: the pickle holds Python objects besides tensors, which could "
                        "run code (torch.load weights_only); convert it to safetensors from a trusted copy") from None
    model.eval()
    return model


def load_config(name_or_path):
    """(name to load from, config) of a local checkpoint folder or a hub id: the config alone, no weights."""
    from transformers import AutoConfig

    name = str(name_or_path)
    path = _checked_name(name, "model")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DymuError(f"not a Hugging Face checkpoint folder (no config.json): {name}")
        _config_json(path / "config.json")  # a clear line for a file that is no JSON object
        name = str(path)
    try:
        return name, AutoConfig.from_pretrained(name)
    except Exception as exc:  # hub or parsing failure: one clear line
        raise DymuError(f"cannot load model {name!r}: not a local checkpoint folder and not loadable from the hub ({type(exc).__name__})") from None


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


def _has_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def load_processor(name_or_path, full: bool = False):
    """The image processor saved with a checkpoint (PIL backend when torchvision is absent).

    ``full=True`` returns the checkpoint's multimodal processor (tokenizer + image processor) instead.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    name = str(name_or_path)
    folder = _checked_name(name, "processor")
    if folder.is_dir() and not _has_processor(folder):
        raise DymuError(f"{name}: no image processor saved there (no {' or '.join(PROCESSOR_FILES)})")
    try:
        if full and checkpoint_model_type(folder if folder.is_dir() else name) == "llava_onevision":
            from .compat import load_onevision_processor

            return load_onevision_processor(str(folder) if folder.is_dir() else name)
        return (AutoProcessor if full else AutoImageProcessor).from_pretrained(str(folder) if folder.is_dir() else name)
    except Exception as exc:
        raise DymuError(f"cannot load the {'processor' if full else 'image processor'} of {name} ({type(exc).__name__})") from None


def checkpoint_model_type(name_or_path) -> str | None:
    """The model_type a checkpoint's config.json names (None when there is none to read)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(name_or_path)).model_type
    except Exception:
        return None


def image_processor_for(model, name_or_path=None):
    """(image processor, notice): the one saved with the model's checkpoint; when there is none (a tower saved with
    ``save_pretrained`` alone, a model built in memory), the standard processor of the tower's family for its
    image size, and a one-line notice saying so (else None)."""
    from .vision import tower_info

    name = str(name_or_path or "")
    folder = Path(name).expanduser()
    if name and (_has_processor(folder) or not folder.is_dir()):  # saved in the folder, or a hub id
        return load_processor(name), None
    info = tower_info(model)
    family, label, normalization = TOWER_FAMILIES[info.model_type]
    where = f"{name} has no {PROCESSOR_FILES[0]}" if name else "the model has no saved image processor"
    notice = f"{where}: using the standard {label} image processor ({info.image_size} px, {normalization})"
    return make_image_processor(family, info.image_size), notice


def describe(model) -> str:
    from .vision import tower_info

    info = tower_info(model)
    return (
        f"{type(model).__name__}: {info.num_layers} layers, width {info.hidden_size}, "
        f"{info.image_size}px/{info.patch_size} -> {info.num_patches} patches{' + CLS' if info.protected else ''}, "
        f"read at layer {info.read_layer}"
    )



#: key of the DyMU settings inside a checkpoint's config.json
CONFIG_SECTION = "dymu"
#: file name the thresholds got inside a checkpoint folder from ``dymu enable`` before they moved into config.json
THRESHOLDS_IN_CHECKPOINT = "dymu_thresholds.json"


def _config_json(path: Path) -> dict:
    """A checkpoint's config.json, which must be a JSON object."""
    from .jsonfile import json_type, read_json

    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise DymuError(f"{path}: a config.json must be a JSON object, got {json_type(config)}")
    return config


def config_section(name_or_path) -> dict | None:
    """The ``"dymu"`` section of a local checkpoint's config.json, if any."""
    path = Path(str(name_or_path)).expanduser() / "config.json"
    if not path.is_file():
        return None
    section = _config_json(path).get(CONFIG_SECTION)
    if section is not None and (not isinstance(section, dict) or "thresholds" not in section):
        raise DymuError(f"{path}: the \"{CONFIG_SECTION}\" section needs a \"thresholds\" entry (a file name or a list)")
    return section


def settings_from_config(name_or_path, thresholds=None, vtu: str | None = None):
    """(thresholds, vtu): the explicit ones, else the checkpoint's ``"dymu"`` section, else (None, "fast").

    The section holds the thresholds inline: a thresholds file's content (``dymu enable``, a ``dymu.Thresholds``
    is returned) or a plain list; or, as ``dymu enable`` wrote them before, the name of a file in the folder.
    """
    from .thresholds import Thresholds, values_from_json

    section = config_section(name_or_path) or {}
    if thresholds is None and section:
        thresholds = section["thresholds"]
        if isinstance(thresholds, str):
            thresholds = str(Path(str(name_or_path)).expanduser() / thresholds)
        elif "format" in section:
            origin = f"the \"{CONFIG_SECTION}\" section of {Path(str(name_or_path)) / 'config.json'}"
            thresholds = Thresholds.from_json(section, origin=origin)
            thresholds.path = origin
        else:
            origin = str(Path(str(name_or_path)).expanduser() / "config.json")
            thresholds = values_from_json(thresholds, origin, f"{CONFIG_SECTION}.thresholds")
    return thresholds, vtu or section.get("vtu", "fast")


def from_pretrained(name_or_path, dtype: torch.dtype | None = None, thresholds=None, vtu: str | None = None):
    """Load a model; apply DyMU from its config.json ``"dymu"`` section (or from ``thresholds``/``vtu``)."""
    from .api import apply

    model = load_model(name_or_path, dtype=dtype)
    thresholds, vtu = settings_from_config(name_or_path, thresholds, vtu)
    if thresholds is not None:
        apply(model, thresholds, vtu=vtu)
    return model


def _checkpoint_config(checkpoint) -> Path:
    folder = Path(str(checkpoint)).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DymuError(f"not a checkpoint folder (no config.json): {folder}")
    return config_path


def enable(checkpoint, thresholds, vtu: str = "fast") -> tuple[Path, list[str]]:
    """Write a ``"dymu"`` section into a checkpoint folder's config.json: the thresholds file's content (its
    per-layer values, the encoder identity and fingerprint, how they were found; not its image lists) and ``vtu``.
    A copy of the checkpoint made by ``from_pretrained`` + ``save_pretrained`` carries it. Returns (config.json,
    notes on what else changed)."""
    from .files import Lock
    from .llava import check_vtu
    from .thresholds import Thresholds
    from .vision import tower_info

    config_path = _checkpoint_config(checkpoint)
    check_vtu(vtu)
    with Lock(config_path):
        loaded = Thresholds.load(thresholds)
        model = load_model(config_path.parent)  # checks the thresholds against the real encoder, as dymu.apply will
        loaded.check(tower_info(model).identity(), origin=str(thresholds))
        section = loaded.to_json()
        section["images"] = {k: v for k, v in section["images"].items() if k not in ("used", "skipped")}
        return config_path, _write_section(config_path, section | {"vtu": vtu})


def disable(checkpoint) -> tuple[Path, list[str] | None]:
    """Remove the ``"dymu"`` section from a checkpoint folder's config.json (and the thresholds file an older
    ``dymu enable`` put beside it). Returns (config.json, notes on what else changed; None: there was no section)."""
    from .files import Lock

    config_path = _checkpoint_config(checkpoint)
    with Lock(config_path):
        if CONFIG_SECTION not in _config_json(config_path):
            return config_path, None
        return config_path, _write_section(config_path, None)


def _write_section(config_path: Path, section: dict | None) -> list[str]:
    """Replace (None: remove) the ``"dymu"`` section of config.json through a temporary file; a linked config.json
    becomes a regular file (the link's target is not written). Returns notes on what else changed."""
    from .files import atomic_write

    config = _config_json(config_path)
    previous = config.pop(CONFIG_SECTION, None)
    if section is not None:
        config[CONFIG_SECTION] = section
    target = os.path.realpath(config_path)
    notes = []
    if atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n"):
        notes.append(f"{config_path} was a link to {target}: it is now a file of its own (the link's target is unchanged)")
    old_file = config_path.parent / THRESHOLDS_IN_CHECKPOINT
    if isinstance(previous, dict) and previous.get("thresholds") == THRESHOLDS_IN_CHECKPOINT and old_file.is_file():
        old_file.unlink()
        notes.append(f"removed {old_file} (the thresholds an older dymu enable kept beside config.json)")
    return notes
