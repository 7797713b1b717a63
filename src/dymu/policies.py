"""Decoder-side policies: what happens to image tokens in the language model, as edits of a ``TokenPlan``.

A policy is any object with

* ``score_layers``: the layers whose attention it may ever read (``dymu.language`` installs its attention kernel
  only when some policy needs one);
* ``scores_at(plan) -> {layer: "last" | "all"}``: the attention it reads this forward (step ``plan.step``; 0 is the
  prefill): "last" = the attention the last query gives every position, "all" = the mean over every real query
  (prefill only); both a mean over heads, put in ``plan.scores[layer]`` as (batch, positions);
* ``edit(plan, layer)``: called right before decoder layer ``layer`` runs, at the prefill and at every decode step,
  once the scores of earlier layers are in; it may call ``plan.drop`` / ``plan.hide`` from ``layer`` on;
* ``decode_edits``: whether it drops positions at decode steps (then each row's plan is its own: beam search, which
  reorders rows, is refused unless the policy has ``reorder(beam_idx)`` for its own per-row state; the plan and the
  caches follow the reordering in ``dymu.language``).

The adapter has no method-specific branch: FastV and VTW below are two such policies, DyRate (``dymu.dyrate``) a
third, and a test writes a fourth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DymuError
from .methods import VTW, DyRate, FastV, is_policy
from .plan import Segment, TokenPlan

#: FastV with k = 0 has no attention to rank by: it keeps a random subset, drawn with this seed (reproducible)
RANDOM_RANK_SEED = 0


@dataclass
class FastVPolicy:
    """FastV (``dymu.methods.FastV``): at layer k, drop (rerank=prefill) or hide for this step (rerank=step) the
    fraction r of image tokens the last query (score=all: every query) attends to least at layer k-1."""

    method: FastV
    num_layers: int
    decode_edits = False

    @property
    def active(self) -> bool:
        return self.method.k < self.num_layers

    @property
    def score_layers(self) -> tuple[int, ...]:
        return (self.method.k - 1,) if self.active and self.method.k > 0 else ()

    def _acts_at(self, step: int) -> bool:
        return self.active and (step == 0 or self.method.rerank == "step")

    def scores_at(self, plan: TokenPlan) -> dict:
        if not self._acts_at(plan.step) or not self.score_layers:
            return {}
        return {self.method.k - 1: self.method.score if plan.step == 0 else "last"}

    def edit(self, plan: TokenPlan, layer: int) -> None:
        k = self.method.k
        if layer != k or not self._acts_at(plan.step):
            return
        if k == 0:  # no attention yet: a reproducible random ranking
            generator = torch.Generator(device="cpu").manual_seed(RANDOM_RANK_SEED)
            scores = torch.rand(plan.segments.shape, generator=generator).to(plan.segments.device)
        else:
            scores = plan.scores[k - 1][:, : plan.num_prompt]
        dropped = plan.best_kept(scores, self.method.r, positions=plan.keep_at(k))
        if self.method.rerank == "step":
            plan.hide(dropped, from_layer=k)
        else:
            plan.drop(dropped, from_layer=k)


@dataclass
class VTWPolicy:
    """VTW (``dymu.methods.VTW``): every image position leaves layers >= k at the prefill."""

    method: VTW
    num_layers: int
    score_layers = ()
    decode_edits = False

    def scores_at(self, plan: TokenPlan) -> dict:
        return {}

    def edit(self, plan: TokenPlan, layer: int) -> None:
        if plan.step == 0 and layer == self.method.k < self.num_layers:
            plan.drop(plan.segments == Segment.IMAGE, from_layer=layer)


def policy_for(method, num_layers: int, config=None):
    """The policy that carries out a parsed ``prune=`` method (``dymu.methods``); objects that already are
    policies (they have ``edit``) pass through. ``config``: the language model's, which a DyRate predictor file is
    checked against (None: its depth only)."""
    if method is None or is_policy(method):
        return method
    if isinstance(method, DyRate):
        from .dyrate import load_policy

        return load_policy(method, num_layers, config)
    if isinstance(method, (FastV, VTW)) and method.k >= num_layers:  # it would change nothing
        name = "fastv" if isinstance(method, FastV) else "vtw"
        raise DymuError(f"{name}:k={method.k} acts from layer {method.k} on, but the language model has {num_layers} "
                        f"layers (0..{num_layers - 1}): choose k < {num_layers}")
    if isinstance(method, FastV):
        return FastVPolicy(method, num_layers)
    if isinstance(method, VTW):
        return VTWPolicy(method, num_layers)
    raise TypeError(f"no policy for {type(method).__name__}")
