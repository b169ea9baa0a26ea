"""pruneflow methods inside other trainers: ``transformers.Trainer`` (here) and
Lightning (``pruneflow.integrations.lightning``). Both drive the same method classes
through :class:`pruneflow.api.Pruner`; nothing is implemented twice.

    from pruneflow.integrations import PruningCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[PruningCallback("seven", sparsity=0.7, start=100, steps=400)])
    trainer.train()            # dense for 100 steps, pruning for 400, then the masks stay frozen

Sparsity is logged as ``pruning/sparsity`` (counted from the weights) with the
Trainer's own logs; at the end of training the masks are removed, leaving plain
weights with the zeros in place (``keep_masks=True`` keeps the parametrizations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pruneflow.api import Pruner, create
from pruneflow.errors import UserError

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[misc,assignment]

# Methods whose pruning needs its own loop or a loss term the callback cannot add.
UNSUPPORTED = {
    "spp": "its search is its own loop: use pruneflow.methods.create('spp', ...).run(lr=...)",
    **{m: f"it scores without weight updates: use pruneflow.methods.create('{m}', ...) in a loop without optimizer.step()"
       for m in ("seven_pre", "snip", "grasp", "force")},
    "admm": "it adds a penalty to the loss: call pruner.extra_loss() in your own compute_loss (pruneflow.methods.create)",
    "l0": "it adds the expected-L0 penalty to the loss: call pruner.extra_loss() in your own compute_loss (pruneflow.methods.create)",
    "soft_movement": "it adds an L1 term to the loss: call pruner.extra_loss() in your own compute_loss (pruneflow.methods.create)",
}


def _steps(value: int | float, total: int, key: str) -> int:
    """An int is a number of optimizer steps, a float a fraction in [0, 1] of the run's
    ``total`` steps (``steps=1.0``: all of them; before, 1.0 meant one step and 2.5 two)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (isinstance(value, float) and value > 1):
        raise UserError(f"Invalid value for '{key}': {value!r}. Allowed: an int, a number of optimizer steps, or a float in "
                        "[0, 1], a fraction of the training steps (1.0: all of them).")
    return int(round(value * total)) if isinstance(value, float) else int(value)


class PruningWindow:
    """The part both callbacks share: dense until ``start``, ``steps`` pruning steps, frozen masks after."""

    def __init__(self, method: str, sparsity: float | None, start: int | float, steps: int | float,
                 include: Sequence[str] | None, exclude: Sequence[str] | None, schedule: dict[str, Any] | None, settings: dict[str, Any]) -> None:
        if method in UNSUPPORTED:
            raise UserError(f"method={method} cannot run inside a trainer callback: {UNSUPPORTED[method]}.")
        self.method, self.sparsity, self.start_setting, self.steps_setting = method, sparsity, start, steps
        self.include, self.exclude, self.schedule, self.settings = include, exclude, dict(schedule or {}), settings
        self.pruner: Pruner | None = None
        self.start = self.steps = 0

    def plan(self, total_steps: int) -> None:
        self.start = _steps(self.start_setting, total_steps, "start")
        self.steps = _steps(self.steps_setting, total_steps, "steps")
        if self.steps < 1 or self.start + self.steps > total_steps:
            raise UserError(
                f"The pruning window (start={self.start}, steps={self.steps}) does not fit in the {total_steps} training steps: "
                "the target sparsity would never be reached. Shorten the window or train longer."
            )
        # built now so that a bad setting fails before any training
        self.pruner = create(self.method, self.sparsity, self.steps, **self.schedule, **self.settings)

    def check_resume(self, step: int) -> None:
        """A run resumed from a checkpoint saved inside or after the pruning window: the
        checkpoint holds the masked weights under parametrization names that a fresh model
        lacks, so the trainer loaded none of them (transformers only warns). Refused rather
        than pruning a model that silently lost its training."""
        if step > self.start and (self.pruner is None or self.pruner.model is None):
            raise UserError(
                f"Resuming at step {step}, inside or after the pruning window (start={self.start}, steps={self.steps}), is not "
                "supported by the pruneflow callback: the checkpoint stores the pruned layers as parametrizations "
                "(...parametrizations.weight.original and the masks) that the new model does not have, so their weights were "
                f"not loaded. Train again from the start, or resume from a checkpoint at step {self.start} or earlier."
            )

    def maybe_attach(self, step: int, model: Any, optimizer: Any, scheduler: Any = None) -> None:  # noqa: ANN401
        if step != self.start or self.pruner.model is not None:
            return
        self.pruner.attach(model, self.include, self.exclude)
        for group in self.pruner.param_groups():  # movement's scores, under the trainer's LR schedule
            optimizer.add_param_group(group)
            if scheduler is not None and hasattr(scheduler, "lr_lambdas") and hasattr(scheduler, "base_lrs"):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                scheduler.base_lrs.append(group["lr"])

    def after_step(self, step: int, grads_finite: bool = True) -> None:
        k = step - self.start
        if self.pruner is None or self.pruner.model is None or not 0 <= k < self.steps:
            return
        self.pruner.after_optimizer_step(k, grads_finite=grads_finite)
        if k == self.steps - 1:
            self.pruner.end()

    def sparsity_now(self) -> float | None:
        return self.pruner.sparsity if self.pruner is not None and self.pruner.model is not None else None


class WindowCallback:
    """The constructor and the end of training both callbacks share.

    ``start`` / ``steps``: the pruning window in optimizer steps (or fractions of the
    training steps); ``schedule``: ``{"schedule": "cubic", "initial_warmup": 0, ...}``;
    other keyword arguments are the method's settings (``alpha_1=0.8``, ``scope="local"``...).
    """

    def __init__(self, method: str, sparsity: float | None = None, start: int | float = 0, steps: int | float = 0.5,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 schedule: dict[str, Any] | None = None, keep_masks: bool = False, **settings: Any) -> None:  # noqa: ANN401
        self.window = PruningWindow(method, sparsity, start, steps, include, exclude, schedule, settings)
        self.keep_masks = keep_masks

    @property
    def pruner(self) -> Pruner | None:
        return self.window.pruner

    def remove_masks(self) -> None:
        """Plain weights with the zeros in place, unless ``keep_masks``."""
        if self.pruner is not None and self.pruner.model is not None and not self.keep_masks:
            self.pruner.remove()


class PruningCallback(WindowCallback, TrainerCallback):
    """Run a pruneflow method inside a ``transformers.Trainer`` (settings: :class:`WindowCallback`)."""

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.window.plan(int(state.max_steps))
        self.window.check_resume(int(state.global_step))  # a resumed run has its checkpoint's step here

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.window.maybe_attach(int(state.global_step), model, optimizer, lr_scheduler)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        # after optimizer.step(), before zero_grad(): the method reads this step's gradients
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # fp16 overflow
        self.window.after_step(int(state.global_step), grads_finite=not skipped)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        sparsity = self.window.sparsity_now()
        if sparsity is not None and logs is not None:
            logs["pruning/sparsity"] = sparsity
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["pruning/sparsity"] = sparsity

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.remove_masks()


__all__ = ["PruningCallback", "PruningWindow", "WindowCallback"]
