"""convert_onevision: an original LLaVA-OneVision checkpoint (lmms-lab layout, as LLaVA-NeXT saves it) written from a
random-weight tiny OneVision, converted back and checked against that model: logits, processor outputs, generation
with DyMU applied, and one-line errors for bad sources."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dymu.vision import DymuError

PRESET = "tiny-llava-onevision"
ROPE_THETA = 1e6  # Qwen2's, not transformers' default: must survive the conversion
CROP = 384  # the preset's crop (SigLIP image size)
#: transformers key prefix -> the original (LLaVA-NeXT) one: the oracle of the renaming, written out independently
TO_ORIGINAL = (("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
               ("model.image_newline", "model.image_newline"),
               ("model.language_model.", "model."),
               ("lm_head.", "lm_head."))
SIGLIP_HUB_ID = "google/siglip-so400m-patch14-384"  # what lmms-lab configs name (not on this machine)
PROMPT = "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
MERGING = [0.3, 0.2, 0.1, 0.0]  # thresholds that merge the tiny random tower a lot

#: (name, the original's image_grid_pinpoints in LLaVA-NeXT's (width, height) pairs, the same as transformers'
#: [height, width] pairs, image_aspect_ratio, image (width, height)). Wide-only grids: swapping the pair order
#: would pick tall grids and fail. anyres_max_2 with a 2 x 2 grid: the grid is scaled down.
CASES = {
    "list": ([[384, 384], [768, 384], [1152, 384]], [[384, 384], [384, 768], [384, 1152]], "anyres_max_9", (900, 400)),
    "range": ("(1x1),...,(2x2)", [[h, w] for h in (384, 768) for w in (384, 768)], "anyres_max_2", (700, 500)),
}


def write_siglip(folder, layers=5):
    """The original SigLIP LLaVA-NeXT starts from (one layer more than OneVision reads, and a head)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from dymu.models import PRESETS

    torch.manual_seed(7)
    kwargs = dict(PRESETS["tiny-siglip"][1], num_hidden_layers=layers, vision_use_head=True)
    SiglipVisionModel(SiglipVisionConfig(**kwargs)).save_pretrained(folder)
    return folder


def reference(case, tied=False):
    """(the tiny OneVision the source is written from, its processor): the preset with Qwen2's rope theta, the
    case's grid pinpoints and aspect ratio; tied: lm_head = the embeddings."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from dymu.models import build_onevision_preset, onevision_processor_for

    _, pinpoints, aspect, _ = CASES[case]
    preset, processor = build_onevision_preset(PRESET)
    config = preset.config
    config.text_config.rope_parameters = {"rope_theta": ROPE_THETA, "rope_type": "default"}
    config.image_grid_pinpoints, config.vision_aspect_ratio = pinpoints, aspect
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.load_state_dict(preset.state_dict())
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    if tied:
        model.lm_head.weight = torch.nn.Parameter(model.model.language_model.embed_tokens.weight.detach().clone())
    return model, onevision_processor_for(config, processor.tokenizer)


def original_state(model, tied=False):
    state = {}
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        prefix, original = next((p, o) for p, o in TO_ORIGINAL if key.startswith(p))
        state[original + key[len(prefix):]] = value.detach().clone().contiguous()
    return state


def original_config(model, case, tower, tied):
    """config.json as LLaVA-NeXT writes it for a Qwen2 OneVision (fields of lmms-lab/llava-onevision-qwen2-7b-ov)."""
    pinpoints, _, aspect, _ = CASES[case]
    text = model.config.text_config
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "hidden_act": "silu",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings, "rope_theta": ROPE_THETA, "rope_scaling": None,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28, "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "vocab_size": text.vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32", "use_cache": True, "image_aspect_ratio": aspect, "image_grid_pinpoints": pinpoints,
        "image_crop_resolution": None, "image_split_resolution": None, "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_newline_position": "one_token", "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": "bilinear", "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": str(tower), "tokenizer_padding_side": "right", "use_mm_proj": True,
    }


def write_source(root, case="list", tied=False, extra_layer=False, tower=None, edit=None):
    """A tiny checkpoint in the lmms-lab layout written from ``reference(case, tied)``; returns (src, siglip folder,
    the reference model, its processor). ``tower``: what mm_vision_tower names (default: the SigLIP folder);
    ``extra_layer``: the checkpoint also holds SigLIP's last layer; ``edit(state, config)`` changes the source."""
    from dymu.tokenizer import build_tokenizer

    siglip = write_siglip(root / "siglip")
    model, processor = reference(case, tied)
    state = original_state(model, tied)
    if extra_layer:
        from safetensors.torch import load_file

        last = load_file(next(siglip.glob("*.safetensors")))
        layer = "encoder.layers.4."
        state.update({"model.vision_tower.vision_tower.vision_model." + k[k.index(layer):]: v
                      for k, v in last.items() if layer in k})
    config = original_config(model, case, siglip if tower is None else tower, tied)
    if edit is not None:
        edit(state, config)
    src = root / "src"
    src.mkdir()
    save_file(state, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    build_tokenizer().save_pretrained(src)  # the text model's tokenizer: <image> known, no <video> yet
    return src, siglip, model, processor


def photo(size):
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size)


