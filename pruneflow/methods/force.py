"""FORCE (de Jorge, Sanyal, Behl, Torr, Rogez & Dokania, ICLR 2021): iterative SNIP
("FOResight Connection sEnsitivity") on the network as it is being pruned.

Without weight updates, every step of the prune stage takes a new batch through
the *currently pruned* network, scores every weight by ``|W * dL/d(W * m)|`` — the
gradient with respect to the masked weight, taken at pruned entries too, times the
weight's original value — and recomputes the mask to the schedule's level
(``schedule=exponential`` is their kept-fraction decay; SEVEN's figure experiments
run every method on ``cubic``). A weight
pruned earlier can come back (what separates FORCE from plain iterative SNIP).

As the authors' code (``naver/force``, ``pruning/pruning_algos.py``,
``iterative_pruning`` with ``prune_method=3``): the network as masked at the step
before, in train mode, the kept fraction ``pf ** ((k + 1) / steps)`` at step k (their
``mode='exp'``); their ``get_mask`` keeps every score >= the ``int(n * keep)``-th
largest (``method.selection=authors``). Their ``num_batches`` averages the mean
gradients of that many batches per step: one batch of ``num_batches`` times the size
(``stages.prune.batch_size``) has the same mean gradient where no layer uses batch
statistics (the Transformers here; their CNNs' batch norm does) and up to dropout.
Their saliency loss is ``F.nll_loss`` of the raw logits (their models end without a
log-softmax): the negative mean logit of the target class, not the cross-entropy of
the paper and of their training. The task loss is the default;
``method.scoring_loss=target_logit`` is theirs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pruneflow.errors import invalid
from pruneflow.methods.score_based import (
    ScoreBasedMethod,
    keep_from_kth_largest_,
    kept_floor,
    written_keep,
)
from pruneflow.schedules import Schedule

SCORING_LOSSES = ("task", "target_logit")


def authors_kept_count(n: int, schedule: Schedule, step: int, target: float) -> int:
    """``int(n * perc)`` with perc their level of ``iterative_pruning`` (``mode='exp'``):
    ``np.exp(0 - ((x + 1) * (0 - np.log(pruning_factor)) / num_steps))`` at ramp step x,
    ``pruning_factor`` the kept fraction as written (0.2 for sparsity 0.8): the float
    ``1 - 0.8`` keeps one weight fewer at BERT-base's 85M at the last step."""
    x = min(step + schedule.step_offset - schedule.initial_warmup, schedule.ramp_steps - 1)
    perc = np.exp(0 - ((x + 1) * (0 - np.log(written_keep(target))) / schedule.ramp_steps))
    return int(n * perc)


class Force(ScoreBasedMethod):
    name = "force"
    uses_gradients = True
    updates_weights = False
    default_regrowth = True
    mask_mode = "pass"  # the gradient of the masked weight reaches pruned entries too

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.loss_kind = cfg.get("scoring_loss", "task")
        if self.loss_kind not in SCORING_LOSSES:
            raise invalid("method.scoring_loss", self.loss_kind, SCORING_LOSSES,
                          "task: the task's loss (the paper's cross-entropy); target_logit: their code's F.nll_loss of the raw "
                          "logits, the negative mean logit of the target class.")

    def check_task(self, task: Any) -> None:  # noqa: ANN401
        if self.loss_kind == "target_logit" and task.problem != "single_label_classification":
            raise invalid("method.scoring_loss", self.loss_kind, f"task with a {task.problem.replace('_', ' ')} task",
                          "target_logit needs one class label per example.")

    def has_scoring_loss(self) -> bool:
        return self.loss_kind == "target_logit"

    def scoring_loss(self, task: Any, bundle: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN401
        _, logits = task.loss_and_logits(bundle, batch)
        labels = batch["labels"]
        if labels.is_floating_point():  # a mixed batch's soft targets (task.mixup): the targets' weighted logits
            return -(labels * logits[0]).sum(-1).mean()
        return F.nll_loss(logits[0], labels)  # their get_average_gradients, on logits without log-softmax

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        for i, (w, grad) in enumerate(zip(self.ctx.weights, self.grads(), strict=True)):
            if grad is not None:
                torch.mul(w.param.detach(), grad, out=self.view("scores", i)).abs_()

    def selection_scores(self) -> torch.Tensor:
        return self.state["scores"]

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """Their ``get_mask``: the ``int(n * keep)``-th largest score, every score >= it kept;
        on the exponential schedule keep is their level (:func:`authors_kept_count`)."""
        if self.on_ramp(sparsity, step, "exponential"):
            count = authors_kept_count(scores.numel(), self.ctx.schedule, step, self.sparsity)
        else:
            count = kept_floor(scores.numel(), 1.0 - sparsity)
        keep_from_kth_largest_(scores, count, out)
