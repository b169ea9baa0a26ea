"""FORCE (de Jorge, Sanyal, Behl, Torr, Rogez & Dokania, ICLR 2021): iterative SNIP
("FOResight Connection sEnsitivity") on the network as it is being pruned.

Without weight updates, every step of the prune stage takes a new batch through
the *currently pruned* network, scores every weight by ``|W * dL/d(W * m)|`` — the
gradient with respect to the masked weight, taken at pruned entries too, times the
weight's original value — and recomputes the mask to the schedule's level
(``schedule=exponential``, their kept-fraction decay, in the experiments). A weight
pruned earlier can come back (what separates FORCE from plain iterative SNIP).
"""

from __future__ import annotations

import torch

from pruneflow.methods.score_based import ScoreBasedMethod


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
