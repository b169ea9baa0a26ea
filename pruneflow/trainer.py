"""The training loop, independent of tasks and methods.

One call trains one stage: the optimizer (AdamW by default), the learning-rate
schedule with its warm-up, gradient accumulation, gradient clipping, bf16/fp16
autocast (with the gradient scaler for fp16), periodic checkpoints that make a
killed run resume bit-for-bit, and the method's hooks around the optimizer step.

Two protocols (``trainer.continuous``):

- ``false``: every stage builds its own optimizer and LR schedule over its own
  steps (the learning rate restarts at each stage boundary);
- ``true``: one optimizer and one LR schedule over all the weight-updating steps
  of the run, carried across finetune -> prune -> recover, with one stream of
  batches — one training in which warm-up, pruning and the frozen-mask phase are
  phases, as SEVEN, PLATON and movement pruning are run by their authors.

Either way an :class:`Optim` holds the optimizer and its position in its LR
schedule; a stage's ``lr`` scales the schedule for the parameter groups that
follow the stage (``pf_lr == "stage"``); a method's own groups (movement
pruning's scores) keep their own base LR under the same schedule.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow import distributed
from pruneflow.errors import RunStopped, TrainingDiverged, invalid
from pruneflow.methods.base import PruningMethod
from pruneflow.models import ModelBundle
from pruneflow.optimizers import HFAdamW, MtDnnAdamax
from pruneflow.stop import STOP
from pruneflow.stop import name as stop_name
from pruneflow.tasks.base import Task
from pruneflow.utils import progress

log = logging.getLogger("pruneflow")

# transformers' LambdaLR schedules (``get_scheduler``); reduce_lr_on_plateau needs a metric per step.
TRANSFORMERS_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
# warmup_linear_mtdnn: pytorch-pretrained-bert 0.6.0's warmup_linear, as mt-dnn (PLATON's GLUE
# code) steps it inside its Adamax: x = step / total; x / warmup_ratio during the warm-up,
# then 1 - x (a jump down at the end of the warm-up, not a ramp from the peak).
LR_SCHEDULERS = (*TRANSFORMERS_SCHEDULERS, "warmup_linear_mtdnn", "cosine_epochs")
OPTIMIZERS = ("adamw", "adamw_hf", "adam", "adamax", "adamax_mtdnn", "sgd")


@dataclass
class StageSpec:
    name: str  # finetune | prune | recover
    steps: int
    lr: float
    batch_size: int
    seed: int
    weight_updates: bool = True  # False: the prune stage of scoring-only methods
    data_offset: int = 0  # batches of the stream consumed before this stage (continuous runs)


def fused_ok(groups: Sequence[dict[str, Any]]) -> bool:
    """Whether torch's fused Adam/AdamW kernel applies: every parameter a floating-point
    tensor on one CPU or CUDA device. The same update as the per-tensor loop, in one
    kernel: on 2 CPU threads an AdamW step over BERT-base's 85M prunable weights took
    0.042 s fused against 0.124 s (movement pruning's scores add that many again)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(
        p.is_floating_point() for p in params)


def timm_epoch_cosine(epoch: int, epochs: float, lr: float, min_lr: float) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of ``epochs`` as DeiT's training loops
    run timm's cosine (``create_scheduler``, t_initial = the epochs, no warm-up): stepped
    with ``step(epoch)`` *after* each epoch, so epochs 0 and 1 both run at ``lr`` and
    epoch e >= 1 at the cosine's value for e - 1, which ends at ``min_lr``."""
    t = max(epoch - 1, 0)
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


