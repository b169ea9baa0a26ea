"""FORCE (de Jorge, Sanyal, Behl, Torr, Rogez & Dokania, ICLR 2021): iterative SNIP
("FOResight Connection sEnsitivity") on the network as it is being pruned.

Without weight updates, every step of the prune stage takes a new batch through
the *currently pruned* network, scores every weight by ``|W * dL/d(W * m)|`` — the
gradient with respect to the masked weight, taken at pruned entries too, times the
weight's original value — and recomputes the mask to the schedule's level
(``schedule=exponential``, their kept-fraction decay, in the experiments). A weight
pruned earlier can come back (what separates FORCE from plain iterative SNIP).

As the authors' code (``naver/force``, ``pruning/pruning_algos.py``,
``iterative_pruning`` with ``prune_method=3``): the network as masked at the step
before, in train mode, the kept fraction ``pf ** ((k + 1) / steps)`` at step k (their
``mode='exp'``); their ``get_mask`` keeps every score >= the ``int(n * keep)``-th
largest (``method.selection=authors``). Their ``num_batches`` averages the mean
gradients of that many batches per step: one batch of ``num_batches`` times the size
(``stages.prune.batch_size``) has the same mean gradient.
"""

from __future__ import annotations

import torch

from pruneflow.methods.score_based import ScoreBasedMethod, keep_from_kth_largest_, kept_floor


class Force(ScoreBasedMethod):
    name = "force"
    uses_gradients = True
    updates_weights = False
    default_regrowth = True
    mask_mode = "pass"  # the gradient of the masked weight reaches pruned entries too

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        for i, (w, grad) in enumerate(zip(self.ctx.weights, self.grads(), strict=True)):
            if grad is not None:
                torch.mul(w.param.detach(), grad, out=self.view("scores", i)).abs_()

    def selection_scores(self) -> torch.Tensor:
        return self.state["scores"]

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor) -> None:
        """Their ``get_mask``: the ``int(n * keep)``-th largest score, every score >= it kept."""
        keep_from_kth_largest_(scores, kept_floor(scores.numel(), 1.0 - sparsity), out)
