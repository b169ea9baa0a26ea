"""SEVEN (Xiao et al., IJCNN 2024, "Pruning Transformer Model by Reserving Sentinels").

Gradients of Transformers are noisy; SEVEN keeps the weights whose gradient is
consistently large (the "sentinels"). At every pruning step k (0 at the first),
as in the authors' public code::

    g  = |G|
    m  = a1*m + (1-a1)*g                  # EMA of |G|
    v  = a2*v + (1-a2)*g^2                # EMA of G^2
    m^ = m / (1 - a1^(k+1));   v^ = sqrt(v / (1 - a2^(k+1))) + 1e-9
    S  = S + |W * g * m^ / v^|            # accumulated from 0 when pruning starts
    S[mask == 0] = 0                      # pruned weights stay pruned

``m^/v^`` ~ E|g| / sqrt(E g^2) is in (0, 1]: near 1 for a steady gradient, small
for a noisy one. ``method.signed=true`` is the sign-descent reading of the
abstract: ``m`` is the EMA of the signed G, so ``|m^|/v^`` ~ |E G| / sqrt(E G^2)
is near 1 only for a gradient of consistent *sign* (the magnitude of an Adam
step) and near 0 for one that flips.

``seven_update_`` is that rule as a pure function of tensors. As in the
authors' loop the update runs after ``optimizer.step()``: W is the updated
weight and G this step's gradient of the effective (masked) weight, which is
what ``param.grad`` holds for kept weights under the mask parametrization. Pruned
scores are -inf rather than 0 (``pruned_score``), so that a kept weight whose
score is exactly 0 (a dead unit's weights get no gradient) can never tie with a
pruned one and revive it. The arithmetic is theirs up to rounding order (the bias
corrections as factors, ``m/v`` before the product, multiply-adds): scores differ
in the last bit, so a near-tie at the threshold can fall the other way.

Schedule (their code): dense fine-tuning for ``t_i`` steps (the finetune stage),
then pruning every step for ``iter_num`` steps (the prune stage) on the cubic
schedule, then training with the mask frozen (recover). ``method.preset``
selects their per-task ``t_i``/``iter_num`` for GLUE. Their loop prunes at
k = 0 … iter_num − 2 only and keeps every weight tied with the k-th largest
score (k = int(r·n)): ``method.stop_early=true`` and ``method.selection=authors``
reproduce both; by default the last step lands exactly on the target count.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch

from pruneflow.errors import UserError, check_bool, invalid
from pruneflow.methods.score_based import (
    NEG_INF,
    ScoreBasedMethod,
    ema_coefficient,
    keep_from_kth_largest_,
    kept_floor,
)

log = logging.getLogger("pruneflow")

# The authors' per-task settings for BERT-base (batch 32, lr 2e-5, AdamW, 10 epochs):
# (t_i: dense steps before pruning, iter_num: pruning steps).
PRESETS: dict[str, tuple[int, int]] = {
    "mnli": (5400, 16600),
    "qqp": (5400, 16600),
    "qnli": (2000, 12000),
    "sst2": (1000, 4000),
    "rte": (200, 1000),
    "mrpc": (300, 600),
    "cola": (500, 1000),
    "stsb": (500, 2000),
}


def seven_step_(
    S: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    mask: torch.Tensor,
    alpha_1: float,
    alpha_2: float,
    c1: float,
    c2: float,
    signed: bool = False,
    pruned_score: float = 0.0,
) -> None:
    """The update with bias corrections given as ``c1 = 1/(1 - a1^(k+1))``,
    ``c2 = 1/(1 - a2^(k+1))``: elementwise and in place (fused when compiled)."""
    g = G.abs()
    m.mul_(alpha_1).add_(G if signed else g, alpha=1 - alpha_1)
    v.mul_(alpha_2).addcmul_(G, G, value=1 - alpha_2)
    ratio = (m * c1) / (torch.sqrt(v * c2) + 1e-9)
    S.add_((W * g * ratio).abs())
    S.masked_fill_(mask == 0, pruned_score)


def seven_update_(
    S: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    alpha_1: float = 0.8,
    alpha_2: float = 0.9,
    signed: bool = False,
    pruned_score: float = 0.0,
) -> None:
    """One SEVEN score update at pruning step ``k`` (0 at the first), in place on
    ``S``, ``m``, ``v`` (all start at 0). Pruned entries (``mask == 0``) get
    ``pruned_score``: 0 as published; the method passes -inf."""
    c1, c2 = bias_corrections(alpha_1, alpha_2, k)
    seven_step_(S, m, v, W, G, mask, alpha_1, alpha_2, c1, c2, signed, pruned_score)


def bias_corrections(alpha_1: float, alpha_2: float, k: int) -> tuple[float, float]:
    """``1/(1 - a1^(k+1))`` and ``1/(1 - a2^(k+1))`` at pruning step ``k``."""
    return 1.0 / (1.0 - alpha_1 ** (k + 1)), 1.0 / (1.0 - alpha_2 ** (k + 1))


class Seven(ScoreBasedMethod):
    name = "seven"
    uses_gradients = True
    state_names: ClassVar[tuple[str, ...]] = ("scores", "m", "v")
    pruned_weights_unread = True  # pruned entries get no gradient and score -inf

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.alpha_1 = ema_coefficient(cfg, "alpha_1", 0.8)
        self.alpha_2 = ema_coefficient(cfg, "alpha_2", 0.9)
        self.signed = check_bool(cfg.get("signed", False), "method.signed")
        self.preset = cfg.get("preset")
        if self.preset is not None and self.preset != "auto" and self.preset not in PRESETS:
            raise invalid("method.preset", self.preset, ["auto", *PRESETS, "null"], "auto picks the GLUE task's preset.")
        self.total_epochs = cfg.get("total_epochs", 10)
        self.lengthen_to_fit = check_bool(cfg.get("lengthen_to_fit", False), "method.lengthen_to_fit")
        self.stop_early = check_bool(cfg.get("stop_early", False), "method.stop_early")
        self.planned: dict[str, Any] = {}  # the preset's stage plan, for result.json

    # --- the authors' per-task presets --------------------------------------------
    def plan_stages(self, steps: dict[str, int], steps_per_epoch: int, task_name: str) -> dict[str, int]:
        if self.preset is None:
            return steps
        task = str(task_name).split("/")[-1]
        key = task if self.preset == "auto" else self.preset
        if key not in PRESETS:
            if self.preset == "auto":  # not a GLUE task: the configured stages apply
                log.info("method.preset=auto: task=%s has no preset of the authors' (GLUE tasks: %s); "
                         "stages.* set the stage lengths.", task_name, ", ".join(PRESETS))
                return steps
            raise invalid("method.preset", self.preset, ["auto", *PRESETS, "null"])
        t_i, iter_num = PRESETS[key]
        if isinstance(self.total_epochs, bool) or not isinstance(self.total_epochs, (int, float)) or self.total_epochs <= 0:
            raise invalid("method.total_epochs", self.total_epochs, "a positive number of epochs (the authors train 10)")
        total = int(math.ceil(float(self.total_epochs) * steps_per_epoch))
        window = t_i + iter_num
        recover = total - window
        if self.lengthen_to_fit:  # the window always runs in full, then at least one epoch with the mask frozen
            recover = max(recover, steps_per_epoch)
        lengthened = window + recover > total
        if lengthened:
            log.warning(
                "method.preset=%s (%s): t_i + iter_num = %d steps and one epoch with the mask frozen do not fit "
                "in %s epochs (%d steps); training is lengthened to %d steps (method.lengthen_to_fit=true), "
                "a deviation from the authors' setting.",
                self.preset, key, window, self.total_epochs, total, window + recover,
            )
        elif recover < 0:
            raise UserError(
                f"method.preset={self.preset} ({key}: t_i={t_i} dense steps + iter_num={iter_num} pruning steps "
                f"= {window}) does not fit in method.total_epochs={self.total_epochs} epochs of "
                f"{steps_per_epoch} steps ({total} steps) for task={task_name}: the target sparsity would never be "
                f"reached (the authors' script stops training first). Train longer, e.g. "
                f"method.total_epochs={math.ceil(window / steps_per_epoch)}, or set method.lengthen_to_fit=true "
                "(the whole window, then one epoch with the mask frozen), or set method.preset=null and choose "
                "stages.finetune/prune/recover yourself."
            )
        self.planned = {"preset": key, "t_i": t_i, "iter_num": iter_num, "recover_steps": recover,
                        "lengthened": lengthened}
        return {**steps, "finetune": t_i, "prune": iter_num, "recover": recover}

    def summary(self) -> dict[str, Any]:
        return dict(self.planned)

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        task = str(cfg.task.name).split("/")[-1]
        if self.preset is None or (self.preset == "auto" and task not in PRESETS):
            why = ("method.total_epochs and method.lengthen_to_fit plan the stages of a preset (method.preset=auto on a "
                   "GLUE task, or a GLUE task name); without one, stages.* set the stage lengths")
            return [*super().unused_settings(cfg), ("method.total_epochs", why), ("method.lengthen_to_fit", why)]
        why = f"method.preset={self.preset} sets the stage lengths (t_i, iter_num and the rest of method.total_epochs)"
        return [*super().unused_settings(cfg),
                *((f"stages.{stage}.{key}", why) for stage in ("finetune", "prune", "recover") for key in ("epochs", "steps"))]

    # --- the authors' loop ------------------------------------------------------------
    def is_mask_step(self, step: int) -> bool:
        if self.stop_early and step >= self.ctx.total_steps - 1:  # their window ends at iter_num - 2
            return False
        return super().is_mask_step(step)

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """Their threshold: the k-th largest score, k = int(r * n); every score >= it is
        kept (ties at the threshold included). On the cubic ramp r is their
        ``keep + (1 - keep) * (1 - (i + 1) / N) ** 3`` in their order of operations: the
        algebraically equal ``1 - target * (1 - (1 - p) ** 3)`` rounds differently and at
        BERT-base's 85M weights lands one weight off in about 1 of 2,600 steps."""
        if self.on_ramp(sparsity, step, "cubic"):
            keep = 1 - self.sparsity
            remain = keep + (1 - keep) * ((1 - self.ctx.schedule.progress(step)) ** 3)
            count = int(remain * scores.numel())
        else:
            count = kept_floor(scores.numel(), 1.0 - sparsity)
        keep_from_kth_largest_(scores, count, out)

    def lands_on_target(self) -> bool:
        return super().lands_on_target() and not self.stop_early

    # --- the score ----------------------------------------------------------------
    def init_state(self) -> None:
        self.step_kernel = self.kernel(seven_step_)

    @torch.no_grad()
    def update_scores(self, step: int) -> None:
        c1, c2 = bias_corrections(self.alpha_1, self.alpha_2, self.k)
        grads = self.grads()
        for i, (w, grad) in enumerate(zip(self.ctx.weights, grads, strict=True)):
            if grad is None:
                continue
            self.step_kernel(
                self.view("scores", i).view(-1), self.view("m", i).view(-1), self.view("v", i).view(-1),
                w.param.detach().reshape(-1), grad.reshape(-1), self.mask_view(i).view(-1),
                self.alpha_1, self.alpha_2, c1, c2, self.signed, NEG_INF,
            )
        self.scores_masked = all(g is not None for g in grads)
