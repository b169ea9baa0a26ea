"""Movement pruning (Sanh, Wolf & Rush, NeurIPS 2020), as their public code runs it
(``transformers`` ``examples/research_projects/movement-pruning``: ``emmental``).

Every prunable weight W has a trainable score S (init ``method.score_init``, 0 in
their commands). The forward uses ``W * mask`` with the mask the top ``int(keep *
n)`` scores of each matrix (``method.scope=local``, their ``topK``); the backward
is the straight-through estimator: the weights get ``g * mask`` and the scores
``g * W`` (so a score accumulates -lr * W * dL/dW' through the optimizer: weights
moving away from zero are kept). The scores are trained by the run's optimizer
with their own learning rate (``method.score_lr``, 1e-2) and no weight decay,
under the same LR schedule, from the first step of the prune stage (put the warm-up
inside the prune stage, ``schedule.initial_warmup``, as their scripts do: the mask
keeps everything then, but the scores already train). The mask follows the
scores, so a pruned weight can come back. Scores only change at optimizer steps,
so recomputing the mask after each step gives every forward exactly the mask
their per-forward top-k computes.

``soft_movement`` (their ``sigmoied_threshold``): keep ``sigmoid(S) > tau`` with tau
ramping from 0 to ``method.final_threshold`` on the cubic schedule, at least
``int(0.005 n) + 1`` weights per matrix, and an L1 penalty
``lambda_t * mean_matrices(mean(sigmoid(S)))`` with ``lambda_t = final_lambda *
tau_t / final_threshold``. Its sparsity is not set directly: ``final_lambda`` and
``final_threshold`` decide it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pruneflow.errors import UserError, invalid
from pruneflow.methods.base import PruneContext
from pruneflow.methods.score_based import (
    ScoreBasedMethod,
    authors_cubic,
    sanh_keep,
    sanh_kept_count,
)
from pruneflow.schedules import Schedule

FLOOR_FRACTION = 0.005  # their ThresholdBinarizer keeps at least int(0.005 n) + 1 weights per matrix
WARMUP_THRESHOLD = -1e2  # their global threshold while the kept fraction is 1 ("an indefinitely low quantity")


def floor_count(n: int) -> int:
    return int(FLOOR_FRACTION * n) + 1


@torch.no_grad()
def threshold_with_floor_(scores: torch.Tensor, threshold: float, out: torch.Tensor, sigmoid: bool = False) -> None:
    """Their ``ThresholdBinarizer`` on one matrix: keep ``scores > threshold`` (``sigmoid``:
    ``sigmoid(scores) > threshold``, soft movement), or, if that keeps fewer than the floor,
    the scores above the ``(n - floor)``-th smallest."""
    torch.gt(torch.sigmoid(scores) if sigmoid else scores, threshold, out=out)
    n = scores.numel()
    if int(out.count_nonzero()) < floor_count(n):
        k = torch.kthvalue(scores, max(n - floor_count(n), 1)).values
        torch.gt(scores, k, out=out)


SCORE_INIT_MODES = ("constant", "uniform", "kaiming")


def score_init_mode(cfg: Any) -> str:  # noqa: ANN401
    """``method.score_init_mode``, their ``--mask_init``."""
    mode = cfg.get("score_init_mode", "constant")
    if mode not in SCORE_INIT_MODES:
        raise invalid("method.score_init_mode", mode, SCORE_INIT_MODES,
                      "their --mask_init: constant fills method.score_init (their --mask_scale); uniform draws from "
                      "U(-score_init, score_init); kaiming is kaiming_uniform_(a=sqrt(5)) per matrix, as a Linear's weights.")
    return str(mode)


def score_init_unused(mode: str) -> list[tuple[str, str]]:
    return [("method.score_init", "method.score_init_mode=kaiming draws the scores from each matrix's fan-in "
             "(their --mask_scale is unused then)")] if mode == "kaiming" else []


def check_score_init_shapes(mode: str, weights: Any) -> None:  # noqa: ANN401
    if mode == "kaiming" and any(len(w.shape) < 2 for w in weights):
        raise invalid("method.score_init_mode", "kaiming", "constant or uniform with method.biases=true",
                      "kaiming_uniform_ needs a matrix's fan-in; biases are vectors.")


@torch.no_grad()
def init_scores_(views: Sequence[torch.Tensor], mode: str, scale: float) -> None:
    """Their ``MaskedLinear.init_mask``, matrix by matrix in the layers' order (the random
    modes draw from torch's global generator, as theirs at model construction)."""
    for v in views:
        if mode == "constant":
            v.fill_(scale)
        elif mode == "uniform":
            nn.init.uniform_(v, a=-scale, b=scale)
        else:
            nn.init.kaiming_uniform_(v, a=math.sqrt(5))


