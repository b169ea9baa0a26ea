"""Optimizers that torch does not ship, for methods whose authors trained with them.

``MtDnnAdamax``: the Adamax of the mt-dnn code base (``module/bert_optim.py``), which
PLATON's GLUE scripts train with (``--optimizer adamax``). It differs from
``torch.optim.Adamax`` in three ways: no bias correction of the first moment, ``eps``
also added to the denominator, and decoupled weight decay (``lr * weight_decay * W``
added to each step, like AdamW) where torch adds an L2 term to the gradient. Its
learning-rate schedule (``warmup_linear``) is ``trainer.lr_scheduler=warmup_linear_mtdnn``.

``HFAdamW``: the ``AdamW`` that ``transformers`` shipped until version 5 (``transformers.
AdamW``, ``correct_bias=True``), which movement pruning's ``masked_run_glue.py`` /
``masked_run_squad.py`` and PLATON's SQuAD script train with. It differs from
``torch.optim.AdamW`` in two ways: ``eps`` is added to ``sqrt(v)`` before the bias
correction (the step is ``lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, so
the effective eps is ``eps / sqrt(1 - b2^t)``, 32x larger at step 1 with b2 = 0.999), and
the decoupled weight decay ``lr * wd * W`` is taken from the weight after the update
rather than before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch


class _PerTensorOptimizer(torch.optim.Optimizer):
    """An optimizer that updates each parameter on its own from its gradient and the
    zero-initialised state tensors ``state_keys`` (plus ``step``): subclasses give ``update``."""

    state_keys: tuple[str, ...] = ()
    default_eps: float = 1e-8

    def __init__(self, params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = None, weight_decay: float = 0.0) -> None:
        eps = self.default_eps if eps is None else eps
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in self.state_keys:
                        state[key] = torch.zeros_like(p)
                self.update(p, state, group)
        return loss

    def update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


class MtDnnAdamax(_PerTensorOptimizer):
    """m = b1 m + (1 - b1) g;  u = max(b2 u, |g| + eps);  W -= lr (m / (u + eps) + wd W)."""

    state_keys = ("exp_avg", "exp_inf")
    default_eps = 1e-6

    def update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
        m, u = state["exp_avg"], state["exp_inf"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        torch.maximum(u.mul_(b2), p.grad.abs().add_(eps), out=u)
        update = m / (u + eps)
        if wd > 0:
            update.add_(p, alpha=wd)
        p.add_(update, alpha=-lr)
        state["step"] += 1


class HFAdamW(_PerTensorOptimizer):
    """m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    W -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps);  then W -= lr wd W."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        (b1, b2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(p.grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        p.addcdiv_(m, v.sqrt().add_(eps), value=-lr * math.sqrt(1 - b2**t) / (1 - b1**t))
        if wd > 0:
            p.add_(p, alpha=-lr * wd)
