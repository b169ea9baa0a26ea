"""pruneflow methods inside other trainers: ``transformers.Trainer`` (here) and
Lightning (``pruneflow.integrations.lightning``). Both drive the same method classes
through :class:`pruneflow.api.Pruner`; nothing is implemented twice.

    from pruneflow.integrations import PruningCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[PruningCallback("seven", sparsity=0.7, start=100, steps=400)])
    trainer.train()            # dense for 100 steps, pruning for 400, then the masks stay frozen

Sparsity is logged as ``pruning/sparsity`` (counted from the weights) with the
Trainer's own logs; at the end of training the masks are removed, leaving plain
weights with the zeros in place (``keep_masks=True`` keeps the parametrizations).

Checkpoints saved inside or after the pruning window resume where they stopped: the
masked layers are stored under their parametrization names (``...parametrizations.
weight.original`` and the mask), which a freshly built model lacks, so on resume the
callback attaches the masks and loads those entries itself, with the method's state
(scores, masks, schedule position) from the file it writes beside the checkpoint
(``checkpoint-N/pruneflow_pruner.pt``; Lightning: the checkpoint's callback state).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pruneflow.api import Pruner, create
from pruneflow.errors import UserError
from pruneflow.utils import atomic_torch_save

log = logging.getLogger(__name__)

STATE_FILE = "pruneflow_pruner.pt"  # beside a transformers checkpoint: the method's state at that step

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

    def refuse_resume(self, step: int, why: str) -> None:
        start, steps = (self.start, self.steps) if self.pruner is not None else (self.start_setting, self.steps_setting)  # before plan()
        raise UserError(
            f"Resuming at step {step}, inside or after the pruning window (start={start}, steps={steps}), needs the "
            f"pruneflow state saved with that checkpoint, and {why}. The checkpoint stores the pruned layers as "
            "parametrizations (...parametrizations.weight.original and the masks) that a new model does not have, so their "
            f"weights were not loaded. Resume from a checkpoint this callback saved, train again from the start, or resume "
            f"from a checkpoint at step {start} or earlier."
        )

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a resume at ``step`` needs besides the model's own entries: the method's
        state (scores, masks, position) and the window it ran in."""
        return {"format": 1, "method": self.method, "start": self.start, "steps": self.steps, "step": step,
                "pruner": self.pruner.state_dict(), "steps_seen": self.pruner.steps_seen}

    def resume(self, step: int, model: torch.nn.Module, saved: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Attach the masks at a checkpoint inside or after the window and restore it: the
        masked layers' entries (``...parametrizations.weight.original`` and masks) from
        ``tensors``, the checkpoint's weights, and the method's state from ``saved``."""
        window = (saved.get("method"), saved.get("start"), saved.get("steps"), saved.get("step"))
        if window != (self.method, self.start, self.steps, step):
            self.refuse_resume(step, f"the state saved with it is of another run (method, start, steps, step = {window}; "
                                     f"this run: {(self.method, self.start, self.steps, step)})")
        self.pruner.attach(model, self.include, self.exclude)
        own = [k for k in model.state_dict() if ".parametrizations." in k]
        missing = [k for k in own if k not in tensors]
        if missing:
            self.refuse_resume(step, f"its weights lack {len(missing)} of the masked entries, e.g. {missing[0]} (include/exclude "
                                     "changed since it was saved?)")
        model.load_state_dict({k: tensors[k] for k in own}, strict=False)
        self.pruner.load_state_dict(saved["pruner"])
        self.pruner.steps_seen = int(saved["steps_seen"])
        log.info("pruneflow: resumed method=%s at step %d of the pruning window (start=%d, steps=%d), sparsity %.4f",
                 self.method, step - self.start, self.start, self.steps, self.pruner.sparsity)

    def maybe_attach(self, step: int, model: Any, optimizer: Any, scheduler: Any = None) -> None:  # noqa: ANN401
        if step != self.start or self.pruner.model is not None:
            return
        self.pruner.attach(model, self.include, self.exclude)
        self.add_groups(optimizer, scheduler)

    def add_groups(self, optimizer: Any, scheduler: Any = None) -> None:  # noqa: ANN401
        for group in self.pruner.param_groups():  # movement's scores, under the trainer's LR schedule
            optimizer.add_param_group(group)
            if scheduler is not None and hasattr(scheduler, "lr_lambdas") and hasattr(scheduler, "base_lrs"):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                scheduler.base_lrs.append(group["lr"])

    def clear_own_grads(self) -> None:
        """The method's own trainable tensors (movement's scores) are not the model's, so a
        trainer that zeroes the model's gradients (transformers: ``model.zero_grad()``) leaves
        theirs to add up over the steps; cleared here after each optimizer step."""
        if self.pruner is not None and self.pruner.model is not None:
            for group in self.pruner.method.param_groups():
                for param in group["params"]:
                    param.grad = None

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


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The model entries of a transformers checkpoint folder (safetensors, sharded or not,
    or ``pytorch_model.bin``)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {}


def plain_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint saved during the pruning window (a transformers ``checkpoint-N`` folder or
    a Lightning ``.ckpt`` file) as the plain weights of the model at that step: the masked
    layers' parametrization entries become ``<layer>.weight = original * mask``, so that
    ``model.load_state_dict(plain_weights(path))`` loads it into a freshly built model.
    (``from_pretrained`` on such a folder would leave those layers newly initialized.)"""
    from pruneflow.masking import strip_parametrization_names

    path = Path(path)
    if path.is_dir():
        tensors = checkpoint_tensors(path)
        if not tensors:
            raise UserError(f"{path} holds no model weights (model.safetensors, its shards, or pytorch_model.bin).")
    else:
        saved = torch.load(path, map_location="cpu", weights_only=False)  # a Lightning checkpoint pickles its hyperparameters
        tensors = saved.get("state_dict", saved) if isinstance(saved, dict) else {}
    return strip_parametrization_names(dict(tensors))