def _positive(cfg: Any, key: str, default: float, allow_zero: bool = False) -> float:  # noqa: ANN401
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
        raise invalid(f"method.{key}", v, "a number >= 0" if allow_zero else "a positive number")
    return float(v)


class Movement(ScoreBasedMethod):
    name = "movement"
    mask_mode = "ste"
    default_regrowth = True

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.score_lr = _positive(cfg, "score_lr", 1e-2)
        init = cfg.get("score_init", 0.0)
        if isinstance(init, bool) or not isinstance(init, (int, float)):
            raise invalid("method.score_init", init, "a number (every score starts at it; their commands use 0)")
        self.score_init = float(init)
        self.score_init_mode = score_init_mode(cfg)
        self.score_params: list[nn.Parameter] = []
        # their --global_topk: a raw-score threshold recomputed every `threshold_every` steps
        self.global_threshold = self.scope == "global" and self.selection == "authors" and self.granularity == "unstructured"
        every = cfg.get("threshold_every", 25)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise invalid("method.threshold_every", every, "an integer >= 1 (steps between recomputations of the global threshold; theirs: 25)")
        self.threshold_every = every
        self.threshold_mem: float | None = None  # their threshold_mem: the held raw-score threshold
        self.step_offset = 0  # their global_step of the forward after prune step k is k + step_offset (set at setup)

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        unused = [*super().unused_settings(cfg), *score_init_unused(self.score_init_mode)]
        if self.global_threshold:
            return unused
        return [*unused, ("method.threshold_every", "it is the recomputation period of their --global_topk threshold, used "
                          "with method.scope=global and method.selection=authors only")]

    def validate(self, model: nn.Module, weights: Any) -> None:  # noqa: ANN401
        super().validate(model, weights)
        check_score_init_shapes(self.score_init_mode, weights)

    def check_schedule(self, schedule: Schedule) -> None:
        if self.global_threshold and schedule.frequency != 1:
            raise UserError(
                f"schedule.frequency={schedule.frequency} cannot be used with method=movement method.scope=global "
                "method.selection=authors: as in their --global_topk, every forward applies the held threshold and "
                f"method.threshold_every (now {self.threshold_every}) sets how often it is recomputed. Leave "
                "schedule.frequency at 1."
            )

    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        self.threshold_mem = None
        self.step_offset = 1 + ctx.schedule.step_offset  # the mask after step k is for their global_step k + 1 (+1 on SQuAD)

    def is_mask_step(self, step: int) -> bool:
        # their global threshold acts in every forward, the warm-up's -100 included
        return True if self.global_threshold else super().is_mask_step(step)

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        if not self.global_threshold:  # their TopKBinarizer: the top int(keep * n) of each matrix
            self.topk.mask_(scores, sanh_kept_count(self, scores.numel(), sparsity, step), out)
            return
        keep = sanh_keep(self, sparsity, step)
        if keep == 1.0:
            threshold = WARMUP_THRESHOLD
        elif self.threshold_mem is None or step is None or (step + self.step_offset) % self.threshold_every == 0:
            n = scores.numel()
            kth = max(n - (int(n * keep) + 1), 1)  # their kthvalue(kth): the kth smallest, i.e. the (n - kth + 1)-th largest
            self.threshold_mem = self.topk.kth_largest(scores, n - kth + 1)
            threshold = self.threshold_mem
        else:
            threshold = self.threshold_mem
        for start, n, _ in self.slices:  # global scope: `scores` and `out` are the whole flat buffers
            threshold_with_floor_(scores[start : start + n], threshold, out[start : start + n])

    def end_prune_stage(self) -> None:
        if self.global_threshold and not self.frozen:
            # their evaluate() drops the held threshold and recomputes it from the final scores
            # at final_threshold: the model evaluated (and kept) is that one, not the last
            # training forward's threshold of up to threshold_every - 1 steps before
            self.threshold_mem = None
            self.update_masks(self.sparsity, None)
        super().end_prune_stage()

    def init_state(self) -> None:
        scores = self.state["scores"]
        # One trainable Parameter per layer, each a view of the flat state buffer: the
        # optimizer updates the state in place and checkpoints save it with the other
        # state. (Slices of one flat Parameter would make autograd build a full-size
        # gradient per layer: 3.7x a dense step at BERT-base shape.)
        self.score_params = [nn.Parameter(scores[start : start + n].view(shape)) for start, n, shape in self.slices]
        init_scores_(self.score_params, self.score_init_mode, self.score_init)
        for w, p in zip(self.ctx.weights, self.score_params, strict=True):
            w.parametrization.bind(lambda p=p: p)

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.score_params:
            return []
        return [{"params": list(self.score_params), "pf_lr": self.score_lr, "weight_decay": 0.0}]

    def selection_scores(self) -> torch.Tensor:
        return self.state["scores"]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "threshold_mem": self.threshold_mem} if state else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold_mem = state.get("threshold_mem")

    def gradient_sources(self) -> list[torch.Tensor]:
        return list(self.score_params)  # the optimizer steps them from their gradients


