"""Training a DyRate predictor (``dymu train-dyrate``): the VLM frozen, the predictor trained end to end through
nested soft masks that enter attention differentiably (spec §4.3 items 6 and 8; ``dymu.dyrate`` says what is read).

* ``training_forward``: one teacher-forced forward of (image, prompt, answer) rows on the stock decoder layers with
  an attention kernel of ours (``SOFT_KERNEL``): layers < K plain (their attention rows are the features and the
  ranking, exactly what inference reads), layers >= K with A_qj = M_qj·exp(z_qj) / Σ_k M_qk·exp(z_qk), M the mixed
  nested mask of each query's rate sample. Gradients reach the predictor only (the VLM's parameters are frozen).
* ``train``: AdamW over the data in a seeded order, Gumbel noise from a seeded generator drawn per record (so a run
  under ``torchrun``, which splits each batch over the processes and averages the gradients over gloo, draws the
  same noise as one process), temperature annealed, a training state written every ``save_every`` steps (a killed
  run resumed from it ends with bit-identical weights), a tqdm bar, then the predictor file.

DATA (``read_records``): a JSON-lines file of {"image", "prompt" (or "question"), "answer"} (image paths relative to
the file), or a folder in the toy benchmark layout (``python -m toyvlm.data``: questions.jsonl + answers.jsonl, and
captions.json's describe prompts with their first reference).
"""

from __future__ import annotations

import io
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dyrate as D
from .errors import DymuError
from .plan import Segment, segments_of

#: the attention kernel of the training forward (registered with transformers' AttentionInterface)
SOFT_KERNEL = "dymu_dyrate_soft"
STATE_FORMAT = "dymu-dyrate-training"
STATE_VERSION = 1
#: the training state is written every this many steps (and at the end)
DEFAULT_SAVE_EVERY = 10
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 1e-3
DEFAULT_EPOCHS = 1
#: the readout bias of rate 0 a training starts from (above the shares' contribution: it starts pruning nothing)
INITIAL_BIAS = 1.0

_RUN = None  # the SoftRun of the training forward in flight (the kernel is called with the module only)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Record:
    image: str  # path
    prompt: str
    answer: str


