"""GraSP (Wang, Zhang & Grosse, ICLR 2020): Gradient Signal Preservation.

Scores every weight by ``S = -W * (H g)``, with g the gradient of the loss and H its
Hessian, and removes the weights of *largest* S (those whose removal least reduces
the gradient flow). As the authors' code: the loss is computed on logits divided
by a temperature (``method.temperature``, their 200); a first pass sums g over the
scoring batches (no graph), a second pass takes z = g(x)^T stop_grad(g) per batch
and back-propagates it, which accumulates ``H g``. The (pre)trained model is not
updated (as ``seven_pre``); the stage's steps are the scoring batches of each pass.
Attention runs through the math kernel here: the fused ones have no second derivative.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pruneflow.errors import invalid
from pruneflow.methods.base import PruneContext
from pruneflow.methods.score_based import ScoreBasedMethod


def tempered_loss(task: Any, bundle: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:  # noqa: ANN401
    """The task loss on logits / T (classification and question answering; regression: T = 1)."""
    loss, logits = task.loss_and_logits(bundle, batch)
    if task.problem == "single_label_classification":
        return F.cross_entropy(logits[0] / temperature, batch["labels"])
    if task.problem == "question_answering":
        n = logits[0].shape[-1]
        s = F.cross_entropy(logits[0] / temperature, batch["start_positions"].clamp(0, n), ignore_index=n)
        e = F.cross_entropy(logits[1] / temperature, batch["end_positions"].clamp(0, n), ignore_index=n)
        return (s + e) / 2
    return loss


class GraSP(ScoreBasedMethod):
    name = "grasp"
    updates_weights = False

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        t = cfg.get("temperature", 200.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise invalid("method.temperature", t, "a positive number (the authors use 200)")
        self.temperature = float(t)

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        return [("schedule", "method=grasp prunes once, after its two scoring passes")]

    def selection_scores(self) -> torch.Tensor:
        return self.state["scores"]

    def run_prune_stage(self, ctx: PruneContext) -> bool:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        bundle, task = ctx.extra["bundle"], ctx.task
        params = [w.param for w in ctx.weights]
        model = ctx.model
        model.train()

        def batches():  # noqa: ANN202 - the same batches for both passes
            data = ctx.batches()
            return [next(data) for _ in range(ctx.total_steps)]

        chosen = batches()
        with sdpa_kernel(SDPBackend.MATH):
            g_sum = [torch.zeros_like(p) for p in params]
            for batch in chosen:
                grads = torch.autograd.grad(tempered_loss(task, bundle, batch, self.temperature), params, allow_unused=True)
                for acc, g in zip(g_sum, grads, strict=True):
                    if g is not None:
                        acc.add_(g)
            hg = [torch.zeros_like(p) for p in params]
            for batch in chosen:
                grads = torch.autograd.grad(tempered_loss(task, bundle, batch, self.temperature), params, create_graph=True, allow_unused=True)
                z = sum((g * s).sum() for g, s in zip(grads, g_sum, strict=True) if g is not None)
                second = torch.autograd.grad(z, params, allow_unused=True)
                for acc, h in zip(hg, second, strict=True):
                    if h is not None:
                        acc.add_(h.detach())
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, (p, h) in enumerate(zip(params, hg, strict=True)):
                # GraSP removes the largest -W*Hg: keep the largest W*Hg
                torch.mul(p.detach(), h, out=self.view("scores", i))
        self.update_masks(self.sparsity)
        return True
