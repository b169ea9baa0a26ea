"""Checks of settings that types alone cannot express, run before any data is read.

Every message names the key, the value given and what is allowed (``invalid``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pruneflow.errors import SPARSITY_ALLOWED, UnusedSetting, UserError, check_bool, invalid
from pruneflow.published import as_typed

log = logging.getLogger("pruneflow")

PRECISIONS = ("32", "bf16", "fp16")


def _number(value: Any) -> bool:  # noqa: ANN401
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_sparsity(value: Any) -> None:  # noqa: ANN401
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= float(value) < 1):
        raise invalid("sparsity", value, SPARSITY_ALLOWED)


def compile_toolchain_missing(cuda: bool) -> str | None:
    """What torch.compile's default backend would lack to build kernels, or None: on CUDA
    Triton, on a CPU a C++ compiler. (Otherwise the run fails at its first step, after the
    data and model are loaded, with a long compiler traceback.)"""
    if cuda:
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton (pip install triton)"
    try:  # Inductor's own search: $CXX, else g++ (it runs `<compiler> --version`)
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # another torch layout: let torch.compile report it
        return None
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return f"a C++ compiler ({os.environ.get('CXX') or 'g++'}; set CXX to use another)"
    return None


def validate_trainer(cfg: DictConfig, cuda: bool, here: bool = True) -> None:
    """``trainer.*``: allowed names, ranges and combinations. ``here=False``: the run will
    start on another machine (a Slurm job), whose compilers are not known here."""
    from pruneflow import distributed
    from pruneflow.trainer import BATCH_ORDERS, LR_SCHEDULERS, OPTIMIZERS

    t = cfg.trainer
    if not check_bool(t.get("drop_last", True), "trainer.drop_last") and distributed.env_world_size() > 1:
        raise invalid("trainer.drop_last", False, "true under torchrun",
                      "Each process takes an equal share of every batch; an epoch's last, smaller batch may not split evenly.")
    if str(t.get("batch_order", "shuffle")) not in BATCH_ORDERS:
        raise invalid("trainer.batch_order", t.get("batch_order"), BATCH_ORDERS,
                      "shuffle: a new permutation of the examples every epoch; mtdnn: batches of consecutive "
                      "examples, their order shuffled once and kept every epoch (PLATON's GLUE code); repeated_aug: "
                      "each example three times in a row in every epoch's permutation, cut to the epoch's length (DeiT's "
                      "RASampler, SPP's DeiT scripts).")
    if str(t.get("optimizer")) not in OPTIMIZERS:
        raise invalid("trainer.optimizer", t.get("optimizer"), OPTIMIZERS)
    if str(t.get("lr_scheduler")) not in LR_SCHEDULERS:
        raise invalid("trainer.lr_scheduler", t.get("lr_scheduler"), LR_SCHEDULERS)
    precision = str(t.get("precision"))
    if precision not in PRECISIONS:
        raise invalid("trainer.precision", t.get("precision"), PRECISIONS)
    if precision == "fp16" and not cuda:
        raise invalid(
            "trainer.precision", "fp16", "32 or bf16 on this device",
            "fp16 autocast with a gradient scaler is for CUDA devices; on a CPU use bf16 (or 32).",
        )
    if str(t.get("eval_precision", "32")) not in PRECISIONS:
        raise invalid("trainer.eval_precision", t.get("eval_precision"), PRECISIONS,
                      "The evaluations run under autocast to this dtype; 32: no autocast.")
    if not isinstance(t.get("compile", False), bool):
        raise invalid("trainer.compile", t.get("compile"), "true or false", "true compiles the model with torch.compile.")
    if t.get("compile", False) and here and (missing := compile_toolchain_missing(cuda)):
        raise invalid("trainer.compile", True, "false on this machine", f"torch.compile (Inductor) builds its kernels with {missing}, which is not available here.")
    pin = t.get("pin_memory", "auto")
    if not (isinstance(pin, bool) or pin == "auto"):
        raise invalid("trainer.pin_memory", pin, "auto (on CUDA), true or false")
    if pin is True and not cuda:
        raise invalid("trainer.pin_memory", True, "auto or false on this device", "Pinned host memory only speeds up copies to a CUDA device.")
    ratio, steps = t.get("warmup_ratio"), t.get("warmup_steps")
    if not _number(ratio) or not 0 <= ratio < 1:
        raise invalid("trainer.warmup_ratio", ratio, "a number in [0, 1) (fraction of the schedule's steps)")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise invalid("trainer.warmup_steps", steps, "an integer >= 0, or null to use trainer.warmup_ratio")
    if steps is not None and ratio:
        raise UserError(
            f"Both 'trainer.warmup_ratio' ({ratio}) and 'trainer.warmup_steps' ({steps}) are set. Set only one, "
            "e.g. trainer.warmup_ratio=0 or trainer.warmup_steps=null."
        )
    if str(t.get("lr_scheduler")) == "warmup_linear_mtdnn" and steps is not None:
        raise invalid(
            "trainer.warmup_steps", steps, "null with trainer.lr_scheduler=warmup_linear_mtdnn",
            "mt-dnn's warmup_linear takes its warm-up as a fraction of the steps: set trainer.warmup_ratio (their --warmup, 0.1).",
        )
    if str(t.get("lr_scheduler")) == "cosine_epochs" and (ratio or steps):
        warm = f"trainer.warmup_ratio={ratio}" if ratio else f"trainer.warmup_steps={steps}"
        raise UserError(
            f"'trainer.lr_scheduler=cosine_epochs' has no warm-up, so '{warm}' would be ignored: it is timm's per-epoch "
            "cosine as DeiT's scripts run it without warm-up (SPP's retraining: --warmup-epochs 0). Set "
            "trainer.warmup_ratio=0 and trainer.warmup_steps=null, or use trainer.lr_scheduler=cosine (per step, with warm-up)."
        )
    min_lr = t.get("min_lr", 0.0)
    if not _number(min_lr) or min_lr < 0:
        raise invalid("trainer.min_lr", min_lr, "a number >= 0 (the learning rate where cosine_epochs ends; timm's --min-lr 1e-5)")
    if str(t.get("lr_scheduler")) == "constant" and (ratio or steps):
        raise invalid(
            "trainer.lr_scheduler", "constant", ", ".join(LR_SCHEDULERS),
            "The constant schedule has no warm-up; use constant_with_warmup, or set the warm-up to 0.",
        )
    for key, low, what in (
        ("weight_decay", 0, "a number >= 0"), ("max_grad_norm", 0, "a number >= 0 (0: no clipping)"),
        ("adam_epsilon", 0, "a number > 0"), ("momentum", 0, "a number >= 0"),
    ):
        v = t.get(key)
        if not _number(v) or v < low or (key == "adam_epsilon" and v <= 0):
            raise invalid(f"trainer.{key}", v, what)
    for key in ("adam_beta1", "adam_beta2"):
        v = t.get(key)
        if not _number(v) or not 0 <= v < 1:
            raise invalid(f"trainer.{key}", v, "a number in [0, 1)")
    if t.get("momentum") and str(t.get("optimizer")) != "sgd":
        raise invalid("trainer.momentum", t.get("momentum"), "0 unless trainer.optimizer=sgd", "Adam-type optimizers have their own betas.")
    for key, low in (("gradient_accumulation_steps", 1), ("log_every", 1), ("checkpoint_every", 0)):
        v = t.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise invalid(f"trainer.{key}", v, f"an integer >= {low}")
    every = t.get("eval_every", 0)
    if not (every == "epoch" or (isinstance(every, int) and not isinstance(every, bool) and every >= 0)):
        raise invalid("trainer.eval_every", every, "an integer >= 0 (0: after each stage only) or epoch")
    keep = t.get("keep_freed_memory", "auto")
    if not (isinstance(keep, bool) or keep == "auto"):
        raise invalid("trainer.keep_freed_memory", keep, "auto (on CPU), true or false")
    threads = t.get("torch_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise invalid("trainer.torch_threads", threads, "an integer >= 1, or null for torch's default")
    freeze = t.get("freeze") or []
    if not all(isinstance(f, str) for f in freeze):
        raise invalid("trainer.freeze", list(freeze), "a list of parameter-name patterns, e.g. [\"*embeddings*\"]")


# ----------------------------------------------------------------------------- settings a run does not use
GROUPS = ("model", "task", "method", "schedule", "stages", "logger")
# Groups whose choice is itself a setting that a run may not use (recovery=lora outside
# task=lm/...): explicit_settings counts choosing one as setting it.
SETTING_GROUPS = ("recovery",)
# Groups whose choice is a setting though every option has the same keys: choosing
# schedule=linear for method=spp (which has no schedule) is setting schedule.name.
CHOICE_SETTINGS = ("schedule",)


@functools.cache
def config_groups() -> frozenset[str]:
    """The config groups of conf/ (model, task, method, ...)."""
    from pruneflow.cli import CONFIG_DIR

    return frozenset(e.name for e in os.scandir(CONFIG_DIR) if e.is_dir())


@functools.cache
def default_choices() -> dict[str, str]:
    """The option each group of conf/config.yaml's defaults list picks (model: tiny_vit, ...)."""
    from omegaconf import OmegaConf

    from pruneflow.cli import CONFIG_DIR

    entries = OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIG_DIR, "config.yaml"))).get("defaults", [])
    return {str(k): str(v) for e in entries if isinstance(e, dict) for k, v in e.items()}


