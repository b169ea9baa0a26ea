"""Optimizers that torch does not ship, for methods whose authors trained with them.

``MtDnnAdamax``: the Adamax of the mt-dnn code base (``module/bert_optim.py``), which
PLATON's GLUE scripts train with (``--optimizer adamax``). It differs from
``torch.optim.Adamax`` in three ways: no bias correction of the first moment, ``eps``
also added to the denominator, and decoupled weight decay (``lr * weight_decay * W``
added to each step, like AdamW) where torch adds an L2 term to the gradient. Its
learning-rate schedule (``warmup_linear``) is ``trainer.lr_scheduler=warmup_linear_mtdnn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class MtDnnAdamax(torch.optim.Optimizer):
    """m = b1 m + (1 - b1) g;  u = max(b2 u, |g| + eps);  W -= lr (m / (u + eps) + wd W)."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_inf"] = torch.zeros_like(p)
                m, u = state["exp_avg"], state["exp_inf"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                torch.maximum(u.mul_(b2), p.grad.abs().add_(eps), out=u)
                update = m / (u + eps)
                if wd > 0:
                    update.add_(p, alpha=wd)
                p.add_(update, alpha=-lr)
                state["step"] += 1
        return loss