def split_own_groups(folder: Path, count: int) -> dict[str, Any] | None:
    """Move the method's optimizer groups (movement's scores: the last ``count``) out of the
    checkpoint's ``optimizer.pt``, and their entries out of ``scheduler.pt``'s per-group lists.
    A resumed Trainer builds its optimizer without them and loads that file before any callback
    runs, so torch would refuse it; the callback adds them back on resume. None: no optimizer
    was saved (``save_only_model``)."""
    opt_path, sched_path = folder / "optimizer.pt", folder / "scheduler.pt"
    if not opt_path.is_file():
        return None
    opt = torch.load(opt_path, map_location="cpu", weights_only=True)
    n = len(opt["param_groups"])
    own = opt["param_groups"][n - count:]
    ids = [i for g in own for i in g["params"]]
    moved: dict[str, Any] = {"groups": own, "state": {i: opt["state"][i] for i in ids if i in opt["state"]}, "scheduler": {}}
    opt["param_groups"] = opt["param_groups"][: n - count]
    opt["state"] = {i: v for i, v in opt["state"].items() if i not in moved["state"]}
    atomic_torch_save(opt, opt_path)
    if sched_path.is_file():
        sched = torch.load(sched_path, map_location="cpu", weights_only=True)
        for key, value in sched.items():
            if isinstance(value, list) and len(value) == n and key != "lr_lambdas":  # base_lrs, _last_lr, ...
                moved["scheduler"][key], sched[key] = value[n - count:], value[: n - count]
        if isinstance(sched.get("lr_lambdas"), list) and len(sched["lr_lambdas"]) == n:
            sched["lr_lambdas"] = sched["lr_lambdas"][: n - count]  # the callback appends the first group's again
        atomic_torch_save(sched, sched_path)
    return moved


def restore_own_groups(optimizer: Any, scheduler: Any, moved: dict[str, Any]) -> None:  # noqa: ANN401
    """The inverse of :func:`split_own_groups`, once the groups were added again (same order)."""
    full = optimizer.state_dict()
    count = len(moved["groups"])
    offset = len(full["param_groups"]) - count
    first = sum(len(g["params"]) for g in full["param_groups"][:offset])  # the ids the saved groups get now
    saved_ids = [i for g in moved["groups"] for i in g["params"]]
    renumber = dict(zip(saved_ids, range(first, first + len(saved_ids)), strict=True))
    full["param_groups"][offset:] = [{**g, "params": [renumber[i] for i in g["params"]]} for g in moved["groups"]]
    full["state"].update({renumber[i]: v for i, v in moved["state"].items()})
    optimizer.load_state_dict(full)
    groups = len(full["param_groups"])
    for key, values in moved.get("scheduler", {}).items():
        current = getattr(scheduler, key, None)
        if isinstance(current, list) and len(current) == groups - count:  # not extended by add_groups (_last_lr)
            current.extend(values)
        elif isinstance(current, list) and len(current) == groups:  # extended with the group's first value (base_lrs)
            current[groups - count:] = values


