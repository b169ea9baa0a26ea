"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017): keep the largest ``|W|``.

By default the mask is recomputed on the schedule from the kept weights (a pruned
weight scores -inf and never returns) with one global threshold. Sanh et al.'s
magnitude baseline (``MagnitudeBinarizer``) keeps the top ``int(keep * n)`` of each
matrix by the raw ``|W|`` in every forward, so a pruned weight whose raw value grows
comes back: ``method.scope=local method.regrowth=true method.selection=authors``.
"""

from __future__ import annotations

import torch

from pruneflow.methods.score_based import NEG_INF, ScoreBasedMethod


def magnitude_scores_(out: torch.Tensor, W: torch.Tensor, mask: torch.Tensor) -> None:
    """``out = |W|`` where kept, -inf where pruned (no regrowth); one fused pass."""
    out.copy_(torch.where(mask == 0, NEG_INF, W.abs()))


class Magnitude(ScoreBasedMethod):
    name = "magnitude"
    scores_without_updates = True  # |W| needs no training: stages.prune.update_weights=false is one-shot at init

    def init_state(self) -> None:
        self.score_kernel = self.kernel(magnitude_scores_)

    @torch.no_grad()
    def selection_scores(self) -> torch.Tensor:
        for i, w in enumerate(self.ctx.weights):
            out, W = self.view("scores", i).view(-1), w.param.detach().reshape(-1)
            if self.regrowth:  # the raw weight of a pruned entry competes again
                torch.abs(W, out=out)
            else:
                self.score_kernel(out, W, self.mask_view(i).view(-1))
        return self.state["scores"]
