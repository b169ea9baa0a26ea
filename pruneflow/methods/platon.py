"""PLATON (Zhang et al., ICML 2022): importance with its upper confidence bound.

Per step, with ``I = |W * G|``::

    U    = b2*U    + (1-b2)*|I - Ibar|     # uncertainty, with the previous Ibar
    Ibar = b1*Ibar + (1-b1)*I              # smoothed sensitivity
    score = Ibar * U

Masks are recomputed from all scores every ``deltaT`` steps (regrowth allowed: a
weight pruned earlier comes back if its score rises again, starting from 0). A
pruned weight has ``W = 0`` and a masked gradient, so ``I = 0`` for it and its
score decays, as in the authors' code, which zeroes pruned weights in place.

Knobs map onto the pipeline: ``initial_warmup`` is the finetune stage,
``final_warmup`` is ``schedule.final_warmup`` (target held, masks still
updating), ``deltaT`` the mask update interval (``method.deltaT``, which sets the
schedule's frequency). Their ``Pruner.py`` averages I over each deltaT window and
updates U with the new Ibar; this follows the update rule above.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pruneflow.methods.score_based import ScoreBasedMethod, ema_coefficient


def platon_step_(Ibar: torch.Tensor, U: torch.Tensor, W: torch.Tensor, G: torch.Tensor, beta1: float, beta2: float) -> None:
    """One PLATON update of ``Ibar`` and ``U`` in place (both start at 0)."""
    I = (W * G).abs()  # noqa: E741 - the paper's name
    U.mul_(beta2).add_((I - Ibar).abs(), alpha=1 - beta2)
    Ibar.mul_(beta1).add_(I, alpha=1 - beta1)


def platon_step_scores_(
    Ibar: torch.Tensor, U: torch.Tensor, W: torch.Tensor, G: torch.Tensor, beta1: float, beta2: float, scores: torch.Tensor
) -> None:
    """``platon_step_`` that also writes ``scores = Ibar * U`` in the same pass (mask-update steps)."""
    platon_step_(Ibar, U, W, G, beta1, beta2)
    torch.mul(Ibar, U, out=scores)


def platon_scores(Ibar: torch.Tensor, U: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mul(Ibar, U, out=out) if out is not None else Ibar * U


class Platon(ScoreBasedMethod):
    name = "platon"
    uses_gradients = True
    allows_regrowth = True
    state_names: ClassVar[tuple[str, ...]] = ("scores", "ibar", "u")

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.beta1 = ema_coefficient(cfg, "beta1", 0.85)
        self.beta2 = ema_coefficient(cfg, "beta2", 0.95)

    def init_state(self) -> None:
        self.step_kernel = self.kernel(platon_step_)
        self.step_scores_kernel = self.kernel(platon_step_scores_)
        self.scores_at: int | None = None  # value of self.k when the update pass last wrote the scores

    def _pass_writes_scores(self, step: int) -> bool:
        """Fuse the score product into this step's update when this step's mask update reads it."""
        return self.ctx.schedule.is_update_step(step)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        grads = self.grads()
        fused = self._pass_writes_scores(step) and all(g is not None for g in grads)
        for i, (w, grad) in enumerate(zip(self.ctx.weights, grads, strict=True)):
            if grad is None:
                continue
            args = (self.view("ibar", i).view(-1), self.view("u", i).view(-1), w.param.detach().reshape(-1), grad.reshape(-1), self.beta1, self.beta2)
            if fused:
                self.step_scores_kernel(*args, self.view("scores", i).view(-1))
            else:
                self.step_kernel(*args)
        self.scores_at = self.k + 1 if fused else None  # after_backward increments k after this

    def selection_scores(self) -> torch.Tensor:
        fresh, self.scores_at = self.scores_at == self.k, None  # read once, and only right after the pass that wrote them
        if fresh:
            return self.state["scores"]
        return platon_scores(self.state["ibar"], self.state["u"], out=self.state["scores"])
