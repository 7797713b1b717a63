"""The one place that names the transformers internals dymu relies on, and checks them.

dymu never patches a transformers class. It replaces ``forward`` on model *instances* (vision encoder layers,
the LLaVA base model), registers PyTorch hooks around stock sub-modules (the language model's projections and
MLPs) and, for exact VTU only, registers an attention kernel under its own name with transformers'
``AttentionInterface``. Everything that names a transformers attribute, parameter or registry is listed here;
``check_tower`` / ``check_vlm`` run when ``dymu.apply`` patches a model and refuse an unknown layout with one
line naming the installed transformers version and the tested range.

What is relied on, by adapter:

* vision tower (``dymu.vision``): ``embeddings``, ``pre_layrnorm`` (CLIP), ``encoder.layers[i]`` with
  ``layer_norm1``, ``self_attn`` (called as ``self_attn(hidden_states=..., attention_mask=...)`` and returning
  ``(output, weights)``), ``self_attn.k_proj``, ``layer_norm2``, ``mlp``.
* LLaVA (``dymu.llava``): ``model.model`` with ``vision_tower``, ``multi_modal_projector``, ``language_model``,
  ``get_image_features``, ``config.image_token_id``; ``forward`` parameters :data:`VLM_FORWARD_PARAMETERS`
  (public API names); ``generate`` passing pre-encoded features as ``mm_encoder_outputs={"image": ...}``.
* language model (``dymu.language``): ``layers[i].self_attn.{q,k,v,o}_proj`` and ``layers[i].mlp`` as
  token-wise modules called on ``(batch, seq, features)``; ``layers[i].self_attn`` called with ``hidden_states``
  (keyword or first positional) whose shape it reads, and each decoder layer returning its hidden states (VTU runs
  the residual stream, norms and MLP on the unique tokens and gives attention a full-length input);
  ``self_attn.head_dim`` / ``layer_idx``; the decoder-layer forward parameters :data:`DECODER_LAYER_PARAMETERS`
  (a plan that edits a layer gathers them). The KV cache is found by type (``Cache``) in the language model's
  inputs and outputs, never by argument name; a plan that drops positions at decode steps shrinks
  ``cache.layers[i].keys / .values`` of :data:`SHRINKABLE_CACHE_LAYERS` (``keep_cache_slots``) and refuses any other
  cache; beam search reorders it through ``reorder_cache(beam_idx)``, which ``follow_reorder`` wraps on the instance
  so the plan's rows follow. Exact VTU also needs ``rotary_emb`` (returns ``(cos, sin)``); exact VTU and policies that read attention
  select their own kernel through ``config._attn_implementation`` and the ``AttentionInterface`` /
  ``AttentionMaskInterface`` registries (wrapping the model's own kernel, and its module's
  ``eager_attention_forward`` for eager).
* images (``dymu.images``): ``transformers.image_transforms.convert_to_rgb`` for processors that do not convert.

Run time adds what a structural check cannot see: every hooked module must run once per layer in a prefill
that dymu compresses, and the KV cache must grow by the full sequence length (``dymu.language``).
"""

from __future__ import annotations

import inspect
import warnings
from importlib.metadata import PackageNotFoundError, version

from torch import nn

from .errors import DymuError

#: transformers releases the whole test suite passes on (``.ci/run`` tests both ends); pyproject.toml admits
#: ``>=TESTED_MIN,<NEXT_UNTESTED`` (tests/test_compat.py keeps the two in step)
TESTED_MIN = "5.18.0"
TESTED_MAX = "5.25.0"
NEXT_UNTESTED = "5.26"

