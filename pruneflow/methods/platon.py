"""PLATON (Zhang et al., ICML 2022): importance with its upper confidence bound.

As the authors' ``Pruner.py`` / ``GLUE/mt_dnn/prune_model.py`` compute it, after
every optimizer step g (counted from 1 at the first step of the prune stage),
with ``I = |W * G|`` (the updated weight, this step's clipped gradient) and
``l = g mod deltaT`` the position in the current window of ``deltaT`` steps::

    l == 0:  Ibar = b1*Ibar + (1-b1)*Iw          # once per window, with the window's mean Iw
             U    = b2*U    + (1-b2)*|Iw - Ibar|  # with the *new* Ibar
             Iw   = I                            # a new window starts
    l  > 0:  Iw   = (Iw*l + I) / (l + 1)         # running mean over the window
    score = Ibar * U

(for 0 < b2 < 1, where both copies agree; at b2 = 0 this is the GLUE copy's rule:
``Pruner.py`` scores Ibar * |I_current_window - Ibar| there. docs/fidelity.md.)
``Iw`` starts at 0 and counts as the first window's first sample, as in their code.
The mask (global over all prunable tensors) is recomputed at window ends during
the cubic ramp, and at every step of the final warm-up (target held); nothing is
pruned during the initial warm-up, but the averages already run. Pruned entries
are zeroed in place at those steps only: their gradients are not masked, so they
keep training in between and can come back (``method.strict_masks=true`` keeps
them at exactly zero with the mask parametrization instead). Biases of the pruned
layers are pruned with their weights (``method.biases``).

Knobs map onto the pipeline: ``schedule.initial_warmup`` / ``final_warmup`` are
the authors' ``initial_warmup``/``final_warmup`` times ``warmup_steps``; put the
warm-up inside the prune stage (finetune of 0 steps) to run the averages from
step 0 as they do. ``method.selection=authors`` thresholds at their
``kthvalue(scores, int(n * (1 - r)))`` with their kept ratio r and keeps every
score >= it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pruneflow.errors import UserError, check_bool
from pruneflow.methods.score_based import (
    ScoreBasedMethod,
    authors_cubic,
    ema_coefficient,
    keep_from_kth_smallest_,
    written_keep,
)
from pruneflow.schedules import Schedule


def platon_window_step_(
    ipt: torch.Tensor, ibar: torch.Tensor, unc: torch.Tensor, W: torch.Tensor, G: torch.Tensor, local_step: int, beta1: float, beta2: float,
    scores: torch.Tensor | None = None,
) -> None:
    """One PLATON update in place; ``local_step`` = g mod deltaT (0 starts a window).
    With ``scores`` (a mask step), also their selection score ``ibar * unc`` from the
    updated averages, in the same pass."""
    if local_step == 0:
        ibar.mul_(beta1).add_(ipt, alpha=1 - beta1)
        unc.mul_(beta2).add_((ipt - ibar).abs_(), alpha=1 - beta2)
        torch.mul(W, G, out=ipt).abs_()
    else:
        ipt.mul_(local_step).add_((W * G).abs_()).div_(local_step + 1)
    if scores is not None:
        platon_scores(ibar, unc, out=scores)


def platon_scores(ibar: torch.Tensor, unc: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mul(ibar, unc, out=out) if out is not None else ibar * unc


def platon_mask_step(g: int, total: int, initial_warmup: int, final_warmup: int, delta_t: int) -> bool:
    """Their ``mask_ind`` at step g (1-based): none in the initial warm-up, every step of
    the final warm-up, window ends (g mod deltaT == 0) in between."""
    if g <= initial_warmup:
        return False
    if g > total - final_warmup:
        return True
    return g % delta_t == 0


def authors_pruned_count(n: int, schedule: Schedule, step: int, target: float) -> int:
    """``int(n * (1 - r))`` with r computed as their ``schedule_threshold_comb`` does:
    ``final + (1 - final) * mul_coeff ** 3`` on the ramp, ``final`` in the final warm-up,
    where ``final`` is their ``--final_threshold`` (the kept fraction as written, 0.10
    for sparsity 0.9, not the float 1 - 0.9) and ``mul_coeff = 1 - (g - iw) / (T - iw - fw)``
    (= 1 - the schedule's progress, the same float). The algebraically equal
    ``target * (1 - (1 - p) ** 3)`` rounds differently: at BERT-base's 85M prunable
    entries it prunes one more weight at a step or two of a run."""
    final = written_keep(target)
    p = schedule.progress(step)
    kept = final if p >= 1.0 else authors_cubic(1.0, final, p)
    return int(n * (1 - kept))


class Platon(ScoreBasedMethod):
    name = "platon"
    uses_gradients = True
    default_regrowth = True
    state_names: ClassVar[tuple[str, ...]] = ("scores", "ipt", "ibar", "unc")

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.beta1 = ema_coefficient(cfg, "beta1", 0.85)
        self.beta2 = ema_coefficient(cfg, "beta2", 0.95)
        dt = cfg.get("deltaT", 10)
        if isinstance(dt, bool) or not isinstance(dt, int) or dt < 1:
            from pruneflow.errors import invalid

            raise invalid("method.deltaT", dt, "an integer >= 1 (the window of steps averaged into one update)")
        self.delta_t = int(dt)
        self.strict = check_bool(cfg.get("strict_masks", False), "method.strict_masks")
        self.mask_mode = "parametrize" if self.strict else "inplace"
        self.scores_fresh = False  # the scores buffer holds ibar * unc of the last update

    def check_schedule(self, schedule: Schedule) -> None:
        if schedule.frequency != 1:
            raise UserError(
                f"method=platon sets its mask cadence with method.deltaT (now {self.delta_t}); "
                f"schedule.frequency={schedule.frequency} would be ignored. Leave schedule.frequency at 1."
            )

    def their_step(self, step: int) -> int:
        """Their global_step after pruneflow's step ``step``: from 1, plus ``schedule.step_offset``.
        The window and the mask steps both count on it, so they stay in step."""
        return step + 1 + self.ctx.schedule.step_offset

    def is_mask_step(self, step: int) -> bool:
        s = self.ctx.schedule
        return platon_mask_step(self.their_step(step), s.total_steps, s.initial_warmup, s.final_warmup, self.delta_t)

    def init_state(self) -> None:
        self.zero_on_update = True  # their masks zero the weights in place (strict mode too: regrown weights start at 0)
        # One fused pass per layer when compiled (BERT-base on CPU): eager, the update is
        # 8 passes over the weights' size and a temporary for |Iw - Ibar|.
        self.step_kernel = self.kernel(platon_window_step_)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        local = self.their_step(step) % self.delta_t
        # At a mask step the kernel also writes the selection scores (saves a pass over
        # ibar and unc); selection_scores then uses them if every layer was updated.
        fuse = self.is_mask_step(step)
        grads = self.grads()
        for i, (w, grad) in enumerate(zip(self.ctx.weights, grads, strict=True)):
            if grad is None:
                continue
            self.step_kernel(self.view("ipt", i).view(-1), self.view("ibar", i).view(-1), self.view("unc", i).view(-1),
                             w.param.detach().reshape(-1), grad.reshape(-1), local, self.beta1, self.beta2,
                             self.view("scores", i).view(-1) if fuse else None)
        self.scores_fresh = fuse and all(g is not None for g in grads)

    def selection_scores(self) -> torch.Tensor:
        if self.scores_fresh:
            scores = self.state["scores"]
        else:
            scores = platon_scores(self.state["ibar"], self.state["unc"], out=self.state["scores"])
        self.scores_fresh = False
        if not self.regrowth:
            self.mask_scores(scores, self.mask_flat)
        return scores

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """``kthvalue(scores, int(n * (1 - r)))`` and keep every score >= it, with their
        kept ratio r (:func:`authors_pruned_count`)."""
        if self.on_ramp(sparsity, step, "cubic"):
            count = authors_pruned_count(scores.numel(), self.ctx.schedule, step, self.sparsity)
        else:
            count = int(scores.numel() * sparsity + 1e-9)
        keep_from_kth_smallest_(scores, count, out)
