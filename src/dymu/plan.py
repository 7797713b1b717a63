"""The language-model token plan: which positions each decoder layer holds, per batch row, as printable data.

The VLM adapter builds a ``TokenPlan`` for a prefill (segment kinds, VTU groups); policies (``dymu.policies``:
FastV, VTW, and any object with the same two methods) edit it between layers and between decode steps; the
language-model adapter (``dymu.language``) carries it out and keeps each layer's KV cache equal to what the plan
says. Nothing here knows transformers.

Positions are sequence indices of the prompt (padding included), as in ``input_ids``; decoded tokens come after it
and every layer holds them. Edits:

* ``drop(positions, from_layer)``: monotone. Layers >= ``from_layer`` stop holding those prompt positions: their
  hidden states are gathered away at a prefill, their KV cache shrinks at a decode step, for each row its own count
  (rows are aligned by fillers, ``dymu.prune.layout``).
* ``hide(positions, from_layer)``: this forward only. Layers >= ``from_layer`` keep the positions (and their cache)
  but mask them as keys for every query but their own (FastV's per-step variant).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field

import torch

from . import prune as P
from . import vtu as V
from .errors import DymuError


def _select_rows(vmap: V.VirtualMap, index: torch.Tensor) -> V.VirtualMap:
    """The map of rows ``index`` (batch,) of ``vmap`` (every field is per row)."""
    fields = {f.name: getattr(vmap, f.name) for f in dataclasses.fields(vmap)}
    return V.VirtualMap(**{name: None if value is None else value.index_select(0, index) for name, value in fields.items()})


class Segment(enum.IntEnum):
    """What a prompt position is. The response (decoded tokens) comes after the prompt."""

    PAD = 0
    SYSTEM = 1  # text before the row's first image
    IMAGE = 2  # image placeholder positions
    NEWLINE = 3  # image-layout tokens that are never merged or pruned (OneVision's image_newline)
    INSTRUCTION = 4  # text after the first image (or every text token of a row without an image)
    RESPONSE = 5  # decoded tokens (never a prompt position)


#: segment names in the order plans print them
SEGMENT_NAMES = {s: s.name.lower() for s in Segment}
#: segments a plan edit may never drop or hide
PROTECTED = (Segment.NEWLINE,)


def segments_of(image: torch.Tensor, padding: torch.Tensor | None = None,
                newline: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, n) ``Segment`` per prompt position from the image / padding / newline masks (each (batch, n) bool)."""
    batch, n = image.shape
    marked = image if newline is None else image | newline
    seen = marked.long().cumsum(-1) > 0  # at or after the row's first image
    has_image = marked.any(-1, keepdim=True)
    segments = torch.full((batch, n), int(Segment.INSTRUCTION), dtype=torch.long, device=image.device)
    segments = segments.masked_fill(has_image & ~seen, int(Segment.SYSTEM))
    segments = segments.masked_fill(image, int(Segment.IMAGE))
    if newline is not None:
        segments = segments.masked_fill(newline, int(Segment.NEWLINE))
    if padding is not None:
        segments = segments.masked_fill(padding, int(Segment.PAD))
    return segments


@dataclass(eq=False)
class LayerPlan:
    """One decoder layer."""

    keep: torch.Tensor | None = None  # (batch, prompt) bool: prompt positions this layer holds (its KV cache); None: all
    hidden: torch.Tensor | None = None  # (batch, prompt) bool: keys hidden this forward (not the query's own); None: none
    scores: str | None = None  # "last" | "all": a policy reads this layer's attention this forward (mean over heads)


