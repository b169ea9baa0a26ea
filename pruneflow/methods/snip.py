"""SNIP (Lee, Ajanthan & Torr, ICLR 2019): single-shot pruning by connection sensitivity.

The (pre)trained model is scored on the prune stage's batches *without weight
updates* (as ``seven_pre``): the gradients of all batches are summed and, after the
last one, every weight is scored by ``|W * G|`` (the sensitivity of the loss to
removing it) and the model is pruned once to the target. Lee et al. score one
batch; more batches average the gradient (the ranking of one batch is the special
case ``stages.prune.steps=1``).

As the authors' code (``namhoonlee/snip-public``, ``snip/model.py``, ``prune.py``):
the scoring batch runs with ``is_train=False`` (batch norm on its moving statistics;
their networks have no dropout), so the forward passes here run with the model in
eval mode, which also turns dropout off (``method.eval_mode``); their ``top_k`` keeps
``int(round(n * (1 - s)))`` scores, Python 3's round (``method.selection=authors``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pruneflow.errors import check_bool
from pruneflow.methods.score_based import ScoreBasedMethod


class Snip(ScoreBasedMethod):
    name = "snip"
    uses_gradients = True
    updates_weights = False
    state_names: ClassVar[tuple[str, ...]] = ("scores", "grad")

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.prune_in_eval_mode = check_bool(cfg.get("eval_mode", True), "method.eval_mode")

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        return [*super().unused_settings(cfg), ("schedule", f"method={self.name} prunes once, after its last scoring batch")]

    def is_mask_step(self, step: int) -> bool:
        return step == self.ctx.total_steps - 1

    def target_sparsity(self, step: int) -> float:
        return self.sparsity

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        for i, grad in enumerate(self.grads()):
            if grad is not None:
                self.view("grad", i).add_(grad)

    @torch.no_grad()
    def selection_scores(self) -> torch.Tensor:
        for i, w in enumerate(self.ctx.weights):
            torch.mul(w.param.detach(), self.view("grad", i), out=self.view("scores", i)).abs_()
        return self.state["scores"]

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """Their ``tf.nn.top_k`` of ``int(round(n * (1 - s)))`` scores (Python's round)."""
        self.topk.mask_(scores, int(round(scores.numel() * (1.0 - sparsity))), out)

    def summary(self) -> dict[str, Any]:
        return {"scoring_batches": self.ctx.total_steps if self.ctx is not None else None}