def read_records(path, limit: int | None = None) -> list[Record]:
    """Training records from DATA (see the module doc); one-line errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        records = _benchmark_records(path)
    elif path.is_file():
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            records.append(_record(_json_line(line, path, number), path.parent, f"{path}:{number}"))
    else:
        raise DymuError(f"training data not found: {path}")
    if not records:
        raise DymuError(f"{path}: no training records")
    missing = next((r.image for r in records if not Path(r.image).is_file()), None)
    if missing is not None:
        raise DymuError(f"{path}: image not found: {missing}")
    return records[:limit] if limit else records


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        raise DymuError(f"{path}:{number}: not a JSON object")
    return row


def _record(row: dict, folder: Path, origin: str) -> Record:
    prompt = row.get("prompt", row.get("question"))
    if not all(isinstance(v, str) and v for v in (row.get("image"), prompt, row.get("answer"))):
        raise DymuError(f"{origin}: needs \"image\", \"prompt\" (or \"question\") and \"answer\" strings")
    return Record(image=str(folder / row["image"]), prompt=prompt, answer=row["answer"])


def _benchmark_records(folder: Path) -> list[Record]:
    """The toy benchmark layout: every question with its answer, then each describe prompt with its first reference."""
    questions, answers = folder / "questions.jsonl", folder / "answers.jsonl"
    if not (questions.is_file() and answers.is_file()):
        raise DymuError(f"{folder}: a DATA folder needs questions.jsonl and answers.jsonl (the toy benchmark layout)")
    lines = lambda p: [_json_line(l, p, n) for n, l in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if l.strip()]
    answer_of = {row.get("question_id"): row.get("answer") for row in lines(answers)}
    records = [_record({**row, "answer": answer_of.get(row.get("question_id"))}, folder, f"{questions}:{n}")
               for n, row in enumerate(lines(questions), 1)]
    captions = folder / "captions.json"
    if captions.is_file():
        data = json.loads(captions.read_text(encoding="utf-8"))
        first = {}
        for annotation in data.get("annotations", []):
            first.setdefault(annotation["image_id"], annotation["caption"])
        records += [Record(str(folder / image["file_name"]), image["prompt"], first[image["id"]])
                    for image in data.get("images", []) if image.get("prompt") and image["id"] in first]
    return records


@dataclass
class Batch:
    """Teacher-forced rows, left padded: prompt then answer then its end-of-sequence token."""

    input_ids: torch.Tensor  # (batch, n)
    attention_mask: torch.Tensor  # (batch, n) 0 on padding
    pixel_values: torch.Tensor  # (batch, 3, h, w)
    answer_lengths: torch.Tensor  # (batch,) answer tokens (with the end token) at the end of each row


class Encoder:
    """Records -> ``Batch`` with a VLM's processor (prompt ids cached per prompt text)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._answers: dict = {}

    def answer_ids(self, record: Record) -> list[int]:
        if record.answer not in self._answers:
            ids = self.tokenizer(record.answer, add_special_tokens=False).input_ids
            self._answers[record.answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[record.answer]

    def __call__(self, records: list[Record]) -> Batch:
        from .images import open_image
        from .llava import chat_prompt

        images = [open_image(r.image) for r in records]
        rows = []
        for record, image in zip(records, images):
            text = chat_prompt(self.processor, record.prompt, 1)
            prompt = self.processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
            rows.append(prompt + self.answer_ids(record))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        lengths = torch.tensor([len(self.answer_ids(r)) for r in records])
        return Batch(ids, mask, pixels, lengths)


# ---------------------------------------------------------------------------------------------- the soft forward
@dataclass
class SoftRun:
    allowed: torch.Tensor  # (batch, 1, n, n) bool: causal, real keys (a padding query: itself)
    record: tuple  # layers whose attention (mean over heads) is kept
    weights: dict  # layer -> (batch, n, n)
    mask: torch.Tensor | None = None  # (batch, 1, n, n) soft key mask M of layers >= from_layer
    from_layer: int = 0


def soft_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Masked-softmax attention: weights M·exp(z) / Σ M·exp(z) over the causal real keys (DynamicViT's form: the
    gradient reaches M where an additive -inf would give none). query: (batch, heads, q, d); key / value:
    (batch, kv_heads, kv, d). Returns ((batch, q, heads, d), None)."""
    run = _RUN
    layer = module.layer_idx
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = (query @ key.transpose(-1, -2)) * scaling  # (batch, heads, q, kv)
    logits = logits.masked_fill(~run.allowed, float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    if run.mask is not None and layer >= run.from_layer:
        weights = weights * run.mask
    weights = weights / weights.sum(-1, keepdim=True)
    if layer in run.record:
        run.weights[layer] = weights.mean(1).detach()
    return (weights @ value).transpose(1, 2).contiguous(), None


@contextmanager
def _soft_kernel(language_model):
    """The decoder's attention is ``soft_attention`` for the duration (the instance's configs, restored after)."""
    from . import compat

    global _RUN
    registries = compat.attention_registries()
    if registries is None:
        raise compat.refuse("transformers has no AttentionInterface")
    registries[0].register(SOFT_KERNEL, soft_attention)
    configs = {id(language_model.config): language_model.config}
    for layer in language_model.layers:
        configs.setdefault(id(layer.self_attn.config), layer.self_attn.config)
    saved = [(config, config._attn_implementation) for config in configs.values()]
    for config, _ in saved:
        config._attn_implementation = SOFT_KERNEL
    try:
        yield
    finally:
        _RUN = None
        for config, implementation in saved:
            config._attn_implementation = implementation


@dataclass
class Forward:
    logits: torch.Tensor  # (batch, n, vocab)
    y: torch.Tensor  # (batch, n, K) rate weights of every query (steps: the answer's queries)
    kept: torch.Tensor  # (batch, n) expected kept fraction of the image tokens per query
    steps: torch.Tensor  # (batch, n) bool: queries that are steps (the last prompt one and the answer's but the last)


def training_forward(model, batch: Batch, predictor: D.Predictor, config: D.PredictorConfig,
                     temperature: float = 1.0, noise: torch.Tensor | None = None) -> Forward:
    """The teacher-forced forward with a rate per step. noise: (batch, n, K) uniform Gumbel noise, or None: the
    argmax without noise (inference's choice)."""
    global _RUN
    base, lm = model.model, model.model.language_model
    ids, real = batch.input_ids, batch.attention_mask.bool()
    n = ids.shape[1]
    image = ids == model.config.image_token_id
    with torch.no_grad():
        features = torch.cat(list(base.get_image_features(pixel_values=batch.pixel_values.to(model.dtype)).pooler_output))
        hidden = base.get_input_embeddings()(ids).masked_scatter(image[..., None], features.to(model.dtype))
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)  # left padding, as generate counts
        tables = lm.rotary_emb(hidden, positions)
    eye = torch.eye(n, dtype=torch.bool)
    allowed = (torch.ones(n, n, dtype=torch.bool).tril() & real[:, None, :]) | eye  # (batch, n, n)
    start = n - batch.answer_lengths  # (batch,) the first answer position p
    query = torch.arange(n)[None]
    steps = (query >= start[:, None] - 1) & (query <= n - 2)  # (batch, n)
    kinds = segments_of(image, ~real).masked_fill(query >= start[:, None], int(Segment.RESPONSE))
    layer_k = config.layer
    run = SoftRun(allowed=allowed[:, None], record=tuple(sorted({*config.features, layer_k - 1})), weights={},
                  from_layer=layer_k)
    with _soft_kernel(lm):
        _RUN = run
        for index, layer in enumerate(lm.layers):
            if index == layer_k:
                run.mask, y, kept = _step_masks(run, image, kinds, steps, start, predictor, config, temperature, noise)
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= layer_k):
                hidden = layer(hidden, attention_mask=None, position_embeddings=tables, position_ids=positions)
        logits = model.lm_head(lm.norm(hidden))
    return Forward(logits=logits, y=y, kept=kept, steps=steps)


