"""Train a small LLaVA-format model from scratch on the synthetic VQA task (CPU).

The result is a stock ``LlavaForConditionalGeneration`` (CLIP-architecture tower, two-layer projector, small
Llama with grouped-query attention) plus a word-level tokenizer and a ``LlavaProcessor``, saved with
``save_pretrained`` so that ``from_pretrained(folder)`` / ``AutoProcessor.from_pretrained(folder)`` load it
like any hub checkpoint.

    python -m toyvlm.train --out assets/toy-llava [--steps N] [--seed S] [--resume]

A killed run continues with ``--resume`` (same options) from the training state it writes to the output folder
(:class:`TrainingState`); the result is bit-identical to an uninterrupted run.

How it trains in about 86 minutes on 2 CPU cores (the shipped run: 85.6 min, test 86.8%, CIDEr-D 2.933; all of
it training-time only; the saved model is plain LLaVA):

* **Multi-turn conversations**, as in LLaVA's own instruction data: one image and ``turns`` questions per
  sequence, ``USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...``. The first turn is
  exactly the evaluation prompt. The image is encoded once and its 144 tokens are shared by every turn, so a
  question costs ~15 tokens instead of ~160. The loss covers every answer and its ``</s>``.
* **Fresh scenes and questions**: every training scene is new (:class:`SceneStream`, the next scenes of split
  ``train``, rendered when drawn: about 5 minutes of a run); each conversation samples its questions from everything
  askable about the scene (kinds uniform among those available; yes/no balanced; a "no" asks about a shape that is in
  the scene in another colour with probability ``hard_no_share`` when the scene allows both kinds of "no").
* **Descriptions** (the describe task of :mod:`toyvlm.data`): each step adds ``describe_rows`` rows of one turn,
  ``USER: <image>\n{describe prompt} ASSISTANT: {one of the scene's five references}</s>``, to the ``batch_size``
  conversations of short questions (own scenes; a description after short questions would hand later questions
  their answers). The stock loss averages over all supervised tokens, so 8 description rows (~45 tokens each) weigh
  about as much as 32 conversations of 6 short answers (2 tokens each).
* **Dense auxiliary supervision** of the vision tower: a linear head (discarded after training) on the
  features the projector reads predicts, per patch, the colour and shape of the object covering it, whether an
  object's centre lies in it (and its shape), and the letter written in it (at the letter's anchor). Scene geometry gives these
  targets for free; without them the from-scratch tower learned too slowly for the budget (first run:
  29.5% validation after 30 min, answering from the language prior). The letter patch is 1 of 144,
  so the letter is also classified on labelled patches alone.
* **Word alignment** (:func:`alignment_loss`): the projected image tokens of an object's patches are classified
  against the language model's own input embeddings of the words naming their colour, shape and letter, so an
  image token of a red triangle "looks like" the words ``red`` and ``triangle`` to the language model.
* **Pointing** (:func:`pointing_loss`): at every answer, two heads of one language-model layer are asked to put
  their attention on the patches of the object the question names first, two on the one named last (the letter's
  patches for ``detail``); ``count`` and absent-object questions are left free. With only the answer loss, the
  4-layer model plateaued at 42-48% (session 2, 46 min): it never learned to retrieve a named object among 144
  image tokens, answering from global statistics.
* **Read-outs after the pointing layer** (``locate_weight``, ``tally_weight``, from stage-2 step
  ``readout_start`` = 1200 on): at the same answer positions, linear heads on the pointing layer's output must
  recover the (row, column) of both named objects (:meth:`AuxiliaryHead.locate_loss`) and, for ``count``, the
  number counted (:meth:`AuxiliaryHead.tally_loss`). Why: pointing alone finds the objects (attention mass
  0.6-0.7) but position answers stayed near chance; a linear probe on the pointing layer's output of the model
  trained without the read-outs (session 3: test 80.9%, position 61.7%, existence 91.1%) read the position answer
  only 70% of the time. Measured: fine-tuning that model 300 steps with the position read-out took position from 58%
  to 81% (100 validation scenes; without it 58%). Switched on at step 1200: test 83.3%, position 78.9%, existence
  87.7% (the previous, short-answer model, 47.1 min); 86.8%, position 81.2%, existence 94.1% (the shipped describe
  run). On from step 0 they slow existence: 70% vs 92.5% at step 1000 (40 validation scenes, 5-layer tower), and a
  6-layer-tower run with them from the start (``--vision-layers 6 --tower-steps 1600 --readout-start 0``, 52.8 min)
  ended at test position 78.7% but existence 69.6%, 79.6% overall.
* Recipes tried and not shipped (a longer tower stage, a pool of 60000 scenes, pointing absent objects, counting
  at existence answers) are in the model card's history (``assets/toy-llava/history.md``), with their numbers.
* **Eager attention only where it is read** (:func:`eager_attention_at`): the pointing layer runs eager attention
  (it returns probabilities), the other layers the stock kernel: the same losses (a test checks it), 0.88 s per
  stage-2 step instead of 1.02-1.22 s with eager everywhere (one measurement, default sizes).

Images are kept as uint8. Everything is seeded.

**The toy OneVision** (``--arch onevision``, the defaults of :data:`ONEVISION_DEFAULTS`; :mod:`toyvlm.onevision`):
the same recipe (both stages, every loss, the same scenes and conversations) on a stock
``LlavaOnevisionForConditionalGeneration``: scenes at 13 sizes and aspect ratios cut into 3-5 AnyRes crops of 112 px,
the conversation's image placeholders as many as the stock layout has (base crop, unpadded grid, down-scaled where
``anyres_max_3`` says, newline rows), the dense targets laid out by the model's own ``pack_image_features``, the
Qwen2 started from the toy LLaVA's language model (``init_from``). The training state also keeps the CPU seconds
(``train_cpu_seconds`` in the log), so a run on a shared machine can say what it cost.

    python -m toyvlm.train --arch onevision --out assets/toy-llava-onevision --resume
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as D

PROMPT = "USER: <image>\n{question} ASSISTANT:"
IGNORE_INDEX = -100
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
#: scenes used to collect the question vocabulary (the templates are fixed, so a few hundred cover it)
VOCABULARY_SCENES = 400
VOCAB_MULTIPLE = 8
MAX_ANSWER_TOKENS = 3
#: greedy descriptions stop here (the longest reference has D.MAX_DESCRIPTION_WORDS words and marks, + </s>)
MAX_DESCRIPTION_TOKENS = 80
#: an object labels a patch for the auxiliary targets when it covers at least this fraction of it
MIN_PATCH_COVER = 0.25
#: auxiliary per-patch classification heads: name -> classes (class 0 = nothing / background)
AUX_CLASSES = {"colour": 1 + len(D.COLOURS), "shape": 1 + len(D.SHAPES), "centre": 1 + len(D.SHAPES),
               "letter": 1 + len(D.LABEL_LETTERS)}
LETTER_HEAD = list(AUX_CLASSES).index("letter")
#: plus two position heads ("row", "column": grid classes each) that keep the patch position readable
TURN = "USER: {question} ASSISTANT:"
#: row of :func:`object_patches` that marks the label's patches (detail questions point there)
LABEL_ROW = D.MAX_OBJECTS
#: floor of the attention mass in the pointing loss's log
MIN_POINT_MASS = 1e-6
#: the training state of a run (:class:`TrainingState`), in its output folder until training completes
STATE_FILE = "training_state.pt"
#: the state is written after the first step that ends this many seconds after the previous write (and after each
#: stage's last step); a write (~35 MB at the default sizes) takes a fraction of a second, a step about one
STATE_EVERY_SECONDS = 300


@dataclass
class TrainConfig:
    image_size: int = 192
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 5
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    text_kv_heads: int = 2
    val_scenes: int = 200
    turns: int = 6
    describe_rows: int = 8  # per step, besides batch_size conversations: rows of one describe turn (image + description)
    hard_no_share: float = 0.8  # exists "no" turns asking about a shape that is in the scene (another colour) when possible
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    curriculum_start: int = 2
    curriculum_steps: int = 600
    point_weight: float = 1.0
    point_layer: int = 2
    point_heads: int = 2
    align_weight: float = 1.0
    count_weight: float = 1.0
    where_weight: float = 1.0
    locate_weight: float = 1.0
    tally_weight: float = 1.0
    readout_start: int = 1200  # stage-2 step from which the locate / tally read-outs are trained (see the docstring)
    tower_steps: int = 1500
    tower_batch_size: int = 64
    tower_learning_rate: float = 3e-3
    eval_every: int = 500
    eval_scenes: int = 40
    seed: int = 0
    threads: int = 2
    arch: str = "llava"  # "llava" (LlavaForConditionalGeneration) or "onevision" (LLaVA-OneVision; ONEVISION_DEFAULTS)
    anyres_max: int = 0  # onevision: grids above this many crops' worth of tokens are scaled down (anyres_max_N)
    init_from: str = ""  # onevision: the toy LLaVA whose language model the Qwen2 starts from ("": fresh)


#: the toy OneVision's recipe (``--arch onevision``; :mod:`toyvlm.onevision`): 112 px crops of 14 px patches (64
#: tokens each), a SigLIP tower read at its last layer, the Qwen2 started from the toy LLaVA's language model, so
#: fewer steps of fewer rows (a row's image is 2-5 crops, ~250 tokens) fit the budget; tower batches are images
#: (all their crops, ~70 per step)
ONEVISION_DEFAULTS = dict(arch="onevision", image_size=112, patch_size=14, anyres_max=3, init_from="assets/toy-llava",
                          steps=1500, batch_size=24, readout_start=750, curriculum_steps=400, tower_steps=1200,
                          tower_batch_size=16)
#: fields only the OneVision recipe reads, with the value that means "unused" in the LLaVA one
ONEVISION_ONLY = {"anyres_max": 0, "init_from": ""}
ARCHES = ("llava", "onevision")


def default_config(arch: str = "llava") -> "TrainConfig":
    """The recipe's defaults for ``arch``."""
    return TrainConfig(**(ONEVISION_DEFAULTS if arch == "onevision" else {}))