class LRSchedule:
    """Learning-rate multiplier as a function of the optimizer step: ``transformers``'
    schedules (``get_scheduler``'s LambdaLR functions, with their default arguments),
    written out here because importing ``transformers.optimization`` pulls in its
    Trainer's utilities (peft, scipy, pandas): 2-3 s of every run's start-up on a 2-core
    VM. tests/test_trainer_options.py checks each against ``get_scheduler`` step by step."""

    def __init__(self, name: str, total_steps: int, warmup_steps: int, warmup_ratio: float = 0.0,
                 steps_per_epoch: int | None = None, min_lr: float = 0.0) -> None:
        if name not in LR_SCHEDULERS:
            raise invalid("trainer.lr_scheduler", name, LR_SCHEDULERS)
        self.name, self.total_steps, self.warmup_steps = name, max(int(total_steps), 1), int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)  # warmup_linear_mtdnn's warm-up, a fraction as theirs
        if name == "cosine_epochs" and not steps_per_epoch:
            raise ValueError("lr_scheduler=cosine_epochs needs steps_per_epoch")
        self.steps_per_epoch, self.min_lr = steps_per_epoch, float(min_lr)  # cosine_epochs (timm, per epoch)

    def lr(self, step: int, base: float) -> float:
        """The learning rate of a group whose base rate is ``base`` at optimizer step ``step``."""
        if self.name == "cosine_epochs":  # timm's min_lr is a rate, not a fraction of the base
            assert self.steps_per_epoch is not None
            return timm_epoch_cosine(step // self.steps_per_epoch, self.total_steps / self.steps_per_epoch, base, self.min_lr)
        return base * self.factor(step)

    def factor(self, step: int) -> float:
        name, total, warmup = self.name, self.total_steps, self.warmup_steps
        if name == "constant":
            return 1.0
        if name == "warmup_linear_mtdnn":
            x, w = step / total, self.warmup_ratio
            return x / w if x < w else 1.0 - x
        if step < warmup:  # every schedule but constant warms up linearly from 0
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        if name == "cosine":  # half a cycle
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        if name == "cosine_with_restarts":  # one cycle
            return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))
        if name == "polynomial":  # power 1 from the base LR (1 here: a factor) down to lr_end=1e-7
            lr_end = 1e-7
            if step > total:
                return lr_end
            return (1.0 - lr_end) * (1 - (step - warmup) / max(1, total - warmup)) + lr_end
        if name == "constant_with_warmup":
            return 1.0
        timescale = warmup or 10_000  # inverse_sqrt
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


class Optim:
    """An optimizer and its position in its LR schedule (``step`` = optimizer steps taken)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.step = 0

    def set_lr(self, stage_lr: float) -> float:
        """Set every group's LR for the coming step; returns the stage groups' LR."""
        for g in self.optimizer.param_groups:
            base = stage_lr if g.get("pf_lr", "stage") == "stage" else float(g["pf_lr"])
            g["lr"] = self.schedule.lr(self.step, base)
        return self.schedule.lr(self.step, stage_lr)

    def add_group(self, group: dict[str, Any]) -> None:
        """A method's extra parameters (e.g. movement scores), under the same schedule."""
        self.optimizer.add_param_group(group)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "optim_step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["optim_step"])


BATCH_ORDERS = ("shuffle", "mtdnn", "repeated_aug")
REPEATS = 3  # DeiT's RASampler: num_repeats


class EpochBatches:
    """Batches, epoch after epoch, in an order fixed by the seed.

    ``order="shuffle"``: a new permutation of the examples every epoch (a shuffling
    DataLoader). ``order="mtdnn"``: mt-dnn's ``MultiTaskBatchSampler`` (PLATON's GLUE
    code): the examples cut once into batches of consecutive examples, the batches'
    order shuffled once, then the same batches in the same order every epoch (the
    short batch, if kept, wherever the shuffle put it). ``order="repeated_aug"``: DeiT's
    ``RASampler`` (repeated augmentation, SPP's DeiT scripts) in one process: every
    epoch's permutation with each example three times in a row, cut to the epoch's
    length, so an epoch sees a third of the examples, each under three augmentations
    (their sampler also rounds the epoch down to a multiple of 256 examples: not done).

    ``start_step`` skips the first batches without touching any data or the global
    RNG, so a resumed stage sees exactly the batches it would have seen.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate: Callable, start_step: int = 0,  # noqa: ANN001
                 drop_last: bool = True, order: str = "shuffle") -> None:
        if order not in BATCH_ORDERS:
            raise ValueError(f"order must be one of {BATCH_ORDERS}, not {order!r}")
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        # drop_last: equal-sized batches; False: the epoch's last, smaller batch too, as a
        # DataLoader without drop_last (the authors' loaders of SEVEN, PLATON, movement pruning)
        self.per_epoch = batches_per_epoch(len(dataset), batch_size, drop_last)
        self.step = start_step
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, its order)
        self._fixed: torch.Tensor | None = None  # mtdnn: the batches' order, drawn once
        self.repeated = order == "repeated_aug"
        if order == "mtdnn":
            self._fixed = torch.randperm(self.per_epoch, generator=torch.Generator().manual_seed(self.seed * 100_003))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, drawn once per epoch (a randperm of ImageNet's 1.28M
        examples takes ~13 ms on a CPU: per batch that would rival a GPU step)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(len(self.dataset), generator=g)
            if self.repeated:
                perm = perm.repeat_interleave(REPEATS)[: len(self.dataset)]
            self._perm = (epoch, perm)
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        """The examples of batch ``step`` (counted over all epochs)."""
        epoch, i = divmod(step, self.per_epoch)
        if self._fixed is not None:
            b = int(self._fixed[i])
            return list(range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.dataset))))
        return self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = self.indices(self.step)
        self.step += 1
        return self.collate([self.dataset[j] for j in idx])


def autocast_dtype(precision: object) -> torch.dtype | None:
    """The autocast dtype of ``trainer.precision`` / ``trainer.eval_precision`` (None: 32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(precision))


