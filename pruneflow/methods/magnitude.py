"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017): keep the largest ``|W|``.

By default the mask is recomputed on the schedule from the kept weights (a pruned
weight scores -inf and never returns) with one global threshold. Sanh et al.'s
magnitude baseline (``MagnitudeBinarizer``) keeps the top ``int(keep * n)`` of each
matrix by the raw ``|W|`` in every forward, so a pruned weight whose raw value grows
comes back: ``method.scope=local method.regrowth=true method.selection=authors``.
"""

from __future__ import annotations

import torch

from pruneflow.errors import invalid
from pruneflow.methods.oneshot import LayerPruner, OneShotMethod, prune_lowest_per_layer, prune_nm
from pruneflow.methods.score_based import NEG_INF, ScoreBasedMethod, sanh_kept_count


def magnitude_scores_(out: torch.Tensor, W: torch.Tensor, mask: torch.Tensor) -> None:
    """``out = |W|`` where kept, -inf where pruned (no regrowth); one fused pass."""
    out.copy_(torch.where(mask == 0, NEG_INF, W.abs()))


class Magnitude(ScoreBasedMethod):
    name = "magnitude"
    scores_without_updates = True  # |W| needs no training: stages.prune.update_weights=false is one-shot at init
    pruned_weights_unread = True  # scores of pruned entries: -inf without regrowth (zero mode has none)

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        return [("method.pattern", "N:M magnitude pruning is for causal-LM tasks (task=lm/...); on this path "
                 "use method=admm for N:M patterns")]

    def init_state(self) -> None:
        self.score_kernel = self.kernel(magnitude_scores_)

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        if self.scope != "local":
            super().authors_mask_(scores, sparsity, out, step)
            return
        # Sanh et al.'s MagnitudeBinarizer: the top int(keep * n) of the matrix, keep from their schedule_threshold
        self.topk.mask_(scores, sanh_kept_count(self, scores.numel(), sparsity, step), out)

    @torch.no_grad()
    def selection_scores(self) -> torch.Tensor:
        for i, w in enumerate(self.ctx.weights):
            out, W = self.view("scores", i).view(-1), w.param.detach().reshape(-1)
            if self.regrowth:  # the raw weight of a pruned entry competes again
                torch.abs(W, out=out)
            else:
                self.score_kernel(out, W, self.mask_view(i).view(-1))
        return self.state["scores"]


# ----------------------------------------------------------------------------- one shot (causal LMs)
class MagnitudeLayerPruner(LayerPruner):
    """Wanda's magnitude baseline: ``|W|`` with one threshold per layer (N:M: per group)."""

    needs_inputs = False

    def metric(self) -> torch.Tensor:
        return self.layer.weight.data.abs().float()

    def pruned_mask(self, metric: torch.Tensor, sparsity: float) -> torch.Tensor:
        if self.method.pattern is not None:
            return prune_nm(metric, *self.method.pattern)
        return prune_lowest_per_layer(metric, sparsity)


class MagnitudeOneShot(OneShotMethod):
    """``method=magnitude`` on a causal-LM task: one shot, no calibration data."""

    name = "magnitude"
    pruner_class = MagnitudeLayerPruner

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        scope = cfg.get("scope", "auto")
        if scope not in ("auto", "local"):
            raise invalid("method.scope", scope, "auto or local for a causal-LM task",
                          "One-shot LLM pruning goes block by block, so magnitude compares |W| within each layer "
                          "(Wanda's magnitude baseline); one global threshold is not offered there.")

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        why = "one-shot magnitude pruning of a causal LM has no training steps, regrowth or structured units"
        return [(f"method.{k}", why) for k in ("regrowth", "selection", "granularity", "compile")]