VISION_LAYER_ATTRIBUTES = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
VISION_ATTENTION_PARAMETERS = ("hidden_states", "attention_mask")
#: what ``dymu.vision``'s packed path (images of different lengths) reads of a CLIP / SigLIP attention module: its
#: projections (nn.Linear), head layout and scale; the kernel is the model's own (``base_kernel``)
VISION_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
VISION_ATTENTION_ATTRIBUTES = ("num_heads", "head_dim", "scale")
VLM_ATTRIBUTES = ("vision_tower", "multi_modal_projector", "language_model", "get_image_features")
#: LlavaModel.forward parameters dymu reads or sets (by name, through inspect.signature binding)
VLM_FORWARD_PARAMETERS = ("input_ids", "pixel_values", "attention_mask", "inputs_embeds", "mm_encoder_outputs",
                          "vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
#: token-wise linear maps of a decoder layer's attention that VTU runs on the unique tokens
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: decoder-layer forward parameters dymu reads (RoPE tables, positions) or gathers by the positions a layer holds
DECODER_LAYER_PARAMETERS = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
#: dymu's attention kernel is registered as KERNEL_PREFIX + the model's own implementation (whose masks it takes)
KERNEL_PREFIX = "dymu_"


def transformers_version() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:  # a source checkout without metadata
        import transformers

        return transformers.__version__


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits or digits != piece:
            break
        parts.append(int(digits))
    return tuple(parts)


def tested_range() -> str:
    return f"tested {TESTED_MIN} to {TESTED_MAX}"


def in_tested_range(text: str | None = None) -> bool:
    current = _release(text or transformers_version())[:3]
    return _release(TESTED_MIN) <= current <= _release(TESTED_MAX)


class LayoutError(DymuError):
    """The model does not have the layout dymu relies on (one line, naming the versions)."""


def refuse(what: str) -> LayoutError:
    return LayoutError(f"{what}: dymu does not know this layout (transformers {transformers_version()}, "
                       f"{tested_range()}); refusing to patch rather than risk wrong answers")


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the tested range (the layout checks passed)."""


_warned_untested = False


def warn_if_untested() -> None:
    """One line, once per process, without a source line, when transformers is outside the tested range."""
    global _warned_untested
    if _warned_untested or in_tested_range():
        return
    _warned_untested = True
    message = (f"dymu: transformers {transformers_version()} is outside the {tested_range()} range; the layout checks "
               "passed and every prefill is checked at run time")
    # warn_explicit names no Python file, so the warning prints as one line (no source line under it)
    warnings.warn_explicit(message, UntestedTransformersWarning, filename="dymu", lineno=0, module="dymu")


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _missing(module: nn.Module, names) -> list[str]:
    return [name for name in names if not hasattr(module, name)]


def check_tower(tower: nn.Module, has_cls: bool) -> None:
    """The CLIP / SigLIP vision-tower layout ``dymu.vision`` runs on."""
    name = type(tower).__name__
    needed = ["embeddings", "encoder"] + (["pre_layrnorm"] if has_cls else [])
    if missing := _missing(tower, needed):
        raise refuse(f"{name} has no {', '.join(missing)}")
    layers = getattr(tower.encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise refuse(f"{name}.encoder has no layers list")
    for index, layer in enumerate(layers):
        if missing := _missing(layer, VISION_LAYER_ATTRIBUTES):
            raise refuse(f"{name} encoder layer {index} ({type(layer).__name__}) has no {', '.join(missing)}")
        attention = layer.self_attn
        if linears := [p for p in VISION_ATTENTION_LINEARS if not isinstance(getattr(attention, p, None), nn.Linear)]:
            raise refuse(f"{name} encoder layer {index}: {type(attention).__name__} has no {', '.join(linears)} "
                         f"linear layer")
        if missing := _missing(attention, VISION_ATTENTION_ATTRIBUTES):
            raise refuse(f"{name} encoder layer {index}: {type(attention).__name__} has no {', '.join(missing)}")
        if missing := [p for p in VISION_ATTENTION_PARAMETERS if p not in _parameters(attention.forward)]:
            raise refuse(f"{type(attention).__name__}.forward takes no {', '.join(missing)}")


def check_vlm(base: nn.Module) -> None:
    """The LLaVA base-model layout ``dymu.llava`` relies on."""
    name = type(base).__name__
    if missing := _missing(base, VLM_ATTRIBUTES):
        raise refuse(f"{name} has no {', '.join(missing)}")
    if getattr(base.config, "image_token_id", None) is None:
        raise refuse(f"{name}.config has no image_token_id")
    parameters = _parameters(type(base).forward)
    if missing := [p for p in VLM_FORWARD_PARAMETERS if p not in parameters]:
        raise refuse(f"{name}.forward takes no {', '.join(missing)}")


def check_language_model(language_model: nn.Module, exact: bool, prune: bool = False) -> None:
    """The decoder layout ``dymu.language`` hooks into (Llama / Qwen2 style)."""
    name = type(language_model).__name__
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise refuse(f"{name} has no decoder layers list")
    for index, layer in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None or not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise refuse(f"{name} layer {index} ({type(layer).__name__}) has no self_attn and mlp")
        if missing := [p for p in PROJECTIONS if not isinstance(getattr(attention, p, None), nn.Linear)]:
            raise refuse(f"{name} layer {index}: {type(attention).__name__} has no {', '.join(missing)} linear layer(s)")
        if not isinstance(getattr(attention, "head_dim", None), int) or not isinstance(getattr(attention, "layer_idx", None), int):
            raise refuse(f"{name} layer {index}: {type(attention).__name__} has no head_dim and layer_idx")
        if missing := [p for p in DECODER_LAYER_PARAMETERS if p not in _parameters(type(layer).forward)]:
            raise refuse(f"{type(layer).__name__}.forward takes no {', '.join(missing)}")
    if exact and not isinstance(getattr(language_model, "rotary_emb", None), nn.Module):
        raise refuse(f"{name} has no rotary_emb (exact VTU needs the RoPE tables)")
    if exact or prune:
        if attention_registries() is None:
            raise refuse("transformers has no AttentionInterface / AttentionMaskInterface")
        import sys

        attention = layers[0].self_attn
        if not callable(getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)):
            raise refuse(f"the module of {type(attention).__name__} has no eager_attention_forward")


def attention_registries():
    """(AttentionInterface, AttentionMaskInterface) classes, or None when this transformers lacks them."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return None
    return AttentionInterface, AttentionMaskInterface


def register_kernel(base: str, kernel) -> str:
    """Register ``kernel`` as ``dymu_<base>``, taking ``base``'s masks (idempotent). Returns the name to select."""
    interface, masks = attention_registries()
    name = KERNEL_PREFIX + base
    interface.register(name, kernel)
    mask = masks._global_mapping.get(base)
    if mask is None:
        raise refuse(f"attention implementation {base!r} has no mask function dymu can reuse")
    masks.register(name, mask)
    return name


def base_kernel(module: nn.Module):
    """The kernel of the implementation dymu's kernel wraps for ``module`` (``dymu_sdpa`` -> sdpa)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = module.config._attn_implementation.removeprefix(KERNEL_PREFIX)
    eager = sys.modules[type(module).__module__].eager_attention_forward  # each model file defines its eager kernel
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)


def find_cache(values):
    """The first transformers ``Cache`` among ``values`` (found by type, whatever the argument is called)."""
    from transformers.cache_utils import Cache

    for value in values:
        if isinstance(value, Cache):
            return value
    return None


#: KV-cache layer classes whose tensors dymu shrinks per layer at decode steps: ``keys`` / ``values`` of shape
#: (batch, kv_heads, positions, head_dim), grown by concatenation (``DynamicCache``, generate's default)
SHRINKABLE_CACHE_LAYERS = ("DynamicLayer",)


def is_dynamic(cache) -> bool:
    """Every layer of ``cache`` is a plain dynamic layer (no static, sliding-window or quantized storage)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ in SHRINKABLE_CACHE_LAYERS for layer in layers)