def _step_masks(run: SoftRun, image, kinds, steps, start, predictor, config, temperature, noise):
    """(M (batch, 1, n, n), y (batch, n, K), kept fraction (batch, n)) from the attention of layers < K."""
    batch, n = image.shape
    shares = torch.stack([D.segment_shares(run.weights[layer], kinds[:, None, :]) for layer in config.features]).mean(0)
    shares = shares * steps[..., None]  # (batch, n, 4); zeros before the first step (inference's empty history)
    padded = torch.nn.functional.pad(shares, (0, 0, config.window - 1, 0))
    windows = padded.unfold(1, config.window, 1).transpose(-1, -2)  # (batch, n, N, 4), oldest first
    logits = predictor(windows)  # (batch, n, K)
    if noise is None:
        y = torch.nn.functional.one_hot(logits.argmax(-1), config.rates).to(logits.dtype)
    else:
        y = D.gumbel_softmax(logits, temperature, config.hard, noise)
    first = start - 1  # (batch,) the query of step 0 (the prefill's last)
    if not config.prune_prefill:
        at_first = torch.arange(n)[None] == first[:, None]
        y = torch.where(at_first[..., None], torch.nn.functional.one_hot(torch.zeros_like(first), config.rates).to(y.dtype)[:, None], y)
    source = torch.maximum(torch.arange(n)[None], first[:, None])  # (batch, n): the prompt's queries take step 0's
    y_rows = y.gather(1, source[..., None].expand(-1, -1, config.rates))
    scores = run.weights[config.layer - 1].gather(1, source[..., None].expand(-1, -1, n))  # (batch, n, n)
    ranks = D.image_ranks(scores, image[:, None, :].expand(-1, n, -1))
    total = image.sum(-1)  # (batch,) N
    kept = (total[:, None] - torch.round(total[:, None].double() * D.rate_values(config.rates)).long())  # (batch, K)
    masks = D.nested_masks(ranks, image[:, None, :], kept[:, None, :])  # (batch, n, n, K)
    mask = D.mixed_mask(masks, y_rows)
    mask = torch.where(torch.eye(n, dtype=torch.bool), torch.ones_like(mask), mask)  # every query sees itself
    fraction = (y * (kept / total.clamp_min(1)[:, None]).to(y.dtype)[:, None, :]).sum(-1)  # (batch, n)
    return mask[:, None].to(run.weights[config.layer - 1].dtype), y, fraction


