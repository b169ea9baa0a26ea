"""Movement pruning (Sanh et al., NeurIPS 2020), hard version: keep the weights
moving away from zero.

The score accumulates ``-W * G`` over the pruning steps (the first-order
importance the paper derives for scores trained by straight-through estimation,
``S = -sum_t W^(t) dL/dW^(t)``, up to the score learning rate, which does not
change the ranking), on the same cubic schedule as the other methods.

Pruned weights keep their last score and are not revived: their gradient is
masked (``param.grad = G * mask``). In the paper's straight-through estimator a
pruned weight's score can keep moving; ours, like SEVEN's, is frozen at -inf.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pruneflow.methods.score_based import NEG_INF, ScoreBasedMethod


def movement_step_(S: torch.Tensor, W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> None:
    """``S += -W * G`` in place; pruned entries (``mask == 0``) score -inf."""
    S.addcmul_(W, G, value=-1.0)
    S.masked_fill_(mask == 0, NEG_INF)


class Movement(ScoreBasedMethod):
    name = "movement"
    uses_gradients = True
    state_names: ClassVar[tuple[str, ...]] = ("scores",)

    def init_state(self) -> None:
        self.step_kernel = self.kernel(movement_step_)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        grads = self.grads()
        for i, (w, grad) in enumerate(zip(self.ctx.weights, grads, strict=True)):
            if grad is not None:
                self.step_kernel(self.view("scores", i).view(-1), w.param.detach().reshape(-1), grad.reshape(-1), self.mask_view(i).view(-1))
        self.scores_masked = all(g is not None for g in grads)
