"""Use a pruneflow method from your own training code.

The same method classes the ``pruneflow`` command runs, driven from any loop::

    pruner = pruneflow.methods.create("seven", sparsity=0.7, steps=1000, model=model)
    for g in pruner.param_groups():            # movement pruning's scores (others: none)
        optimizer.add_param_group(g)
    for step in range(1000):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        pruner.after_optimizer_step(step)      # scores from this step's gradients, then the mask
        optimizer.zero_grad()
    model = pruner.end()                       # masks frozen (SPP: compressed)
    ...                                        # go on training: pruned weights stay zero
    pruner.remove()                            # plain weights with the zeros in place
    print(pruneflow.sparsity_report(model))

Settings are the method's config keys (``conf/method/<name>.yaml``) and are
checked as on the command line; the sparsity schedule is ``schedule`` (cubic,
linear, exponential, oneshot) over ``steps`` with ``initial_warmup`` /
``final_warmup`` / ``frequency`` (``step_offset``: how far the schedule's step counter
runs ahead of the loop's, 1 for masked_run_squad.py's global_step).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from omegaconf import ListConfig, OmegaConf
from torch import nn

import pruneflow
from pruneflow.errors import UserError
from pruneflow.masking import (
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    MaskedWeights,
    select_prunable,
    strip_parametrization_names,
)
from pruneflow.methods.base import PruneContext, PruningMethod
from pruneflow.schedules import KINDS, Schedule

log = logging.getLogger(__name__)

CONF = pruneflow.CONFIG_DIR


def method_config(name: str, settings: dict[str, Any]) -> Any:  # noqa: ANN401
    """The method's packaged defaults merged with ``settings``; an unknown key is an error
    that lists the valid ones (closest first)."""
    from pruneflow.methods import METHODS, unregistered_hint

    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = unregistered_hint(name)
        raise UserError(f"Unknown method '{name}'. Allowed: {', '.join(sorted(METHODS))}." + (f" Did you mean {close[0]}?" if close else "")
                        + (f" {hint}" if hint else ""))
    path = CONF / "method" / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"method={name} is in METHODS but has no config: create conf/method/{name}.yaml with its settings "
                        f"(at least `name: {name}`), as the README's \"Adding a method\" shows.")
    cfg = OmegaConf.load(path)
    for key in settings:
        if key not in cfg:
            close = difflib.get_close_matches(key, [str(k) for k in cfg], n=1)
            raise UserError(
                f"Unknown setting '{key}' for method={name}. Allowed: {', '.join(str(k) for k in cfg if k != 'name')}."
                + (f" Did you mean {close[0]}?" if close else "")
            )
    from pruneflow.validation import refuse_non_finite

    merged = OmegaConf.merge(cfg, OmegaConf.create(settings))
    refuse_non_finite(merged, "method")  # nan and inf pass range checks written as comparisons
    return merged


# Methods whose scores need no data: end() right after create() is one-shot pruning.
DATA_FREE = ("magnitude", "random", "dense")


class Pruner:
    """One method attached to one model; call it where the pruneflow trainer does."""

    def __init__(self, method: PruningMethod, schedule: Schedule, steps: int) -> None:
        self.method = method
        self.schedule = schedule
        self.steps = steps
        self.model: nn.Module | None = None
        self.weights: MaskedWeights | None = None
        self.ended = False
        self.warned_mode = False
        self.steps_seen = 0  # after_optimizer_step calls before end()
        self.ran = False  # run(): the method's own loop

    def _attached(self, call: str) -> None:
        if self.model is None:
            raise UserError(f"pruner.{call} before pruner.attach(model): the pruner has no model yet. Pass the model when "
                            f"creating it (pruneflow.methods.create({self.method.name!r}, ..., model=model)) or call "
                            "pruner.attach(model) first.")

    # -- attaching -------------------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        batches: Callable[[], Iterator[Any]] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> Pruner:
        """Select the prunable weights (shell-style module-name patterns; default: every
        Linear of the encoder blocks) and start pruning. ``batches`` / ``loss_fn`` are
        needed only by methods with their own loop (SPP's search: :meth:`run`)."""
        if not isinstance(model, nn.Module):
            raise UserError(f"Invalid value for 'model': a {type(model).__name__}. Allowed: a torch.nn.Module (the model itself, "
                            "not its name).")
        cfg = self.method.cfg
        include = patterns(include, "include") or list(cfg.get("include") or DEFAULT_INCLUDE)
        exclude = patterns(exclude, "exclude") or list(cfg.get("exclude") or DEFAULT_EXCLUDE)
        weights = MaskedWeights(select_prunable(model, include, exclude, biases=bool(cfg.get("biases", False))))
        if self.method.prunes and not len(weights):
            raise UserError(f"No prunable weights: no nn.Linear in the model matches include={include} (minus exclude={exclude}).")
        self.method.validate(model, weights)
        if self.method.has_scoring_loss():
            raise UserError(f"method={self.method.name}'s scoring_loss replaces the loss of the scoring steps, which your loop "
                            "computes: leave it at 'task' and compute that loss yourself (FORCE's authors: F.nll_loss of the raw logits).")
        if batches is not None and not callable(batches):
            raise UserError(f"batches={type(batches).__name__} object: pass a function that returns a fresh iterator over your "
                            "batches on every call, e.g. batches=lambda: iter(loader) (it is called again for every pass).")
        device = next(model.parameters()).device
        ctx = PruneContext(model=model, weights=weights, schedule=self.schedule, sparsity=self.method.sparsity,
                           total_steps=self.steps, device=device, batches=None if batches is None else endless(batches),
                           loss_fn=loss_fn)
        self.method.setup(ctx)
        self.model, self.weights = model, weights
        return self

    def param_groups(self, lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer groups for the method's own trainable tensors (movement pruning's
        scores, with their learning rate): add them with ``optimizer.add_param_group``."""
        self._attached("param_groups()")
        out = []
        for g in self.method.param_groups():
            group = {k: v for k, v in g.items() if k != "pf_lr"}
            group["lr"] = float(g["pf_lr"]) * lr_scale
            out.append(group)
        return out

    # -- the training loop's hooks -------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        """Add to the loss before ``backward()`` (ADMM's penalty, soft movement's L1 term)."""
        self._attached("extra_loss()")
        return self.method.extra_loss()

    def after_backward(self, step: int, grads_finite: bool = True) -> None:
        self._attached("after_backward()")
        self.method.after_backward(step, grads_finite=grads_finite)

    def after_optimizer_step(self, step: int, grads_finite: bool = True) -> None:
        """After ``optimizer.step()`` and before ``zero_grad()`` (the method reads this
        step's gradients); ``grads_finite=False`` on a step skipped by an fp16 scaler."""
        self._attached("after_optimizer_step()")
        if self.method.prune_in_eval_mode and not self.ended and self.model.training and not self.warned_mode:
            # the loop is the caller's, so is the model's mode: say what the authors do
            log.warning("method=%s scores with the model in eval mode (no dropout), as its authors' code; this loop runs it "
                        "in train mode. Call model.eval() while scoring, or pass eval_mode=False to say train mode is meant.",
                        self.method.name)
            self.warned_mode = True
        if not self.ended:
            self.method.after_optimizer_step(step, grads_finite=grads_finite)
            self.steps_seen += 1

    def run(self, lr: float | None = None) -> bool:
        """Methods with their own prune loop (SPP's search, ``steps`` long): run it now.
        ``lr``: SPP's mask learning rate, as ``create("spp", search_lr=...)`` sets it."""
        self._attached("run()")
        if lr is not None:
            from pruneflow.methods.spp import SPP

            if not isinstance(self.method, SPP):
                raise UserError(f"run(lr={lr}): method={self.method.name}'s prune loop has no learning rate; lr is SPP's search rate.")
            self.method.lr = float(lr)
        ctx = self.method.ctx
        own_loop = type(self.method).run_prune_stage is not PruningMethod.run_prune_stage
        if ctx is not None and own_loop and (ctx.batches is None or ctx.loss_fn is None):
            raise UserError(f"run(): method={self.method.name}'s own loop reads your data: pass batches=lambda: iter(loader) "
                            "and loss_fn=lambda model, batch: <the loss> to create(...) or attach(...).")
        if not self.method.run_prune_stage(self.method.ctx):
            raise UserError(f"run(): method={self.method.name} has no prune loop of its own; call pruner.after_backward(step) "
                            "and pruner.after_optimizer_step(step) in your training loop instead (run() is for spp and grasp).")
        self.ran = True
        return True

    def end(self) -> nn.Module:
        """End the pruning phase: masks frozen (later hook calls change nothing), the model
        finalised (SPP: physically compressed). Returns the model to go on training."""
        self._attached("end()")
        if self._unscored():
            raise UserError(f"pruner.end() before any pruning step: method={self.method.name} would choose its mask from scores "
                            "that saw no data, an arbitrary mask. Call pruner.after_optimizer_step(step) in your loop first "
                            "(pruner.run() for spp and grasp), or use method=magnitude or random, which need no data.")
        self.method.end_prune_stage()
        self.model = self.method.finalize(self.model)
        self.ended = True
        return self.model

    def remove(self) -> nn.Module:
        """Drop the mask parametrizations, leaving plain weights with the zeros in place
        (before any pruning step of a method that needs data: nothing pruned)."""
        self._attached("remove()")
        unscored = self._unscored()
        if unscored:
            log.warning("pruner.remove() before any pruning step: method=%s saw no data, so nothing was pruned.", self.method.name)
        elif not self.ended:
            self.end()
        if self.weights is not None and self.method.prunes:
            self.weights.bake(keep_masked=not unscored)  # unscored: the weights as they were (no L0 gate folded in)
        return self.model

    def _unscored(self) -> bool:
        """Not ended and no step or run() yet, on a method whose mask needs data."""
        return not self.ended and not self.ran and self.steps_seen == 0 and self.method.prunes and self.method.name not in DATA_FREE

    @property
    def sparsity(self) -> float:
        """The current fraction of prunable weights at zero, counted from the weights."""
        self._attached("sparsity")
        return sparsity_report(self.model, names=[w.name for w in self.weights])["prunable"]["sparsity"]

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "ended": self.ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.ended = bool(state.get("ended", False))


def patterns(value: str | Sequence[str] | None, key: str) -> list[str] | None:
    """``include``/``exclude``: one shell-style pattern or a list of them (a plain string
    is one pattern: ``list("blocks.0.*")`` would be its characters, ``*`` matching all)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence | ListConfig) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"Invalid value for '{key}': {value!r}. Allowed: a shell-style module-name pattern or a list of them, "
                    "e.g. ['*.attention.*', '*.mlp.*'].")


def endless(batches: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
    """The user's ``batches`` (a function returning an iterator over one pass of the data,
    e.g. ``lambda: iter(loader)``) as the endless stream a method's own loop reads:
    called again whenever a pass runs out, so ``steps`` may exceed one pass."""

    def stream() -> Iterator[Any]:
        while True:
            empty = True
            for batch in batches():
                empty = False
                yield batch
            if empty:
                raise UserError("batches() returned an iterator with no batches: pass a function that returns a fresh "
                                "iterator over your data on every call, e.g. batches=lambda: iter(loader).")

    return stream


def create(
    name: str,
    sparsity: float | None = None,
    steps: int = 1,
    *,
    model: nn.Module | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    schedule: str = "cubic",
    initial_warmup: int | float = 0,
    final_warmup: int | float = 0,
    frequency: int = 1,
    step_offset: int = 0,
    batches: Callable[[], Iterator[Any]] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    **settings: Any,  # noqa: ANN401
) -> Pruner:
    """Build the method ``name`` (its config keys as keyword arguments), with the sparsity
    schedule over ``steps`` pruning steps; attached to ``model`` when given."""
    from pruneflow.methods import get_method_class
    from pruneflow.runner import validate_sparsity
    from pruneflow.validation import refuse_non_finite

    validate_sparsity(sparsity)
    cfg = method_config(name, settings)
    cls = get_method_class(name)
    if getattr(cls, "one_shot", False):
        raise UserError(f"method={name} prunes a causal LM one shot from calibration data, not along a training loop: "
                        f"use pruneflow.llm.prune_causal_lm(model, calibration_ids, method={name!r}, sparsity=...).")
    target = cls.resolve_sparsity(cfg, sparsity)
    method = cls(cfg, target)
    if schedule not in KINDS:
        raise UserError(f"Invalid value for 'schedule': {schedule!r}. Allowed: {', '.join(KINDS)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"Invalid value for 'steps': {steps!r}. Allowed: an integer >= 1 (the pruning steps).")
    sched_cfg = OmegaConf.create({"name": schedule, "initial_warmup": initial_warmup, "final_warmup": final_warmup,
                                  "frequency": frequency, "step_offset": step_offset})
    refuse_non_finite(sched_cfg)
    sched = Schedule.from_config(sched_cfg, method.schedule_target(), steps)
    if method.prunes:
        sched.validate()
        method.check_schedule(sched)
    pruner = Pruner(method, sched, steps)
    if model is not None:
        pruner.attach(model, include, exclude, batches=batches, loss_fn=loss_fn)
    return pruner


@torch.no_grad()
def sparsity_report(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Zeros counted from the model's (effective) weights: per prunable layer, over the
    prunable set (default: every Linear of the encoder blocks) and over all parameters.
    Weights a physical compression removed (SPP) count as zeros against the layer's
    original shape, as ``result.json``'s measured sparsity counts them."""
    from pruneflow.compress import ORIGINAL_SHAPE

    state = strip_parametrization_names(model.state_dict())
    if names is None:
        names = [w.name for w in select_prunable(model, patterns(include, "include") or DEFAULT_INCLUDE,
                                                 patterns(exclude, "exclude") or DEFAULT_EXCLUDE)]
    removed_at, removed_biases = {}, 0  # weight name -> weights removed by compression; bias entries removed
    for name, mod in model.named_modules():
        if hasattr(mod, ORIGINAL_SHAPE) and hasattr(mod, "weight"):
            shape = getattr(mod, ORIGINAL_SHAPE)
            removed_at[f"{name}.weight" if name else "weight"] = math.prod(shape) - mod.weight.numel()
            if getattr(mod, "bias", None) is not None:
                removed_biases += shape[0] - mod.bias.numel()
    per_layer, zeros, total = {}, 0, 0
    for n in names:
        t = state[n]
        gone = removed_at.get(n, 0)
        z = int(t.numel() - t.count_nonzero()) + gone
        per_layer[n] = round(z / max(t.numel() + gone, 1), 6)
        zeros += z
        total += t.numel() + gone
    param_names = {n.replace(".parametrizations.", ".").removesuffix(".original") for n, _ in model.named_parameters()}
    params = {k: v for k, v in state.items() if k in param_names}
    all_removed = sum(removed_at.values()) + removed_biases
    all_zeros = sum(int(v.numel() - v.count_nonzero()) for v in params.values()) + all_removed
    all_total = sum(v.numel() for v in params.values()) + all_removed
    return {
        "prunable": {"zeros": zeros, "total": total, "sparsity": round(zeros / max(total, 1), 6)},
        "overall": {"zeros": all_zeros, "total": all_total, "sparsity": round(all_zeros / max(all_total, 1), 6)},
        "per_layer": per_layer,
    }