def load_converted(dst):
    from transformers import LlavaOnevisionForConditionalGeneration

    from dymu.models import load_processor

    return LlavaOnevisionForConditionalGeneration.from_pretrained(dst).eval(), load_processor(dst, full=True)


@pytest.mark.parametrize("case,tied,extra_layer", [("list", False, False), ("range", True, True)])
def test_converted_model_equals_the_source_model(tmp_path, case, tied, extra_layer):
    from dymu.convert_onevision import convert_onevision
    from dymu.tokenizer import ONEVISION_CHAT_TEMPLATE, VIDEO_TOKEN

    # "range" names the hub SigLIP in its config, so its geometry comes from --vision-tower
    src, siglip, ref, ref_processor = write_source(tmp_path, case, tied, extra_layer,
                                                   tower=SIGLIP_HUB_ID if case == "range" else None)
    dst = convert_onevision(src, tmp_path / "hf", vision_tower=siglip if case == "range" else None)
    model, processor = load_converted(dst)

    config, expected = model.config, ref.config
    assert (config.image_token_index, config.video_token_index) == (expected.image_token_index, expected.video_token_index)
    assert processor.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) == config.video_token_index
    assert processor.tokenizer.added_tokens_decoder[config.video_token_index].special
    assert config.text_config.vocab_size == expected.text_config.vocab_size, "Qwen2's spare rows: no resize"
    assert config.vision_config.num_hidden_layers == 4 and not config.vision_config.vision_use_head
    assert sorted(config.image_grid_pinpoints) == sorted(expected.image_grid_pinpoints)
    assert config.vision_aspect_ratio == expected.vision_aspect_ratio
    assert config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    assert processor.chat_template == ONEVISION_CHAT_TEMPLATE
    if tied:
        assert config.tie_word_embeddings
        assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)

    image = photo(CASES[case][3])
    got, want = (p(images=image, text=PROMPT, return_tensors="pt") for p in (processor, ref_processor))
    for key in ("input_ids", "pixel_values", "image_sizes"):
        assert torch.equal(got[key], want[key]), key
    assert got["pixel_values"].shape[1] >= 4, "several AnyRes crops"
    with torch.no_grad():
        torch.testing.assert_close(model(**got).logits, ref(**want).logits, rtol=1e-6, atol=1e-6)