class SoftMovement(Movement):
    name = "soft_movement"
    default_sparsity = None  # type: ignore[assignment]

    def __init__(self, cfg, sparsity: float | None) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)  # type: ignore[arg-type]
        self.final_threshold = _positive(cfg, "final_threshold", 0.1)
        if self.final_threshold >= 1:
            raise invalid("method.final_threshold", self.final_threshold, "a number in (0, 1) (the final threshold on sigmoid(scores))")
        self.final_lambda = _positive(cfg, "final_lambda", 400.0, allow_zero=True)
        self.tau = 0.0  # threshold of the current mask

    @classmethod
    def resolve_sparsity(cls, cfg, requested: float | None) -> float | None:  # noqa: ANN001
        if requested is not None:
            raise UserError(
                f"sparsity={requested} cannot be set for method=soft_movement: its sparsity follows from the L1 "
                "penalty (method.final_lambda) and the score threshold (method.final_threshold), as in Sanh et al. "
                "Leave sparsity unset (null) and tune method.final_lambda (their README: 400 with final_threshold 0.1)."
            )
        return None

    def schedule_target(self) -> float:
        return self.final_threshold

    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        self.tau = 0.0

    def threshold_at(self, level: float, step: int | None) -> float:
        """tau for the schedule's ``level`` at ``step``: on the cubic ramp in their
        schedule_threshold's order of operations, ``final + (0 - final) * c ** 3``; the
        schedule's algebraically equal ``final * (1 - c ** 3)`` differs in the last bit on
        about a quarter of the ramp's steps."""
        if self.on_ramp(level, step, "cubic"):
            return authors_cubic(0.0, self.final_threshold, self.ctx.schedule.progress(step))
        return float(level)

    @torch.no_grad()
    def update_masks(self, sparsity: float, step: int | None = None) -> None:
        """``sparsity`` is the schedule's value: here the threshold tau on sigmoid(S)."""
        self.tau = self.threshold_at(sparsity, step)
        scores = self.state["scores"]
        for start, n, _ in self.slices:
            threshold_with_floor_(scores[start : start + n], self.tau, self.mask_flat[start : start + n], sigmoid=True)

    def extra_loss(self) -> torch.Tensor | None:
        if self.frozen or not self.score_params or self.final_lambda == 0 or self.tau == 0:
            return None
        lam = self.final_lambda * self.tau / self.final_threshold
        means = [torch.sigmoid(p).mean() for p in self.score_params]
        return lam * torch.stack(means).mean()

    def lands_on_target(self) -> bool:
        return False

    def summary(self) -> dict[str, Any]:
        return {"final_threshold": self.final_threshold, "final_lambda": self.final_lambda}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tau = float(state.get("tau", 0.0))