@dataclass
class Loss:
    total: torch.Tensor
    cross_entropy: float
    kept: float  # mean kept fraction over the steps
    rate: float  # mean chosen rate over the steps


def loss_of(forward: Forward, batch: Batch, config: D.PredictorConfig, penalty: float) -> Loss:
    """Next-token cross-entropy over the answer + ``penalty`` x the mean kept fraction over the steps."""
    steps = forward.steps[:, :-1]
    targets = batch.input_ids[:, 1:][steps]
    ce = torch.nn.functional.cross_entropy(forward.logits[:, :-1][steps].float(), targets)
    kept = forward.kept[:, :-1][steps].mean()
    rates = (forward.y.detach().argmax(-1).double() / config.rates)[:, :-1][steps].mean()
    return Loss(ce + penalty * kept, float(ce.detach()), float(kept.detach()), float(rates))


# ---------------------------------------------------------------------------------------------- the loop
def record_noise(generator: torch.Generator, lengths: list[int], rates: int) -> list[torch.Tensor]:
    """Uniform noise (steps, K) per record in order: a record's answer of L tokens (its end included) has L steps."""
    return [torch.rand(length, rates, generator=generator) for length in lengths]


def place_noise(pieces: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """(batch, n, K) with each record's noise on its steps (queries p-1 .. n-2); 0.5 elsewhere (unused)."""
    rows, n = batch.input_ids.shape
    noise = torch.full((rows, n, pieces[0].shape[1]), 0.5)
    for row, piece in enumerate(pieces):
        noise[row, n - 1 - piece.shape[0] : n - 1] = piece
    return noise


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass
class Settings:
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    seed: int = 0
    save_every: int = DEFAULT_SAVE_EVERY


def train(model, processor, records: list[Record], config: D.PredictorConfig, out, settings: Settings = Settings(),
          resume: bool = False, progress: bool = True, on_step=None, data_name: str = "") -> D.PredictorFile:
    """Train a predictor for ``model`` (frozen) on ``records``; writes ``out`` (the predictor file) and, while it
    runs, ``out.state`` (removed at the end). ``resume``: continue from ``out.state``. ``on_step(step, loss)``: called
    after every optimizer step (tests stop a run there). Under ``torchrun`` (an initialised process group) each batch
    is split over the processes and the gradients averaged; only rank 0 writes."""
    from tqdm.auto import tqdm

    from .files import atomic_write, model_fingerprint

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    config.check(model.config.get_text_config().num_hidden_layers, "train-dyrate")
    encoder = Encoder(processor)
    header = {"format": STATE_FORMAT, "version": STATE_VERSION, "model": model_fingerprint(model),
              "data": _fingerprint([(r.image, r.prompt, r.answer) for r in records]), "config": config.to_json(),
              "settings": vars(settings), "world": world}
    predictor = initial_predictor(config, settings.seed)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    per_epoch = math.ceil(len(records) / settings.batch_size)
    total = settings.epochs * per_epoch
    step, history = 0, []
    if resume:
        step, history = _resume(state_path, header, predictor, optimizer, generator)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    bar = tqdm(total=total, initial=step, desc="train-dyrate", unit="step", disable=not progress or rank != 0)
    try:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            chunk = epoch_order(settings.seed, epoch, len(records))[index * settings.batch_size:(index + 1) * settings.batch_size]
            chosen = [records[i] for i in chunk.tolist()]
            noise = record_noise(generator, [len(encoder.answer_ids(r)) for r in chosen], config.rates)
            mine = list(range(rank, len(chosen), world))
            batch = encoder([chosen[i] for i in mine])
            temperature = config.temperature + (config.temperature_end - config.temperature) * step / max(total - 1, 1)
            forward = training_forward(model, batch, predictor, config, temperature, place_noise([noise[i] for i in mine], batch))
            loss = loss_of(forward, batch, config, config.penalty)
            optimizer.zero_grad()
            (loss.total * len(mine) / len(chosen)).backward()
            if distributed:
                for parameter in predictor.parameters():
                    torch.distributed.all_reduce(parameter.grad)
            optimizer.step()
            step += 1
            stats = torch.tensor([float(loss.total.detach()), loss.cross_entropy, loss.kept, loss.rate],
                                 dtype=torch.float64) * (len(mine) / len(chosen))
            if distributed:  # the batch's numbers: each process's share of them, summed
                torch.distributed.all_reduce(stats)
            history.append({"step": step, **dict(zip(("loss", "cross_entropy", "kept", "rate"), stats.tolist()))})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", kept=f"{loss.kept:.2f}")
            if rank == 0 and (step % settings.save_every == 0 or step == total):
                atomic_write(state_path, _state_bytes(header, predictor, optimizer, generator, step, history))
            if on_step is not None:
                on_step(step, loss)
    finally:
        bar.close()
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    text = model.config.get_text_config()
    result = D.PredictorFile(config, {k: v.detach().clone() for k, v in predictor.state_dict().items()},
                             {**D.identity(text), "name_or_path": getattr(model.config, "_name_or_path", None),
                              "fingerprint": header["model"]},
                             {"data": data_name, "records": len(records), "steps": total, **vars(settings),
                              "world": world, "history": history})
    if rank == 0:
        result.save(out)
        if state_path.exists():
            state_path.unlink()
    return result


def initial_predictor(config: D.PredictorConfig, seed: int) -> D.Predictor:
    """PyTorch's default initialisation (seeded), the readout's bias ``INITIAL_BIAS`` on rate 0: training starts from
    a predictor that prunes nothing, and the penalty has to earn every rate above it."""
    torch.manual_seed(seed)
    predictor = D.Predictor(config)
    with torch.no_grad():
        predictor.readout.bias.zero_()
        predictor.readout.bias[0] = INITIAL_BIAS
    return predictor


def _fingerprint(data) -> str:
    from .files import fingerprint

    return fingerprint(data)


def _state_bytes(header, predictor, optimizer, generator, step, history) -> bytes:
    buffer = io.BytesIO()
    torch.save({"header": header, "predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "step": step, "history": history}, buffer)
    return buffer.getvalue()


def _resume(path: Path, header: dict, predictor, optimizer, generator) -> tuple[int, list]:
    if not path.exists():
        raise DymuError(f"--resume: no training state {path} to continue")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 (any unreadable file is one line)
        raise DymuError(f"{path}: not a readable training state ({type(exc).__name__}); delete it to start over") from None
    stored = state.get("header", {}) if isinstance(state, dict) else {}
    if stored.get("format") != STATE_FORMAT or stored.get("version") != STATE_VERSION:
        raise DymuError(f"{path}: not a dymu train-dyrate state of version {STATE_VERSION}")
    for key, meaning in (("model", "another model"), ("data", "other data"), ("config", "another predictor config"),
                         ("settings", "other settings"), ("world", "another number of processes")):
        if stored.get(key) != header[key]:
            raise DymuError(f"{path} was made with {meaning}: resume with the same, or delete it to start over")
    predictor.load_state_dict(state["predictor"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return state["step"], state["history"]


def chosen_rates(model, processor, records: list[Record], predictor, config, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Mean rate the predictor picks (argmax, no noise) over the steps of ``records``, teacher-forced."""
    encoder = Encoder(processor)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(records), batch_size):
            batch = encoder(records[begin : begin + batch_size])
            forward = training_forward(model, batch, predictor, config)
            steps = forward.steps[:, :-1]
            total += float((forward.y.argmax(-1).double() / config.rates)[:, :-1][steps].sum())
            count += int(steps.sum())
    return total / max(count, 1)


def init_distributed() -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group over gloo (CPU). Returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return True