def group_defaults(cfg: DictConfig, groups: tuple[str, ...] = GROUPS) -> dict[str, Any] | None:
    """The settings (flattened, dotted keys) that the chosen options of ``groups`` give by
    themselves (no experiment, no command-line values); None when they cannot be composed
    (e.g. a config from elsewhere). Read-only: the result is shared between callers."""
    from hydra.core.global_hydra import GlobalHydra

    from pruneflow.cli import CONFIG_DIR

    choices = tuple(f"{g}={cfg[g].name}" for g in groups if isinstance(cfg.get(g), DictConfig) and cfg[g].get("name"))
    gh = GlobalHydra.instance()
    # where the configs come from: the app's search path (a --config-dir adds one), else ours alone
    folders = [s.path for s in gh.config_loader().get_sources() if s.scheme() == "file"] if gh.is_initialized() else [CONFIG_DIR]
    return _composed_defaults(choices, tuple((f, _yaml_state(f)) for f in folders), gh.is_initialized())


def _yaml_state(folder: str) -> tuple[int, int]:
    """How many YAML files a config folder holds and the newest one's mtime: a file edited
    in a long-lived process (a notebook using the API) is composed again."""
    times = [p.stat().st_mtime_ns for p in Path(folder).rglob("*.yaml")]
    return len(times), max(times, default=0)


