"""A small byte-level BPE tokenizer built offline, so random-weight LLaVA presets ship a real processor.

It is trained deterministically on a fixed built-in corpus (no downloads). Any text encodes (byte-level);
``<image>`` is a special token, ``<s>`` is prepended, padding is on the left (for batched generation).
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
#: LLaVA-OneVision's processor also names a video placeholder (appended after training: the other ids stay put)
VIDEO_TOKEN = "<video>"
TOKENIZER_VOCAB_SIZE = 1024
#: LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% if message['role'] != 'user' %}</s>{% else %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: LLaVA-OneVision's (Qwen2 ChatML) conversation format
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = """
USER: What is shown in the image? ASSISTANT: A photo of a cat sitting on a red sofa next to a window.
USER: How many objects are there? ASSISTANT: There are three objects: a circle, a square and a triangle.
USER: What colour is the triangle? ASSISTANT: The triangle is blue. The circle is green and the square is yellow.
USER: Is there a dog in the picture? ASSISTANT: No, there is no dog. Yes, there is a person on the left.
Describe the scene in detail. The astronaut wears an orange suit; the rocket stands behind her on the pad.
Coins, a clock, the moon, grass, gravel, bricks, text on a page, a camera man, coffee in a cup, a horse.
The quick brown fox jumps over the lazy dog. Left, right, top, bottom, above, below, small, large, big.
one two three four five six seven eight nine ten zero red green blue yellow black white orange purple
"""


def build_tokenizer(video: bool = False):
    """Return a ``PreTrainedTokenizerFast`` (deterministic); ``video`` adds OneVision's ``<video>`` placeholder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TOKEN] if video else ["<image>"]})
    return wrapped