def check_shrinkable(cache) -> None:
    if not is_dynamic(cache):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", ())}) or ["no layers list"]
        raise DymuError(f"pruning shrinks each layer's KV cache; {type(cache).__name__} ({', '.join(kinds)}) cannot: "
                        "use the dynamic cache (generate's default)")


def keep_cache_slots(cache, layer: int, index) -> None:
    """Layer ``layer`` of a dynamic cache keeps the slots ``index`` (batch, kept) of its (batch, heads, slots, d)."""
    entry = cache.layers[layer]
    gather = index[:, None, :, None]
    entry.keys = entry.keys.gather(2, gather.expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1]))
    entry.values = entry.values.gather(2, gather.expand(-1, entry.values.shape[1], -1, entry.values.shape[-1]))


def follow_reorder(cache, callback) -> None:
    """After beam search reorders the rows of ``cache`` (``Cache.reorder_cache(beam_idx)``, which generate calls after
    every step), ``callback(beam_idx)`` runs: the instance's method is wrapped (the class is left alone)."""
    reorder = cache.reorder_cache

    def reordered(beam_idx):
        reorder(beam_idx)
        callback(beam_idx)

    cache.reorder_cache = reordered


def bind_arguments(function, *args, **kwargs) -> tuple[dict, dict]:
    """(named arguments, extra ``**kwargs``) of a call, bound to ``function``'s signature."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    extra = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = arguments.pop(name, {})
    return arguments, extra


# ---------------------------------------------------------------------------------------------- LLaVA-OneVision
#: what ``dymu.llava`` relies on in ``LlavaOnevisionModel``: its layout function (called on dymu's own features and
#: on probe tensors, so the language model sees exactly the stock token layout; ``dymu flops`` calls it on a
#: config-only stand-in, ``onevision_pack``), the newline parameter, and the module-level crop count of an image size
ONEVISION_ATTRIBUTES = ("pack_image_features", "image_newline")
ONEVISION_PACK_PARAMETERS = ("image_features", "image_sizes", "image_newline", "vision_aspect_ratio")


def check_onevision(base: nn.Module) -> None:
    name = type(base).__name__
    if missing := _missing(base, ONEVISION_ATTRIBUTES):
        raise refuse(f"{name} has no {', '.join(missing)}")
    if missing := [p for p in ONEVISION_PACK_PARAMETERS if p not in _parameters(base.pack_image_features)]:
        raise refuse(f"{name}.pack_image_features takes no {', '.join(missing)}")
    if getattr(base.config, "image_grid_pinpoints", None) is None:
        raise refuse(f"{name}.config has no image_grid_pinpoints")


def onevision_crops(base: nn.Module, image_sizes, batch_num_images=None) -> list[int]:
    """Crops (base + AnyRes grid) the stock OneVision model reads per image: images of multi-image prompts get
    their base crop only (``batch_num_images``), like ``LlavaOnevisionModel.get_image_features``."""
    if batch_num_images is None:
        single = [True] * len(image_sizes)
    else:
        single = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    counts = anyres_crops(image_sizes, base.config.image_grid_pinpoints, base.config.vision_config.image_size)
    return [n if alone else 1 for n, alone in zip(counts, single)]


def onevision_pack(config):
    """``LlavaOnevisionModel.pack_image_features`` of a OneVision ``config`` without a model (for counts from a config
    alone): the stock method, called on a stand-in that holds only ``config`` (the method reads nothing else of its
    model: the crop and patch size, ``image_grid_pinpoints``)."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    pack = getattr(LlavaOnevisionModel, "pack_image_features", None)
    if pack is None or [p for p in ONEVISION_PACK_PARAMETERS if p not in _parameters(pack)]:
        raise refuse("LlavaOnevisionModel.pack_image_features is missing or takes other parameters")
    stand_in = SimpleNamespace(config=config)

    def packed(image_features, image_sizes, image_newline=None, vision_aspect_ratio=None):
        return pack(stand_in, image_features, image_sizes, image_newline=image_newline,
                    vision_aspect_ratio=vision_aspect_ratio)

    return packed


