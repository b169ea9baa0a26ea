"""Structured configs: typed schemas registered in Hydra's ConfigStore.

``conf/config.yaml`` starts from ``pruneflow_schema``, so Hydra rejects a wrong
type (``stages.finetune.lr=abc``) or an unknown key before anything runs. Value
checks that types cannot express (ranges, exclusive keys) are in
``pruneflow.runner`` and also run before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# Settings that do not change what a run computes: a resumed run may change them, the
# finetune cache ignores them and a report does not list them as a run's settings.
# (stages.name only names the recipe: its values are compared one by one.)
RESUME_FREE = ("trainer.device", "trainer.torch_threads", "trainer.keep_freed_memory", "trainer.checkpoint_every", "trainer.log_every",
               "trainer.eval_every", "logger",
               "speed", "overwrite", "cache", "cache_dir", "save_model", "allow_config_change", "stages.eval_batch_size", "stages.name")


def resume_free(config: dict[str, Any]) -> tuple[str, ...]:
    """RESUME_FREE for the run of ``config`` (a container): under ``task.metric_average=batch_mean``
    (SEVEN's mean of per-batch GLUE metrics) the evaluation batch size changes the reported
    metric, so there it is a setting like any other."""
    task = config.get("task")
    if isinstance(task, dict) and task.get("metric_average") == "batch_mean":
        return tuple(k for k in RESUME_FREE if k != "stages.eval_batch_size")
    return RESUME_FREE


@dataclass
class StageConfig:
    epochs: float | None = None
    steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 32
    # prune stage only: false = score the model without weight updates (pruning at
    # initialisation, as SNIP/GraSP/FORCE/seven_pre always do); null = the method's own.
    update_weights: bool | None = None


@dataclass
class StagesConfig:
    name: str = "default"  # the recipe (conf/stages/<name>.yaml); pretrained models choose their own
    finetune: StageConfig = field(default_factory=StageConfig)
    prune: StageConfig = field(default_factory=StageConfig)
    recover: StageConfig = field(default_factory=StageConfig)
    eval_batch_size: int = 256


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "32"  # 32 | bf16 | fp16
    eval_precision: str = "32"  # 32 | bf16 | fp16: evaluation under autocast (SPP's DeiT scripts evaluate in fp16)
    compile: bool = False  # torch.compile the model (in place)
    pin_memory: Any = "auto"  # auto (on CUDA) | true | false
    torch_threads: int | None = None
    keep_freed_memory: Any = "auto"  # auto (on CPU) | true | false: glibc reuses freed memory
    continuous: bool = False  # one optimizer and LR schedule across finetune -> prune -> recover
    optimizer: str = "adamw"  # adamw | adamw_hf | adam | adamax | adamax_mtdnn | sgd
    gradient_accumulation_steps: int = 1
    drop_last: bool = True  # false: an epoch ends with its last, smaller batch (the authors' loaders)
    batch_order: str = "shuffle"  # shuffle: new permutation every epoch | mtdnn: fixed consecutive batches (PLATON GLUE)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.0  # sgd only
    lr_scheduler: str = "linear"
    min_lr: float = 1e-5  # lr_scheduler=cosine_epochs only: where timm's cosine ends
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept fixed (e.g. "*embeddings*")
    checkpoint_every: int = 50
    log_every: int = 10
    eval_every: Any = 0  # 0: evaluate after each stage only | N: also every N steps | epoch: also every epoch


@dataclass
class ScheduleConfig:
    name: str = "cubic"
    initial_warmup: float = 0  # steps, or a fraction of the prune stage when < 1
    final_warmup: float = 0
    frequency: int = 1
    step_offset: int = 0  # steps the schedule's counter runs ahead of the prune stage's (1: masked_run_squad.py)


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "pruneflow"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0


@dataclass
class DistillConfig:
    """Knowledge distillation from a dense teacher (Sanh et al.'s loss), any method."""

    enabled: bool = False
    teacher: str = "finetuned"  # finetuned: the model after the finetune stage | a directory with a fine-tuned model
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_distil: float = 0.5
    stages: list[str] = field(default_factory=lambda: ["prune", "recover"])


@dataclass
class SpeedConfig:
    enabled: bool = True
    batch: int = 8
    repeats: int = 10


@dataclass
class CalibrationConfig:
    """Calibration data of one-shot causal-LM pruning (task=lm/...)."""

    dataset: str = "c4"  # c4 | wikitext2 | local (calibration.path)
    path: str | None = None  # a local copy (directory with a train split), or the file for dataset=local
    nsamples: int = 128
    seqlen: int | None = None  # tokens per sample; null = the model's max_position_embeddings (the authors')
    seed: int = 0
    blockwise: bool = True  # false: the whole-model reference (every block's inputs recomputed)
    batch_size: int = 1  # windows per scoring step of the gradient-scored methods (seven_pre, snip, force)


@dataclass
class AllocationConfig:
    """Per-block sparsity of one-shot causal-LM pruning: uniform, or OWL (Yin et al. 2024)."""

    name: str = "uniform"  # uniform | owl
    owl_m: float = 5.0  # outlier: a Wanda score above owl_m x the layer's mean
    owl_lambda: float = 0.08  # per-block kept fractions span 2 * lambda around their mean 1 - s (not around s per block)


@dataclass
class Deviation:
    what: str = ""
    authors: str = ""  # what their code / paper does
    here: str = ""  # what this experiment does
    restore: str | None = None  # the override that restores theirs (null: not offered, with why in `here`)


@dataclass
class SparsityDefinition:
    """A paper's sparsity: the fraction of ``include`` (minus ``exclude``) Linear layers'
    weights (and biases with ``biases=true``) that are zero, reported as ``removed`` or
    ``remaining``; ``layer_norms=true`` adds the LayerNorms among those modules to the
    total, as remaining (never pruned)."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    biases: bool = False
    layer_norms: bool = False  # Sanh et al.'s counts_parameters.py counts the encoder's LayerNorms (as remaining)
    reports: str = "removed"  # removed | remaining
    text: str = ""  # the paper's words, e.g. "remaining encoder Linear weights"


@dataclass
class ExperimentInfo:
    """What an ``experiment=`` config reproduces; ``pruneflow-report`` shows it beside the runs.

    Numbers are fractions like result.json's metrics (the report shows them x100).
    ``published`` lists what the paper printed, one entry per method, task and metric
    (``pruneflow.published`` documents the form: curves by sparsity, "≈" and "<" points,
    ``when`` conditions such as distillation, the dense baseline as ``method: dense``).
    ``tolerance`` is how far a measured mean may be from a published value and count as
    reproduced (a figure's reading precision; one point for a printed table);
    ``tolerance_approx`` applies to "≈" points. ``published_overall`` holds numbers that
    are not one task's metric: ``glue_score`` and ``params_reduction``.
    ``sparsity_definition`` is the paper's: which weights count (module-name patterns,
    biases or not) and whether it reports the fraction removed or remaining; result.json
    reports the measured sparsity under it beside the project's own.
    """

    name: str = ""  # the experiment's config name, e.g. movement/squad_bert_base
    source: str = ""  # citation: authors, year, venue, table or figure
    figure: str | None = None  # experiments drawn together in one reproduction plot
    mark: str | None = None  # primary | author-repo | secondary | figure, approx
    note: str | None = None  # anything else a reader of the report should know
    # Where this setting differs from what the authors ran (docs/fidelity.md):
    # [{what, authors, here, restore}] - restore: the setting that gives theirs, or null.
    deviations: list[Deviation] = field(default_factory=list)
    published: Any = None
    tolerance: float | None = None
    tolerance_approx: float | None = None
    published_overall: dict[str, Any] = field(default_factory=dict)
    sparsity_definition: SparsityDefinition | None = None
    missing: list[str] = field(default_factory=list)  # tables/rows of the paper that are not available


@dataclass
class PruneflowConfig:
    model: Any = None
    task: Any = None
    method: Any = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: Any = None  # causal-LM tasks: conf/recovery/<none|full|lora>.yaml
    sparsity: float | None = None
    seed: int = 0
    overwrite: bool = False
    allow_config_change: bool = False  # resume a run directory whose settings changed
    save_model: bool = True
    cache: bool = True
    cache_dir: str = "outputs/.cache"
    experiment_info: ExperimentInfo | None = None  # set by experiment configs: published numbers and source


def _dirname(overrides: str) -> str:
    """A sweep job's folder name from its overrides, safe as one path component. Long
    names are cut and end with a hash of the whole override string, so two jobs that
    differ only past the cut still get different folders. Hydra escapes ':' in values
    (``method.pattern=2\\:4``); a folder name needs no escape, and ``2:4`` is what one types."""
    import hashlib
    import re

    name = (overrides or "default").replace("/", "_").replace("\\:", ":")
    if len(name) <= 200:
        return name
    digest = "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    # Keys' parents shortened to initials (stages.finetune.epochs -> s.f.epochs), so that more
    # of the values that tell jobs apart come before the cut. The order stays Hydra's: a job's
    # folder depends on its own overrides only, so a narrower re-launch finds it again.
    def initials(m: re.Match) -> str:
        *parents, last = m.group(2).split(".")
        return m.group(1) + ".".join([p[:1] for p in parents] + [last]) + "="

    return re.sub(r"(^|,)([\w+~-]+(?:\.[\w-]+)+)=", initials, name)[:183] + digest


# The folder each default-layout run took in this process, by its timestamped name.
_FRESH_DIRS: dict[str, str] = {}
# torchrun, ranks other than 0: each default-layout folder this process resolved without
# claiming it (absolute path: whether it existed already). Hydra creates it for the rank's
# log; once the rank has moved to rank 0's folder, one it created and left empty is removed.
OTHER_RANK_DIRS: dict[str, bool] = {}


def _fresh_dir(base: str) -> str:
    """``hydra.run.dir``'s default (``outputs/<day>/<time>``): a folder no other command
    has. Two commands started in the same second (``pruneflow ... &`` in a loop) would
    otherwise share one, and the second would be refused. The folder is created here,
    atomically, so only one command gets ``base``; the next gets ``base-2``, and so on.
    Under torchrun rank 0 claims the folder; the other ranks get ``base`` unclaimed and
    the runner moves them to rank 0's folder (``distributed.shared_run_dir``)."""
    import os
    import sys
    from pathlib import Path

    if base in _FRESH_DIRS:
        return _FRESH_DIRS[base]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        OTHER_RANK_DIRS[str(Path(base).absolute())] = Path(base).exists()
        return base
    if any(a in ("-c", "--cfg", "-i", "--info") or a.startswith(("--cfg=", "--info=")) for a in sys.argv[1:]):
        return base  # the command only prints its config (--cfg all --resolve): it takes no folder
    path = Path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        _FRESH_DIRS[base] = str(candidate)
        return str(candidate)
    return base  # 10,000 commands in one second: let the run lock refuse the rest


# Failed and stopped jobs of the sweep that just ran (filled by SweepCheck in the launching process).
SWEEP_FAILURES: list[tuple[str, str]] = []
SWEEP_STOPPED: list[tuple[str, str]] = []
SWEEP_DIRS: list[str] = []  # the folder of each sweep this process launched (the CLI prints where it went)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[misc,assignment]


# Launchers whose jobs run in other processes on this machine (joblib, submitit_local): a
# signal to the launching process is passed on to them (pruneflow.stop). The basic launcher
# runs jobs in the launching process; Slurm jobs are the cluster's to stop.
LOCAL_PROCESS_LAUNCHERS = (".JoblibLauncher", ".LocalLauncher")


def local_process_launcher(hydra_cfg: Any) -> bool:  # noqa: ANN401 - Hydra's config node
    return str(hydra_cfg.launcher.get("_target_", "")).endswith(LOCAL_PROCESS_LAUNCHERS)


def keep_earlier_launch_record(sweep_dir: Path) -> Path | None:
    """Hydra's sweeper rewrites ``multirun.yaml`` (its record of the launch: overrides,
    experiment, settings) at every launch. On a re-launch into the same folder the
    earlier record is moved aside as ``multirun.<its time>.yaml`` rather than lost."""
    import time

    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return None
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(record.stat().st_mtime))
    target, n = sweep_dir / f"multirun.{stamp}.yaml", 1
    while target.exists():  # two launches within one second
        target, n = sweep_dir / f"multirun.{stamp}_{n}.yaml", n + 1
    record.rename(target)
    return target


class SweepCheck(_HydraCallback):
    """Hydra callback: after a sweep, collect the jobs that failed in this launch (their
    error.txt, written since it started) and the jobs a signal stopped (stopped.txt), so
    that ``pruneflow -m`` exits non-zero and lists them. A failure of an earlier launch
    into the same sweep folder is not this one's. As a sweep of local worker processes
    starts, it tells the stop handler where the jobs will look for a stop request
    (``pruneflow.stop``)."""

    started: float | None = None

    def on_multirun_start(self, config, **kwargs) -> None:  # noqa: ANN001, ANN003
        import time
        from pathlib import Path

        from pruneflow.stop import STOP, STOP_FILE, quiet_idle_joblib_workers

        self.started = time.time()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if str(sweep_dir) not in SWEEP_DIRS:  # known before the end too: a launcher may fail mid-sweep
            SWEEP_DIRS.append(str(sweep_dir))
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # an earlier launch's, if it was killed
        keep_earlier_launch_record(sweep_dir)
        if local_process_launcher(config.hydra):
            STOP.share_with_jobs(sweep_dir)
            quiet_idle_joblib_workers()

    def on_multirun_end(self, config, **kwargs) -> None:  # noqa: ANN001, ANN003
        from pathlib import Path

        from pruneflow.stop import STOPPED_FILE

        root = Path(str(config.hydra.sweep.dir))  # in SWEEP_DIRS since on_multirun_start
        for found, file in ((SWEEP_FAILURES, "error.txt"), (SWEEP_STOPPED, STOPPED_FILE)):
            found.clear()
            for path in sorted(root.rglob(file)):
                if ".cache" in path.parts:
                    continue
                if self.started is not None and path.stat().st_mtime < self.started - 2:  # 2 s: coarse file-system clocks
                    continue
                lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
                found.append((str(path.parent), lines[-1] if lines else f"(empty {file})"))


def _times(factor: float, value: float | None) -> float | None:
    """``${pf_times:2,${trainer.warmup_steps}}``: a setting the authors give as a multiple
    of another (Sanh et al.'s final_warmup = 2 x warmup_steps), so that overriding the
    base scales both as in their scripts."""
    if value is None:
        return None
    out = factor * value
    return int(out) if isinstance(value, int) and float(out).is_integer() else out


def register_configs() -> None:
    ConfigStore.instance().store(name="pruneflow_schema", node=PruneflowConfig)
    if not OmegaConf.has_resolver("pf_times"):
        OmegaConf.register_new_resolver("pf_times", _times)
    if not OmegaConf.has_resolver("pf_dirname"):
        OmegaConf.register_new_resolver("pf_dirname", _dirname)
    if not OmegaConf.has_resolver("pf_fresh_dir"):
        # cached: every later read of hydra.run.dir in this config gives the folder taken first
        OmegaConf.register_new_resolver("pf_fresh_dir", _fresh_dir, use_cache=True)


# Launchers (joblib, submitit) import this module in their workers: resolvers must exist there too.
register_configs()