class PruningCallback(WindowCallback, TrainerCallback):
    """Run a pruneflow method inside a ``transformers.Trainer`` (settings: :class:`WindowCallback`)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.window.plan(int(state.max_steps))
        step = int(state.global_step)  # a resumed run has its checkpoint's step here
        if step > self.window.start:
            # transformers names its checkpoints checkpoint-<step> in output_dir; resume_from_checkpoint=True takes the last
            folder = Path(args.output_dir) / f"checkpoint-{step}"
            if not (folder / STATE_FILE).is_file():
                self.window.refuse_resume(step, f"there is none in {folder} (the callback looks where transformers writes its "
                                                f"checkpoints, <output_dir>/checkpoint-<step>: resume from a checkpoint there, or "
                                                f"set output_dir to the folder that holds the one you resume from)")
            tensors = checkpoint_tensors(folder)
            loaded = model.state_dict()
            # the folder must be the checkpoint transformers resumed from: its other weights are the ones it loaded
            differ = [k for k, v in tensors.items() if k in loaded and not torch.equal(loaded[k].cpu(), v.to(loaded[k].dtype))]
            if differ:
                self.window.refuse_resume(step, f"{folder} is not the checkpoint this run resumed from ({differ[0]} differs)")
            saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            self.window.resume(step, model, saved, tensors)
            if self.pruner.param_groups():  # movement's scores join the optimizer as at the window's start
                self.window.add_groups(optimizer, lr_scheduler)
                if saved.get("own_groups") is not None:  # None: no optimizer was saved, none is restored
                    restore_own_groups(optimizer, lr_scheduler, saved["own_groups"])

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if self.pruner is None or self.pruner.model is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():  # a hyperparameter search saves under run-<trial> folders
            log.warning("pruneflow: no checkpoint folder %s, so the pruning state of step %d was not saved: a resume from "
                        "this checkpoint will be refused.", folder, state.global_step)
            return
        saved = self.window.state_dict(int(state.global_step))
        count = len(self.pruner.param_groups())
        if count:
            saved["own_groups"] = split_own_groups(folder, count)
        atomic_torch_save(saved, folder / STATE_FILE)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.window.maybe_attach(int(state.global_step), model, optimizer, lr_scheduler)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        # after optimizer.step(), before zero_grad(): the method reads this step's gradients
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # fp16 overflow
        self.window.after_step(int(state.global_step), grads_finite=not skipped)
        self.window.clear_own_grads()


    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        # The window has just ended (masks final), before this step's evaluation: the best model
        # (load_best_model_at_end, metric_for_best_model) is one at the final sparsity. An earlier
        # best would be a denser model, or, saved before the window, one whose pruned layers
        # transformers cannot load into the masked model: it would load the rest over the last step's.
        end = self.window.start + self.window.steps
        best_step = getattr(state, "best_global_step", None)  # transformers >= 4.51
        if int(state.global_step) == end and (state.best_metric is not None or best_step is not None):
            log.info("pruneflow: the pruning window ended at step %d; the best evaluation before it (step %s, %s) no longer "
                     "counts for the best model, which is chosen among the evaluations at the final sparsity.", end,
                     best_step, state.best_metric)
            state.best_metric = state.best_model_checkpoint = None
            if best_step is not None:
                state.best_global_step = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        sparsity = self.window.sparsity_now()
        if sparsity is not None and logs is not None:
            logs["pruning/sparsity"] = sparsity
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["pruning/sparsity"] = sparsity

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.remove_masks()


__all__ = ["PruningCallback", "PruningWindow", "WindowCallback", "plain_weights"]
