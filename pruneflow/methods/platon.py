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

from pruneflow.errors import invalid
from pruneflow.methods.score_based import ScoreBasedMethod


def platon_step_(Ibar: torch.Tensor, U: torch.Tensor, W: torch.Tensor, G: torch.Tensor, beta1: float, beta2: float) -> None:
    """One PLATON update of ``Ibar`` and ``U`` in place (both start at 0)."""
    I = (W * G).abs()  # noqa: E741 - the paper's name
    U.mul_(beta2).add_((I - Ibar).abs(), alpha=1 - beta2)
    Ibar.mul_(beta1).add_(I, alpha=1 - beta1)


def platon_scores(Ibar: torch.Tensor, U: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mul(Ibar, U, out=out) if out is not None else Ibar * U


class Platon(ScoreBasedMethod):
    name = "platon"
    uses_gradients = True
    allows_regrowth = True
    state_names: ClassVar[tuple[str, ...]] = ("scores", "ibar", "u")

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.beta1 = float(cfg.get("beta1", 0.85))
        self.beta2 = float(cfg.get("beta2", 0.95))
        for key, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= b < 1:
                raise invalid(f"method.{key}", b, "a number in [0, 1) (EMA coefficient)")

    def init_state(self) -> None:
        self.step_kernel = self.kernel(platon_step_)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        for i, (w, grad) in enumerate(zip(self.ctx.weights, self.grads(), strict=True)):
            if grad is not None:
                self.step_kernel(self.view("ibar", i).view(-1), self.view("u", i).view(-1), w.param.detach().reshape(-1), grad.reshape(-1), self.beta1, self.beta2)

    def selection_scores(self) -> torch.Tensor:
        return platon_scores(self.state["ibar"], self.state["u"], out=self.state["scores"])
