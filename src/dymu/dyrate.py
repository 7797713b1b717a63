"""DyRate (Liang et al., arXiv 2501.14204): the fraction of image tokens pruned is chosen at every generation step by a
small trained predictor from where the last query's attention goes.

Our reading (``research/decoder_pruning_spec.md`` §4.3, item by item; every open point of §4.4 is a field of
``PredictorConfig`` with §4.3's default):

* **Feature** (items 1-2): at every forward (the prefill, then each decode step) the attention row of the last query
  at the feature layers (default: layer K-1, the layer FastV ranks by), mean over heads, summed per segment:
  v = [system, image, instruction, response so far] (``segment_shares``; a softmax row, so v sums to 1). OneVision's
  newline tokens count as image. The share vectors of a row's steps form its history.
* **Predictor** (item 3): ``linear`` (4 -> K logits, the paper's classifier as secondary sources describe it), ``mlp``
  (4 -> 32 -> K, ReLU) or ``recurrent`` (a GRU over the last ``history`` share vectors, zeros before the prefill:
  the seed's own suggestion).
* **Rates** (item 4): {0, 1/K, ..., (K-1)/K}, K = ``rates`` = 4; rate r keeps N - round(r·N) of the N image tokens
  (VTU: unique tokens, groups whole), as FastV.
* **Masks** (item 5): the image tokens ranked by the same last-query attention at layer K-1 as FastV; M_i marks the
  top N - round(r_i·N); nested because one ranking serves all rates.
* **Training** (items 6, 8; ``train``): the VLM frozen, teacher forcing on (image, prompt, answer). Every query that
  produces an answer token is one step: its share vector (and history) gives rate logits, a Gumbel-softmax sample y
  (hard: one-hot forward, soft gradient; temperature annealed from ``temperature`` to ``temperature_end``), and the
  key mask M = Σ_i y_i·M_i of layers >= K for that query; the prompt's queries take the first step's mask (the
  prefill is pruned at r_0). The mask enters attention multiplicatively, A_qj = M_qj·exp(z_qj) / Σ_k M_qk·exp(z_qk)
  (DynamicViT; an additive -inf mask has no gradient), so the loss - next-token cross-entropy plus ``penalty`` times
  the mean kept fraction Σ_i y_i·(N - round(r_i·N))/N - trains the predictor only. With a one-hot y the training
  forward equals inference with rate i at each step (non-monotone); the monotone rule below is inference only.
* **Inference** (item 7, mode B; ``DyRatePolicy``): the rate of the argmax logit (no noise). ``monotone`` (default):
  the rate never falls (r_t = max(prediction, r_{t-1})) and the image tokens ranked lowest among those still held
  leave layers >= K for good, each row its own count: their KV cache entries are removed. Non-monotone: the lowest
  fraction r_t of all image tokens is hidden from this step's query only (FastV's per-step variant, full caches).
  ``prune_prefill``: the prefill (its last query) is step 0 and is pruned too (default), else it runs whole.
* **FLOPs** (item 10; ``generation_flops``): both counters, each named: FastV's Eq. 5 per step (the whole sequence
  recomputed at every step: mode A's accounting) and the cache-aware count of what dymu runs.

Where we depart from §4.3 or leave a point out: the monotone rule is inference only (training uses the per-step,
non-monotone masks, which equal inference with the same rates exactly); training starts from a predictor that picks
rate 0 (``dyrate_train.INITIAL_BIAS``); mode A (the whole sequence recomputed at every step) is not an execution
mode, only the fastv-formula counter's accounting; the head pooling is the mean over heads (no per-head features)
and the loss has no KL term to the unpruned model (neither is a config field yet).

The predictor file (JSON, ``format: "dymu-dyrate"``, ``version: 1``) holds the config, the weights (every value a
float32 written exactly), the training record and the identity of the language model it was trained on; loading it
onto a language model of another architecture (model type, depth, width, heads, vocabulary) is refused in one
line, and so is a file whose pruning layer the model does not have.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import prune as P
from .errors import DymuError
from .jsonfile import json_type, read_json
from .plan import Segment, TokenPlan

FORMAT = "dymu-dyrate"
VERSION = 1
PREDICTORS = ("linear", "mlp", "recurrent")
#: the four segments of a share vector, in order
SHARES = ("system", "image", "instruction", "response")
#: share index of each Segment value (PAD: -1, in no share; NEWLINE: image)
SHARE_OF = {Segment.PAD: -1, Segment.SYSTEM: 0, Segment.IMAGE: 1, Segment.NEWLINE: 1, Segment.INSTRUCTION: 2,
            Segment.RESPONSE: 3}
#: language-model config keys a predictor file must match
IDENTITY_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


class PredictorError(DymuError):
    """A predictor file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class PredictorConfig:
    """What a DyRate predictor computes and how it was trained (spec §4.4's open points, §4.3's defaults)."""

    predictor: str = "linear"  # linear | mlp | recurrent
    rates: int = 4  # K: rates {0, 1/K, ..., (K-1)/K}
    layer: int = 3  # the pruning layer: image tokens leave layers >= layer (FastV's K)
    feature_layers: tuple[int, ...] | None = None  # layers whose shares are averaged (None: layer - 1)
    hidden: int = 32  # width of the mlp / recurrent predictor
    history: int = 8  # recurrent: share vectors of the last N steps
    monotone: bool = True  # a dropped token never comes back (caches shrink); False: hidden per step
    prune_prefill: bool = True  # the prefill is step 0 and is pruned at its rate
    temperature: float = 1.0  # Gumbel-softmax temperature at the start of training
    temperature_end: float = 0.5  # ... annealed linearly to this at the end
    hard: bool = True  # straight-through one-hot samples (False: soft mixtures in the forward)
    penalty: float = 0.5  # weight of the mean kept fraction in the loss

    @property
    def features(self) -> tuple[int, ...]:
        return tuple(self.feature_layers) if self.feature_layers is not None else (self.layer - 1,)

    @property
    def window(self) -> int:
        """Share vectors the predictor reads per step."""
        return self.history if self.predictor == "recurrent" else 1

    def check(self, num_layers: int | None = None, origin: str = "dyrate") -> None:
        """Raise PredictorError naming ``origin`` when a field is out of range (``num_layers``: the model's depth)."""
        if self.predictor not in PREDICTORS:
            raise PredictorError(f"{origin}: predictor must be one of {', '.join(PREDICTORS)}, got {self.predictor!r}")
        for name, low in (("rates", 2), ("layer", 1), ("hidden", 1), ("history", 1)):
            if getattr(self, name) < low:
                raise PredictorError(f"{origin}: {name} must be >= {low}, got {getattr(self, name)}")
        if not all(0 <= layer < self.layer for layer in self.features):
            raise PredictorError(f"{origin}: feature layers {list(self.features)} must be below the pruning layer {self.layer}")
        if not (self.temperature > 0 and self.temperature_end > 0 and self.penalty >= 0):
            raise PredictorError(f"{origin}: temperatures must be > 0 and the penalty >= 0")
        if num_layers is not None and self.layer >= num_layers:
            raise PredictorError(f"{origin}: prunes from layer {self.layer}, but the language model has {num_layers} "
                                 f"layers (0..{num_layers - 1})")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["feature_layers"] = None if self.feature_layers is None else list(self.feature_layers)
        return data

    @classmethod
    def from_json(cls, data, origin: str) -> "PredictorConfig":
        if not isinstance(data, dict):
            raise PredictorError(f"{origin}: \"config\" must be an object, got {json_type(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - set(fields)):
            raise PredictorError(f"{origin}: unknown config field(s) {', '.join(unknown)}")
        values = {}
        for name, value in data.items():
            default = fields[name].default
            if name == "feature_layers" and value is not None:
                if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise PredictorError(f"{origin}: config \"feature_layers\" must be a list of layer numbers")
                value = tuple(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise PredictorError(f"{origin}: config \"{name}\" must be true or false, got {json_type(value)}")
            elif isinstance(default, (int, float)):
                kinds = int if isinstance(default, int) else (int, float)
                if isinstance(value, bool) or not isinstance(value, kinds):
                    raise PredictorError(f"{origin}: config \"{name}\" must be {'a whole number' if kinds is int else 'a number'}"
                                         f", got {json_type(value)}")
            elif isinstance(default, str) and not isinstance(value, str):
                raise PredictorError(f"{origin}: config \"{name}\" must be a string, got {json_type(value)}")
            values[name] = value
        config = cls(**values)
        config.check(origin=origin)
        return config


# ---------------------------------------------------------------------------------------------- math
def rate_values(rates: int) -> torch.Tensor:
    """(rates,) float64: {0, 1/K, ..., (K-1)/K}."""
    return torch.arange(rates, dtype=torch.float64) / rates


def segment_shares(attention: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(..., 4) attention summed per share (system, image + newline, instruction, response); padding in none.

    attention: (..., kv) attention each key receives; kinds: (..., kv) long ``Segment`` of each key (broadcasts)."""
    share_of = torch.tensor([SHARE_OF[Segment(s)] for s in range(len(Segment))], device=kinds.device)[kinds]
    onehot = (share_of[..., None] == torch.arange(len(SHARES), device=kinds.device)).to(attention.dtype)
    return (attention[..., None] * onehot).sum(-2)


def image_ranks(scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(..., n) rank of every image key by ``scores`` (0 = most attended; ties: the earlier first); non-image keys
    rank after all image keys. scores / image: (..., n)."""
    order = torch.sort(scores.masked_fill(~image, float("-inf")), dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def nested_masks(ranks: torch.Tensor, image: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(..., n, K) bool M_i: key j stays at rate i (non-image keys always; image keys ranked below ``kept[..., i]``).

    ranks: (..., n) from ``image_ranks``; image: (..., n) bool; kept: (..., K) image tokens kept at each rate."""
    return ~image[..., None] | (ranks[..., None] < kept[..., None, :])


def mixed_mask(masks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., n) M = Σ_i y_i·M_i. masks: (..., n, K) bool; y: (..., K) rate weights (a Gumbel-softmax sample)."""
    return (masks.to(y.dtype) * y[..., None, :]).sum(-1)


def gumbel_softmax(logits: torch.Tensor, temperature: float, hard: bool, noise: torch.Tensor) -> torch.Tensor:
    """(..., K) Gumbel-softmax sample of ``logits`` with the uniform ``noise`` (same shape, in (0, 1)) given, so a
    training run draws it from its own generator; hard: one-hot forward, the soft sample's gradient."""
    tiny = torch.finfo(logits.dtype).tiny
    gumbel = -torch.log((-torch.log(noise.to(logits.dtype).clamp_min(tiny))).clamp_min(tiny))  # -log(-log u)
    soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
    if not hard:
        return soft
    onehot = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return onehot - soft.detach() + soft


# ---------------------------------------------------------------------------------------------- the predictor
class Predictor(nn.Module):
    """Rate logits from share vectors: ``forward(window)`` with window (..., N, 4) (the last N steps, oldest first;
    linear / mlp read the newest only) -> (..., K)."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        width, rates = len(SHARES), config.rates
        if config.predictor == "linear":
            self.net = nn.Linear(width, rates)
        elif config.predictor == "mlp":
            self.net = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(), nn.Linear(config.hidden, rates))
        else:
            self.gru = nn.GRU(width, config.hidden, batch_first=True)
            self.net = nn.Linear(config.hidden, rates)

    @property
    def readout(self) -> nn.Linear:
        """The last linear layer (its outputs are the rate logits)."""
        return self.net[-1] if isinstance(self.net, nn.Sequential) else self.net

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        window = window.to(self.readout.weight.dtype)
        if self.config.predictor != "recurrent":
            return self.net(window[..., -1, :])
        lead = window.shape[:-2]
        _, last = self.gru(window.reshape(-1, *window.shape[-2:]))  # last: (1, rows, hidden)
        return self.net(last[0]).reshape(*lead, -1)


def forced(config: PredictorConfig, rate_index: int) -> Predictor:
    """A predictor that always picks rate ``rate_index`` (zero weights, one large bias): a fixed-rate DyRate."""
    predictor = Predictor(config)
    with torch.no_grad():
        for parameter in predictor.parameters():
            parameter.zero_()
        predictor.readout.bias[rate_index] = FORCED_LOGIT
    return predictor


#: the bias of ``forced``'s chosen rate: far above any Gumbel noise a training forward adds
FORCED_LOGIT = 1e4


# ---------------------------------------------------------------------------------------------- the policy
@dataclass
class Step:
    """What DyRate chose at one forward, per batch row."""

    shares: torch.Tensor  # (batch, 4) the feature
    rate: torch.Tensor  # (batch,) float64: the fraction of image tokens pruned (monotone: never below earlier steps)
    kept: torch.Tensor  # (batch,) image tokens the query sees in layers >= K (unique tokens with VTU)
    dropped: torch.Tensor  # (batch, prompt) bool: positions dropped (monotone) or hidden at this step


@dataclass
class DyRatePolicy:
    """DyRate on the token plan (``dymu.policies``): at layer K of every forward, the predictor's rate from the last
    query's attention shares; monotone: ``plan.drop`` (caches shrink, each row its own count), else ``plan.hide``."""

    predictor: Predictor
    config: PredictorConfig
    num_layers: int
    monotone: bool = True
    trajectory: list = field(default_factory=list)  # Step per forward of the last generation (0: the prefill)
    _window: torch.Tensor | None = field(default=None, repr=False)  # (batch, N, 4) the last N share vectors
    _rate: torch.Tensor | None = field(default=None, repr=False)  # (batch,) the rate so far (monotone)

    def __post_init__(self):
        self.config.check(self.num_layers)
        self.predictor.eval()

    @property
    def decode_edits(self) -> bool:
        return self.monotone

    @property
    def score_layers(self) -> tuple[int, ...]:
        return tuple(sorted({*self.config.features, self.config.layer - 1}))

    def scores_at(self, plan: TokenPlan) -> dict:
        return {layer: "last" for layer in self.score_layers}

    def edit(self, plan: TokenPlan, layer: int) -> None:
        config = self.config
        if layer != config.layer:
            return
        if plan.step == 0:
            self.trajectory = []
            self._window = torch.zeros(plan.batch, config.window, len(SHARES), dtype=torch.float64,
                                       device=plan.segments.device)
            self._rate = torch.zeros(plan.batch, dtype=torch.float64, device=plan.segments.device)
        shares = self.shares(plan)  # (batch, 4)
        self._window = torch.cat((self._window[:, 1:], shares[:, None].to(self._window.dtype)), dim=1)
        with torch.no_grad():
            index = self.predictor(self._window).argmax(-1)  # (batch,)
        rate = rate_values(config.rates).to(index.device)[index]
        if plan.step == 0 and not config.prune_prefill:
            rate = torch.zeros_like(rate)
        if self.monotone:
            rate = torch.maximum(rate, self._rate)
            self._rate = rate
        token_of = plan.vmap.full_to_unique if plan.vmap is not None else None
        kept = P.kept_count(plan.image_tokens(), rate)  # (batch,) of the prompt's N image tokens
        scores = plan.scores[config.layer - 1][:, : plan.num_prompt]
        image = plan.image & plan.keep_at(layer) if self.monotone else plan.image
        gone = image & ~P.keep_top(scores, image, kept, token_of)
        if self.monotone:
            plan.drop(gone, from_layer=layer)
        else:
            plan.hide(gone, from_layer=layer)
        self.trajectory.append(Step(shares=shares, rate=rate, kept=kept, dropped=gone))

    def shares(self, plan: TokenPlan) -> torch.Tensor:
        """(batch, 4) the feature of this forward: the last query's shares, mean over the feature layers."""
        kinds = None
        total = []
        for layer in self.config.features:
            scores = plan.scores[layer]  # (batch, prompt + decoded + queries)
            if kinds is None:
                after = scores.shape[1] - plan.num_prompt
                kinds = torch.cat((plan.segments, plan.segments.new_full((plan.batch, after), int(Segment.RESPONSE))), 1)
            total.append(segment_shares(scores, kinds))
        return torch.stack(total).mean(0)

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search reordered the rows: so do the history, the rates so far and the trajectory."""
        self._window = self._window.index_select(0, index)
        self._rate = self._rate.index_select(0, index)
        self.trajectory = [Step(**{f.name: getattr(step, f.name).index_select(0, index) for f in dataclasses.fields(step)})
                           for step in self.trajectory]

    def rates(self) -> torch.Tensor:
        """(batch, forwards) the rate of every forward of the last generation."""
        return torch.stack([step.rate for step in self.trajectory], dim=1)

    def kept(self) -> torch.Tensor:
        """(batch, forwards) image tokens seen in layers >= K at every forward of the last generation."""
        return torch.stack([step.kept for step in self.trajectory], dim=1)


# ---------------------------------------------------------------------------------------------- the file
def identity(config) -> dict:
    """The language model's identity a predictor file records: ``IDENTITY_KEYS`` of its (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text, key, None) for key in IDENTITY_KEYS}


@dataclass
class PredictorFile:
    """A trained predictor: config, weights, the model it was trained on, how."""

    config: PredictorConfig
    state: dict  # parameter name -> tensor
    model: dict  # identity (+ name_or_path, fingerprint)
    training: dict = field(default_factory=dict)
    path: str | None = None

    def predictor(self) -> Predictor:
        predictor = Predictor(self.config)
        predictor.load_state_dict(self.state)
        return predictor.eval()

    def to_json(self) -> dict:
        weights = {name: {"shape": list(t.shape), "values": t.detach().to(torch.float32).reshape(-1).tolist()}
                   for name, t in self.state.items()}
        return {"format": FORMAT, "version": VERSION, "model": self.model, "config": self.config.to_json(),
                "weights": weights, "training": self.training, "source": "dymu train-dyrate"}

    def save(self, path) -> None:
        from .files import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path) -> "PredictorFile":
        origin = str(path)
        try:
            data = read_json(Path(path), "predictor file")
        except DymuError as exc:
            raise PredictorError(str(exc)) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PredictorError(f"{origin}: not a DyRate predictor file (missing \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise PredictorError(f"{origin}: predictor format version {data.get('version')!r}, this dymu reads version {VERSION}")
        config = PredictorConfig.from_json(data.get("config"), origin)
        model = data.get("model")
        if not isinstance(model, dict):
            raise PredictorError(f"{origin}: \"model\" must be an object, got {json_type(model)}")
        expected = Predictor(config).state_dict()
        weights = data.get("weights")
        if not isinstance(weights, dict) or set(weights) != set(expected):
            raise PredictorError(f"{origin}: \"weights\" must hold {', '.join(sorted(expected))} for a "
                                 f"{config.predictor} predictor")
        state = {}
        for name, reference in expected.items():
            entry = weights[name]
            values = entry.get("values") if isinstance(entry, dict) else None
            if not isinstance(values, list) or entry.get("shape") != list(reference.shape) or \
                    len(values) != reference.numel() or not all(_is_number(v) for v in values):
                raise PredictorError(f"{origin}: weights \"{name}\" must be {list(reference.shape)} numbers")
            state[name] = torch.tensor(values, dtype=torch.float32).reshape(reference.shape)
        training = data.get("training") or {}
        return cls(config=config, state=state, model=model, training=training, path=origin)

    def check(self, config, num_layers: int, origin: str | None = None) -> None:
        """Refuse (one line) a language model of another architecture than the one trained on."""
        origin = origin or self.path or "predictor"
        if config is not None:
            current = identity(config)
            for key in IDENTITY_KEYS:
                if key in self.model and current.get(key) is not None and self.model[key] != current[key]:
                    raise PredictorError(f"{origin}: trained on a language model with {key}={self.model[key]!r} "
                                         f"({self.model.get('name_or_path') or 'unknown model'}), but this one has "
                                         f"{key}={current[key]!r}: train a predictor on this model")
        self.config.check(num_layers, origin)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_policy(method, num_layers: int, config=None) -> DyRatePolicy:
    """The policy of a ``dymu.methods.DyRate`` spec: its file loaded and checked against the language model."""
    stored = PredictorFile.load(method.path)
    stored.check(config, num_layers)
    monotone = stored.config.monotone if method.monotone is None else method.monotone
    return DyRatePolicy(stored.predictor(), stored.config, num_layers, monotone)


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class GenerationFlops:
    """The language model's FLOPs of one DyRate generation (one row) and of the same generation unpruned, by both
    counters (spec §4.3 item 10), each a ``dymu.flops.Count`` naming its counter."""

    cache_aware: object  # Count: the prefill as it ran + every decode step against what each layer cached
    cache_aware_unpruned: object
    fastv_formula: object  # Count: FastV's Eq. 5 per-layer average per step, the sequence recomputed at each step
    fastv_formula_unpruned: object

    @property
    def ratios(self) -> dict:
        return {self.cache_aware.counter: self.cache_aware.flops / self.cache_aware_unpruned.flops,
                self.fastv_formula.counter: self.fastv_formula.flops / self.fastv_formula_unpruned.flops}


#: which forwards read attention, for ``generation_flops``: DyRate every one; a fixed rate decided once (FastV pruned
#: at the prefill, the same as DyRate forced to that rate, monotone) the prefill only; nothing (rate 0, unpruned)
READS = ("every", "prefill", "none")


def generation_flops(decoder, plan: TokenPlan, policy: DyRatePolicy, row: int = 0, vtu: str = "fast",
                     reads: str = "every", forwards: int | None = None) -> GenerationFlops:
    """FLOPs of the last generation of ``policy`` (its trajectory: the prefill, then one step per further token) for
    batch row ``row``, its first ``forwards`` forwards (default: all; a row that ended before the batch did);
    ``plan``: the prefill plan as it ran (``dymu.llava.last_prefill_plan``); ``reads``: which forwards read
    attention (``READS``).

    cache-aware: ``flops.plan_shapes`` of the prefill (with its drop and the ranking query), then at decode step t
    every layer computes one token against the prompt positions it holds (monotone: minus those dropped up to step t
    from layer K on; non-monotone hides keys, which the kernel still computes) plus the t tokens decoded, and the
    layers DyRate reads rank once more; the unpruned generation is the same without drops or reads.
    fastv-formula: per forward t, [K·C(n_t) + (T−K)·C(n̂_t)] / T with n_t the real prompt tokens + t and
    n̂_t = n_t − round(r_t·N) (N: image tokens; with VTU both count unique tokens, what the model computes on),
    summed over the forwards."""
    from . import flops as F

    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    layer_k = policy.config.layer
    pad = plan.segments[row] == Segment.PAD
    real = int((~pad).sum())
    image = int(plan.image[row].sum())
    tokens, image_tokens = real, image
    if plan.vmap is not None:  # the formula counts the tokens computed on: unique tokens
        tokens = int(torch.unique(plan.vmap.full_to_unique[row][~pad]).numel())
        image_tokens = int(plan.image_tokens()[row])
    prefill = F.plan_shapes(plan, row, vtu)
    if reads == "none":
        prefill = [dataclasses.replace(shape, ranking_queries=0) for shape in prefill]
    unpruned_plan = [F.LayerShape(rows=prefill[0].rows, queries=real, keys=real, score_width=prefill[0].score_width)
                     for _ in prefill]  # every layer as layer 0, which nothing edits
    read_layers = set(policy.score_layers) if reads == "every" else set()
    cache = F.prefill_flops(decoder, prefill).flops
    stock = F.prefill_flops(decoder, unpruned_plan).flops
    dropped = 0
    formula = stock_formula = 0.0
    for t, step in enumerate(policy.trajectory[:forwards]):
        if policy.monotone:
            dropped += int(step.dropped[row].sum())
        n = tokens + t
        kept = n - int(torch.round(step.rate[row] * image_tokens))
        full_cost = F.fastv_layer(n, decoder.hidden, decoder.intermediate)
        formula += (layer_k * full_cost + (decoder.layers - layer_k) * F.fastv_layer(kept, decoder.hidden, decoder.intermediate)) / decoder.layers
        stock_formula += full_cost
        if t == 0:
            continue
        for layer in range(decoder.layers):
            keys = real - (dropped if layer >= layer_k else 0) + t
            cache += F.decoder_layer_flops(decoder, F.LayerShape(rows=1, queries=1, keys=keys,
                                                                 ranking_queries=int(layer in read_layers)))
            stock += F.decoder_layer_flops(decoder, F.LayerShape(rows=1, queries=1, keys=real + t))
        cache += F.lm_head_flops(decoder)
        stock += F.lm_head_flops(decoder)
    return GenerationFlops(F.Count(cache, F.CACHE_AWARE), F.Count(stock, F.CACHE_AWARE),
                           F.Count(formula, F.FASTV_FORMULA), F.Count(stock_formula, F.FASTV_FORMULA))


def describe_trajectory(policy: DyRatePolicy, row: int = 0) -> list[str]:
    """Lines for ``dymu generate``: the rate and the image tokens kept at every forward of the last generation."""
    steps = policy.trajectory
    width = max(len(str(int(s.kept[row]))) for s in steps)
    mode = "monotone" if policy.monotone else "non-monotone"
    lines = [f"  DyRate ({policy.config.predictor}, {mode}, from layer {policy.config.layer}): per step (0 = prefill) "
             "rate / image tokens kept"]
    for start in range(0, len(steps), TRAJECTORY_PER_LINE):
        chunk = steps[start : start + TRAJECTORY_PER_LINE]
        lines.append("    " + "  ".join(f"{start + i:>3}: {float(s.rate[row]):.2f}/{int(s.kept[row]):>{width}}"
                                        for i, s in enumerate(chunk)))
    return lines


#: dymu generate prints this many steps of a trajectory per line
TRAJECTORY_PER_LINE = 8


def plot_trajectories(trajectories: list, path, title: str = "DyRate: the rate chosen at each step") -> None:
    """A PNG of rate trajectories: ``trajectories`` is a list of (label, rates (steps,)) to draw as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 3.8), dpi=120)
    for label, rates in trajectories:
        rates = [float(r) for r in rates]
        axis.step(range(len(rates)), rates, where="post", label=label, alpha=0.8)
    axis.set_xlabel("generation step (0 = prefill)")
    axis.set_ylabel("fraction of image tokens pruned")
    axis.set_ylim(-0.03, 1.0)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(trajectories) <= 10:
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