@functools.lru_cache(maxsize=64)
def _composed_defaults(choices: tuple[str, ...], folders: tuple[tuple[str, tuple[int, int]], ...],
                       initialized: bool) -> dict[str, Any] | None:
    """One composition (~0.5 s on 2 cores) per set of choices and state of the config
    folders in a process: a sweep's check composes the same groups' defaults for many of its jobs."""
    from hydra import compose, initialize_config_dir

    from pruneflow.cli import CONFIG_DIR

    try:
        if initialized:  # inside the pruneflow app (or a test's compose context): its search path
            return _flatten(compose(config_name="config", overrides=list(choices)))
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return _flatten(compose(config_name="config", overrides=list(choices)))
    except Exception:  # noqa: BLE001 - e.g. a group option that exists only in a user's config dir
        return None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:  # noqa: ANN401
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:  # noqa: ANN401
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value

    walk(container, prefix)
    return out


# Top-level keys that hold no setting: an experiment's description, read by the report.
DESCRIPTION_KEYS = ("hydra", "experiment_info")
# Mappings handed on whole to a library, so they take keys no config here names: timm's
# create_model and create_transform kwargs, a transformers config and overrides of it.
PASS_THROUGH = ("kwargs", "augment_kwargs", "config", "config_overrides")


def _paths(flat: dict[str, Any]) -> set[str]:
    """Every dotted key of a flattened config and every section above one."""
    return {k.rsplit(".", i)[0] for k in flat for i in range(k.count(".") + 1)}