def build_tokenizer():
    """Word-level tokenizer over the task's vocabulary (lower-cased; punctuation split off)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set(PROMPT.replace("{question}", "").replace("<image>", "").lower().replace(":", " : ").split())
    rng = np.random.default_rng(0)
    for _ in range(VOCABULARY_SCENES):
        scene = D.generate_scene(rng)
        for qas in D.candidate_questions(scene).values():
            for qa in qas:
                words.update(pre_split(qa.question))
                words.update(pre_split(qa.answer))
        for text in D.describe(scene):  # the describe task's templates
            words.update(pre_split(text))
    words.update("abcdefghijklmnopqrstuvwxyz")
    for text in (*D.DESCRIBE_PROMPTS, *D.NUMBER_WORDS, *D.BACKGROUND_PHRASES.values(), *sum(D.PLACE_NAMES, ())):
        words.update(pre_split(text))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # "<image>" is a special token, matched before this
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    bos = vocab["<s>"]
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": "<image>"})
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return wrapped


def pre_split(text: str) -> list[str]:
    """The words the tokenizer will see (must match its Whitespace pre-tokenizer for vocabulary building)."""
    from tokenizers import pre_tokenizers

    return [piece.lower() for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_model(config: TrainConfig, tokenizer):
    """(LlavaForConditionalGeneration, LlavaProcessor) with fresh weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dymu.tokenizer import CHAT_TEMPLATE

    vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    vision = CLIPVisionConfig(hidden_size=config.vision_hidden, intermediate_size=4 * config.vision_hidden,
                              num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                              image_size=config.image_size, patch_size=config.patch_size, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=config.text_hidden, intermediate_size=int(8 / 3 * config.text_hidden),
                       num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                       num_key_value_heads=config.text_kv_heads, vocab_size=vocab, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    patches = (config.image_size // config.patch_size) ** 2
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=patches)
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": config.image_size},
                                            crop_size={"height": config.image_size, "width": config.image_size},
                                            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=config.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


def render_split(examples, image_size: int, patch_size: int | None = None, progress: bool = True):
    """(scenes, 3, H, W) uint8 pixels; with ``patch_size`` also the (scenes, heads, patches) auxiliary targets and
    the (scenes, MAX_OBJECTS + 1, patches) bool masks of the patches each object (and the label) covers (see :func:`object_patches`)."""
    from tqdm.auto import tqdm

    # filled in place, and an image not yet cached on its example is not cached (a copy per scene would double memory)
    pixels = torch.empty((len(examples), 3, image_size, image_size), dtype=torch.uint8)
    targets, masks = [], []
    for index, example in enumerate(tqdm(examples, desc="rendering", unit="scene", leave=False, disable=not progress)):
        image = example._image if example._image is not None else D.render(example.scene, example.image_size)
        pixels[index] = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W)
        if patch_size is not None:
            cover = _patch_cover(example.scene, image_size, patch_size)  # one object-map render for both
            targets.append(patch_targets(example.scene, image_size, patch_size, cover))
            masks.append(object_patches(example.scene, image_size, patch_size, cover))
    if patch_size is None:
        return pixels
    return pixels, torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(masks))


def _patch_cover(scene: D.Scene, image_size: int, patch_size: int) -> np.ndarray:
    """(patches, objects) fraction of each patch (raster order) covered by each object."""
    grid = image_size // patch_size
    if not scene.objects:
        return np.zeros((grid * grid, 0))
    ids = D.object_id_map(scene, image_size)[: grid * patch_size, : grid * patch_size]
    ids = ids.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    return np.stack([(ids == k + 1).mean(1) for k in range(len(scene.objects))], 1).reshape(grid * grid, -1)


def object_patches(scene: D.Scene, image_size: int, patch_size: int, cover: np.ndarray | None = None) -> np.ndarray:
    """(MAX_OBJECTS + 1, patches) bool: row ``k`` marks the patches object ``k`` covers by at least MIN_PATCH_COVER
    (always at least its best-covered patch; rows past the scene's objects are all False); the last row
    (LABEL_ROW) marks the patches the label's letter box overlaps. ``cover``: :func:`_patch_cover`, if already computed."""
    grid = image_size // patch_size
    out = np.zeros((D.MAX_OBJECTS + 1, grid * grid), dtype=bool)
    if scene.objects:
        cover = (_patch_cover(scene, image_size, patch_size) if cover is None else cover).T  # (objects, patches)
        out[: len(scene.objects)] = cover >= np.minimum(MIN_PATCH_COVER, cover.max(1, keepdims=True))
    out[LABEL_ROW, label_patches(scene, image_size, patch_size)] = True
    return out


