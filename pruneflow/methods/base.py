"""The interface every pruning method implements.

The training loop (``pruneflow.trainer``) calls a method at a few fixed points;
the schedule (``pruneflow.schedules``) says how sparse the model must be; masks
are applied by ``pruneflow.masking``. A method only decides *which* weights.

Call order in the prune stage::

    method.setup(ctx)                       # once, after the finetune stage
    optimizer gets method.param_groups()    # trainable method state (movement scores)
    if not method.run_prune_stage(ctx):     # methods with their own loop return True
        for step in range(ctx.total_steps): # the trainer's loop
            loss = task_loss + method.extra_loss()
            loss.backward()
            method.after_backward(step, grads_finite)        # gradients ready, before clipping
            clip gradients; optimizer.step()
            method.after_optimizer_step(step, grads_finite)  # new weights, gradients still there
            optimizer.zero_grad()
    method.end_prune_stage()                # masks final and frozen from here on
    model = method.finalize(model)          # e.g. physical compression (SPP)

``grads_finite`` is False on a step whose fp16 gradients overflowed (the gradient
scaler skips that optimizer step): a method must not feed those gradients into
its scores. The recover stage trains with the masks frozen: the parametrization
keeps pruned entries at exactly zero, no method call is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow.masking import MaskedWeights
from pruneflow.schedules import Schedule

if TYPE_CHECKING:
    from pruneflow.tasks.base import Task

log = logging.getLogger("pruneflow")


@dataclass
class PruneContext:
    """What a method may use during the prune stage."""

    model: nn.Module
    weights: MaskedWeights  # the prunable weights (masks not yet attached at setup)
    schedule: Schedule
    sparsity: float
    total_steps: int  # steps of the prune stage
    device: torch.device
    task: Task | None = None
    # Yields training batches (already on the device), endlessly, in the run's seeded order;
    # a run's batches(start_step) starts at that batch of the order (a resumed loop; the
    # Python API's take no argument, as it writes no checkpoints).
    batches: Callable[..., Iterator[dict[str, torch.Tensor]]] | None = None
    # loss(model, batch) -> scalar; used by methods that run their own loop.
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
    run_dir: Path | None = None
    cache_dir: Path | None = None
    cache_key: dict[str, Any] = field(default_factory=dict)  # what the finetuned model depends on
    extra: dict[str, Any] = field(default_factory=dict)


class PruningMethod:
    """Base class: a method that does nothing (``dense``)."""

    name: ClassVar[str] = "base"
    #: sparsity used when the user leaves ``sparsity=null``
    default_sparsity: ClassVar[float] = 0.7
    #: False for ``dense``: no prune stage, no masks
    prunes: ClassVar[bool] = True
    #: False for methods whose prune stage does not train the weights (``seven_pre``
    #: scores without updates; SPP's search trains only its masks)
    updates_weights: ClassVar[bool] = True
    #: True for methods that can also prune without weight updates when asked
    #: (``stages.prune.update_weights=false``: pruning at initialisation)
    scores_without_updates: ClassVar[bool] = False
    #: False when ``finalize`` rebuilds layers (SPP), so no optimizer state can carry over
    keeps_architecture: ClassVar[bool] = True
    #: the prune stage's forward passes run with the model in eval mode (no dropout, batch
    #: norm on running statistics): SNIP's authors score with ``is_train=False`` (``method.eval_mode``)
    prune_in_eval_mode: bool = False

    def __init__(self, cfg: DictConfig, sparsity: float) -> None:
        self.cfg = cfg
        self.sparsity = sparsity
        self.ctx: PruneContext | None = None

    # --- configuration -----------------------------------------------------
    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float:
        """The sparsity the run targets; methods whose sparsity follows from their
        settings (ADMM's N:M pattern) override this and reject a conflicting value."""
        return cls.default_sparsity if requested is None else float(requested)

    def plan_stages(self, steps: dict[str, int], steps_per_epoch: int, task_name: str) -> dict[str, int]:
        """Adjust stage lengths in optimizer steps (``finetune``/``prune``/``recover``),
        e.g. SEVEN's per-task presets or ADMM's iterations x epochs. Called before
        the schedule is validated."""
        return steps

    def check_schedule(self, schedule: Schedule) -> None:
        """Raise ``UserError`` for schedule settings the method cannot honour."""

    def unused_settings(self, cfg: DictConfig) -> list[tuple[str, str]]:
        """(key prefix, why) of settings this method does not use with this config: setting
        one is an error rather than silently ignored."""
        return []

    def schedule_target(self) -> float:
        """What the sparsity schedule ramps to (soft movement: its score threshold)."""
        return self.sparsity

    def has_scoring_loss(self) -> bool:
        """Whether the prune stage's loss is ``scoring_loss`` instead of the task's."""
        return False

    def scoring_loss(self, task: Any, bundle: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN401
        """The prune stage's loss when ``has_scoring_loss()`` (FORCE's ``scoring_loss=target_logit``)."""
        raise NotImplementedError

    def check_task(self, task: Any) -> None:  # noqa: ANN401
        """Raise ``UserError`` for settings that cannot work with this task: called before
        any data is read, and again once the training set is loaded, before training."""

    def validate(self, model: nn.Module, weights: MaskedWeights) -> None:
        """Raise ``UserError`` for settings that cannot work with this model. May
        narrow ``weights`` in place (structured granularity keeps the weights its
        heads/neurons own); the sparsity denominator is the set left after this."""

    # --- prune stage ---------------------------------------------------------
    def setup(self, ctx: PruneContext) -> None:
        self.ctx = ctx

    def run_prune_stage(self, ctx: PruneContext) -> bool:
        """Return True if the method ran the whole prune stage itself."""
        return False

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the method's own trainable tensors, created by ``setup``
        (``{"params": [...], "pf_lr": base_lr, "weight_decay": ...}``)."""
        return []

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def use_zeroed_masks(self) -> bool:
        """Called before ``setup`` by loops that run ``after_backward`` before clipping and
        the optimizer step and ``after_optimizer_step`` after it (pruneflow's trainer): a
        method may then keep pruned weights at zero in place instead of masking every
        forward pass. Returns whether it did; by default nothing changes."""
        return False

    def after_backward(self, step: int, grads_finite: bool = True) -> None:
        pass

    def after_optimizer_step(self, step: int, grads_finite: bool = True) -> None:
        pass

    def end_prune_stage(self) -> None:
        pass

    def finalize(self, model: nn.Module) -> nn.Module:
        """Last chance to change the model before recovery/saving (SPP compresses)."""
        return model

    def summary(self) -> dict[str, Any]:
        """Extra, method-specific entries for result.json (under ``method_info``)."""
        return {}

    def current_sparsity(self) -> float | None:
        """The pruned share of the prunable weights under the current masks, for
        evaluations during training (None: this method keeps no such masks)."""
        weights = self.ctx.weights if getattr(self, "ctx", None) is not None else None
        if weights is None or not len(weights) or not weights.attached:
            return None
        return weights.sparsity()

    # --- resume ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