@dataclass(eq=False)
class TokenPlan:
    """The plan of one batch through the language model: prefill (step 0), then each decode step."""

    segments: torch.Tensor  # (batch, prompt) long Segment of every prompt position
    vmap: V.VirtualMap | None  # VTU groups over the prompt (None: every position its own token)
    layers: list[LayerPlan]
    step: int = 0  # 0: the prefill; t: the t-th decode forward
    generated: int = 0  # positions after the prompt every layer holds before this forward (decoded tokens)
    queries: int = 0  # positions this forward adds (the prompt at the prefill, then the new tokens)
    cursor: int = 0  # the layer about to run: edits apply from here on
    scores: dict = field(default_factory=dict)  # layer -> (batch, prompt + generated + queries) attention this forward
    _layouts: dict = field(default_factory=dict, repr=False)  # id(keep) -> (keep, Kept)

    @classmethod
    def build(cls, image: torch.Tensor, padding: torch.Tensor | None, vmap: V.VirtualMap | None, num_layers: int,
              newline: torch.Tensor | None = None) -> "TokenPlan":
        return cls(segments=segments_of(image, padding, newline), vmap=vmap,
                   layers=[LayerPlan() for _ in range(num_layers)], queries=image.shape[1])

    # ------------------------------------------------------------------ what it holds
    @property
    def batch(self) -> int:
        return self.segments.shape[0]

    @property
    def num_prompt(self) -> int:
        return self.segments.shape[1]

    @property
    def image(self) -> torch.Tensor:
        """(batch, prompt) bool: image positions."""
        return self.segments == Segment.IMAGE

    @property
    def padding(self) -> torch.Tensor | None:
        """(batch, prompt) bool: padding positions, None without any."""
        padding = self.segments == Segment.PAD
        return padding if bool(padding.any()) else None

    @property
    def edited(self) -> bool:
        """Some layer holds fewer positions or hides some."""
        return any(layer.keep is not None or layer.hidden is not None for layer in self.layers)

    def keep_at(self, layer: int) -> torch.Tensor:
        """(batch, prompt) bool: the prompt positions ``layer`` holds."""
        keep = self.layers[layer].keep
        return torch.ones_like(self.segments, dtype=torch.bool) if keep is None else keep

    def layout(self, layer: int) -> P.Kept | None:
        """The positions ``layer`` holds as cache slots (fillers align the rows); None: every prompt position."""
        keep = self.layers[layer].keep
        if keep is None:
            return None
        cached = self._layouts.get(id(keep))
        if cached is None or cached[0] is not keep:
            cached = (keep, P.layout(keep, self.image_tokens(keep)))
            self._layouts[id(keep)] = cached
        return cached[1]

    def cache_length(self, layer: int) -> int:
        """Prompt slots of ``layer``'s KV cache (fillers included), before any decoded token."""
        kept = self.layout(layer)
        return self.num_prompt if kept is None else kept.length

    def image_tokens(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch,) image tokens among ``keep`` (all positions when None): unique tokens with VTU."""
        image = self.image if keep is None else self.image & keep
        if self.vmap is None:
            return image.sum(-1)
        present = torch.zeros(self.batch, self.vmap.num_unique, dtype=torch.long, device=image.device).scatter_add_(
            1, self.vmap.full_to_unique, image.long()) > 0
        return present.sum(-1)

    def vmap_at(self, layer: int) -> V.VirtualMap | None:
        """The VTU map over the positions ``layer`` holds (a prefill)."""
        kept = self.layout(layer)
        if self.vmap is None or kept is None:
            return self.vmap
        cached = self._layouts.get(("vmap", id(kept)))
        if cached is None or cached[0] is not kept:
            cached = (kept, V.restrict(self.vmap, kept.positions, kept.filler))
            self._layouts[("vmap", id(kept))] = cached
        return cached[1]

    # ------------------------------------------------------------------ edits (policies call these)
    def _check_edit(self, positions: torch.Tensor, from_layer: int, what: str) -> None:
        if positions.shape != self.segments.shape or positions.dtype != torch.bool:
            raise DymuError(f"plan.{what}: positions must be a (batch, prompt) = {tuple(self.segments.shape)} bool tensor, "
                            f"got {tuple(positions.shape)} {positions.dtype}")
        if not self.cursor <= from_layer <= len(self.layers):
            raise DymuError(f"plan.{what} from layer {from_layer} at layer {self.cursor} of step {self.step}: an edit "
                            f"applies from the layer about to run on (layers {self.cursor}..{len(self.layers)})")
        for segment in PROTECTED:
            if bool((positions & (self.segments == segment)).any()):
                raise DymuError(f"plan.{what}: {SEGMENT_NAMES[segment]} positions are never dropped or hidden")

    def drop(self, positions: torch.Tensor, from_layer: int) -> None:
        """Layers >= ``from_layer`` stop holding ``positions`` (batch, prompt) bool, for good (their caches shrink)."""
        self._check_edit(positions, from_layer, "drop")
        if not bool(positions.any()):
            return
        new = {}  # id(old keep) -> new keep: layers that held the same positions keep sharing one tensor
        for index in range(from_layer, len(self.layers)):
            layer = self.layers[index]
            if id(layer.keep) not in new:
                new[id(layer.keep)] = self.keep_at(index) & ~positions
            layer.keep = new[id(layer.keep)]

    def hide(self, positions: torch.Tensor, from_layer: int) -> None:
        """For this forward, layers >= ``from_layer`` mask ``positions`` as keys (each stays visible to itself)."""
        self._check_edit(positions, from_layer, "hide")
        for layer in self.layers[from_layer:]:
            layer.hidden = positions

    def best_kept(self, scores: torch.Tensor, fraction: float, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, prompt) bool: the image positions that go when the lowest-scored ``fraction`` of the image tokens
        among ``positions`` (default: all image positions) is removed; VTU groups are ranked and go whole.
        scores: (batch, prompt) attention each position received."""
        image = self.image if positions is None else self.image & positions
        token_of = self.vmap.full_to_unique if self.vmap is not None else None
        keep, _ = P.keep_best(scores, image, fraction, token_of)
        return image & ~keep

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search reordered the rows of the KV cache: row i becomes old row ``index[i]`` (batch,) in every per-row
        tensor. Each layer keeps the slot layout its cache holds (rows are only selected, so its width stays)."""
        self.segments = self.segments.index_select(0, index)
        if self.vmap is not None:
            self.vmap = _select_rows(self.vmap, index)
        new = {}  # id(old keep) -> new keep (layers that shared one tensor still do)
        layouts = {}
        for layer in self.layers:
            if layer.keep is not None and id(layer.keep) not in new:
                keep = layer.keep.index_select(0, index)
                cached = self._layouts.get(id(layer.keep))
                if cached is not None and cached[0] is layer.keep:
                    kept = cached[1]
                    layouts[id(keep)] = (keep, P.Kept(positions=kept.positions.index_select(0, index),
                                                      filler=kept.filler.index_select(0, index),
                                                      image_tokens=kept.image_tokens.index_select(0, index)))
                new[id(layer.keep)] = keep
            if layer.keep is not None:
                layer.keep = new[id(layer.keep)]
            if layer.hidden is not None:
                layer.hidden = layer.hidden.index_select(0, index)
        self.scores = {layer: scores.index_select(0, index) for layer, scores in self.scores.items()}
        self._layouts = layouts

    def snapshot(self) -> "TokenPlan":
        """A copy that later edits leave alone (edits replace tensors, never write into them)."""
        copied = copy.copy(self)
        copied.layers = [copy.copy(layer) for layer in self.layers]
        copied.scores = dict(self.scores)
        copied._layouts = dict(self._layouts)
        return copied

    # ------------------------------------------------------------------ printing
    def row_summary(self, layer: int, row: int) -> str:
        keep = self.keep_at(layer)[row]
        segments = self.segments[row]
        parts = []
        for segment in Segment:
            if segment == Segment.RESPONSE:
                continue
            count = int((keep & (segments == segment)).sum())
            total = int((segments == segment).sum())
            if total:
                parts.append(f"{SEGMENT_NAMES[segment]} {count}" + (f"/{total}" if count != total else ""))
        if self.generated:
            parts.append(f"response {self.generated}")
        kept = self.layout(layer)
        fillers = int(kept.filler[row].sum()) if kept is not None else 0
        text = ", ".join(parts) + f"; cache {int(keep.sum()) + fillers + self.generated}"
        if fillers:
            text += f" ({fillers} filler{'s' if fillers > 1 else ''})"
        vmap = self.vmap_at(layer) if self.step == 0 else None
        if vmap is not None:
            text += f"; unique {int(vmap.unique_lengths[row])}"
        hidden = self.layers[layer].hidden
        if hidden is not None and bool(hidden[row].any()):
            text += f"; hidden {int(hidden[row].sum())}"
        return text

    def __str__(self) -> str:
        title = f"TokenPlan: {self.batch} row(s), prompt {self.num_prompt} positions, " + (
            "prefill" if self.step == 0 else f"decode step {self.step} ({self.generated} decoded)")
        lines = [title]
        layers = len(self.layers)
        start = 0
        while start < layers:
            rows = [self.row_summary(start, row) for row in range(self.batch)]
            scores = self.layers[start].scores
            end = start + 1
            while end < layers and self.layers[end].scores == scores and \
                    [self.row_summary(end, row) for row in range(self.batch)] == rows:
                end += 1
            span = f"layer {start}" if end == start + 1 else f"layers {start}-{end - 1}"
            lines.append(span + (f" (scores: {scores})" if scores else "") + ":")
            lines += [f"  row {row}: {text}" for row, text in enumerate(rows)]
            start = end
        return "\n".join(lines)