def label_patches(scene: D.Scene, image_size: int, patch_size: int) -> list[int]:
    """Raster indices of the patches that the label's letter box (font size square around its anchor) overlaps;
    empty when no object is labelled."""
    label = D.label_position(scene, image_size)
    if label is None:
        return []
    grid = image_size // patch_size
    x, y, _ = label
    half = D.LABEL_FONT_SIZE * image_size / D.SCENE_SIZE / 2
    rows = range(max(0, int((y - half) // patch_size)), min(grid - 1, int((y + half) // patch_size)) + 1)
    columns = range(max(0, int((x - half) // patch_size)), min(grid - 1, int((x + half) // patch_size)) + 1)
    return [r * grid + c for r in rows for c in columns]


def patch_targets(scene: D.Scene, image_size: int, patch_size: int, cover: np.ndarray | None = None) -> np.ndarray:
    """(len(AUX_CLASSES) + 2, patches) int64 class per patch in raster order, from the scene geometry (see AUX_CLASSES;
    the last two rows are the patch's row and column). ``cover``: :func:`_patch_cover`, if already computed."""
    grid = image_size // patch_size
    out = np.zeros((len(AUX_CLASSES) + 2, grid * grid), dtype=np.int64)
    out[-2], out[-1] = np.divmod(np.arange(grid * grid), grid)
    if not scene.objects:
        return out
    if cover is None:
        cover = _patch_cover(scene, image_size, patch_size)  # (patches, objects)
    best, covered = cover.argmax(1), cover.max(1) >= MIN_PATCH_COVER
    colour = np.array([D.COLOURS.index(o.colour) + 1 for o in scene.objects])
    shape = np.array([D.SHAPES.index(o.shape) + 1 for o in scene.objects])
    out[0] = np.where(covered, colour[best], 0)
    out[1] = np.where(covered, shape[best], 0)
    scale = image_size / D.SCENE_SIZE
    for obj, code in zip(scene.objects, shape):
        out[2, _patch_index(obj.x * scale, obj.y * scale, patch_size, grid)] = code
    label = D.label_position(scene, image_size)
    if label is not None:
        x, y, letter = label
        out[LETTER_HEAD, _patch_index(x, y, patch_size, grid)] = D.LABEL_LETTERS.index(letter) + 1
    return out


def _patch_index(x: float, y: float, patch_size: int, grid: int) -> int:
    return min(int(y) // patch_size, grid - 1) * grid + min(int(x) // patch_size, grid - 1)


class SceneStream:
    """Training scenes that are each used once: the next scenes of the ``train`` split (seeded like
    :func:`toyvlm.data.make_split`), rendered when drawn; with ``max_objects``, scenes with more objects are skipped.
    A from-scratch tower memorises a fixed pool: the model trained on a pool of 30000 scenes answered the letter on
    scenes it trained on 85% of the time and on new ones 72%."""

    def __init__(self, seed: int, image_size: int, patch_size: int):
        self.seed, self.image_size, self.patch_size = seed, image_size, patch_size
        self.next_index = 0  # of the train split

    def draw(self, rng: np.random.Generator | None, count: int, max_objects: int | None = None):
        """(scenes, pixels, targets, objects) of the next ``count`` scenes (``rng`` is not used)."""
        examples = []
        while len(examples) < count:
            scene = D.generate_scene(D.split_rngs("train", self.seed, self.next_index)[0])
            self.next_index += 1
            if max_objects is None or len(scene.objects) <= max_objects:
                examples.append(D.Example(f"train_{self.next_index - 1:05d}", scene, [], self.image_size))
        return ([example.scene for example in examples],
                *render_split(examples, self.image_size, self.patch_size, progress=False))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (batch, 3, H, W) -> CLIP-normalised float."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    return (pixels.float() / 255 - mean) / std


def sample_turns(scene: D.Scene, rng: np.random.Generator, turns: int, hard_no_share: float | None = None) -> list[D.QA]:
    """Up to ``turns`` distinct questions: each turn picks a kind uniformly among those with questions left
    (``exists``: yes or no with probability 1/2), then a question of it uniformly. With ``hard_no_share``, a "no" is
    about a colour + shape whose shape is in the scene (in another colour: where answering by the shape alone fails)
    with that probability when the scene has both kinds of "no" left (uniformly over all "no"s, ~62% of them are)."""
    candidates = D.candidate_questions(scene)
    pools = {kind: list(qas) for kind, qas in candidates.items() if kind != "exists"}
    shapes = {obj.shape for obj in scene.objects}
    no = [q for q in candidates["exists"] if q.answer == "no"]
    hard = [q for q in no if _MENTION.search(q.question.lower()).group(2) in shapes]
    pools["exists"] = [[q for q in candidates["exists"] if q.answer == "yes"], hard if hard_no_share is not None else no,
                       [q for q in no if q not in hard] if hard_no_share is not None else []]
    chosen = []
    for _ in range(turns):
        kinds = [kind for kind, pool in pools.items() if (any(pool) if kind == "exists" else pool)]
        if not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = pools[kind]
        if kind == "exists":
            yes, hard_left, easy_left = pool
            sides = [side for side in (yes, hard_left + easy_left) if side]
            pool = sides[int(rng.integers(len(sides)))]
            if pool is not yes:  # a "no": hard (shape present) with probability hard_no_share when both are left
                pool = hard_left if hard_left and (not easy_left or rng.random() < hard_no_share) else easy_left
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
    return chosen


class ConversationEncoder:
    """Token ids for LLaVA-1.5 multi-turn conversations (cached per text piece). ``patches``: the image tokens of
    every image, or None when each conversation gives its own (OneVision's count depends on the image size)."""

    def __init__(self, tokenizer, patches: int | None):
        self.tokenizer, self.patches = tokenizer, patches
        self._cache: dict[tuple[str, str, int | None], list[int]] = {}

    def _ids(self, kind: str, text: str, patches: int | None = None) -> list[int]:
        key = (kind, text, patches if kind == "first" else None)
        if key not in self._cache:
            if kind == "first":
                ids = self.tokenizer(PROMPT.format(question=text).replace("<image>", "<image>" * patches)).input_ids
            elif kind == "turn":
                ids = self.tokenizer(TURN.format(question=text), add_special_tokens=False).input_ids
            else:
                ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            self._cache[key] = ids
        return self._cache[key]

    def __call__(self, qas: list[D.QA], patches: int | None = None) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one conversation whose image has ``patches`` tokens (default: the encoder's);
        labels cover each answer and its </s>."""
        ids, labels = [], []
        for turn, qa in enumerate(qas):
            prompt = self._ids("first" if turn == 0 else "turn", qa.question, patches or self.patches)
            answer = self._ids("answer", qa.answer)
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        return ids, labels


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors from (input_ids, labels) rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        target[i, : len(labels)] = torch.tensor(labels)
    return input_ids, mask, target


class AuxiliaryHead(torch.nn.Module):
    """Per-patch linear classifiers on the projector's input features (training only; never saved)."""

    def __init__(self, hidden: int, grid: int, text_hidden: int | None = None):
        super().__init__()
        self.classes = [*AUX_CLASSES.values(), grid, grid]
        self.linear = torch.nn.Linear(hidden, sum(self.classes))
        self.grid = grid
        # linear read-out of (row, column) from the projected image tokens (see position_loss)
        self.where = torch.nn.Linear(text_hidden, 2) if text_hidden else None
        # linear read-outs at the answer position: both pointed objects' (row, column) (see locate_loss) and the
        # number of counted objects (see tally_loss)
        self.locate = torch.nn.Linear(text_hidden, 4) if text_hidden else None
        self.tally = torch.nn.Linear(text_hidden, 1) if text_hidden else None

    def position_loss(self, projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error of a linear read-out of each projected image token's (row, column), scaled to [-1, 1]:
        keeps the patch position a *linear* direction of the tokens the language model sees, so two attended objects'
        positions can be compared. projected: (images, patches, text hidden); targets: :func:`patch_targets`."""
        where = targets[:, -2:].transpose(1, 2).to(projected.dtype)  # (images, patches, 2): row, column
        where = 2 * (where + 0.5) / self.grid - 1
        return torch.nn.functional.mse_loss(self.where(projected), where)

    def locate_loss(self, hidden: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean squared error of a linear read-out, from the language model's hidden state at answer queries, of the
        (row, column) of the object named first and of the one named last (centre of their patches, scaled to
        [-1, 1]): the pointing heads must bring the positions, not only the identities, of what they attend to,
        so that the layers after them can compare two positions. hidden: (queries, text hidden);
        masks: (queries, 2, patches) bool from :func:`pointing_targets`."""
        return torch.nn.functional.mse_loss(self.locate(hidden), pointed_positions(masks, self.grid).flatten(1))

    def tally_loss(self, hidden: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Mean squared error of a linear read-out, from the hidden state at ``count`` answer queries, of the number of
        counted objects scaled to [-1, 1]: the counting head's output (the mass it leaves on ``<s>``, 1 / (count + 1))
        must be turned into a linear count before the last layer names it. hidden: (queries, text hidden);
        support: (queries, patches) bool from :func:`counting_targets`."""
        count = 2 * support.sum(-1, keepdim=True).to(hidden.dtype) / D.MAX_OBJECTS - 1  # (queries, 1)
        return torch.nn.functional.mse_loss(self.tally(hidden), count)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # features: (images, patches, hidden); targets: (images, heads, patches)
        logits = self.linear(features).split(self.classes, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(head.flatten(0, 1), targets[:, i].flatten())
                   for i, head in enumerate(logits)) / len(logits)
        # the letter patch is 1 of 144: also classify the letter on labelled patches only, or it is drowned out
        labelled = targets[:, LETTER_HEAD] > 0  # (images, patches)
        if labelled.any():
            loss = loss + torch.nn.functional.cross_entropy(logits[LETTER_HEAD][labelled], targets[:, LETTER_HEAD][labelled])
        return loss


_MENTION = re.compile(r"\b(?:({colours}) )?({shapes})\b".format(colours="|".join(D.COLOURS), shapes="|".join(D.SHAPES)))


def referenced_objects(scene: D.Scene, qa: D.QA) -> tuple[list[int], list[int]] | None:
    """(objects named first, objects named last) by ``qa``, or None when the answer is not found by looking at
    named objects (``count`` and ``describe`` questions, ``exists`` questions answered no). Parsed from the fixed
    templates of :func:`toyvlm.data.candidate_questions`; a position question names two objects, the others one
    (twice)."""
    if qa.kind in ("count", D.DESCRIBE_KIND) or (qa.kind == "exists" and qa.answer == "no"):
        return None
    mentions = _MENTION.findall(qa.question.lower())
    groups = []
    for colour, shape in mentions:
        groups.append([k for k, obj in enumerate(scene.objects) if obj.shape == shape and colour in ("", obj.colour)])
    if not groups or not all(groups):
        return None
    return groups[0], groups[-1]


def answer_queries(labels: torch.Tensor) -> list[list[int]]:
    """Per row, the positions whose next-token prediction is the first token of an answer (turn order)."""
    supervised = labels != IGNORE_INDEX  # (rows, tokens)
    starts = supervised[:, 1:] & ~supervised[:, :-1]
    return [row.nonzero().flatten().tolist() for row in starts]


def pointing_targets(qas_per_row, scenes, labels, object_masks):
    """(rows, positions, masks) of every answer query that names objects: ``masks`` (queries, 2, patches) bool marks
    the patches of the objects named first / last (see :func:`referenced_objects`); detail questions point at the
    letter's patches."""
    rows, positions, masks = [], [], []
    for row, (qas, queries) in enumerate(zip(qas_per_row, answer_queries(labels))):
        scene, patches = scenes[row], object_masks[row]  # patches: (MAX_OBJECTS + 1, patches)
        for qa, position in zip(qas, queries):
            named = ([LABEL_ROW], [LABEL_ROW]) if qa.kind == "detail" else referenced_objects(scene, qa)
            if named is not None:
                rows.append(row)
                positions.append(position)
                masks.append(torch.stack([patches[named[0]].any(0), patches[named[1]].any(0)]))
    if not rows:
        return None
    return torch.tensor(rows), torch.tensor(positions), torch.stack(masks)


def pointed_positions(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(queries, 2, 2) mean (row, column) of the patches marked in ``masks`` (queries, 2, grid * grid), scaled so that
    patch centres span [-1 + 1 / grid, 1 - 1 / grid] (as in :meth:`AuxiliaryHead.position_loss`)."""
    row, column = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    weights = masks.float() / masks.sum(-1, keepdim=True).clamp_min(1)  # (queries, 2, patches)
    centre = torch.stack([weights @ row.float(), weights @ column.float()], -1)  # (queries, 2, 2)
    return 2 * (centre + 0.5) / grid - 1


def image_attention(weights, image_mask, rows, positions, heads: slice) -> torch.Tensor:
    """(queries, heads, patches) attention of ``heads`` at query (``rows``, ``positions``) on the image tokens.

    weights: (rows, heads_all, tokens, tokens) attention probabilities of one language-model layer; image_mask:
    (rows, tokens) bool, the image-token positions (the same count in every row)."""
    image_positions = image_mask.nonzero()[:, 1].view(image_mask.shape[0], -1)  # (rows, patches)
    attention = weights[rows, heads, positions]  # (queries, heads, tokens)
    return attention.gather(-1, image_positions[rows][:, None].expand(-1, attention.shape[1], -1))


def pointed_mass(weights, image_mask, rows, positions, masks, heads: int) -> torch.Tensor:
    """(queries, 2 * heads) attention mass of heads ``[0, heads)`` on the object named first and of heads
    ``[heads, 2 * heads)`` on the one named last (``masks``: :func:`pointing_targets`)."""
    on_image = image_attention(weights, image_mask, rows, positions, slice(0, 2 * heads))
    return (on_image * masks.repeat_interleave(heads, dim=1)).sum(-1)


def pointing_loss(weights, image_mask, rows, positions, masks, heads: int) -> torch.Tensor:
    """-log(attention mass on the named objects' patches) (:func:`pointed_mass`), averaged over queries and supervised
    heads; the other heads are free."""
    mass = pointed_mass(weights, image_mask, rows, positions, masks, heads)
    return -torch.log(mass.clamp_min(MIN_POINT_MASS)).mean()


_PLURAL_SHAPES = {plural: shape for shape, plural in D.SHAPE_PLURALS.items()}
CENTRE_HEAD = list(AUX_CLASSES).index("centre")


def counting_targets(qas_per_row, labels, centres):
    """(rows, positions, support) of every ``count`` answer query: ``support`` (queries, patches) bool marks the centre
    patches of the objects being counted (all objects, or those of the shape asked about; none for zero).

    centres: (rows, patches) the ``centre`` row of :func:`patch_targets` (shape code at each object's centre patch)."""
    rows, positions, support = [], [], []
    for row, (qas, queries) in enumerate(zip(qas_per_row, answer_queries(labels))):
        for qa, position in zip(qas, queries):
            if qa.kind != "count":
                continue
            words = qa.question.lower().rstrip("?").split()
            shape = next((_PLURAL_SHAPES[w] for w in words if w in _PLURAL_SHAPES), None)
            support.append(centres[row] > 0 if shape is None else centres[row] == D.SHAPES.index(shape) + 1)
            rows.append(row)
            positions.append(position)
    if not rows:
        return None
    return torch.tensor(rows), torch.tensor(positions), torch.stack(support)


def counting_loss(weights, image_mask, rows, positions, support, head: int) -> torch.Tensor:
    """Cross-entropy of head ``head``'s attention against the uniform distribution over {the first token (<s>)} and
    the counted objects' centre patches: at the optimum the mass left on <s> is 1 / (count + 1), so the count can be
    read from the head's output.

    weights: (rows, heads, tokens, tokens) attention probabilities; image_mask: (rows, tokens) bool; support:
    (queries, patches) bool."""
    on_image = image_attention(weights, image_mask, rows, positions, slice(head, head + 1))[:, 0]  # (queries, patches)
    log_image = on_image.clamp_min(MIN_POINT_MASS).log()
    log_first = weights[rows, head, positions, 0].clamp_min(MIN_POINT_MASS).log()
    total = log_first + (log_image * support).sum(-1)
    return -(total / (1 + support.sum(-1))).mean()


def alignment_words(tokenizer) -> list[tuple[int, torch.Tensor]]:
    """(auxiliary target row, token ids of its classes 1..n) for the attributes that have a word: colour, shape, letter."""
    def ids(words):
        return torch.tensor(tokenizer.convert_tokens_to_ids([word.lower() for word in words]))

    return [(0, ids(D.COLOURS)), (1, ids(D.SHAPES)), (LETTER_HEAD, ids(D.LABEL_LETTERS))]


def alignment_loss(features, embeddings, targets, words) -> torch.Tensor:
    """Projected image tokens of an object's patch should look like the words naming it: cross-entropy of
    ``features @ embeddings[word ids].T`` against the patch's colour / shape / letter (patches that have one).

    features: (images, patches, text hidden) projector output; embeddings: (vocab, text hidden) the language model's
    input embeddings; targets: (images, heads, patches) from :func:`patch_targets`; words: :func:`alignment_words`."""
    losses = []
    for row, ids in words:
        present = targets[:, row] > 0  # (images, patches)
        if present.any():
            logits = features[present] @ embeddings[ids].T  # (present patches, classes)
            losses.append(torch.nn.functional.cross_entropy(logits, targets[:, row][present] - 1))
    return torch.stack(losses).mean() if losses else features.new_zeros(())


def tower_features(model, pixel_values) -> torch.Tensor:
    """(images, patches, vision hidden) features the projector reads: the tower run only up to
    ``vision_feature_layer``, CLS dropped (the ``default`` feature select strategy)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    read = model.config.vision_feature_layer % (len(layers) + 1)  # index into (embeddings, layer 1, ..., layer L)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (images, 1 + patches, vision hidden)
    for layer in layers[:read]:
        hidden = layer(hidden, None)
    return hidden[:, 1:]


def tower_losses(model, aux_head, hidden, targets, words=None, where_rows=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(projected image tokens (images, patches, text hidden), {"aux", "align", "where"}) for tower features
    ``hidden``: :class:`AuxiliaryHead`, :func:`alignment_loss` (0 when ``words`` is None) and
    :meth:`AuxiliaryHead.position_loss` (0 when the head has no position read-out; on the images ``where_rows``
    only when given: OneVision's base crops, the only crops whose patch position is the image position)."""
    projected = model.model.multi_modal_projector(hidden)  # (images, patches, text hidden)
    losses = {"aux": aux_head(hidden, targets), "align": torch.zeros(()), "where": torch.zeros(())}
    if words is not None:
        losses["align"] = alignment_loss(projected, model.get_input_embeddings().weight, targets, words)
    if aux_head.where is not None:
        rows = slice(None) if where_rows is None else where_rows
        losses["where"] = aux_head.position_loss(projected[rows], targets[rows])
    return projected, losses


def pretrain_tower(model, aux_head, config: "TrainConfig", recipe, scenes, words, rng, state: "TrainingState",
                   progress: bool = True) -> list:
    """Stage 1: train the tower (and projector / word embeddings through the alignment loss) on the auxiliary and
    alignment losses alone, without the language model, so stage 2 starts from readable image tokens. Returns the log
    (``state.logs["tower_log"]``); continues from ``state`` when it was saved in this stage. A language model started
    from a trained one (``init_from``) keeps its word embeddings: the images are aligned to them, not they to the
    images."""
    from tqdm.auto import tqdm

    parameters = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
                  *aux_head.parameters(), *([] if config.init_from else [model.get_input_embeddings().weight])]
    optimizer = torch.optim.AdamW(parameters, lr=config.tower_learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.tower_steps))
    log = state.logs["tower_log"]
    start = state.start("tower", optimizer, schedule, config.tower_steps)
    for step in tqdm(range(start, config.tower_steps), initial=start, total=config.tower_steps, desc="tower", unit="step",
                     disable=not progress):
        losses = recipe.tower_losses(model, aux_head, scenes, rng, words)
        optimizer.zero_grad(set_to_none=True)
        weighted_total(losses, config).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.tower_steps - 1:
            log.append({"step": step, **{f"{name}_loss": value.item() for name, value in losses.items()}})
        state.step_done("tower", step + 1, optimizer, schedule, last=step + 1 == config.tower_steps)
    return log


def weighted_total(losses: dict[str, torch.Tensor], config: "TrainConfig") -> torch.Tensor:
    """The loss to minimise: each of ``losses`` times the config's ``{name}_weight`` (the answer loss ``lm``: 1)."""
    return sum(value if name == "lm" else getattr(config, f"{name}_weight") * value for name, value in losses.items())


def _warmup_cosine(warmup: int, steps: int):
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0 at ``steps``."""
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


@contextlib.contextmanager
def captured_attention(attention: torch.nn.Module | None):
    """Collects the attention probabilities every forward of ``attention`` (a self-attention module run with eager
    attention) returns, into the yielded list; ``None`` captures nothing."""
    captured: list[torch.Tensor] = []
    hook = None if attention is None else attention.register_forward_hook(
        lambda module, args, output: captured.append(output[1]))
    try:
        yield captured
    finally:
        if hook is not None:
            hook.remove()
    if captured and captured[0] is None:
        raise RuntimeError("attention weights are needed (pointing / counting): use attn_implementation='eager'")


def eager_attention_at(language_model, layer: int):
    """Run layer ``layer`` of ``language_model`` (a decoder whose layers share its config) with eager attention, which
    returns the attention probabilities, and the other layers with the stock kernel (an eager-format float mask works
    for both). Returns a function that restores the stock setting on every layer."""
    shared = language_model.config
    stock = shared._attn_implementation
    fused = copy.copy(shared)  # the other layers keep the stock kernel through their own config copy
    shared._attn_implementation = "eager"  # the mask is built from the shared config: additive float
    for index, decoder_layer in enumerate(language_model.layers):
        if index != layer:
            decoder_layer.self_attn.config = fused

    def restore() -> None:
        shared._attn_implementation = stock
        for decoder_layer in language_model.layers:
            decoder_layer.self_attn.config = shared

    return restore


def training_loss(model, aux_head, pixel_values, input_ids, mask, labels, targets, pointing=None, point_layer: int = 0,
                  point_heads: int = 0, words=None, counting=None, locate: bool = False,
                  tally: bool = False) -> dict[str, torch.Tensor]:
    """Losses for images (images, 3, H, W) whose conversations are the rows of ``input_ids`` (one row per image):
    ``lm`` (the stock LLaVA loss), ``aux`` (:class:`AuxiliaryHead`), ``point`` (:func:`pointing_loss`; 0 when
    ``pointing``, :func:`pointing_targets`' output, is None; it needs eager attention) and ``align``
    (:func:`alignment_loss`; 0 when ``words`` is None), ``where`` (:meth:`AuxiliaryHead.position_loss`; 0 without
    its read-out) and ``count`` (:func:`counting_loss` on head ``2 *
    point_heads`` of the pointing layer; 0 when ``counting``, :func:`counting_targets`' output, is None) and
    ``locate`` (:meth:`AuxiliaryHead.locate_loss` on the output of the pointing layer at the pointed queries; 0 unless
    ``locate`` and ``pointing``) and ``tally`` (:meth:`AuxiliaryHead.tally_loss`, there too, at the count queries;
    0 unless ``tally`` and ``counting``). Runs only the tower layers up to ``vision_feature_layer``."""
    features, losses = tower_losses(model, aux_head, tower_features(model, pixel_values), targets, words)
    embeds = model.get_input_embeddings()(input_ids)
    image_tokens = input_ids == model.config.image_token_id  # (rows, tokens)
    embeds = embeds.masked_scatter(image_tokens[..., None], features.to(embeds.dtype))
    return language_losses(model, aux_head, embeds, mask, labels, image_tokens, losses, pointing, point_layer,
                           point_heads, counting, locate, tally)


def language_losses(model, aux_head, embeds, mask, labels, image_tokens, losses, pointing=None, point_layer: int = 0,
                    point_heads: int = 0, counting=None, locate: bool = False, tally: bool = False,
                    locate_masks=None) -> dict[str, torch.Tensor]:
    """The language-model side of :func:`training_loss`, added to the tower's ``losses``: the stock loss on the input
    embeddings ``embeds`` (images already in place), and the pointing / counting / locate / tally losses, whose
    attention is read on the positions ``image_tokens`` (rows, tokens) bool marks (the same count in every row).
    ``locate_masks``: the (queries, 2, patches) masks the locate read-out's positions come from, when not
    ``pointing``'s own."""
    supervised = pointing is not None or counting is not None
    with captured_attention(model.model.language_model.layers[point_layer].self_attn if supervised else None) as captured:
        output = model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                       output_hidden_states=(locate and pointing is not None) or (tally and counting is not None))
    losses.update(lm=output.loss, point=torch.zeros(()), count=torch.zeros(()), locate=torch.zeros(()),
                  tally=torch.zeros(()))
    after_point = output.hidden_states[point_layer + 1] if output.hidden_states else None  # (rows, tokens, hidden)
    if pointing is not None:
        losses["point"] = pointing_loss(captured[0], image_tokens, *pointing, heads=point_heads)
        if locate:
            rows, positions, masks = pointing
            masks = masks if locate_masks is None else locate_masks
            losses["locate"] = aux_head.locate_loss(after_point[rows, positions], masks)
    if counting is not None:
        losses["count"] = counting_loss(captured[0], image_tokens, *counting, head=2 * point_heads)
        if tally:
            rows, positions, support = counting
            losses["tally"] = aux_head.tally_loss(after_point[rows, positions], support)
    return losses


def greedy_generate(model, tokenizer, inputs, max_new_tokens: int = MAX_ANSWER_TOKENS) -> tuple[list[str], list[bool]]:
    """Decoded greedy answers (at most ``max_new_tokens`` tokens) for a left-padded batch of prepared model inputs,
    and whether each generation ended with the end-of-sequence token."""
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    ended = (new_tokens == tokenizer.eos_token_id).any(-1).tolist()
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended


def greedy_answers(model, tokenizer, inputs) -> list[str]:
    return greedy_generate(model, tokenizer, inputs)[0]


def llava_inputs(model, processor, pixels: torch.Tensor):
    """``prepare(indices, questions)``: the toy LLaVA's inputs for the images ``pixels[indices]`` (uint8) asked
    ``questions`` (the toy prompt, the image token expanded, CLIP-normalised pixels; left padding)."""
    patches = model.config.image_seq_length

    def prepare(indices: list[int], questions: list[str]):
        prompts = [PROMPT.format(question=question).replace("<image>", "<image>" * patches) for question in questions]
        encoded = processor.tokenizer(prompts, return_tensors="pt", padding=True)  # left padding for generation
        encoded["pixel_values"] = normalize(pixels[indices])
        return encoded

    return prepare


def evaluate(model, processor, examples, pixels, batch_size: int = 32, prepare=None) -> dict:
    """Greedy answers for every question of ``examples``; ``toyvlm.data.accuracy`` of them. ``prepare``: the model's
    inputs for (indices into ``pixels``, questions); default :func:`llava_inputs`."""
    tokenizer = processor.tokenizer
    prepare = prepare or llava_inputs(model, processor, pixels)
    items = [(i, qa) for i, example in enumerate(examples) for qa in example.qas]
    predictions = []
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        encoded = prepare([i for i, _ in chunk], [qa.question for _, qa in chunk])
        predictions += greedy_answers(model, tokenizer, encoded)
    records = [{"kind": qa.kind, "answer": qa.answer, "background": examples[i].scene.background} for i, qa in items]
    return D.accuracy(records, predictions)


def describe_score(model, processor, examples, pixels, batch_size: int = 32, prepare=None) -> dict:
    """Greedy descriptions (at most MAX_DESCRIPTION_TOKENS) of ``examples`` asked their describe prompt: CIDEr-D
    against their references (:mod:`toyvlm.cider`) and the share that ended with </s>. ``prepare``: as for
    :func:`evaluate`."""
    from .cider import cider_d

    tokenizer = processor.tokenizer
    prepare = prepare or llava_inputs(model, processor, pixels)
    texts, ended = [], []
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = prepare(list(range(start, start + len(chunk))), [e.describe_prompt for e in chunk])
        batch_texts, batch_ended = greedy_generate(model, tokenizer, encoded, MAX_DESCRIPTION_TOKENS)
        texts += batch_texts
        ended += batch_ended
    cider, _ = cider_d(dict(enumerate(texts)), {i: e.descriptions for i, e in enumerate(examples)})
    return {"cider": cider, "ended": float(np.mean(ended)), "scenes": len(examples), "example": texts[0]}


class StateError(Exception):
    """A training state that must not be overwritten or cannot be resumed from."""


class ConfigError(ValueError):
    """A training config the recipe cannot run."""


class TrainingState:
    """Everything a step depends on, so that a killed run continues bit-identically (``--resume``): model and auxiliary
    head weights, the current stage's optimizer and LR schedule, the stage ("tower", then "main") and the steps done in
    it, the numpy generator that samples questions and descriptions, the scene stream's position (a scene is generated
    from its own seeded stream, :func:`toyvlm.data.split_rngs`), torch's RNG, the logs so far and the training seconds
    (of earlier segments and this one: a resumed run's setup counts again, the steps after the last write are
    redone). Python's ``random`` is not used. Written atomically to ``out/STATE_FILE`` (see STATE_EVERY_SECONDS),
    removed by :func:`train` when it completes. Without ``resume``, an existing state is an error; with it, a
    state of another config is refused."""

    def __init__(self, out: Path, config: TrainConfig, resume: bool):
        self.path, self.config = out / STATE_FILE, asdict(config)
        self.saved, self.parts, self.written = None, {}, time.time()
        self.logs = {"tower_log": [], "log": [], "evaluations": []}
        if self.path.exists() and not resume:
            raise StateError(f"{self.path} holds the state of an interrupted run: pass --resume to continue it "
                             "(or delete the file to start over)")
        if resume and self.path.exists():
            self.saved = torch.load(self.path, weights_only=True)
            for key, value in self.config.items():
                if self.saved["config"].get(key) != value:
                    raise StateError(f"cannot resume from {self.path}: it was made with {key}="
                                     f"{self.saved['config'].get(key)!r}, this run has {key}={value!r}")
            self.logs = self.saved["logs"]

    @property
    def seconds(self) -> float:
        """Training seconds of the earlier segments."""
        return self.saved["seconds"] if self.saved else 0.0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (this process, all threads) of the earlier segments (0 for a state written without them)."""
        return self.saved.get("cpu_seconds", 0.0) if self.saved else 0.0

    def attach(self, started: float, cpu_started: float, model, aux_head, rng: np.random.Generator, scenes) -> None:
        """The training's state-holding parts, restored from the saved state when resuming; ``started`` /
        ``cpu_started``: the wall / process CPU time training started, minus the earlier segments' seconds."""
        self.started, self.cpu_started = started, cpu_started
        self.parts = {"model": model, "aux_head": aux_head, "rng": rng, "scenes": scenes}
        if self.saved:
            model.load_state_dict(self.saved["model"])
            aux_head.load_state_dict(self.saved["aux_head"])
            rng.bit_generator.state = self.saved["numpy_rng"]
            torch.set_rng_state(self.saved["torch_rng"])
            scenes.next_index = self.saved["next_scene"]

    def start(self, stage: str, optimizer, schedule, steps: int) -> int:
        """The first step of ``stage`` to run: 0; when resuming in ``stage``, the saved step (``optimizer`` and
        ``schedule`` restored); when resuming in a later stage, ``steps`` (its number of steps: none left)."""
        saved = self.saved["stage"] if self.saved else None
        if saved != stage:
            return steps if saved == "main" else 0  # "main" follows "tower"
        optimizer.load_state_dict(self.saved["optimizer"])
        schedule.load_state_dict(self.saved["schedule"])
        return self.saved["step"]

    def step_done(self, stage: str, steps: int, optimizer, schedule, last: bool) -> None:
        """After ``steps`` steps of ``stage``: write the state when STATE_EVERY_SECONDS have passed since the last write
        or ``last`` (the stage's last step)."""
        if not last and time.time() - self.written < STATE_EVERY_SECONDS:
            return
        parts = self.parts
        state = {"config": self.config, "stage": stage, "step": steps, "model": parts["model"].state_dict(),
                 "aux_head": parts["aux_head"].state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "numpy_rng": parts["rng"].bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "next_scene": parts["scenes"].next_index, "logs": self.logs,
                 "seconds": time.time() - self.started, "cpu_seconds": time.process_time() - self.cpu_started}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # left only when writing failed
        self.written = time.time()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class LlavaRecipe:
    """The toy LLaVA's side of :func:`train`: its model, its scene stream, the losses of a tower step and of a main
    step, its evaluation inputs. :class:`toyvlm.onevision.OneVisionRecipe` is the toy OneVision's."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def build(self):
        """(model, processor) with fresh weights."""
        return build_model(self.config, build_tokenizer())

    def stream(self, processor) -> SceneStream:
        return SceneStream(self.config.seed, self.config.image_size, self.config.patch_size)

    def encoder(self, model, processor) -> ConversationEncoder:
        return ConversationEncoder(processor.tokenizer, model.config.image_seq_length)

    def images(self, examples) -> torch.Tensor:
        """The validation images, as :meth:`inputs` reads them."""
        return render_split(examples, self.config.image_size)

    def inputs(self, model, processor, images):
        return llava_inputs(model, processor, images)

    def tower_losses(self, model, aux_head, scenes, rng, words) -> dict[str, torch.Tensor]:
        _, pixels, targets, _ = scenes.draw(rng, self.config.tower_batch_size)  # scenes: SceneStream
        return tower_losses(model, aux_head, tower_features(model, normalize(pixels)), targets, words)[1]

    def step_losses(self, model, aux_head, scenes, rng, step: int, encoder, words) -> dict[str, torch.Tensor]:
        """Main step ``step``: draw its scenes and conversations, return :func:`training_loss`."""
        config = self.config
        batch, pixels, targets, objects = scenes.draw(rng, config.batch_size + config.describe_rows,
                                                      object_limit(config, step))
        turns = conversation_turns(batch, rng, config)
        input_ids, mask, labels = pad_batch([encoder(qas) for qas in turns], encoder.tokenizer.pad_token_id)
        pointing = pointing_targets(turns, batch, labels, objects) if config.point_weight else None
        counting = counting_targets(turns, labels, targets[:, CENTRE_HEAD]) if config.count_weight else None
        readouts = step >= config.readout_start  # the locate / tally read-outs join late (see the docstring)
        return training_loss(model, aux_head, normalize(pixels), input_ids, mask, labels, targets, pointing,
                             config.point_layer, config.point_heads, words if config.align_weight else None, counting,
                             bool(config.locate_weight) and readouts, bool(config.tally_weight) and readouts)


def conversation_turns(scenes: list[D.Scene], rng: np.random.Generator, config: TrainConfig) -> list[list[D.QA]]:
    """The rows of a main step: ``batch_size`` conversations of short questions, then ``describe_rows`` single
    describe turns (the scenes in that order)."""
    return ([sample_turns(scene, rng, config.turns, config.hard_no_share) for scene in scenes[: config.batch_size]]
            + [[D.describe_qa(scene, rng)] for scene in scenes[config.batch_size :]])


def recipe_for(config: TrainConfig):
    """The :class:`LlavaRecipe` or :class:`toyvlm.onevision.OneVisionRecipe` of ``config.arch``; a field the arch
    does not read must keep its unused value (:data:`ONEVISION_ONLY`)."""
    if config.arch not in ARCHES:
        raise ConfigError(f"arch {config.arch!r}: choose one of {', '.join(ARCHES)}")
    if config.arch == "onevision":
        from .onevision import OneVisionRecipe

        return OneVisionRecipe(config)
    for name, unused in ONEVISION_ONLY.items():
        if getattr(config, name) != unused:
            raise ConfigError(f"{name} is a OneVision setting (--arch onevision); the LLaVA recipe has none")
    return LlavaRecipe(config)


def train(config: TrainConfig, out_dir, log_every: int = 50, progress: bool = True, resume: bool = False) -> dict:
    """Train, evaluate on the validation split, save model + processor + training_log.json to ``out_dir``.
    ``resume``: continue from the :class:`TrainingState` in ``out_dir``, if there is one. ``config.arch`` chooses
    the model (:func:`recipe_for`); everything else is the same recipe."""
    from tqdm.auto import tqdm

    heads_needed = 2 * config.point_heads + (1 if config.count_weight else 0)
    if (config.point_weight or config.count_weight) and not (0 <= config.point_layer < config.text_layers
                                                             and heads_needed <= config.text_heads):
        raise ValueError(f"pointing / counting losses: point_layer {config.point_layer} must be < text_layers "
                         f"{config.text_layers} and 2 * point_heads {config.point_heads} (+1 when counting) <= "
                         f"text_heads {config.text_heads}")
    recipe = recipe_for(config)
    out = Path(out_dir)
    state = TrainingState(out, config, resume)
    if state.saved:
        print(f"resuming from {state.path}: stage {state.saved['stage']}, {state.saved['step']} steps done",
              file=sys.stderr)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    started = time.time() - state.seconds
    cpu_started = time.process_time() - state.cpu_seconds
    model, processor = recipe.build()
    language_model = model.model.language_model
    restore_attention = lambda: None  # noqa: E731
    if config.point_weight or config.count_weight:  # the pointing / counting losses read attention probabilities
        restore_attention = eager_attention_at(language_model, config.point_layer)
    aux_head = AuxiliaryHead(config.vision_hidden, config.image_size // config.patch_size,
                             config.text_hidden if config.where_weight or config.locate_weight or config.tally_weight
                             else None)
    val_examples = D.make_split("val", seed=config.seed, num_scenes=config.val_scenes, image_size=config.image_size)
    scenes = recipe.stream(processor)  # every training scene new
    val_images = recipe.images(val_examples)
    encoder = recipe.encoder(model, processor)
    words = alignment_words(processor.tokenizer)
    parameters = list(model.parameters()) + list(aux_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
    rng = np.random.default_rng(config.seed)
    state.attach(started, cpu_started, model, aux_head, rng, scenes)
    tower_log = pretrain_tower(model, aux_head, config, recipe, scenes, words, rng, state, progress)
    log, evaluations = state.logs["log"], state.logs["evaluations"]
    model.train()
    start = state.start("main", optimizer, schedule, config.steps)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training", unit="step",
               disable=not progress)
    for step in bar:
        losses = recipe.step_losses(model, aux_head, scenes, rng, step, encoder, words)
        optimizer.zero_grad(set_to_none=True)
        weighted_total(losses, config).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps - 1:
            log.append({"step": step, "loss": losses["lm"].item(),
                        **{f"{name}_loss": value.item() for name, value in losses.items() if name != "lm"},
                        "objects": object_limit(config, step), "seconds": time.time() - started,
                        "cpu_seconds": time.process_time() - cpu_started})
            bar.set_postfix({name: f"{value.item():.3f}" for name, value in losses.items()})
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            prepare = recipe.inputs(model, processor, val_images[: config.eval_scenes])
            partial = evaluate(model, processor, val_examples[: config.eval_scenes], None,
                               batch_size=config.batch_size, prepare=prepare)
            partial["describe"] = describe_score(model, processor, val_examples[: config.eval_scenes], None,
                                                 config.batch_size, prepare=prepare)
            evaluations.append({"step": step + 1, "seconds": time.time() - started, **partial})
            bar.write(f"step {step + 1}: validation[:{config.eval_scenes} scenes] {_summary(partial)}", file=sys.stderr)
            model.train()
        state.step_done("main", step + 1, optimizer, schedule, last=step + 1 == config.steps)
    train_seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
    model.eval()
    prepare = recipe.inputs(model, processor, val_images)
    validation = evaluate(model, processor, val_examples, None, batch_size=config.batch_size, prepare=prepare)
    validation["describe"] = describe_score(model, processor, val_examples, None, config.batch_size, prepare=prepare)
    out.mkdir(parents=True, exist_ok=True)
    restore_attention()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"config": asdict(config), "validation": validation, "train_seconds": train_seconds,
               "train_cpu_seconds": cpu_seconds, "evaluations": evaluations, "tower_log": tower_log, "log": log}
    (out / "training_log.json").write_text(json.dumps(summary, indent=1))
    state.remove()
    return summary


def object_limit(config: TrainConfig, step: int) -> int:
    """Curriculum: the most objects a training scene may have at ``step`` (rises linearly to MAX_OBJECTS)."""
    if step >= config.curriculum_steps:
        return D.MAX_OBJECTS
    span = D.MAX_OBJECTS - config.curriculum_start + 1
    return min(D.MAX_OBJECTS, config.curriculum_start + step * span // config.curriculum_steps)


def _summary(result: dict) -> str:
    kinds = " ".join(f"{kind} {100 * value:.1f}" for kind, value in result["per_kind"].items())
    describe = result.get("describe")
    cider = (f"; CIDEr-D {describe['cider']:.3f}, {100 * describe['ended']:.0f}% ended: {describe['example']!r}"
             if describe else "")
    return f"overall {100 * result['overall']:.1f}% ({kinds}; {result['questions']} questions){cider}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the killed run whose {STATE_FILE} is in --out (same options), if there is one")
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--arch", choices=ARCHES, default="llava")
    defaults = asdict(default_config(first.parse_known_args(argv)[0].arch))  # --arch chooses the other defaults
    for name, value in defaults.items():
        if name == "arch":
            parser.add_argument("--arch", choices=ARCHES, default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = TrainConfig(**{name: getattr(args, name) for name in defaults})
    try:
        summary = train(config, args.out, resume=args.resume)
    except (StateError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps({"validation": summary["validation"], "train_seconds": round(summary["train_seconds"]),
                      "train_cpu_seconds": round(summary["train_cpu_seconds"])}, indent=1), flush=True)


if __name__ == "__main__":
    main()
