"""Shared machinery for methods that rank weights by a score and keep the top ones.

A subclass says how its score evolves (``update_scores``, called after every
backward pass when ``uses_gradients``) and what the current score is
(``current_scores``); this class turns scores into masks at the schedule's
update steps, globally or per layer, with or without regrowth.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pruneflow.errors import invalid
from pruneflow.methods.base import PruneContext, PruningMethod
from pruneflow.topk import global_topk_masks, kept_count, local_topk_masks

SCOPES = ("global", "local")


class ScoreBasedMethod(PruningMethod):
    uses_gradients: ClassVar[bool] = False
    #: PLATON recomputes masks from scratch; most methods never revive a pruned weight.
    allows_regrowth: ClassVar[bool] = False

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.scope = cfg.get("scope", "global")
        if self.scope not in SCOPES:
            raise invalid("method.scope", self.scope, SCOPES)
        self.scores: list[torch.Tensor] = []

    # --- to override -----------------------------------------------------------
    def init_scores(self) -> None:
        self.scores = [torch.zeros_like(w.param, requires_grad=False) for w in self.ctx.weights]

    def update_scores(self, step: int) -> None:
        """Accumulate the score from the current weights and gradients."""

    def current_scores(self) -> list[torch.Tensor]:
        return self.scores

    # --- machinery ---------------------------------------------------------------
    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        ctx.weights.attach()
        self.init_scores()

    def after_backward(self, step: int) -> None:
        if self.uses_gradients:
            self.update_scores(step)

    def after_optimizer_step(self, step: int) -> None:
        schedule = self.ctx.schedule
        if schedule.is_update_step(step):
            self.update_masks(schedule.sparsity(step))

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        scores = self.current_scores()
        if not self.allows_regrowth:
            scores = [s.masked_fill(w.mask == 0, float("-inf")) for s, w in zip(scores, self.ctx.weights)]
        self.ctx.weights.set_masks(self.select(scores, sparsity))

    def select(self, scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        if self.scope == "local":
            return local_topk_masks(scores, sparsity)
        return global_topk_masks(scores, kept_count(sum(s.numel() for s in scores), sparsity))

    def end_prune_stage(self) -> None:
        # The schedule's last ramp step lands on the target; this guards against a
        # stage cut short (e.g. a run resumed with a different length).
        weights = self.ctx.weights
        if weights.numel - weights.num_kept() != weights.numel - kept_count(weights.numel, self.sparsity):
            self.update_masks(self.sparsity)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": [s.detach().cpu() for s in self.scores]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, saved in zip(self.scores, state.get("scores", []), strict=False):
            s.copy_(saved)