def added_keys(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Dotted keys of a run's config (``mine``, flattened) that its groups' defaults
    (``theirs``) do not define, i.e. keys added with ``+key=value``: nothing reads them.
    New entries are fine under a mapping that is empty or null by default
    (``model.config_overrides: {}``), and a key may replace a whole section."""
    known = _paths(theirs)
    open_maps = [k for k, v in theirs.items() if v is None or v == {}]
    open_maps += [k for k in known if k.rpartition(".")[2] in PASS_THROUGH]
    return [k for k in mine
            if k not in known and k.split(".")[0] not in DESCRIPTION_KEYS and not any(k.startswith(m + ".") for m in open_maps)]


def unknown_key_message(key: str, value: Any, theirs: dict[str, Any]) -> str:  # noqa: ANN401
    """One paragraph for a key that ``added_keys`` found."""
    from pruneflow.cli import _closest

    known = _paths(theirs)
    parent = key.rpartition(".")[0]
    while parent and parent not in known:  # name the deepest section that exists
        parent = parent.rpartition(".")[0]
    depth = parent.count(".") + 1 if parent else 0
    valid = sorted({k.split(".")[depth] for k in theirs if k.startswith(parent + ".") or not parent}
                   - set(DESCRIPTION_KEYS))
    where = f"'{parent}'" if parent else "the top level"
    open_maps = sorted(k for k in known if k.rpartition(".")[2] in PASS_THROUGH and not k.startswith("hydra"))
    return (f"Unknown key '{key}' (set to {value!r} with +{key}=... or by an experiment): no part of pruneflow reads "
            f"it, so it would be silently ignored. Valid keys at {where}: {', '.join(valid)}."
            + _closest(key[len(parent) + 1 if parent else 0:].split(".")[0], valid)
            + (f" New entries are taken only under {', '.join(open_maps)}." if open_maps else ""))


def _unknown_key_problem(mine: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    unknown = added_keys(mine, theirs)
    return unknown_key_message(unknown[0], mine[unknown[0]], theirs) if unknown else None


def unknown_key_problem(cfg: DictConfig) -> str | None:
    """The message for the first key of ``cfg`` that its groups do not define, or None."""
    default = group_defaults(cfg, GROUPS + SETTING_GROUPS)
    return None if default is None else _unknown_key_problem(_flatten(cfg), default)


def typed_settings(mine: dict[str, Any], typed: Sequence[str]) -> dict[str, Any]:
    """The dotted keys (with the run's values) that the command line names, even at their
    default value: ``schedule=cubic`` for a method without a schedule is a setting the
    run would ignore as much as ``schedule=linear`` is. A whole section (``distill={...}``)
    names every key under it; choices of the model/task/method/logger groups are no setting.
    A value that switches off (null, false, 0) is left out: typed at its default it undoes
    an experiment's value (``method.lengthen_to_fit=false``), which must stay possible."""
    out: dict[str, Any] = {}
    for key in typed_text(typed):
        if key in SETTING_GROUPS + CHOICE_SETTINGS:
            key = f"{key}.name"
        elif key.startswith("hydra") or key in config_groups():  # every run has a model, a task, ...: no setting
            continue
        out.update({k: v for k, v in mine.items() if (k == key or k.startswith(key + ".")) and v is not None and v is not False and v != 0})
    return out


def explicit_settings(cfg: DictConfig, typed: Sequence[str] = ()) -> dict[str, Any]:
    """Dotted keys (and values) that the command line or an experiment set to something
    other than the chosen groups' defaults, and those the command line (``typed``, its
    overrides) names at their default value. A key no group defines is an error."""
    theirs = group_defaults(cfg)
    if theirs is None:
        return {}
    mine = _flatten(cfg)
    chosen = [g for g in SETTING_GROUPS if theirs.get(f"{g}.name") != mine.get(f"{g}.name")]
    problem = unknown_key_problem(cfg) if chosen else _unknown_key_problem(mine, theirs)  # a second composition (once per process)
    if problem:
        raise UserError(problem)
    explicit = {k: v for k, v in mine.items() if k not in ("hydra",) and not k.startswith("hydra.") and theirs.get(k, object()) != v}
    for g in CHOICE_SETTINGS:
        name = mine.get(f"{g}.name")
        if name is not None and default_choices().get(g) not in (None, name):
            explicit[f"{g}.name"] = name
    return {**typed_settings(mine, typed), **explicit}


def typed_text(typed: Sequence[str]) -> dict[str, str]:
    """Each ``key=value`` of the command line as typed (``stages.prune.epochs=4``, which
    the float-typed config holds as 4.0): messages quote the user's own words."""
    out = {}
    for line in typed:
        if "=" in line and not line.startswith("~"):
            key, value = line.lstrip("+").split("=", 1)
            out[key.strip()] = value.strip()
    return out


# A sweep gives a setting to every job and only some use it (stages.prune.lr in -m method=dense,magnitude):
# the CLI's check names such keys here for the jobs it launches, which log it instead of refusing it.
SWEEP_SHARED_ENV = "PRUNEFLOW_SWEEP_SHARED_UNUSED"
#: the same keys while the CLI checks the sweep's jobs (quietly: it decides once every job is checked)
SWEEP_SHARED_CHECKING: set[str] = set()


def _shared_by_the_sweep(key: str) -> str | None:
    """``"quiet"``/``"log"`` when ``key`` is a setting the sweep shares with jobs that use it."""
    if key in SWEEP_SHARED_CHECKING:
        return "quiet"
    return "log" if key in [k for k in os.environ.get(SWEEP_SHARED_ENV, "").split(",") if k] else None


def check_unused(cfg: DictConfig, unused: list[tuple[str, str]], explicit: dict[str, Any] | None = None, typed: Sequence[str] = ()) -> None:
    """A setting the run would ignore is an error (unless set to null, 0 or ``<section>.enabled=false``: "not used").
    ``explicit``: ``explicit_settings(cfg, typed)`` if the caller has it (one composition,
    ~0.5 s); ``typed``: the command line's overrides (to compute it, and to quote them)."""
    if not unused:
        return
    if explicit is None:
        explicit = explicit_settings(cfg, typed)
    typed_values = typed_text(typed)
    for prefix, why in unused:
        for key, value in explicit.items():
            # null, 0 and a section's enabled=false say "not used"; another false is a value the run would ignore
            unset = value is None or (not isinstance(value, bool) and value == 0) or (value is False and key.endswith(".enabled"))
            if not unset and (key == prefix or key.startswith(prefix + ".")):
                group = key.removesuffix(".name")
                if key.endswith(".name") and group in SETTING_GROUPS + CHOICE_SETTINGS:  # a group's option was chosen
                    key = group
                shown = typed_values.get(key, as_typed(value))
                shared = _shared_by_the_sweep(key) if key in typed_values else None
                if shared == "log":
                    log.warning("'%s=%s' is not used by this job: %s. The sweep gives it to every job, and other jobs use it.", key, shown, why)
                if shared is None:
                    raise UnusedSetting(f"'{key}={shown}' would be ignored: {why}. Remove it; no setting is silently ignored.", key)


def check_typed_unused(cfg: DictConfig, unused: list[tuple[str, str]], typed: Sequence[str]) -> None:
    """``check_unused`` for settings that an experiment sets once for every row of its table,
    some of which do not read them (the calibration data of a data-free magnitude row): only
    the command line's own settings are refused."""
    check_unused(cfg, unused, typed_settings(_flatten(cfg), typed), typed)


def switched_off(cfg: DictConfig) -> list[tuple[str, str]]:
    """Sections that a switch or a choice turns off (``check_unused``'s list)."""
    out = []
    logger = cfg.get("logger") or {}
    if logger.get("name") == "none":
        out.append(("logger", "logger=none logs to no service; logger=wandb uses logger.*"))
    elif logger.get("mode") == "disabled":
        out += [(f"logger.{k}", "logger.mode=disabled makes no W&B run") for k in logger if k not in ("name", "mode")]
    task = cfg.get("task") or {}
    if str(task.get("name", "")).startswith("squad/") and task.get("features", "run_qa") == "run_qa":
        out.append(("task.max_query_length", "task.features=run_qa keeps whole questions; task.features=run_squad cuts them at task.max_query_length"))
    if task.get("path"):
        out += [("task.hub_id", "task.path reads local files, not the Hub"),
                ("task.source", "task.path reads local files (task.source picks where to download from)"),
                ("task.download_dir", "task.path reads local files: nothing is downloaded")]
        if "source" in task:  # CIFAR reads its batch files directly, not through the datasets cache
            out.append(("task.cache_dir", "task.path's CIFAR batch files are read directly, not through the datasets cache"))
    elif task.get("source") == "torchvision":
        out += [(f"task.{k}", "task.source=torchvision downloads into task.download_dir") for k in ("hub_id", "cache_dir")]
    elif "source" in task:
        out.append(("task.download_dir", "task.source=hub loads through datasets (task.cache_dir); task.download_dir is torchvision's"))
    if task.get("augment") is False:
        out.append(("task.augment_kwargs", "task.augment=false trains on the evaluation transform"))
    model = cfg.get("model") or {}
    if model.get("family") in ("hf", "causal_lm") and model.get("pretrained", True) and (model.get("path") or model.get("hub_id")):
        out += [(f"model.{k}", "model.pretrained=true loads the architecture and tokenizer with the weights") for k in ("config", "tokenizer")]
    mixup = task.get("mixup")
    if hasattr(mixup, "get"):
        alphas = [mixup.get("mixup_alpha"), mixup.get("cutmix_alpha")]
        if not any(alphas):
            out += [(f"task.mixup.{k}", "mixing is off (task.mixup.mixup_alpha and cutmix_alpha are 0)") for k in ("prob", "switch_prob", "mode")]
        elif not all(alphas):
            out.append(("task.mixup.switch_prob", "it chooses between Mixup and CutMix, and only one of their alphas is on"))
    d = cfg.get("distill")
    if d is not None and d.get("enabled") is False:
        out.append(("distill", "distillation is off (distill.enabled=false); distill.enabled=true uses distill.*"))
    speed = cfg.get("speed")
    if speed is not None and speed.get("enabled") is False:
        out += [(f"speed.{k}", "the latency benchmark is off (speed.enabled=false)") for k in speed if k != "enabled"]
    trainer = cfg.get("trainer") or {}
    if trainer.get("lr_scheduler", "cosine_epochs") != "cosine_epochs":
        out.append(("trainer.min_lr", f"it is where trainer.lr_scheduler=cosine_epochs ends; {trainer.get('lr_scheduler')} does not read it"))
    if trainer.get("optimizer") == "sgd":
        out += [(f"trainer.{k}", "trainer.optimizer=sgd has no Adam betas or epsilon (trainer.momentum is its setting)")
                for k in ("adam_beta1", "adam_beta2", "adam_epsilon")]
    schedule = cfg.get("schedule")
    if schedule is not None and schedule.get("name") == "oneshot":
        out += [(f"schedule.{k}", "schedule=oneshot prunes once, right after schedule.initial_warmup") for k in ("final_warmup", "frequency")]
    return out


LOGGER_MODES = ("offline", "online", "disabled")


def refuse_compressed(path: str, model_name: str) -> None:
    """A run starts from a full-size model; a structurally compressed one (SPP's
    ``model/``: heads and FFN neurons removed) would fail to load with a list of size
    mismatches that names neither the cause nor the way out."""
    from pruneflow.export import saved_metadata

    try:
        saved = saved_metadata(path)
    except (OSError, ValueError, AttributeError):  # not a saved model/ (the model loader says what it is)
        return
    meta_file, meta = saved if saved is not None else (None, None)
    if isinstance(meta, dict) and meta.get("compressed"):
        raise UserError(
            f"model.path={path} holds a structurally compressed model ({meta_file.name}: pruneflow.compressed is "
            f"true): its attention heads and FFN neurons were removed, so its layers are smaller than model={model_name}'s "
            "and a run cannot start from it. Point model.path at a full-size model (dense, or a masked model/ of an "
            f"unstructured method); to evaluate or use the compressed one, load it in Python with "
            f"pruneflow.load_model('{path}')."
        )


def refuse_non_finite(cfg: DictConfig, prefix: str = "") -> None:
    """No setting may be nan or inf (``trainer.max_grad_norm=nan``): such a value passes
    every range check written as a comparison, and would run a broken job (NaN weights,
    a stage of nan epochs) instead of being refused here."""
    for key, value in _flatten(cfg, prefix).items():
        if key.split(".")[0] == "hydra":
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise invalid(key, value, "a finite number", "Settings take no nan or inf.")


def validate_run(cfg: DictConfig) -> None:
    """Top-level, logger, task and model settings that need no data to check."""
    logger = cfg.get("logger") or {}
    if logger.get("name") == "wandb" and str(logger.get("mode")) not in LOGGER_MODES:
        raise invalid("logger.mode", logger.get("mode"), LOGGER_MODES, "logger=none turns W&B off.")
    ebs = cfg.stages.get("eval_batch_size")
    if not isinstance(ebs, int) or isinstance(ebs, bool) or ebs < 1:
        raise invalid("stages.eval_batch_size", ebs, "an integer >= 1")
    speed = cfg.get("speed") or {}
    for key in ("batch", "repeats"):  # checked now, not when the finished run measures latency
        v = speed.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise invalid(f"speed.{key}", v, "an integer >= 1", "speed.enabled=false skips the latency measurement.")
    task = cfg.task
    for key in ("max_train_samples", "max_eval_samples"):
        v = task.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise invalid(f"task.{key}", v, "an integer >= 1 (the first N examples), or null for all of them")
    if task.get("path") is not None and str(task.name) == "digits":
        raise invalid("task.path", task.path, "null for task=digits", "digits is scikit-learn's bundled set: it reads no files.")
    model = cfg.model
    if model.get("family") in ("hf", "causal_lm") and model.get("path") and not model.get("pretrained", True) and model.get("config"):
        raise UserError(
            f"model.path={model.path} would be ignored: model={model.name} has model.pretrained=false and a model.config, so "
            "it is built from that config with random weights. Set model.pretrained=true to load the path, or remove model.path."
        )
    if model.get("path"):
        refuse_compressed(str(model.path), str(model.name))
    method = cfg.method
    preset = method.get("preset")
    if preset not in (None, "auto") and not str(task.name).startswith("glue/"):
        raise invalid("method.preset", preset, "auto or null for a task outside GLUE",
                      f"The presets are the authors' GLUE settings; task={task.name} is not a GLUE task.")


def check_model_path(cfg: DictConfig) -> None:
    """``model.path`` must exist before any work: a sweep checks it for every job."""
    path = cfg.model.get("path")
    if path and not Path(str(path)).expanduser().exists():
        raise invalid("model.path", str(path), "a local directory written by save_pretrained (timm: model.safetensors "
                      "and config.json), or model.path=null to load model.hub_id", "It does not exist.")