def anyres_crops(image_sizes, grid_pinpoints, crop_size: int) -> list[int]:
    """Crops (base + grid) of each (height, width) image under AnyRes: transformers' ``image_size_to_num_patches``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return [image_size_to_num_patches(image_size=size, grid_pinpoints=grid_pinpoints, patch_size=crop_size)
            for size in image_sizes]


def onevision_processor(image_processor, tokenizer, **kwargs):
    """A ``LlavaOnevisionProcessor`` built without torchvision. Its constructor checks the video processor's class
    through transformers' video-processor mapping, which installs without torchvision cannot resolve, even for
    images only (transformers#48558). The check is skipped for this one instance; the video processor is the stock
    one (it saves and loads; processing a video needs torchvision)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    video_processor = kwargs.pop("video_processor", None) or LlavaOnevisionVideoProcessor()
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.check_argument_for_proper_class = lambda name, argument: type(argument)
    try:
        LlavaOnevisionProcessor.__init__(processor, image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=video_processor, **kwargs)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def load_onevision_processor(folder: str):
    """The ``LlavaOnevisionProcessor`` saved in ``folder``, loaded part by part (``AutoProcessor`` needs torchvision
    for OneVision's video processor): image processor (PIL backend), tokenizer, the processor's own settings."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    settings, _ = LlavaOnevisionProcessor.get_processor_dict(folder)
    names = set(inspect.signature(LlavaOnevisionProcessor.__init__).parameters) - {"self", "image_processor",
                                                                                  "tokenizer", "video_processor"}
    return onevision_processor(LlavaOnevisionImageProcessorPil.from_pretrained(folder),
                               AutoTokenizer.from_pretrained(folder),
                               **{key: value for key, value in settings.items() if key in names})
