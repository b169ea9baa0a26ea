"""The pipeline: finetune → prune → recover, evaluating after every stage.

``run(cfg, run_dir)`` is what the ``pruneflow`` command executes for one job.
All configuration is validated before any data is loaded or any step is taken.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from pruneflow import allocator, distill, distributed
from pruneflow.cache import NOT_IN_FINETUNE, StageCache, path_fingerprint
from pruneflow.config import RESUME_FREE, resume_free
from pruneflow.errors import (
    RunStopped,
    UserError,
    check_bool,
    invalid,
    load_error_text,
)
from pruneflow.history import EVAL_HISTORY, EvalHistory, parse_eval_every
from pruneflow.loggers import NullLogger, make_logger
from pruneflow.masking import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, MaskedWeights, select_prunable
from pruneflow.methods import METHODS, PruneContext, PruningMethod, get_method_class
from pruneflow.models import ModelBundle, build_model, check_pairing
from pruneflow.results import build_result, write_predictions
from pruneflow.schedules import Schedule
from pruneflow.stop import STOP, STOPPED_FILE
from pruneflow.stop import name as stop_name
from pruneflow.tasks import build_task
from pruneflow.trainer import (
    Optim,
    StageSpec,
    Trainer,
    _fault_injection,
    _fault_signal,
    autocast_dtype,
    steps_per_epoch,
)
from pruneflow.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    unwritable,
    writing,
)
from pruneflow.validation import (
    check_model_path,
    check_typed_unused,
    check_unused,
    explicit_settings,
    refuse_non_finite,
    switched_off,
    typed_text,
    validate_run,
    validate_sparsity,
    validate_trainer,
)

if TYPE_CHECKING:  # pruneflow.llm.runner imports this module
    from pruneflow.llm.runner import LLMRun

log = logging.getLogger("pruneflow")

STAGES = ("finetune", "prune", "recover")
# the optimizer's settings: read only by a stage that updates weights
OPTIMIZER_SETTINGS = ("optimizer", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "momentum", "lr_scheduler",
                      "min_lr", "warmup_ratio", "warmup_steps", "max_grad_norm")


# Trainer settings that change what a run reports but not the weights it trains: left out of
# the finetune cache key (a dense model serves every evaluation precision). The cached stage's
# evaluation history is reused only where they are equal (Run.run_finetune).
NOT_IN_FINETUNE_KEY = ("eval_precision",)


def trainer_key(trainer: DictConfig) -> dict[str, Any]:
    """The trainer settings a cached finetune depends on."""
    return {k: v for k, v in OmegaConf.to_container(trainer, resolve=True).items()
            if f"trainer.{k}" not in RESUME_FREE and k not in NOT_IN_FINETUNE_KEY}


def zero_step_stages(cfg: DictConfig) -> dict[str, bool]:
    """Each stage: are its 0 steps known without the data (epochs=0 with steps unset, or steps=0)?"""
    return {n: (cfg.stages[n].get("epochs") == 0 and cfg.stages[n].get("steps") is None) or cfg.stages[n].get("steps") == 0
            for n in STAGES}



# ----------------------------------------------------------------------------- validation
def recipe_note(cfg: DictConfig, overrides: list[str] | None) -> str | None:
    """A model trained from random weights under its config's recipe for pretrained
    weights (``model=deit_tiny model.pretrained=false`` gets ``stages=pretrained_vision``):
    the note to log, or None. A recipe typed on the command line is the user's choice."""
    recipe = str(cfg.stages.get("name") or "")
    if not recipe.startswith("pretrained") or "stages" in typed_text(overrides or []):
        return None
    if cfg.model.get("pretrained", True) is not False or cfg.model.get("path"):
        return None
    return (f"model.pretrained=false trains {cfg.model.name} from random weights, but stages={recipe} (its default, "
            f"finetune lr {cfg.stages.finetune.lr:g}) is a recipe for fine-tuning pretrained weights; stages=default is "
            "the from-scratch one (stages=<name> on the command line chooses and silences this).")


def stage_steps(cfg: DictConfig, name: str, n_train: int, grad_accum: int) -> tuple[int, StageSpec | None]:
    """Optimizer steps of a stage from its `epochs` or `steps` (exactly one may be set)."""
    s = cfg.stages[name]
    epochs, steps = s.get("epochs"), s.get("steps")
    if epochs is not None and steps is not None:
        raise UserError(
            f"Both 'stages.{name}.epochs' ({epochs}) and 'stages.{name}.steps' ({steps}) are set. "
            f"Set only one, e.g. stages.{name}.steps=null, or stages.{name}.epochs=null."
        )
    for key, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise invalid(f"stages.{name}.{key}", v, "a number >= 0 (0 skips the stage)")
    for key, _kind in (("lr", float), ("batch_size", int)):
        v = s.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise invalid(f"stages.{name}.{key}", v, "a positive number")
    bs = int(s.batch_size)
    if steps is None:
        steps = int(math.ceil(float(epochs or 0) * steps_per_epoch(n_train, bs, grad_accum, bool(cfg.trainer.get("drop_last", True)))))
    return int(steps), bs


def check_typed_patterns(model: torch.nn.Module, include: list[str], exclude: list[str], typed: dict[str, str]) -> None:
    """A ``method.include``/``method.exclude`` pattern typed on the command line that matches
    no module it could act on is a mistake (a typo such as ``mlp.fc`` for ``mlp.fc1``): it
    would select or remove nothing, silently."""
    import fnmatch

    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    included = [n for n in linear if any(fnmatch.fnmatchcase(n, p) for p in include)]
    for key, patterns, names, what in (("method.include", include, linear, "nn.Linear module"),
                                       ("method.exclude", exclude, included, "module that method.include selects")):
        if key not in typed:
            continue
        dead = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if dead:
            shown = ", ".join(names[:3] + (["...", names[-1]] if len(names) > 4 else names[3:]))
            raise invalid(key, typed[key], "shell-style patterns over module names, each matching at least one",
                          f"{dead} match(es) no {what} of model={model.__class__.__name__}; its names look like: {shown or 'none'}.")


def check_mixup_batches(cfg: DictConfig) -> None:
    """``task.mixup`` pairs each image with another of its batch (timm's Mixup): every
    training stage needs even batches, and an epoch's short last batch is dropped, as DeiT does."""
    why = "task.mixup mixes each training image with another of its batch, so a batch needs an even number of images"
    if not cfg.trainer.get("drop_last", True):
        raise UserError(f"Invalid value for 'trainer.drop_last': false. Allowed: true with task.mixup. {why}; an epoch's "
                        "short last batch may not have one (DeiT drops it).")
    for name in STAGES:
        s = cfg.stages[name]
        if (s.get("steps") or s.get("epochs")) and int(s.batch_size) % 2:
            raise invalid(f"stages.{name}.batch_size", s.batch_size, "an even number with task.mixup", f"{why}.")


@dataclass
class Plan:
    stages: dict[str, StageSpec]
    schedule: Schedule

    def runs(self, name: str) -> bool:
        return self.stages[name].steps > 0


