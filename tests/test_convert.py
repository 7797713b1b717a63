"""convert_llava: original-LLaVA checkpoint -> LlavaForConditionalGeneration, checked against the source weights."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from dymu.convert import IMAGE_TOKEN, convert_llava
from dymu.vision import DymuError

IMAGE_SIZE, PATCH = 56, 14
PATCHES = (IMAGE_SIZE // PATCH) ** 2
VISION_HIDDEN, TEXT_HIDDEN, VOCAB = 32, 64, 120
ROPE_THETA = 5e5  # not the default: must survive the conversion
WORDS = ["USER:", "ASSISTANT:", "describe", "the", "image", "please", "a", "cat"]


def write_clip(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=VISION_HIDDEN, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu")
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


def write_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]").save_pretrained(folder)


def write_source(root, weights="safetensors", projector="mlp2x_gelu", tokenizer=False):
    """A tiny checkpoint in the liuhaotian/llava-v1.5 layout (vision tower in a separate folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    clip, src = write_clip(root / "clip"), root / "src"
    src.mkdir()
    torch.manual_seed(2)
    text = LlamaConfig(hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       rope_theta=ROPE_THETA)
    state = dict(LlamaForCausalLM(text).state_dict())
    if projector == "mlp2x_gelu":
        state.update({"model.mm_projector.0.weight": torch.randn(TEXT_HIDDEN, VISION_HIDDEN) * 0.2,
                      "model.mm_projector.0.bias": torch.randn(TEXT_HIDDEN) * 0.2,
                      "model.mm_projector.2.weight": torch.randn(TEXT_HIDDEN, TEXT_HIDDEN) * 0.2,
                      "model.mm_projector.2.bias": torch.randn(TEXT_HIDDEN) * 0.2})
    else:
        state.update({"model.mm_projector.weight": torch.randn(TEXT_HIDDEN, VISION_HIDDEN) * 0.2,
                      "model.mm_projector.bias": torch.randn(TEXT_HIDDEN) * 0.2})
    state = {k: v.contiguous() for k, v in state.items()}
    if weights == "safetensors":
        save_file(state, src / "model.safetensors")
    elif weights == "bin":  # like transformers-4.31 checkpoints: stored rotary buffers
        torch.save({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, src / "pytorch_model.bin")
    else:  # sharded with an index
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, src / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config = text.to_dict()
    if weights == "bin":  # old-style rope field
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(clip),
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_projector_type=projector,
                  mm_hidden_size=VISION_HIDDEN, mm_use_im_start_end=False, image_aspect_ratio="pad")
    (src / "config.json").write_text(json.dumps(config))
    if tokenizer:
        write_tokenizer(src)
    return src, clip, state


def reference_logits(src, clip, state, ids, pixels, image_id, projector):
    """Independent forward from the SOURCE weights: Llama + CLIP hidden_states[-2] w/o CLS + hand-made projector."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(src).eval()
    tower = CLIPVisionModel.from_pretrained(clip).eval()
    with torch.no_grad():
        features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        if projector == "mlp2x_gelu":
            hidden = torch.nn.functional.gelu(features @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
            projected = hidden @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
        else:
            projected = features @ state["model.mm_projector.weight"].T + state["model.mm_projector.bias"]
        is_image = ids == image_id
        embeds = llama.get_input_embeddings()(torch.where(is_image, 0, ids))
        embeds[is_image] = projected.reshape(-1, TEXT_HIDDEN)
        head = llama.lm_head.weight
        return llama(inputs_embeds=embeds).logits, embeds, head


def check_against_reference(dst, src, clip, state, ids, pixels, projector):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    image_id = model.config.image_token_index
    rows = model.config.text_config.vocab_size
    assert rows % 64 == 0 and rows > image_id >= 0
    assert model.config.image_seq_length == PATCHES and model.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
    expected, _, head = reference_logits(src, clip, state, ids, pixels, image_id, projector)
    assert got.shape == (*ids.shape, rows)
    torch.testing.assert_close(got[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    # padded vocabulary rows are the mean row: their logit is the mean of the original logits
    mean_logit = expected.mean(dim=-1, keepdim=True).expand(*ids.shape, rows - VOCAB)
    torch.testing.assert_close(got[..., VOCAB:], mean_logit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head.weight[:VOCAB], head)
    return model


@pytest.mark.parametrize("weights,projector", [("safetensors", "mlp2x_gelu"), ("sharded", "mlp2x_gelu"), ("bin", "linear")])
def test_no_tokenizer_matches_source(tmp_path, weights, projector):
    src, clip, state = write_source(tmp_path, weights=weights, projector=projector)
    with pytest.warns(UserWarning, match="no tokenizer"):
        dst = convert_llava(src, tmp_path / "hf")
    assert not (dst / "processor_config.json").exists() and not (dst / "tokenizer_config.json").exists()
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, VOCAB, (2, 3), generator=g), torch.full((2, PATCHES), VOCAB),
                     torch.randint(3, VOCAB, (2, 5), generator=g)], dim=1)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    model = check_against_reference(dst, src, clip, state, ids, pixels, projector)
    assert model.config.image_token_index == VOCAB and model.config.text_config.vocab_size == 128
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"


def test_tokenizer_and_processor(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    src, clip, state = write_source(tmp_path, tokenizer=True)
    dst = convert_llava(src, tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(dst)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(WORDS) + 3 and tokenizer.pad_token == "<pad>"
    image = Image.fromarray((torch.rand(80, 64, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=image, text=f"USER: {IMAGE_TOKEN} describe the image ASSISTANT:", return_tensors="pt")
    assert (inputs["input_ids"] == image_id).sum() == PATCHES
    assert inputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    model = check_against_reference(dst, src, clip, state, inputs["input_ids"], inputs["pixel_values"], "mlp2x_gelu")
    assert model.config.image_token_index == image_id and model.config.text_config.pad_token_id == tokenizer.pad_token_id


def test_vision_tower_argument_overrides_config(tmp_path):
    src, clip, state = write_source(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # not in the cache: only the override works
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(DymuError, match="clip-vit-large-patch14-336"):
        convert_llava(src, tmp_path / "hf")
    with pytest.warns(UserWarning):
        convert_llava(src, tmp_path / "hf", vision_tower=clip)


def test_vision_tower_tuned_in_checkpoint_wins(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    src, clip, _ = write_source(tmp_path)
    state = load_file(src / "model.safetensors")
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.full((VISION_HIDDEN,), 2.0)
    save_file(state, src / "model.safetensors")
    with pytest.warns(UserWarning):
        dst = convert_llava(src, tmp_path / "hf")
    tower = LlavaForConditionalGeneration.from_pretrained(dst).model.vision_tower
    assert torch.equal(tower.post_layernorm.weight, torch.full((VISION_HIDDEN,), 2.0))


def test_bad_inputs_raise(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    missing = tmp_path / "nowhere"
    with pytest.raises(DymuError, match=re.escape(str(missing))):
        convert_llava(missing, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DymuError, match="no config.json"):
        convert_llava(empty, tmp_path / "out")
    plain = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=VOCAB)).save_pretrained(plain)
    with pytest.raises(DymuError, match=re.escape(str(plain))):
        convert_llava(plain, tmp_path / "out")
    clip = write_clip(tmp_path / "clip")
    with pytest.raises(DymuError, match=r"no model\.mm_projector"):
        convert_llava(plain, tmp_path / "out", vision_tower=clip)


def test_cli_converts_and_dymu_applies_to_the_result(tmp_path, capsys):
    import math

    import dymu
    from dymu.cli import main

    src, clip, state = write_source(tmp_path, tokenizer=True)
    assert main(["convert-llava", str(src), str(tmp_path / "hf")]) == 0
    assert "wrote transformers LLaVA checkpoint" in capsys.readouterr().out
    model = dymu.from_pretrained(tmp_path / "hf")
    processor = __import__("transformers").AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.chat_template and "ASSISTANT:" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True)
    from PIL import Image

    image = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=image, text=f"USER: {IMAGE_TOKEN} describe ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        stock = model(**inputs).logits
        dymu.apply(model, [math.inf] * model.config.vision_config.num_hidden_layers)
        assert torch.equal(model(**inputs).logits, stock)


def test_destination_follows_the_output_rule(tmp_path):
    """Issue 23 item 4: a non-empty DST is refused without --overwrite (left as it was), a model folder is replaced
    with it; a conversion that fails leaves DST untouched."""
    src, clip, state = write_source(tmp_path, weights="safetensors", projector="mlp2x_gelu")
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(DymuError, match="is not empty: pass --overwrite"):
        convert_llava(src, dst)
    with pytest.raises(DymuError, match="no config.json, so it is no model checkpoint"):
        convert_llava(src, dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    (dst / "notes.txt").unlink()
    with pytest.warns(UserWarning, match="no tokenizer"):
        convert_llava(src, dst)
    weights = (dst / "model.safetensors").read_bytes()
    with pytest.raises(DymuError, match="not loadable offline"):  # fails inside the build
        convert_llava(src, dst, vision_tower=tmp_path / "no-tower", overwrite=True)
    assert (dst / "model.safetensors").read_bytes() == weights
    with pytest.warns(UserWarning, match="no tokenizer"):
        assert convert_llava(src, dst, overwrite=True) == dst
    assert (dst / "config.json").is_file() and not list(tmp_path.glob(".hf.*"))  # no build folder left