def _fault_injection(stage: str, step: int | str) -> None:
    """Tests set PRUNEFLOW_TEST_KILL_AT=<stage>:<step> to SIGKILL the run right after
    that checkpoint, which makes resume tests deterministic."""
    target = os.environ.get("PRUNEFLOW_TEST_KILL_AT")
    if target and target == f"{stage}:{step}":  # step "done": after a stage's complete checkpoint
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_signal(stage: str, step: int | str) -> None:
    """Tests set PRUNEFLOW_TEST_SIGNAL_AT=<stage>:<step>:<TERM|INT>[x2] to send the run that
    signal after that step (a deterministic SIGTERM/SIGINT; x2: twice, at once; step "done":
    after the stage's complete checkpoint and progress.json, before the next stage)."""
    target = os.environ.get("PRUNEFLOW_TEST_SIGNAL_AT")
    if target and target.rsplit(":", 1)[0] == f"{stage}:{step}":
        sig = target.rsplit(":", 1)[1]
        for _ in range(2 if sig.endswith("x2") else 1):
            os.kill(os.getpid(), getattr(signal, "SIG" + sig.removesuffix("x2")))


def _fault_hold(stage: str, step: int) -> None:
    """Tests set PRUNEFLOW_TEST_HOLD_AT=<stage>:<step> to make the run wait after that step
    until it is asked to stop (at most 5 minutes), saying so in its log: a signal sent then
    finds it inside the stage however slowly the machine runs, so the stage needs no steps to spare."""
    if os.environ.get("PRUNEFLOW_TEST_HOLD_AT") == f"{stage}:{step}":
        from pruneflow.stop import STOP

        log.info("PRUNEFLOW_TEST_HOLD_AT: waiting after step %d of the %s stage until asked to stop.", step, stage)
        deadline = time.monotonic() + 300
        while STOP.requested_here() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def batches_per_epoch(n_examples: int, batch_size: int, drop_last: bool = True) -> int:
    return max(1, n_examples // batch_size if drop_last else -(-n_examples // batch_size))


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int = 1, drop_last: bool = True) -> int:
    """Optimizer steps per epoch: whole groups of ``grad_accum`` batches (as the authors'
    ``len(dataloader) // gradient_accumulation_steps``)."""
    return max(1, batches_per_epoch(n_examples, batch_size, drop_last) // grad_accum)


def no_weight_decay_names(model: nn.Module) -> frozenset[str]:
    """The parameters a timm model asks to keep out of weight decay (``pos_embed``,
    ``cls_token``, ...: its ``no_weight_decay()``, which timm's ``create_optimizer`` and
    the DeiT / SPP training scripts honour); none for other models."""
    own = getattr(model, "no_weight_decay", None)
    return frozenset(str(n) for n in own()) if callable(own) else frozenset()


def decay_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float,
                 skip: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (the usual BERT recipe), nor
    on the parameters named in ``skip`` (a timm model's ``no_weight_decay()``)."""
    decay, no_decay = [], []
    for name, p in params:
        skipped = name in skip or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)  # timm may give patterns
        (no_decay if p.ndim < 2 or "norm" in name.lower() or skipped else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grads_finite(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """False when the fp16 gradient scaler found inf/NaN gradients after ``unscale_``
    (it will skip this optimizer step). Always True without a scaler."""
    if scaler is None:
        return True
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = state.get("found_inf_per_device")
    if found:  # what GradScaler itself reads in step()
        return not any(float(v.item()) for v in found.values())
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return all(bool(torch.isfinite(g).all()) for g in grads)


class Trainer:
    def __init__(self, cfg: DictConfig, device: torch.device, bundle: ModelBundle, task: Task) -> None:
        self.cfg = cfg
        self.device = device
        self.bundle = bundle
        self.task = task
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.drop_last = bool(cfg.get("drop_last", True))
        self.batch_order = str(cfg.get("batch_order", "shuffle"))
        precision = str(cfg.get("precision", "32"))
        self.autocast_dtype = autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.continuous = bool(cfg.get("continuous", False))
        pin = cfg.get("pin_memory", "auto")
        self.pin_memory = device.type == "cuda" and pin in (True, "auto")
        if cfg.get("compile", False):
            # nn.Module.compile compiles in place: parameter names, state_dict keys (checkpoints,
            # safetensors) and the masks' parametrizations stay as they are.
            bundle.model.compile()
        self.distiller: Any = None  # pruneflow.distill.Distiller, set by the runner
        # The trainable parameters, named and ordered as in the model before any mask is
        # attached: optimizers built at any stage (and on resume) list them identically.
        self.freeze = list(cfg.get("freeze") or [])
        self.base_params = trainable_parameters(bundle.model, self.freeze)

    def refresh_params(self) -> None:
        """After a method rebuilt layers (SPP's compression)."""
        self.base_params = trainable_parameters(self.bundle.model, self.freeze, check=False)

    # -- helpers ----------------------------------------------------------------------
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pin_memory:  # page-locked host copy: the transfer runs asynchronously
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], own: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Task loss under the configured autocast (with distillation when configured);
        used by methods with their own loops too. ``own(task, bundle, batch)``: a method's
        scoring loss in its place (FORCE's ``scoring_loss=target_logit``)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if own is not None:
                return own(self.task, self.bundle, batch)
            if self.distiller is not None:
                return self.distiller.loss(self.bundle, self.task, batch)
            return self.task.loss(self.bundle, batch)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for batch in EpochBatches(self.task.train_set, batch_size, seed, self.task.collate, start_step, self.drop_last, self.batch_order):
            yield self.task.train_batch(self.to_device(batch))

    def warmup_steps(self, total: int) -> int:
        steps = self.cfg.get("warmup_steps")
        if steps is not None:
            return int(steps)
        return int(math.ceil(float(self.cfg.get("warmup_ratio", 0.0) or 0.0) * total))

    def build_optim(self, total_steps: int, extra_groups: Sequence[dict[str, Any]] = (), batch_size: int | None = None) -> Optim:
        """The optimizer over the model's trainable parameters (plus a method's groups)
        with an LR schedule over ``total_steps`` optimizer steps (``batch_size``: what an
        epoch is, for ``lr_scheduler=cosine_epochs``)."""
        cfg = self.cfg
        name = str(cfg.get("optimizer", "adamw"))
        taken = {id(p) for g in extra_groups for p in g["params"]}
        groups = decay_groups([(n, p) for n, p in self.base_params if id(p) not in taken], float(cfg.weight_decay),
                              no_weight_decay_names(self.bundle.model))
        groups += [dict(g) for g in extra_groups]
        betas = (float(cfg.adam_beta1), float(cfg.adam_beta2))
        eps = float(cfg.adam_epsilon)
        fused = {"fused": True} if fused_ok(groups) else {}
        if name == "adamw":
            opt = torch.optim.AdamW(groups, lr=1.0, betas=betas, eps=eps, **fused)
        elif name == "adam":  # L2 weight decay added to the gradient (not decoupled)
            opt = torch.optim.Adam(groups, lr=1.0, betas=betas, eps=eps, **fused)
        elif name == "adamax":
            opt = torch.optim.Adamax(groups, lr=1.0, betas=betas, eps=eps)
        elif name == "adamw_hf":  # transformers' own AdamW: movement pruning, PLATON SQuAD (pruneflow.optimizers)
            opt = HFAdamW(groups, lr=1.0, betas=betas, eps=eps)
        elif name == "adamax_mtdnn":  # PLATON's GLUE optimizer (pruneflow.optimizers)
            opt = MtDnnAdamax(groups, lr=1.0, betas=betas, eps=eps)
        elif name == "sgd":
            opt = torch.optim.SGD(groups, lr=1.0, momentum=float(cfg.get("momentum", 0.0)))
        else:
            raise invalid("trainer.optimizer", name, OPTIMIZERS)
        per_epoch = None
        if str(cfg.lr_scheduler) == "cosine_epochs":
            if batch_size is None:
                raise ValueError("lr_scheduler=cosine_epochs needs the batch size (what an epoch is)")
            per_epoch = steps_per_epoch(len(self.task.train_set), batch_size, self.grad_accum, self.drop_last)
        return Optim(opt, LRSchedule(str(cfg.lr_scheduler), total_steps, self.warmup_steps(total_steps), float(cfg.get("warmup_ratio") or 0.0),
                                     per_epoch, float(cfg.get("min_lr", 0.0) or 0.0)))

    # -- the loop -----------------------------------------------------------------------
    def train(
        self,
        stage: StageSpec,
        method: PruningMethod | None = None,
        optim: Optim | None = None,
        resume: dict[str, Any] | None = None,
        checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
        on_log: Callable[[dict[str, float]], None] | None = None,
        evaluate: Callable[[int], None] | None = None,
        eval_every: int = 0,
    ) -> dict[str, float]:
        """Train ``stage.steps`` steps; returns the stage's time.

        ``optim`` is the run's optimizer (continuous protocol); None builds one for
        this stage. ``checkpoint(step, trainer_state)`` is called every
        ``trainer.checkpoint_every`` steps with the optimizer and scaler state;
        ``resume`` is such a state. ``evaluate(step)`` is called every ``eval_every``
        steps before the stage's last (whose evaluation is the caller's).
        """
        model = self.bundle.model
        model.train(not (stage.name == "prune" and method is not None and method.prune_in_eval_mode))
        own_loss = method.scoring_loss if method is not None and method.has_scoring_loss() else None
        if optim is None:
            extra = method.param_groups() if method is not None else []
            optim = self.build_optim(stage.steps if stage.weight_updates else 1, extra, stage.batch_size)
        opt = optim.optimizer
        start = 0
        if resume is not None:
            if resume.get("optimizer") is not None:
                optim.load_state_dict(resume)
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            start = int(resume["step"])
        data = self.batches(stage.batch_size, stage.seed, start_step=stage.data_offset + start * self.grad_accum)
        every = int(self.cfg.get("checkpoint_every", 0) or 0)
        log_every = int(self.cfg.get("log_every", 10))
        max_norm = float(self.cfg.get("max_grad_norm", 0) or 0)
        clip_params = [p for g in opt.param_groups for p in g["params"]]
        # Averaged over ranks: the model's parameters and any a method trains beside them
        # (movement, soft movement and L0 scores live outside the model).
        in_model = {id(p) for p in model.parameters()}
        sync_params = [*model.parameters(), *(p for p in clip_params if id(p) not in in_model)]
        running, n_running = 0.0, 0
        t0 = time.perf_counter()
        lr = stage.lr
        bar = progress(range(start, stage.steps), desc=stage.name, initial=start, total=stage.steps, leave=False, disable=not distributed.is_main())
        for step in bar:
            if stage.weight_updates:
                lr = optim.set_lr(stage.lr)
            losses = []
            for _ in range(self.grad_accum):
                batch = distributed.shard(next(data))  # torchrun: this rank's share of the global batch
                loss = self.loss(model, batch, own_loss if stage.name == "prune" else None)
                extra = method.extra_loss() if method is not None else None
                if extra is not None:
                    loss = loss + extra
                losses.append(loss.detach())
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            # one device sync per step, not one per micro-batch (the same sum as before)
            loss_value = sum(v / self.grad_accum for v in torch.stack(losses).tolist())
            # torchrun: mean gradients over ranks before any hook reads them, so scores,
            # thresholds and masks are identical on every rank (no-ops in one process).
            distributed.average_gradients(sync_params)
            loss_value = distributed.mean_scalar(loss_value, self.device)
            if not math.isfinite(loss_value):
                resumable = False
                if checkpoint is not None:  # for inspection; the last good checkpoint stays the one to resume from
                    resumable = bool(checkpoint(step, {**self.state(optim, step), "diverged": True}))
                raise TrainingDiverged(self._diverged_message(loss_value, step, stage, lr, max_norm, resumable))
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            # fp16: an overflow step is skipped by the scaler; no method may score its gradients.
            finite = grads_finite(self.scaler, opt)
            if method is not None:
                method.after_backward(step, grads_finite=finite)
            # Clipping tames weight updates; a scoring stage (no updates: SNIP, FORCE, SEVEN_pre)
            # reads raw gradients, as their authors do (clipped per batch, summed scores re-weight the batches).
            if max_norm > 0 and stage.weight_updates:
                nn.utils.clip_grad_norm_(clip_params, max_norm)
            if stage.weight_updates:
                if self.scaler is not None:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                optim.step += finite  # a step the scaler skipped does not advance the LR schedule (as accelerate's)
            elif self.scaler is not None:  # no step, but update() ends this step's unscale_ (else the next one raises)
                self.scaler.update()
            # The hook sees this step's gradients and the updated weights (SEVEN reads both).
            if method is not None:
                method.after_optimizer_step(step, grads_finite=finite)
            opt.zero_grad(set_to_none=True)
            running += loss_value
            n_running += 1
            if (step + 1) % log_every == 0 or step + 1 == stage.steps:
                bar.set_postfix(loss=f"{running / n_running:.4f}", refresh=False)  # the bar shows it at its next refresh
                if on_log is not None:
                    on_log({f"{stage.name}/loss": running / n_running, f"{stage.name}/lr": lr, f"{stage.name}/step": step + 1})
                running, n_running = 0.0, 0
            if evaluate is not None and eval_every > 0 and (step + 1) % eval_every == 0 and step + 1 < stage.steps:
                evaluate(step + 1)  # before the checkpoint: a resume from it never evaluates this step again
            if checkpoint is not None and every > 0 and (step + 1) % every == 0 and step + 1 < stage.steps:
                checkpoint(step + 1, self.state(optim, step + 1))
                _fault_injection(stage.name, step + 1)
            _fault_signal(stage.name, step + 1)
            _fault_hold(stage.name, step + 1)
            signum = STOP.requested()
            if signum is not None:
                bar.close()
                if checkpoint is not None:
                    checkpoint(step + 1, self.state(optim, step + 1))
                raise RunStopped(
                    f"Stopped by {stop_name(signum)} after step {step + 1} of {stage.steps} of the {stage.name} stage; "
                    "a checkpoint was saved. Run the same command again to resume from it.",
                    signum,
                )
        bar.close()
        return {"time_s": time.perf_counter() - t0}

    def _diverged_message(self, loss_value: float, step: int, stage: StageSpec, lr: float, max_norm: float, resumable: bool) -> str:
        hints = [f"lower stages.{stage.name}.lr (now {stage.lr:g})"]
        if max_norm <= 0:
            hints.append("enable gradient clipping (trainer.max_grad_norm=1.0)")
        elif max_norm > 1.0:
            hints.append(f"clip harder (trainer.max_grad_norm is {max_norm:g})")
        if self.autocast_dtype is not None:
            hints.append("use trainer.precision=32")
        if resumable:
            kept = "; checkpoints/last.pt, the last checkpoint before it, is kept"
            again = "it resumes from the last checkpoint with the new settings (the learning rate of the command line, not the saved one)"
        else:
            kept = " (no checkpoint had been written before it: trainer.checkpoint_every sets how often)"
            again = "it starts the run again with the new settings"
        return (
            f"The training loss became {loss_value} at step {step} of the {stage.name} stage (learning rate "
            f"{lr:.3g} at that step). The diverged state is saved as checkpoints/diverged.pt{kept}. To go on: "
            + ", or ".join(hints) + f", and run the command again with allow_config_change=true: {again}."
        )

    def state(self, optim: Optim, step: int) -> dict[str, Any]:
        return {
            **optim.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": step,
        }


def trainable_parameters(model: nn.Module, freeze: Sequence[str] = (), check: bool = True) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that trains; ``freeze`` patterns (shell-style,
    over parameter names) switch parameters off, e.g. the embeddings in movement pruning.
    ``check``: a pattern that matches nothing, or patterns that freeze everything, are the
    user's mistake (checked on the model as built, before masks rename parameters)."""
    out, matched = [], set()
    names = []
    for name, p in model.named_parameters():
        names.append(name)
        hits = [pat for pat in freeze if fnmatch.fnmatchcase(name, pat)]
        if hits:
            matched.update(hits)
            p.requires_grad_(False)
            continue
        if p.requires_grad:
            out.append((name, p))
    unmatched = [pat for pat in freeze if pat not in matched]
    examples = f"This model's parameters are named like {names[0]!r}, {names[len(names) // 2]!r}, {names[-1]!r}." if names else ""
    if unmatched and check:
        raise invalid("trainer.freeze", list(freeze), "shell-style patterns over parameter names, each matching one or more",
                      f"{unmatched} match(es) no parameter of this model, so nothing would be frozen by it. {examples}")
    if freeze and not out and check:
        raise invalid("trainer.freeze", list(freeze), "patterns that leave some parameters training",
                      f"They freeze every parameter of the model, so no stage could train. {examples}")
    return out
