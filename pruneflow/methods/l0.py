"""L0 regularization (Louizos, Welling & Kingma, ICLR 2018: hard-concrete gates) as
Sanh, Wolf & Rush run it as a baseline of movement pruning (NeurIPS 2020; their code:
``transformers`` ``examples/research_projects/movement-pruning``, ``emmental``
``MaskedLinear(pruning_method="l0")`` and ``regularization(mode="l0")`` of
``masked_run_glue.py`` / ``masked_run_squad.py``).

Every prunable weight W has a trainable score S (``method.score_init``: their
``--mask_init constant --mask_scale 2.197``), trained by the run's optimizer at
``method.score_lr`` (their ``--mask_scores_learning_rate 1e-1``) without weight decay,
under the same LR schedule and gradient clipping as the weights. With their constants
l = -0.1, r = 1.1, beta = 2/3:

* training forward: ``W * z`` with a fresh sample per forward, ``u ~ U(0, 1)`` clamped
  to [1e-4, 1 - 1e-4] (the global RNG, as their ``uniform_()``),
  ``z = clamp(sigmoid((log u - log(1 - u) + S) / beta) * (r - l) + l, 0, 1)``: a
  continuous gate, differentiated by plain autograd (no straight-through estimator);
* evaluation forward: ``W * clamp(sigmoid(S) * (r - l) + l, 0, 1)`` (no noise, no beta);
* loss: ``task + lambda_t * mean over matrices of mean(sigmoid(S - beta * log(-l / r)))``,
  the expected fraction of non-zero gates of each matrix, averaged over matrices;
  ``lambda_t = final_lambda * threshold_t / final_threshold`` with their threshold
  running from ``initial_threshold`` to ``final_threshold`` on the cubic schedule (the
  threshold has no other use for L0). Their README's command sets both to 1: a
  constant ``lambda = final_lambda`` (125), and then no ``schedule.*`` setting is used.

The sparsity is not set directly: ``final_lambda`` decides it. At the end of the prune
stage the evaluation gate is folded into the weights (W <- W * gate, their
``bertarize.py``) and the weights whose gate is 0 are pruned with a 0/1 mask (their
``counts_parameters.py`` counts ``gate > 0`` as remaining), frozen for the recover stage
and the saved model: the model after the prune stage is exactly their evaluated model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow import distributed
from pruneflow.errors import UserError, invalid
from pruneflow.masking import Mask
from pruneflow.methods.base import PruneContext, PruningMethod
from pruneflow.methods.movement import (
    check_score_init_shapes,
    init_scores_,
    score_init_mode,
    score_init_unused,
)
from pruneflow.schedules import Schedule

# Their MaskedLinear's hard-concrete constants: the stretch interval (l, r) and the temperature.
LEFT, RIGHT, BETA = -0.1, 1.1, 2.0 / 3.0
U_EPS = 1e-4  # u is clamped to [eps, 1 - eps] so that log u and log(1 - u) stay finite
# P(gate != 0) = sigmoid(S - beta * log(-l / r)) (Louizos et al., eq. 12)
L0_SHIFT = BETA * math.log(-LEFT / RIGHT)


def hard_concrete(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The training gate for uniform noise ``u`` (already clamped)."""
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + scores) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def eval_gate(scores: torch.Tensor) -> torch.Tensor:
    """The deterministic gate of evaluation and of the final model."""
    return (torch.sigmoid(scores) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def expected_l0(scores: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matrices of each matrix's expected fraction of non-zero gates."""
    total = sum(torch.sigmoid(s - L0_SHIFT).sum() / s.numel() for s in scores)
    return total / len(scores)  # type: ignore[return-value]


class HardConcreteMask(Mask):
    """Parametrization ``W -> W * gate(S)``: a hard-concrete sample in training mode, the
    deterministic gate in eval mode, the stored 0/1 ``mask`` once frozen (after the prune
    stage; same state-dict keys as a plain ``Mask``). The scores live in the method;
    ``bind`` gives this layer its view."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask)
        self.frozen = False

    def bind(self, scores: Any) -> None:  # noqa: ANN401 - a callable returning this layer's score view
        self.__dict__["_scores"] = scores  # not a submodule/parameter: the method owns and saves the scores

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scores = self.__dict__.get("_scores")
        if self.frozen or scores is None:
            return weight * self.mask
        s = scores()
        if self.training:
            u = torch.empty_like(s).uniform_().clamp_(U_EPS, 1 - U_EPS)
            gate = hard_concrete(s, u)
        else:
            gate = eval_gate(s)
        return weight * gate.to(weight.dtype)


def _number(cfg: DictConfig, key: str, default: float, minimum: float | None = None, strict: bool = False, why: str = "") -> float:
    v = cfg.get(key, default)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and minimum is not None:
        ok = v > minimum if strict else v >= minimum
    if not ok:
        allowed = "a number" if minimum is None else f"a number {'>' if strict else '>='} {minimum:g}"
        raise invalid(f"method.{key}", v, allowed, why)
    return float(v)


class L0(PruningMethod):
    name = "l0"
    default_sparsity = None  # type: ignore[assignment]

    def __init__(self, cfg: DictConfig, sparsity: float | None) -> None:
        super().__init__(cfg, sparsity)  # type: ignore[arg-type]
        self.final_lambda = _number(cfg, "final_lambda", 125.0, 0.0, why="The weight of the expected-L0 penalty (their README: 125).")
        self.initial_threshold = _number(cfg, "initial_threshold", 1.0, 0.0,
                                         why="Lambda starts at final_lambda * initial_threshold / final_threshold.")
        self.final_threshold = _number(cfg, "final_threshold", 1.0, 0.0, strict=True,
                                       why="The penalty weight is final_lambda * threshold_t / final_threshold.")
        self.score_lr = _number(cfg, "score_lr", 0.1, 0.0, strict=True, why="The scores' learning rate (their --mask_scores_learning_rate: 1e-1).")
        self.score_init = _number(cfg, "score_init", 2.197, why="Every score starts at it (their --mask_scale 2.197).")
        self.score_init_mode = score_init_mode(cfg)
        self.ramps = self.initial_threshold != self.final_threshold
        self.score_param: torch.Tensor | None = None  # every score, flat (saved in checkpoints)
        self.score_params: list[nn.Parameter] = []  # the trainable per-layer views of it
        self.slices: list[tuple[int, int, torch.Size]] = []
        self.step = 0  # optimizer steps taken in the prune stage: the schedule position of the next loss
        self.frozen = False
        self.final: dict[str, Any] = {}  # gate statistics at the end of the prune stage
        self.penalized = False  # extra_loss() was asked for since the last optimizer step

    # --- configuration -----------------------------------------------------------------
    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float | None:  # type: ignore[override]
        if requested is not None:
            raise UserError(
                f"sparsity={requested} cannot be set for method=l0: its sparsity follows from the expected-L0 "
                "penalty (method.final_lambda), as in Sanh et al.'s L0 regularization baseline. Leave sparsity "
                "unset (null) and tune method.final_lambda (their README: 125); a larger lambda prunes more."
            )
        return None

    def schedule_target(self) -> float:
        # The schedule only shapes lambda's ramp: 0 -> 1 is the fraction of the way from
        # initial_threshold to final_threshold; with equal thresholds nothing follows it.
        return 1.0 if self.ramps else 0.0

    def validate(self, model: nn.Module, weights: Any) -> None:  # noqa: ANN401
        super().validate(model, weights)
        check_score_init_shapes(self.score_init_mode, weights)

    def unused_settings(self, cfg: DictConfig) -> list[tuple[str, str]]:
        unused = score_init_unused(self.score_init_mode)
        if not self.ramps:
            return [*unused, ("schedule", "method=l0 with method.initial_threshold == method.final_threshold (their README's "
                                 "L0 command: 1 and 1) has a constant penalty weight final_lambda and no mask schedule")]
        return [*unused, ("schedule.frequency", "method=l0 updates lambda at every step, as their schedule_threshold")]

    def check_schedule(self, schedule: Schedule) -> None:
        if self.ramps and schedule.kind == "exponential":
            raise invalid("schedule", "exponential", "cubic (theirs), linear, oneshot",
                          "method=l0 ramps lambda from initial_threshold to final_threshold; an exponential "
                          "sparsity schedule has no meaning for that ramp.")

    # --- prune stage ---------------------------------------------------------------------
    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        weights = ctx.weights
        weights.attach(HardConcreteMask)
        first = weights.weights[0].param
        self.slices, start = [], 0
        for w in weights:
            self.slices.append((start, w.numel(), w.shape))
            start += w.numel()
        # One flat fp32 tensor (whatever the weights' dtype); each layer trains a Parameter
        # that is a view of it (slices of one flat Parameter would make autograd build a
        # full-size gradient per layer).
        self.score_param = torch.full((start,), self.score_init, dtype=torch.float32, device=first.device)
        self.score_params = [nn.Parameter(self.score_param[s : s + n].view(shape)) for s, n, shape in self.slices]
        init_scores_(self.score_params, self.score_init_mode, self.score_init)
        for i, w in enumerate(weights):
            w.parametrization.bind(lambda i=i: self.score_view(i))
        self.step = 0
        self.frozen = False
        self.final = {}
        self.penalized = False
        self.refresh_masks()

    def score_view(self, i: int) -> torch.Tensor:
        return self.score_params[i]

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.score_params:
            return []
        return [{"params": list(self.score_params), "pf_lr": self.score_lr, "weight_decay": 0.0}]

    def threshold(self, step: int) -> float:
        """Their threshold at optimizer step ``step`` (0-based): the schedule's value after
        step - 1, so that the ramp lines up with their ``schedule_threshold(step)``."""
        if not self.ramps:
            return self.final_threshold
        frac = 0.0 if step == 0 else self.ctx.schedule.sparsity(step - 1)
        return self.initial_threshold + (self.final_threshold - self.initial_threshold) * frac

    def regu_lambda(self, step: int) -> float:
        return self.final_lambda * self.threshold(step) / self.final_threshold

    def extra_loss(self) -> torch.Tensor | None:
        if self.frozen or self.score_param is None:
            return None
        self.penalized = True
        lam = self.regu_lambda(self.step)
        if lam == 0:
            return None
        return lam * expected_l0([self.score_view(i) for i in range(len(self.slices))])

    def after_backward(self, step: int, grads_finite: bool = True) -> None:
        # torchrun: pruneflow's trainer averages the scores with the model; a user's DDP
        # loop (pruneflow.methods.create) averages only the model's, and unaveraged scores
        # (and so the gates) would differ per rank. A second mean of equal values is a no-op.
        if not self.frozen and self.score_params:
            distributed.average_gradients(self.score_params)

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Mask buffers = the evaluation gate of the current scores, so that reading the
        model's state (``pruneflow.sparsity_report``, checkpoints) during the prune stage
        shows the model as it evaluates. The forward computes its gate from the scores."""
        for i, w in enumerate(self.ctx.weights):
            w.mask.copy_(eval_gate(self.score_view(i)))

    def after_optimizer_step(self, step: int, grads_finite: bool = True) -> None:
        if self.frozen:
            return
        if not self.penalized and self.regu_lambda(self.step) > 0:
            # Without its penalty L0 would train the gates on the task loss alone and silently
            # not prune (e.g. inside a trainer callback, which cannot add a loss term).
            raise UserError(
                "method=l0 adds its expected-L0 penalty to the loss, but extra_loss() was not called before this "
                "optimizer step. In your own loop add pruner.extra_loss() to the loss before backward() "
                "(pruneflow.methods.create('l0', ...)); the trainer callbacks cannot add a loss term."
            )
        self.penalized = False
        self.step = step + 1  # their global_step advances on every step, skipped fp16 steps included
        self.refresh_masks()

    @torch.no_grad()
    def end_prune_stage(self) -> None:
        """Fold the evaluation gate into the weights and freeze the 0/1 mask (gate > 0).
        A resumed run whose prune stage had ended only re-freezes: the folded weights and
        masks come back with the model's state."""
        if self.ctx is None:
            return
        weights = self.ctx.weights
        if not self.frozen:
            kept = partial = total = 0
            for i, w in enumerate(weights):
                gate = eval_gate(self.score_view(i))
                w.param.mul_(gate.to(w.param.dtype))
                w.mask.copy_(gate > 0)
                kept += int((gate > 0).sum())
                partial += int(((gate > 0) & (gate < 1)).sum())
                total += gate.numel()
            self.final = {"kept_fraction": kept / max(total, 1), "scaled_fraction": partial / max(total, 1)}
        self.frozen = True
        for w in weights:
            if isinstance(w.parametrization, HardConcreteMask):
                w.parametrization.frozen = True

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"final_lambda": self.final_lambda, "initial_threshold": self.initial_threshold,
                               "final_threshold": self.final_threshold}
        if self.final:
            # kept: gate > 0 (their count); scaled: kept weights whose gate was in (0, 1), folded into W
            out["gates"] = {k: round(v, 6) for k, v in self.final.items()}
        return out

    # --- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.score_param is None:  # before the prune stage
            return {}
        return {"scores": self.score_param.detach().cpu(), "step": self.step, "frozen": self.frozen, "final": dict(self.final)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scores" in state and self.score_param is not None:
            with torch.no_grad():
                self.score_param.copy_(state["scores"])
        self.step = int(state.get("step", 0))
        self.frozen = bool(state.get("frozen", False))
        self.final = dict(state.get("final", {}))
        if self.ctx is None:
            return
        if self.frozen:  # the folded weights and 0/1 masks come with the model's state
            for w in self.ctx.weights:
                if isinstance(w.parametrization, HardConcreteMask):
                    w.parametrization.frozen = True
        else:
            self.refresh_masks()