# ----------------------------------------------------------------------------- the run
class Run:
    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = overrides or []
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ckpt_path = self.ckpt_dir / "last.pt"
        self.progress_path = self.ckpt_dir / "progress.json"
        self.rank_checks: dict[str, list[dict[str, str]]] = {}  # torchrun: per-rank fingerprints
        self.finetune_source: dict[str, Any] | None = None  # the dense finetune's cache entry (result's provenance)
        from pruneflow.results import pruneflow_source

        self.source = pruneflow_source()  # checkpoints record it: a resume under other code says so

    # -- setup ------------------------------------------------------------------------------
    def _prune_updates_weights(self, cfg: DictConfig) -> bool:
        """``stages.prune.update_weights``: the method's own behaviour unless set."""
        for name in ("finetune", "recover"):
            if cfg.stages[name].get("update_weights") not in (None, True):
                raise invalid(f"stages.{name}.update_weights", cfg.stages[name].update_weights, "null or true",
                              "Only the prune stage can score without weight updates.")
        own = self.method_cls.updates_weights
        want = cfg.stages.prune.get("update_weights")
        if want is None or bool(want) == own:
            return own
        if want and not own:
            raise invalid("stages.prune.update_weights", want, "null or false",
                          f"method={cfg.method.name} never trains the weights in its prune stage.")
        if not self.method_cls.scores_without_updates:
            allowed = sorted(n for n in METHODS if get_method_class(n).scores_without_updates or not get_method_class(n).updates_weights)
            raise invalid("stages.prune.update_weights", want, "null or true",
                          f"method={cfg.method.name} needs weight updates to score; methods that prune without them: {', '.join(allowed)}.")
        return False

    def check_settings(self, here: bool = True) -> None:
        """Every check that needs no data and changes nothing: run first by ``prepare`` and,
        for every job of a sweep, by the CLI before the first job starts. ``here=False``:
        the job runs on another machine (Slurm), so this one's devices are not checked."""
        cfg = self.cfg
        refuse_non_finite(cfg)
        validate_sparsity(cfg.get("sparsity"))
        if here:
            self.device = resolve_device(str(cfg.trainer.device))
            cuda = self.device.type == "cuda"
            if cfg.get("cache", True) and (problem := unwritable(Path(str(cfg.cache_dir)))):
                raise invalid("cache_dir", cfg.cache_dir, "a folder this user can create and write, or cache=false",
                              f"The stage cache cannot be written there ({problem}).")
        else:
            cuda = str(cfg.trainer.device) != "cpu"
        validate_trainer(cfg, cuda=cuda, here=here)
        validate_run(cfg)
        self.method_cls = get_method_class(cfg.method.name)
        if getattr(self.method_cls, "one_shot", False):
            raise invalid("method", cfg.method.name, sorted(n for n in METHODS if not getattr(get_method_class(n), "one_shot", False)),
                          f"method={cfg.method.name} prunes a causal LM one shot from calibration data: use it with a causal-LM "
                          f"task (task=lm/wikitext2 or lm/c4) and model (e.g. model=tiny_llama), not task={cfg.task.name}.")
        explicit = explicit_settings(cfg, self.overrides)  # composes the groups' defaults once for both checks
        check_unused(cfg, [("calibration", "calibration data is for one-shot causal-LM pruning (task=lm/...)"),
                           ("allocation", "per-block sparsity allocation is for one-shot causal-LM pruning (task=lm/...)"),
                           ("recovery", "recovery=full|lora is for one-shot causal-LM pruning (task=lm/...); here the "
                            "recover stage (stages.recover) fine-tunes the pruned model"), *switched_off(cfg)], explicit, self.overrides)
        self.sparsity = self.method_cls.resolve_sparsity(cfg.method, cfg.get("sparsity"))
        self.method = self.method_cls(cfg.method, self.sparsity)
        check_unused(cfg, self.method.unused_settings(cfg), explicit, self.overrides)
        distill.validate(cfg)
        for name in STAGES:  # cheap checks before any data is read
            stage_steps(cfg, name, 1, 1)
        self.check_plan_settings()
        self.prune_updates_weights = self._prune_updates_weights(cfg)
        if self.method.prunes and not self.prune_updates_weights:
            check_unused(cfg, [("stages.prune.lr", f"the prune stage of method={cfg.method.name} makes no weight updates "
                                                   "(stages.prune.update_weights=false or the method's own rule)")], explicit, self.overrides)
        self.check_optimizer_used()
        path = cfg.task.get("path")
        if path is not None and not Path(str(path)).exists():
            raise UserError(
                f"Invalid value for 'task.path': {path} does not exist. Allowed: a local directory with one "
                "file per split (train, validation, ...) as .parquet/.jsonl/.json/.csv, a DatasetDict.save_to_disk "
                "folder, or an ImageFolder; or task.path=null to load from the Hugging Face Hub."
            )
        check_model_path(cfg)
        self.task = build_task(cfg.task, int(cfg.seed))
        self.task.eval_autocast = autocast_dtype(cfg.trainer.get("eval_precision", "32"))
        self.task.check_path()
        check_pairing(cfg.model, self.task)
        if getattr(self.task, "mixup", None) is not None:
            check_mixup_batches(cfg)
        self.method.check_task(self.task)

    def prepare(self) -> None:
        cfg = self.cfg
        begin(self)
        if (note := recipe_note(cfg, self.overrides)) is not None:
            log.warning(note)
        if not cfg.get("cache", True) and "cache_dir" in typed_text(self.overrides or []):
            # a warning, not an error: a sweep may switch the cache off for some jobs and keep one cache_dir
            log.warning("cache_dir=%s is not used: cache=false runs the finetune stage without reading or writing "
                        "the stage cache.", cfg.cache_dir)
        allocator.apply_setting(cfg.trainer.get("keep_freed_memory", "auto"), self.device.type)
        self.task.load()
        self.bundle: ModelBundle = build_model(cfg.model, self.task)
        self.task.prepare(self.bundle)
        self.task.check_eval_sizes()
        self.method.check_task(self.task)
        self.bundle.model.to(self.device)
        distributed.broadcast_module(self.bundle.model)  # torchrun: rank 0's initial weights everywhere
        self.total_params = sum(p.numel() for p in self.bundle.model.parameters())

        include = list(cfg.method.get("include") or DEFAULT_INCLUDE)
        exclude = list(cfg.method.get("exclude") or DEFAULT_EXCLUDE)
        biases = check_bool(cfg.method.get("biases", False), "method.biases")
        check_typed_patterns(self.bundle.model, include, exclude, typed_text(self.overrides))
        self.weights = MaskedWeights(select_prunable(self.bundle.model, include, exclude, biases=biases))
        if self.method.prunes and len(self.weights) == 0:
            raise UserError(
                f"No prunable weights: no nn.Linear in model={cfg.model.name} matches method.include={include} "
                f"(minus method.exclude={exclude}). Adjust the patterns (shell-style, over module names)."
            )
        self.method.validate(self.bundle.model, self.weights)  # may narrow the prunable set (structured units)
        self.original_shapes = {w.name: tuple(w.shape) for w in self.weights}

        n_train = len(self.task.train_set)
        accum = int(cfg.trainer.get("gradient_accumulation_steps", 1))
        continuous = bool(cfg.trainer.get("continuous", False))
        for name in STAGES:
            bs = cfg.stages[name].batch_size
            if isinstance(bs, int) and bs * accum > n_train and stage_steps(cfg, name, n_train, accum)[0] > 0:
                raise invalid(f"stages.{name}.batch_size", bs, f"at most {n_train // accum} here",
                              f"The training set has {n_train} examples" + (f" and trainer.gradient_accumulation_steps={accum}" if accum > 1 else "")
                              + ": a batch larger than it cannot be drawn.")
        specs = {}
        for i, name in enumerate(STAGES):
            steps, bs = stage_steps(cfg, name, n_train, accum)
            distributed.check_batch_size(bs, name)
            if name == "prune" and not self.method.prunes:
                steps = 0
            # continuous: one stream of batches through all stages (one seed, offsets below)
            seed = int(cfg.seed) * 10 + (0 if continuous else i)
            specs[name] = StageSpec(name=name, steps=steps, lr=float(cfg.stages[name].lr), batch_size=bs, seed=seed)
        specs["prune"].weight_updates = self.prune_updates_weights
        planned = self.method.plan_stages(
            {k: v.steps for k, v in specs.items()},
            steps_per_epoch(n_train, specs["prune"].batch_size, accum, bool(cfg.trainer.get("drop_last", True))), cfg.task.name
        )
        for k, v in planned.items():
            specs[k].steps = int(v)
        if continuous:
            self._plan_continuous(specs, accum)
        schedule = Schedule.from_config(cfg.schedule, self.method.schedule_target(), specs["prune"].steps)
        if self.method.prunes:
            schedule.validate()
            self.method.check_schedule(schedule)
            if specs["prune"].steps == 0 and not self.method_cls.__dict__.get("prunes_without_steps", False):
                raise self.no_prune_steps()
        self.plan = Plan(stages=specs, schedule=schedule)
        # trainer.eval_every: evaluations inside the weight-updating stages (eval_history.jsonl)
        every = parse_eval_every(cfg.trainer.get("eval_every", 0))
        drop_last = bool(cfg.trainer.get("drop_last", True))
        self.steps_per_epoch = {k: steps_per_epoch(n_train, sp.batch_size, accum, drop_last) for k, sp in specs.items()}
        self.eval_every = {k: 0 if not sp.weight_updates else self.steps_per_epoch[k] if every == "epoch" else int(every)
                           for k, sp in specs.items()}
        self.history = EvalHistory(self.run_dir, enabled=every != 0, write=distributed.is_main())
        self.distill = cfg.get("distill") if cfg.get("distill") is not None and cfg.distill.get("enabled") else None
        if self.distill is not None and self.distill.teacher == "finetuned" and specs["finetune"].steps == 0:
            raise UserError(
                "distill.teacher=finetuned distils from the model after the finetune stage, but stages.finetune has 0 "
                "steps. Give the finetune stage epochs or steps, or set distill.teacher=<a directory with a fine-tuned model>."
            )
        if self.distill is not None:
            idle = [s for s in self.distill.stages if specs[s].steps == 0]
            if idle:
                running = [s for s in STAGES if specs[s].steps > 0]
                raise invalid("distill.stages", "[" + ",".join(self.distill.stages) + "]", f"stages that run here: {', '.join(running) or 'none'}",
                              f"{' and '.join(idle)} {'has' if len(idle) == 1 else 'have'} no steps in this run "
                              f"(method={cfg.method.name} and the stage lengths), so distilling there would be ignored.")
            if self.task.problem == "regression":
                check_unused(cfg, [("distill.temperature", f"task={cfg.task.name} is a regression: its outputs are distilled "
                                                           "by mean squared error, which has no temperature")], typed=self.overrides)
        self.distiller: distill.Distiller | None = None
        self.teacher_path = self.ckpt_dir / "teacher.safetensors"
        self.trainer = Trainer(cfg.trainer, self.device, self.bundle, self.task)
        # trainer.continuous: one optimizer and LR schedule for the whole run, built now
        # (before any mask is attached) over every weight-updating step of every stage.
        self.optim: Optim | None = None
        if continuous:
            total = sum(sp.steps for sp in specs.values() if sp.weight_updates)
            self.optim = self.trainer.build_optim(total, batch_size=specs["prune"].batch_size)  # continuous: one batch size
        self.warn_long_warmup(specs, continuous)

    def warn_long_warmup(self, specs: dict[str, StageSpec], continuous: bool) -> None:
        """trainer.warmup_steps longer than the schedule it warms up: the learning rate
        never reaches the stage's lr (a fraction, warmup_ratio, cannot overrun)."""
        warmup = self.cfg.trainer.get("warmup_steps")
        if not warmup:
            return
        spans = ({"the run (trainer.continuous=true)": sum(sp.steps for sp in specs.values() if sp.weight_updates)} if continuous
                 else {f"the {k} stage": sp.steps for k, sp in specs.items() if sp.steps > 0 and sp.weight_updates})
        for what, steps in spans.items():
            if steps and int(warmup) >= steps:
                log.warning("trainer.warmup_steps=%d is as long as %s or longer (%d steps): its learning rate never reaches "
                            "the stage's lr. Shorten it, or give a fraction with trainer.warmup_ratio.", int(warmup), what, steps)

    def check_plan_settings(self) -> None:
        """The checks of ``prepare``'s plan that need no data (a stage's epochs become steps
        only once the training set's size is known): run by ``check_settings``, so a sweep
        refuses them for every job before the first starts."""
        cfg = self.cfg
        explicit_zero = zero_step_stages(cfg)
        own_plan = self.method_plans_stages()
        if self.method.prunes:
            schedule = Schedule.from_config(cfg.schedule, self.method.schedule_target(), 1)
            schedule.check_settings()
            self.method.check_schedule(schedule)
            if explicit_zero["prune"] and not own_plan and not self.method_cls.__dict__.get("prunes_without_steps", False):
                raise self.no_prune_steps()
        if not own_plan:  # a skipped stage reads neither its learning rate nor its batch size (as typed: the
            # experiments write every stage's recipe, a skipped stage's included)
            skipped = [n for n in STAGES if explicit_zero[n] and (n != "prune" or self.method.prunes)]
            typed = typed_text(self.overrides or [])
            check_unused(cfg, [(key, f"stages.{n} has 0 steps, so the stage is skipped") for n in skipped
                               for key in (f"stages.{n}.lr", f"stages.{n}.batch_size") if key in typed], typed=self.overrides)
        if bool(cfg.trainer.get("continuous", False)) and not own_plan:
            running = [n for n in STAGES if not explicit_zero[n] and (n != "prune" or self.method.prunes)]
            self.check_continuous({n: int(cfg.stages[n].batch_size) for n in running}, "recover" in running)

    def method_plans_stages(self) -> bool:
        """The method sets the stage lengths itself (SEVEN's presets), not stages.*."""
        return type(self.method).plan_stages is not PruningMethod.plan_stages

    def check_optimizer_used(self) -> None:
        """No stage updates a weight (finetune and recover at 0 steps, a prune stage that only
        scores or does not run): the optimizer's settings as typed would be ignored. An
        experiment's are kept, as they serve its other rows."""
        cfg = self.cfg
        if self.method_plans_stages():
            return
        zero = zero_step_stages(cfg)
        prune_trains = self.method.prunes and self.prune_updates_weights and not zero["prune"]
        if zero["finetune"] and zero["recover"] and not prune_trains:
            why = ("no stage updates a weight (stages.finetune and stages.recover have 0 steps, and the prune stage "
                   + ("makes no weight updates)" if self.method.prunes and not zero["prune"] else "does not run)"))
            check_typed_unused(cfg, [(f"trainer.{k}", why) for k in OPTIMIZER_SETTINGS], self.overrides)

    def no_prune_steps(self) -> UserError:
        return UserError(
            f"method={self.cfg.method.name} prunes during the prune stage, but stages.prune has 0 steps. "
            "Give it epochs or steps (e.g. stages.prune.epochs=2), or use method=dense."
        )

    def check_continuous(self, sizes: dict[str, int], recovers: bool) -> None:
        """trainer.continuous=true: the stages are phases of one training, so they share one
        batch size (one stream of batches) and the method must keep the architecture."""
        cfg = self.cfg
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"stages.{k}.batch_size={v}" for k, v in sizes.items())
            raise UserError(
                f"trainer.continuous=true trains the stages as one run over one stream of batches, so they need one "
                f"batch size; got {listed}. Set them equal, or use trainer.continuous=false (each stage its own "
                "optimizer, schedule and batches)."
            )
        if not self.method_cls.keeps_architecture and recovers:
            raise UserError(
                f"trainer.continuous=true cannot carry the optimizer across the prune stage of method={cfg.method.name}: "
                "it rebuilds the pruned layers (physical compression), so the recover stage starts a new optimizer. "
                "Use trainer.continuous=false (the authors retrain with a fresh optimizer too)."
            )

    def _plan_continuous(self, specs: dict[str, StageSpec], accum: int) -> None:
        self.check_continuous({sp.name: sp.batch_size for sp in specs.values() if sp.steps > 0}, specs["recover"].steps > 0)
        offset = 0
        for name in STAGES:
            specs[name].data_offset = offset
            offset += specs[name].steps * accum

    # -- checkpoints ----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        if self.progress_path.exists():
            try:
                return json.loads(self.progress_path.read_text())
            except (OSError, ValueError) as e:
                raise self._damaged(self.progress_path, e) from e
        return {"done": {}}

    def _damaged(self, path: Path, error: Exception) -> UserError:
        return UserError(
            f"{path} cannot be read ({type(error).__name__}: {load_error_text(error)}): the file is "
            "damaged, e.g. the run was killed while writing it on a full disk. Start this run over with overwrite=true "
            f"(or delete {path.parent}); the finetune cache is kept, so a cached dense stage is not redone."
        )

    def save_progress(self, progress: dict[str, Any]) -> None:
        if distributed.is_main():
            with writing(self.progress_path):
                atomic_write_json(self.progress_path, progress)

    def save_checkpoint(self, stage: str, step: int, complete: bool, trainer_state: dict[str, Any] | None = None,
                        done: dict[str, Any] | None = None, model_state: dict[str, Any] | None = None) -> None:
        """``done``: a complete stage's progress entry (metrics, time), also written to
        progress.json right after: a kill between the two writes loses neither.
        ``model_state``: the weights to save in place of the model's state dict (SPP's
        search saves them without its masks)."""
        if not distributed.is_main():
            return
        with writing(self.ckpt_path):
            self._save_checkpoint(stage, step, complete, trainer_state, done, model_state)

    def _save_checkpoint(self, stage: str, step: int, complete: bool, trainer_state: dict[str, Any] | None,
                         done: dict[str, Any] | None = None, model_state: dict[str, Any] | None = None) -> None:
        atomic_torch_save(
            {
                "stage": stage,
                "step": step,
                "complete": complete,
                "done": done,
                "model": self.bundle.model.state_dict() if model_state is None else model_state,
                "method": self.method.state_dict(),
                "trainer": trainer_state,
                "rng": rng_state(),
                "torch_threads": torch.get_num_threads(),
                "pruneflow_source": self.source,
            },
            self.ckpt_path,
        )

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.ckpt_path.exists():
            return None
        import zipfile

        try:
            # torch.load does not check the CRC-32 its zip format stores for every record: flipped
            # bits in the weights loaded silently (and the run then diverged, blaming the lr)
            with zipfile.ZipFile(self.ckpt_path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"its record {bad} fails the CRC-32 check written with it (the file changed on disk)")
            # weights_only: a checkpoint cannot run code when loaded
            return torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, ...
            raise self._damaged(self.ckpt_path, e) from e

    # -- stage transitions -----------------------------------------------------------------------
    def prune_context(self) -> PruneContext:
        spec = self.plan.stages["prune"]
        return PruneContext(
            model=self.bundle.model,
            weights=self.weights,
            schedule=self.plan.schedule,
            sparsity=self.sparsity,
            total_steps=spec.steps,
            device=self.device,
            task=self.task,
            batches=lambda start_step=0: self.trainer.batches(spec.batch_size, spec.seed, start_step),
            loss_fn=self.trainer.loss,
            run_dir=self.run_dir,
            cache_dir=Path(self.cfg.cache_dir) if self.cfg.get("cache", True) else None,
            cache_key=self.finetune_key(),
            extra={"bundle": self.bundle, "trainer": self.trainer, "stage": spec},
        )

    def check_ranks(self, key: str, what: str) -> None:
        """torchrun: fingerprints of masks, method state (scores) and weights, equal on every rank or an error."""
        if not distributed.is_distributed():
            return
        fp = {"weights": distributed.tensors_hash(self.bundle.model.state_dict().values())}
        if self.method.prunes and len(self.weights) and self.weights.attached:
            fp["masks"] = distributed.tensors_hash(self.weights.masks())
        state = _tensors(self.method.state_dict())
        if state:
            fp["scores"] = distributed.tensors_hash(state)
        self.rank_checks[key] = distributed.check_identical(what, fp)

    def finalize_model(self) -> None:
        model = self.method.finalize(self.bundle.model)
        self.bundle.model = model.to(self.device)
        if not self.method_cls.keeps_architecture:  # new layers: the next optimizer must list them
            self.trainer.refresh_params()

    def finetune_key(self) -> dict[str, Any]:
        c = self.cfg
        key = {
            "model": OmegaConf.to_container(c.model, resolve=True),
            "task": {k: v for k, v in OmegaConf.to_container(c.task, resolve=True).items()},
            "seed": int(c.seed),
            "stage": OmegaConf.to_container(c.stages.finetune, resolve=True),
            "steps": self.plan.stages["finetune"].steps,
            "trainer": trainer_key(c.trainer),
            "version": 2,
            # what lies at the paths: other weights or data at the same path are another entry
            "model_files": path_fingerprint(c.model.get("path")),
            "task_files": path_fingerprint(c.task.get("path"), deep=False),
        }
        if self.optim is not None:  # continuous: the finetune LR depends on the whole schedule
            key["schedule"] = {"total_steps": self.optim.schedule.total_steps, "warmup_steps": self.optim.schedule.warmup_steps}
        return key

    def evaluate(self, stage: str) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        bs = int(self.cfg.stages.get("eval_batch_size", 64))
        metrics, predictions = self.task.evaluate_all(self.bundle, bs, self.device, desc=f"eval after {stage}")
        self.bundle.model.train()
        log.info("%s: %s", stage, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics, predictions

    def eval_during(self, stage: str) -> Callable[[int], None] | None:
        """The trainer's callback for ``trainer.eval_every``: evaluate, log, record a row.
        The RNG state and the model's train/eval mode are restored, so training goes on
        exactly as without it (an evaluation loader draws a seed from torch's RNG)."""
        if self.eval_every.get(stage, 0) <= 0:
            return None
        bs = int(self.cfg.stages.get("eval_batch_size", 64))
        steps = self.plan.stages[stage].steps

        def evaluate(step: int) -> None:
            model = self.bundle.model
            was_training, rng = model.training, rng_state()
            metrics, _ = self.task.evaluate_all(self.bundle, bs, self.device, desc=f"eval {stage} {step}/{steps}")
            model.train(was_training)
            set_rng_state(rng)
            row = self.history.record(stage, step, self.steps_per_epoch[stage], metrics, self.mask_sparsity(stage))
            log.info("%s step %d/%d (epoch %g): %s", stage, step, steps, row["epoch"], ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.logger.log({**{f"{stage}/eval/{k}": v for k, v in metrics.items()}, f"{stage}/step": step})

        return evaluate

    def mask_sparsity(self, stage: str) -> float | None:
        """The pruned share of the prunable weights by the method's current masks (None
        before the prune stage, or where a method keeps no masks)."""
        if stage == "finetune" or not self.method.prunes:
            return None
        return self.method.current_sparsity()

    def setup_method(self) -> None:
        """Start the prune stage: masks attached; in a continuous run the method's own
        trainable tensors join the run's optimizer (in the same order on resume)."""
        self.method.use_zeroed_masks()  # the trainer runs the hooks in the order this needs
        self.method.setup(self.prune_context())
        if self.optim is not None:
            for group in self.method.param_groups():
                self.optim.add_group(group)

    # -- main ------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        self.logger = make_logger(cfg, self.run_dir) if distributed.is_main() else NullLogger()
        # After the logger: W&B's wait for an unreachable server (about 30 s before its
        # offline fallback) is start-up, which time_s.total leaves out like the loading.
        t_start = time.perf_counter()
        progress = self.progress()
        ckpt = self.load_checkpoint()
        if ckpt is None and progress["done"]:  # the stages' metrics without their weights
            raise UserError(
                f"{self.ckpt_path} is missing, but {self.progress_path} records finished stages ({', '.join(progress['done'])}): "
                "resuming would train from the start and report those stages' old metrics. Start this run over with "
                "overwrite=true; the finetune cache is kept, so a cached dense stage is not redone."
            )
        start_index = 0
        resume_trainer: dict[str, Any] | None = None
        if ckpt is not None and self.distill is not None and self.distill.teacher == "finetuned" and self.teacher_path.exists():
            self.make_teacher(self.teacher_path)  # before any mask is attached to the student
        if ckpt is not None:
            start_index = STAGES.index(ckpt["stage"])
            log.info("Resuming from %s (stage %s, step %d)", self.ckpt_path, ckpt["stage"], ckpt["step"])
            if ckpt["complete"] and ckpt["stage"] not in progress["done"] and ckpt.get("done") is not None:
                # killed after the stage's checkpoint, before progress.json recorded it
                progress["done"][ckpt["stage"]] = ckpt["done"]
            was, now = ckpt.get("torch_threads"), torch.get_num_threads()
            code_was = ckpt.get("pruneflow_source")
            if code_was is not None and code_was != self.source:
                log.warning("pruneflow's code changed since this checkpoint was written (source %s, now %s): the resumed "
                            "run continues under other code than it started with. overwrite=true runs it again from the "
                            "start under this code.", code_was, self.source)
            # result.json's provenance lists every resume: where, and with which device, threads and code
            progress.setdefault("resumes", []).append({
                "stage": ckpt["stage"], "step": int(ckpt["step"]), "complete": bool(ckpt["complete"]), "device": str(self.device),
                "torch_threads": now, "checkpoint_torch_threads": was, "pruneflow_source": self.source,
                "checkpoint_pruneflow_source": code_was, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.save_progress(progress)
            if was is not None and was != now and self.device.type == "cpu":
                # torch splits CPU reductions by thread: the sums (and so the weights) change in the last bits
                log.warning("Resuming with %d torch threads; the checkpoint was written with %d. The result can differ from "
                            "an uninterrupted run's in the last bits; trainer.torch_threads=%d resumes exactly.", now, was, was)
            if start_index >= STAGES.index("prune") and self.method.prunes and self.plan.runs("prune"):
                self.setup_method()
                self.method.load_state_dict(ckpt["method"])
                if start_index > STAGES.index("prune") or ckpt["complete"]:
                    self.method.end_prune_stage()
                    self.finalize_model()
            self.bundle.model.load_state_dict(ckpt["model"])
            if self.optim is not None and ckpt.get("trainer"):  # continuous: the run's optimizer
                self.optim.load_state_dict(ckpt["trainer"])
            if ckpt["complete"]:
                start_index += 1
            else:
                resume_trainer = ckpt["trainer"]
                set_rng_state(ckpt["rng"])
        if self.history.enabled:  # the rows the checkpoint covers, as an uninterrupted run's
            if ckpt is None:
                self.history.start_over()
            else:
                self.history.trim_to(ckpt["stage"], int(ckpt["step"]), bool(ckpt["complete"]))
        elif ckpt is not None and self.history.path.exists() and distributed.is_main():
            self.history.trim_to(ckpt["stage"], int(ckpt["step"]), bool(ckpt["complete"]))
            log.warning("%s holds the evaluations of this run's earlier launch, made with trainer.eval_every; this launch "
                        "runs with trainer.eval_every=0 and adds none, so the file ends at the checkpoint it resumes from "
                        "(%s step %d).", self.history.path, ckpt["stage"], int(ckpt["step"]))
        metrics: dict[str, dict[str, float]] = {k: v["metrics"] for k, v in progress["done"].items()}
        self.finetune_source = (progress["done"].get("finetune") or {}).get("source")
        times: dict[str, float] = {k: v["time_s"] for k, v in progress["done"].items()}
        predictions: dict[str, list[dict[str, Any]]] | None = None

        for index in range(start_index, len(STAGES)):
            name = STAGES[index]
            spec = self.plan.stages[name]
            if spec.steps == 0:
                continue
            resumed = resume_trainer is not None
            if not resumed:
                seed_everything(spec.seed)
            t0 = time.perf_counter()
            self.trainer.distiller = self.distiller_for(name)
            if name == "finetune":
                self.run_finetune(spec, resume_trainer)
                if self.distill is not None and self.distill.teacher == "finetuned":
                    if distributed.is_main():
                        self.teacher_path.parent.mkdir(parents=True, exist_ok=True)
                        st_save_model(self.bundle.model, str(self.teacher_path))
                    self.make_teacher(None)
            elif name == "prune":
                if not resumed:
                    self.setup_method()
                # a checkpoint that a method's own loop wrote (SPP's search) resumes in that loop
                own_loop = resume_trainer.get("method_loop") if resume_trainer is not None else None
                save = self.checkpoint_fn(name)
                self.method.ctx.extra.update(checkpoint=save, resume=own_loop)
                handled = (not resumed or own_loop is not None) and self.method.run_prune_stage(self.method.ctx)
                if not handled:
                    self.trainer.train(spec, self.method, self.optim, resume=resume_trainer, checkpoint=save,
                                       on_log=self.logger.log, evaluate=self.eval_during(name), eval_every=self.eval_every[name])
                self.method.end_prune_stage()
                self.check_ranks("prune", "the masks and scores after the prune stage")
                self.finalize_model()
            else:  # recover: masks frozen, no method hooks (a score-based method would re-run its schedule)
                self.trainer.train(spec, None, self.optim, resume=resume_trainer, checkpoint=self.checkpoint_fn(name),
                                   on_log=self.logger.log, evaluate=self.eval_during(name), eval_every=self.eval_every[name])
            resume_trainer = None
            times[name] = time.perf_counter() - t0
            metrics[name], predictions = self.evaluate(name)
            if self.history.enabled:
                self.history.record(name, spec.steps, self.steps_per_epoch[name], metrics[name], self.mask_sparsity(name), end=True)
            self.logger.log({f"{name}/{k}": v for k, v in metrics[name].items()})
            progress["done"][name] = {"metrics": metrics[name], "time_s": times[name]}
            if name == "finetune":
                progress["done"][name]["source"] = self.finetune_source
            self.save_checkpoint(name, spec.steps, complete=True, trainer_state=self.optim_state(), done=progress["done"][name])
            _fault_injection(name, "done")  # tests: killed between the stage's checkpoint and progress.json
            self.save_progress(progress)
            _fault_signal(name, "done")
            signum = STOP.requested()
            if signum is not None and index + 1 < len(STAGES):
                raise RunStopped(f"Stopped by {stop_name(signum)} after the {name} stage; its checkpoint is saved. "
                                 "Run the same command again to resume.", signum)

        if predictions is None:  # every stage was already done (resumed after the last one)
            _, predictions = self.evaluate("final")
        return self.finish(metrics, times, predictions, t_start)

    def make_teacher(self, weights: Path | None) -> None:
        """distill.teacher=finetuned: a frozen copy of the dense model after the finetune
        stage (``weights``: that copy saved in checkpoints/, for a resumed run)."""
        teacher = copy.deepcopy(self.bundle.model)
        if weights is not None:
            st_load_model(teacher, str(weights), device=str(self.device))
        self.distiller = distill.Distiller(self.distill, teacher, self.task.problem)
        log.info("Distilling from the model after the finetune stage (T=%g, alpha_distil=%g, alpha_ce=%g).",
                 self.distiller.temperature, self.distiller.alpha_distil, self.distiller.alpha_ce)

    def distiller_for(self, stage: str) -> distill.Distiller | None:
        if self.distill is None or stage not in list(self.distill.stages):
            return None
        if self.distiller is None and self.distill.teacher != "finetuned":
            teacher = distill.load_teacher(str(self.distill.teacher), self.bundle.model).to(self.device)
            self.distiller = distill.Distiller(self.distill, teacher, self.task.problem)
            log.info("Distilling from %s.", self.distill.teacher)
        return self.distiller

    def optim_state(self) -> dict[str, Any] | None:
        """The run's optimizer at a stage boundary (continuous runs; None otherwise)."""
        return self.optim.state_dict() if self.optim is not None else None

    def checkpoint_fn(self, stage: str):  # noqa: ANN201
        def save(step: int, trainer_state: dict[str, Any], model_state: dict[str, Any] | None = None) -> bool:
            """Writes the checkpoint; for a diverged state, returns whether a last.pt to
            resume from exists (the message says where a re-run starts)."""
            if trainer_state.get("diverged"):  # keep last.pt (the state to resume from) untouched
                path, self.ckpt_path = self.ckpt_path, self.ckpt_dir / "diverged.pt"
                try:
                    self.save_checkpoint(stage, step, complete=False, trainer_state=trainer_state)
                finally:
                    self.ckpt_path = path
                return path.exists()
            self.save_checkpoint(stage, step, complete=False, trainer_state=trainer_state, model_state=model_state)
            return True

        return save

    def run_finetune(self, spec: StageSpec, resume: dict[str, Any] | None) -> None:
        """Dense fine-tuning, cached across runs that share model, task, seed and settings
        (in a continuous run the cache also holds the optimizer state to continue from)."""

        def train() -> None:
            self.trainer.train(spec, None, self.optim, resume=resume, checkpoint=self.checkpoint_fn("finetune"),
                               on_log=self.logger.log, evaluate=self.eval_during("finetune"), eval_every=self.eval_every["finetune"])

        def store(cache_dir: Path) -> dict[str, Any]:
            st_save_model(self.bundle.model, str(cache_dir / "model.safetensors"))
            if self.optim is not None:
                atomic_torch_save(self.optim.state_dict(), cache_dir / "optimizer.pt")
            self.history.save_stage("finetune", cache_dir / EVAL_HISTORY)  # its evaluations, for runs that reuse it
            return {"steps": spec.steps, "continuous": self.optim is not None, "computed_by": self.computed_by(),
                    "evaluated": self.evaluation_settings()}

        def compute(cache_dir: Path | None) -> dict[str, Any]:
            train()
            return store(cache_dir) if cache_dir is not None else {"steps": spec.steps}

        if not self.cfg.get("cache", True):
            train()
            self.finetune_source = {"cache": None, "reused": False}
            return
        cache = StageCache(Path(self.cfg.cache_dir), "finetune", self.finetune_key(), code_skip=NOT_IN_FINETUNE)
        if distributed.is_distributed():  # every rank trains (collectives); rank 0 stores
            reused = distributed.broadcast_object(cache.exists())
            if not reused:
                train()
                if distributed.is_main():
                    cache.get_or_compute(store)
                distributed.barrier()
            else:
                self.load_finetuned(cache.dir)
        else:
            reused = cache.reuse(compute, self.load_finetuned)
        self.finetune_source = self.cached_finetune_source(cache, reused)
        if reused and self.history.enabled:
            evaluated = self.finetune_source.get("evaluated") or {k: "32" for k in NOT_IN_FINETUNE_KEY}  # entries from before
            if evaluated != self.evaluation_settings():
                log.info("The finetune stage comes from the cache (%s), evaluated during training with %s; this run evaluates "
                         "with %s, so %s has the finetune's stage-end evaluation only; cache=false fine-tunes and evaluates "
                         "here.", cache.dir, evaluated, self.evaluation_settings(), EVAL_HISTORY)
            elif not self.history.load_stage("finetune", Path(cache.dir) / EVAL_HISTORY):
                log.info("The finetune stage comes from the cache (%s), computed without trainer.eval_every: %s has its "
                         "stage-end evaluation only; cache=false fine-tunes and evaluates here.", cache.dir, EVAL_HISTORY)

    def evaluation_settings(self) -> dict[str, str]:
        """The settings of NOT_IN_FINETUNE_KEY, which a cached finetune's evaluations were made with."""
        return {k: str(self.cfg.trainer.get(k, "32")) for k in NOT_IN_FINETUNE_KEY}

    def computed_by(self) -> dict[str, Any]:
        """Where and how a cache entry was computed: a later run reusing it records this."""
        import datetime
        import socket

        return {"run_dir": str(self.run_dir), "host": socket.gethostname(), "device": str(self.device),
                "torch_threads": torch.get_num_threads(), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def cached_finetune_source(self, cache: StageCache, reused: bool) -> dict[str, Any]:
        """The finetune entry this run used, for result.json's provenance. The cache key
        leaves out the device and thread count (a dense model fine-tuned on one machine
        serves a sweep on another), so a reuse computed elsewhere says so: a fresh
        fine-tuning here could differ from it in the last bits."""
        try:
            entry = json.loads(cache.done_file.read_text())
        except (OSError, ValueError):
            entry = {}
        by = entry.get("computed_by")
        if reused and isinstance(by, dict) and distributed.is_main():  # once, not per rank
            threads = torch.get_num_threads()
            other_device = torch.device(str(by.get("device", self.device))).type != self.device.type
            other_threads = self.device.type == "cpu" and by.get("torch_threads", threads) != threads
            if other_device or other_threads:
                log.warning("The cached finetune was computed on %s with %s torch threads (%s); this run uses %s with %d. "
                            "A finetune computed here could differ from it in the last bits; cache=false computes it here.",
                            by.get("device"), by.get("torch_threads"), by.get("run_dir"), self.device, threads)
        return {"cache": str(Path(cache.dir).absolute()), "reused": reused, "computed_by": by, "evaluated": entry.get("evaluated")}

    def load_finetuned(self, cache_dir: Path) -> None:
        """The cached finetune stage: weights (and, continuous, the optimizer to continue).
        Both files are read before anything is changed, so a damaged entry leaves the
        model untouched for the recomputation."""
        from safetensors.torch import load_file

        load_file(str(cache_dir / "model.safetensors"))  # parses the whole file (a truncated one fails here)
        optim = torch.load(cache_dir / "optimizer.pt", map_location=self.device, weights_only=True) if self.optim is not None else None
        st_load_model(self.bundle.model, str(cache_dir / "model.safetensors"), device=str(self.device))
        if optim is not None:
            self.optim.load_state_dict(optim)

    def finish(self, metrics: dict[str, dict[str, float]], times: dict[str, float], predictions: dict[str, list[dict[str, Any]]], t_start: float) -> dict[str, Any]:
        from pruneflow.export import save_model
        from pruneflow.speed import measure_speed

        last = [s for s in STAGES if s in metrics][-1]
        metrics["final"] = dict(metrics[last])
        final_model = self.bundle.model
        if self.method.prunes:
            self.weights.bake()
        self.check_ranks("final", "the final weights")
        main = distributed.is_main()  # torchrun: only rank 0 measures and writes
        # Every output that can be written is written: one that fails is recorded in
        # result.json ("output_errors") instead of losing the run.
        failed: dict[str, str] = {}
        speed = None
        if self.cfg.speed.enabled and main:
            try:
                speed = measure_speed(self.cfg, self.bundle, self.task, self.device)
            except Exception as e:  # noqa: BLE001 - e.g. no memory left for the dense copy it times beside the model
                failed["speed"] = f"{type(e).__name__}: {e}"
                log.error("Could not measure speed: %s", failed["speed"])
        export = self.method.export_info(self.bundle, self.device) if hasattr(self.method, "export_info") else None

        def attempt(what: str, fn) -> None:  # noqa: ANN001
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - a disk or permission problem with one output
                failed[what] = f"{type(e).__name__}: {e}"
                log.error("Could not write %s: %s", what, failed[what])

        save = self.cfg.get("save_model", True) and main
        if save:
            attempt("model/", lambda: save_model(self.bundle, self.run_dir / "model", self.method))
        if main:
            attempt("predictions", lambda: write_predictions(self.run_dir, self.task, predictions))
        times["total"] = max(time.perf_counter() - t_start, sum(times.values()))
        result = build_result(self, final_model, metrics, times, speed, export)
        if self.finetune_source is not None:
            result["provenance"]["finetune"] = self.finetune_source
        result["provenance"]["resumes"] = self.progress().get("resumes", [])
        if distributed.is_distributed():
            result["provenance"]["distributed"] = {**distributed.info(), "fingerprints": self.rank_checks}
        if save and "model/" not in failed:
            from pruneflow.card import model_card

            attempt("model/README.md", lambda: atomic_write_text(self.run_dir / "model" / "README.md", model_card(result)))
        if failed:
            result["output_errors"] = failed
        if self.history.enabled and main:
            result["eval_history"] = self.history_summary(result["main_metric"], metrics["final"])
        measured = result["sparsity"]["measured"]
        if self.method.prunes and measured >= 1.0:
            log.warning("Every prunable weight of the final model is zero (measured sparsity 1.0; %d prunable weights, "
                        "sparsity=%s): its outputs no longer depend on those layers' weights.", result["params"]["prunable"], self.sparsity)
        if self.method.prunes and self.sparsity is None and measured < 0.01:  # soft movement, L0: no target to fall short of
            log.warning("method=%s removed %.2f %% of the prunable weights: its sparsity follows from its penalty "
                        "(method.final_lambda) and how long the scores train (stages.prune), not from a target. Raise "
                        "method.final_lambda or lengthen stages.prune for a sparser model.", self.method.name, 100 * measured)
        if main:
            with writing(self.run_dir / "result.json"):
                atomic_write_json(self.run_dir / "result.json", result)
            if failed:
                log.error("The run finished and result.json is written, but %s could not be made (see output_errors).", ", ".join(failed))
        self.logger.summary(result)
        self.logger.finish()
        return result


    def history_summary(self, main_metric: str, final: dict[str, float]) -> dict[str, Any]:
        """result.json's pointer to eval_history.jsonl, with its best evaluation by the
        main metric (logged beside the final model's, which is the one result.json reports)."""
        rows = self.history.rows()
        last = [s for s in STAGES if self.plan.runs(s)][-1]
        best = self.history.best(main_metric, last, rows)
        summary: dict[str, Any] = {"file": EVAL_HISTORY, "evaluations": len(rows), "every": self.cfg.trainer.eval_every, "best": None}
        if best is not None:
            summary["best"] = {k: best[k] for k in ("stage", "step", "epoch", "metrics")}
            log.info("%s: %d evaluations; the %s stage's best %s, %.4f, after its step %d (epoch %g); the final model's "
                     "(result.json): %.4f", EVAL_HISTORY, len(rows), last, main_metric, best["metrics"][main_metric],
                     best["step"], best["epoch"], final.get(main_metric, float("nan")))
        return summary


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a nested dict/list (a method's state)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _comparable(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    from pruneflow.validation import _flatten

    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat = _flatten(container)
    free = resume_free(container)
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in free) and not k.startswith("hydra")}


def _saved_settings(path: Path) -> dict[str, Any]:
    """A run's settings as ``check_resume_config`` saved them (checkpoints/config.json)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); start the run over with overwrite=true.") from e


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """The settings in which ``now`` differs from ``saved``, listed ("" if none)."""
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    return "; ".join(f"{k}: {saved.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")


# What a run writes into its folder (besides the command's .hydra/ record and the log of the run now
# going): overwrite=true removes them, so that nothing of the replaced run is left beside
# the new one's result (its model/ when save_model=false, its W&B run, its predictions).
RUN_OUTPUTS = ("result.json", "checkpoints", "model", "adapter", "predictions.jsonl", "predictions_*.jsonl", EVAL_HISTORY,
               "spp_path.json", "error.txt", STOPPED_FILE, "wandb", ".wandb_run_id")


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Delete ``RUN_OUTPUTS`` in ``run_dir`` (nothing else: the folder may hold the user's
    own files); returns the names removed."""
    import shutil

    removed = []
    for pattern in RUN_OUTPUTS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


def check_finished_config(cfg: DictConfig, run_dir: Path, done: dict[str, Any]) -> None:
    """A finished run is skipped only for its own settings: with others, its result.json
    would stand for a run that was never made. The settings are its checkpoints' or, once
    checkpoints/ was deleted (to free space after a sweep), its result.json's."""
    saved_path = run_dir / "checkpoints" / "config.json"
    if saved_path.exists():
        listed = _differences(_saved_settings(saved_path), _comparable(cfg))
    elif isinstance(done.get("config"), dict):
        listed = _differences(_comparable(done["config"]), _comparable(cfg))
    else:
        listed = ""
    if listed:
        raise UserError(
            f"{run_dir} holds a finished run with other settings ({listed}); its result.json is not a result for "
            "these. Choose another hydra.run.dir, or overwrite=true to replace that run."
        )


def check_resume_config(cfg: DictConfig, run_dir: Path) -> None:
    """Resuming a run directory with different settings would mix two runs: an error
    naming the differences, unless ``allow_config_change=true``."""
    saved_path = run_dir / "checkpoints" / "config.json"
    now = _comparable(cfg)
    if not saved_path.exists():
        if (run_dir / "checkpoints").exists() and distributed.is_main():
            atomic_write_json(saved_path, now)
        elif cfg.get("allow_config_change", False):
            check_nothing_to_resume(run_dir)
        return
    listed = _differences(_saved_settings(saved_path), now)
    if not listed:
        return
    if cfg.get("allow_config_change", False):
        log.warning("Resuming %s with changed settings (allow_config_change=true): %s", run_dir, listed)
        atomic_write_json(saved_path, now)
        return
    raise UserError(
        f"{run_dir} holds an unfinished run with other settings ({listed}). Resuming it would mix two configurations. "
        "Run the same settings to resume it, add allow_config_change=true to resume it with these changes (e.g. a lower "
        "learning rate after a divergence), overwrite=true to start it over, or choose another hydra.run.dir."
    )


def check_nothing_to_resume(run_dir: Path) -> None:
    """``allow_config_change=true`` in a folder with no run to resume would quietly start a
    new run, the typical slip being a re-run without the stopped run's ``hydra.run.dir``. A
    sweep re-launched with it resumes the jobs that started and starts the others: there
    the job's log says so."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.warning("allow_config_change=true: %s holds no run to resume, so this job starts a new one.", run_dir)
        return
    raise UserError(
        f"allow_config_change=true resumes an unfinished run with changed settings, but {run_dir} holds no run to resume "
        "(no checkpoints/), so this command would start a new run and ignore it. To resume a run, run in its folder: add "
        "hydra.run.dir=<that run's folder> (the message that suggested allow_config_change names it); to start a new run, "
        "drop allow_config_change=true."
    )


def begin(run: Run | LLMRun) -> None:
    """The first steps of both runners' ``prepare``: the data-free checks, then this run's
    torch threads and seed."""
    run.check_settings()
    threads = run.cfg.trainer.get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(int(run.cfg.seed))


def check_settings(cfg: DictConfig, here: bool = True, overrides: list[str] | None = None) -> None:
    """The checks of one run that need no data (the CLI runs them for each job of a sweep
    before the first starts; ``here=False`` for jobs that start on other machines;
    ``overrides``: the job's command line). Raises ``UserError``."""
    from pruneflow.llm.runner import LLMRun, is_lm_task

    (LLMRun if is_lm_task(cfg) else Run)(cfg, Path("."), overrides).check_settings(here)


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None,
        record: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """``record(run_dir)`` writes the command's record (the CLI: ``.hydra/``) once the
    folder is this command's: at once in a folder that holds no run, and in one that
    holds a run only once its settings are accepted (resumed, or ``overwrite=true``).
    A refused command, or one answered from a finished run, leaves the record of the
    run in the folder as it was."""
    threads = torch.get_num_threads()
    try:
        return _run(cfg, Path(run_dir), overrides, record)
    finally:  # trainer.torch_threads is this run's setting, not the calling process's
        torch.set_num_threads(threads)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (finished, or with checkpoints to resume from)."""
    return (run_dir / "result.json").exists() or (run_dir / "checkpoints").exists()


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, record: Callable[[Path], None] | None = None) -> dict[str, Any]:
    if distributed.env_world_size() > 1:  # torchrun: join the group, share rank 0's run dir
        distributed.setup(resolve_device(str(cfg.trainer.device)))
        run_dir = distributed.shared_run_dir(run_dir)
    if not distributed.is_main():
        record = None
    with run_lock(run_dir):
        if record is not None and not holds_run(run_dir):
            record(run_dir)
            record = None
        result_path = run_dir / "result.json"
        if result_path.exists() and not cfg.get("overwrite", False):
            try:
                done = json.loads(result_path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{result_path} exists but cannot be read ({e}): run again with overwrite=true to redo this run.") from e
            check_finished_config(cfg, run_dir, done)
            log.info("%s exists: this run is finished, skipping it (overwrite=true runs it again).", result_path)
            return done
        if cfg.get("overwrite", False):
            if distributed.is_main():
                removed = remove_run_outputs(run_dir)
                if removed:  # pruneflow.log is kept (appended to): say where this run's lines start
                    log.info("overwrite=true: removed the previous run's %s from %s; the log lines above this one are "
                             "that run's, this run's start here.", ", ".join(removed), run_dir)
            distributed.barrier()
        fresh = not (run_dir / "checkpoints").exists()
        from pruneflow.llm.runner import LLMRun, is_lm_task

        try:
            check_resume_config(cfg, run_dir)
            if distributed.is_main():  # the folder is this command's now: a refused command left them as they were
                for stale in ("error.txt", STOPPED_FILE):  # a failed job run again; a stop (written again if it stops)
                    (run_dir / stale).unlink(missing_ok=True)
            if record is not None:  # the settings fit the run in the folder: this command's record replaces its
                record(run_dir)
            r = LLMRun(cfg, run_dir, overrides) if is_lm_task(cfg) else Run(cfg, run_dir, overrides)
            r.prepare()
        except UserError as e:
            e.before_work = fresh  # the CLI removes a new run folder that holds nothing yet
            raise
        if distributed.is_main():
            with writing(run_dir / "checkpoints"):
                (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                if not (run_dir / "checkpoints" / "config.json").exists():
                    atomic_write_json(run_dir / "checkpoints" / "config.json", _comparable(cfg))
        return r.execute()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process per run directory: a second one started on it stops with an error."""
    if not distributed.is_main():
        yield
        return
    from filelock import FileLock, Timeout

    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".pruneflow.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout as e:
        raise UserError(
            f"{run_dir} is in use by another pruneflow process (its lock: {run_dir / '.pruneflow.lock'}). Wait for it to "
            "finish, or give this run another hydra.run.dir."
        ) from e
    try:
        yield
    finally:
        lock.release()