def test_ids_outside_the_vocabulary_pad_rows(tmp_path):
    """A vocabulary without spare rows: <video> falls outside, rows are padded to a multiple of 64 with the mean row."""
    from dymu.convert_onevision import convert_onevision
    from dymu.tokenizer import build_tokenizer

    rows = len(build_tokenizer())  # the source tokenizer's size: <video> gets this id

    def cut(state, config):
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = state[key][:rows].clone()
        config["vocab_size"] = rows

    src, _, ref, ref_processor = write_source(tmp_path, edit=cut)
    model, processor = load_converted(convert_onevision(src, tmp_path / "hf"))
    assert model.config.video_token_index == rows and model.config.text_config.vocab_size == 576
    inputs = processor(images=photo(CASES["list"][3]), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        got, want = model(**inputs).logits, ref(**inputs).logits[..., :rows]
    torch.testing.assert_close(got[..., :rows], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[..., rows:], want.mean(-1, keepdim=True).expand(*want.shape[:-1], 576 - rows),
                               rtol=1e-5, atol=1e-5)


def test_cli_converts_and_dymu_generates_like_on_the_source_model(tmp_path, capsys):
    import dymu
    from dymu.cli import main
    from dymu.llava import last_images

    src, siglip, ref, _ = write_source(tmp_path)
    dst = tmp_path / "hf"
    assert main(["convert-onevision", str(src), str(dst)]) == 0
    assert "wrote transformers LLaVA-OneVision checkpoint" in capsys.readouterr().out
    assert main(["convert-onevision", str(src), str(dst)]) == 2, "a non-empty DST needs --overwrite"
    assert "--overwrite" in capsys.readouterr().err
    template = "{% for message in messages %}{{ message['role'] }}: <image>\n{% endfor %}"
    (src / "chat_template.jinja").write_text(template)  # the source's own processor template wins
    assert main(["convert-onevision", str(src), str(dst), "--overwrite", "--vision-tower", str(siglip)]) == 0
    model, processor = load_converted(dst)
    assert processor.chat_template == template
    inputs = processor(images=photo(CASES["list"][3]), text=PROMPT, return_tensors="pt")
    outputs = []
    for vlm in (model, ref):
        dymu.apply(vlm, MERGING, vtu="fast")
        with torch.no_grad():
            outputs.append(vlm.generate(**inputs, max_new_tokens=4, do_sample=False))
        placeholders, tokens = last_images(vlm)[0]
        assert tokens < 0.7 * placeholders, "DToMe must merge"
    assert outputs[0].shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(outputs[0], outputs[1])


def _drop(prefix):
    def edit(state, config):
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    return edit


def _set(**fields):
    return lambda state, config: config.update(fields)


@pytest.mark.parametrize("edit,tower,message", [
    (_set(image_aspect_ratio="pad"), None, "not a LLaVA-OneVision checkpoint: image_aspect_ratio='pad'"),
    (_set(mm_projector_type="linear"), None, "mm_projector_type='linear'"),
    (_drop("model.mm_projector."), None, r"no model\.mm_projector\.\* weights"),
    (_drop("model.vision_tower."), SIGLIP_HUB_ID, "no vision tower weights .* pass --vision-tower"),
    (None, "someone/unknown-siglip", "geometry is unknown: pass --vision-tower"),
    (None, SIGLIP_HUB_ID, "mm_hidden_size=64 but vision tower .* has hidden_size=1152"),  # so400m's geometry
    (_set(mm_hidden_size=1152), SIGLIP_HUB_ID, "weights do not match the LLaVA-OneVision layout .*embeddings"),
    (_set(image_grid_pinpoints="(axb)"), None, "image_grid_pinpoints='\\(axb\\)'"),
])
def test_bad_sources_give_one_line(tmp_path, edit, tower, message):
    from dymu.convert_onevision import convert_onevision

    src, _, _, _ = write_source(tmp_path, edit=edit, tower=tower)
    with pytest.raises(DymuError, match=message) as error:
        convert_onevision(src, tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists(), "nothing written"


def test_missing_tokenizer_and_missing_tower_folder(tmp_path):
    from dymu.convert_onevision import convert_onevision

    src, siglip, _, _ = write_source(tmp_path, edit=_drop("model.vision_tower."))
    with pytest.raises(DymuError, match="not loadable offline"):
        convert_onevision(src, tmp_path / "hf", vision_tower=tmp_path / "no-tower")
    convert_onevision(src, tmp_path / "hf", vision_tower=siglip)  # the tower's own weights, cut to 4 layers
    for file in src.glob("tokenizer*"):
        file.unlink()
    with pytest.raises(DymuError, match="no Qwen2 tokenizer that loads"):
        convert_onevision(src, tmp_path / "hf2")


def test_known_so400m_geometry_is_llava_hf_onevision_tower(tmp_path):
    """A checkpoint naming google/siglip-so400m-patch14-384 (not on this machine) converts its tuned tower with the
    geometry of llava-hf's OneVision tower: so400m cut to 26 layers, no head (dymu's llava-onevision-qwen2-7b)."""
    from dymu.convert_onevision import _siglip_tower
    from dymu.models import onevision_preset_config
    from dymu.tokenizer import build_tokenizer

    with torch.device("meta"):
        tuned = {f"encoder.layers.{i}.mlp.fc1.weight": torch.empty(4304, 1152) for i in (0, 25, 26)}
        tuned["head.probe"] = torch.empty(1, 1, 1152)
    config, weights = _siglip_tower(SIGLIP_HUB_ID, False, tuned, tmp_path)
    expected = onevision_preset_config("llava-onevision-qwen2-7b", build_tokenizer(video=True)).vision_config
    assert config.to_dict() == expected.to_dict()
    assert sorted(weights) == ["encoder.layers.0.mlp.fc1.weight", "encoder.layers.25.mlp.fc1.weight"]


def test_grid_pinpoints_forms():
    from dymu.convert_onevision import grid_pinpoints

    six = grid_pinpoints("(1x1),...,(6x6)", 384, "config.json")
    assert len(six) == 36 and sorted(six) == sorted([h * 384, w * 384] for h in range(1, 7) for w in range(1, 7))
    assert grid_pinpoints("[(384, 768), (768, 384)]", 384, "c") == [[768, 384], [384, 768]]
    assert grid_pinpoints([[336, 672]], 336, "c") == [[672, 336]]
