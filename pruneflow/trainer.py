"""The training loop, independent of tasks and methods.

One call trains one stage: AdamW with a linear (or other ``transformers``)
learning-rate schedule and warm-up, gradient accumulation, gradient clipping,
bf16/fp16 autocast, periodic checkpoints that make a killed run resume
bit-for-bit, and the method's hooks around the optimizer step.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow import distributed
from pruneflow.errors import TrainingDiverged
from pruneflow.methods.base import PruningMethod
from pruneflow.models import ModelBundle
from pruneflow.tasks.base import Task
from pruneflow.utils import progress

log = logging.getLogger("pruneflow")


@dataclass
class StageSpec:
    name: str  # finetune | prune | recover
    steps: int
    lr: float
    batch_size: int
    seed: int
    weight_updates: bool = True  # False: the prune stage of scoring-only methods


class EpochBatches:
    """Shuffled batches, epoch after epoch, in an order fixed by (seed, epoch).

    ``start_step`` skips the first batches without touching any data or the global
    RNG, so a resumed stage sees exactly the batches it would have seen.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate: Callable, start_step: int = 0) -> None:  # noqa: ANN001
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.per_epoch = max(1, len(dataset) // batch_size)  # drop_last: equal-sized batches
        self.step = start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, i = divmod(self.step, self.per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        idx = perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()
        self.step += 1
        return self.collate([self.dataset[j] for j in idx])


def _fault_injection(stage: str, step: int) -> None:
    """Tests set PRUNEFLOW_TEST_KILL_AT=<stage>:<step> to SIGKILL the run right after
    that checkpoint, which makes resume tests deterministic."""
    target = os.environ.get("PRUNEFLOW_TEST_KILL_AT")
    if target and target == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int = 1) -> int:
    return max(1, n_examples // (batch_size * grad_accum))


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: DictConfig, device: torch.device, bundle: ModelBundle, task: Task) -> None:
        self.cfg = cfg
        self.device = device
        self.bundle = bundle
        self.task = task
        self.grad_accum = int(cfg.get("gradient_accumulation_steps", 1))
        precision = str(cfg.get("precision", "32"))
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # -- helpers ----------------------------------------------------------------------
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Task loss under the configured autocast; used by methods with their own loops."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.task.loss(self.bundle, batch)

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for batch in EpochBatches(self.task.train_set, batch_size, seed, self.task.collate, start_step):
            yield self.to_device(batch)

    def make_optimizer(self, model: nn.Module, lr: float, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        from transformers import get_scheduler

        opt = torch.optim.AdamW(
            _decay_groups(model, float(self.cfg.weight_decay)),
            lr=lr,
            betas=(float(self.cfg.adam_beta1), float(self.cfg.adam_beta2)),
            eps=float(self.cfg.adam_epsilon),
        )
        warmup = self.cfg.get("warmup_ratio", 0.0)
        sched = get_scheduler(
            self.cfg.lr_scheduler, opt, num_warmup_steps=int(math.ceil(float(warmup) * steps)), num_training_steps=max(steps, 1)
        )
        return opt, sched

    # -- the loop -----------------------------------------------------------------------
    def train(
        self,
        stage: StageSpec,
        method: PruningMethod | None = None,
        resume: dict[str, Any] | None = None,
        checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
        on_log: Callable[[dict[str, float]], None] | None = None,
    ) -> dict[str, float]:
        """Train ``stage.steps`` optimizer steps; returns the mean training loss.

        ``checkpoint(step, trainer_state)`` is called every ``trainer.checkpoint_every``
        steps with the optimizer and scheduler state; ``resume`` is such a state.
        """
        model = self.bundle.model
        model.train()
        opt, sched = self.make_optimizer(model, stage.lr, stage.steps)
        start = 0
        if resume is not None:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            start = int(resume["step"])
        data = self.batches(stage.batch_size, stage.seed, start_step=start * self.grad_accum)
        every = int(self.cfg.get("checkpoint_every", 0) or 0)
        log_every = int(self.cfg.get("log_every", 10))
        max_norm = float(self.cfg.get("max_grad_norm", 0) or 0)
        running, n_running = 0.0, 0
        t0 = time.perf_counter()
        bar = progress(range(start, stage.steps), desc=stage.name, initial=start, total=stage.steps, leave=False, disable=not distributed.is_main())
        for step in bar:
            loss_value = 0.0
            for _ in range(self.grad_accum):
                batch = distributed.shard(next(data))  # torchrun: this rank's share of the global batch
                loss = self.loss(model, batch)
                extra = method.extra_loss() if method is not None else None
                if extra is not None:
                    loss = loss + extra
                loss_value += float(loss.detach()) / self.grad_accum
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            # torchrun: mean gradients over ranks before any hook reads them, so scores,
            # thresholds and masks are identical on every rank (no-ops in one process).
            distributed.average_gradients(model.parameters())
            loss_value = distributed.mean_scalar(loss_value, self.device)
            if not math.isfinite(loss_value):
                if checkpoint is not None:
                    checkpoint(step, self._state(opt, sched, step))
                raise TrainingDiverged(
                    f"The training loss became {loss_value} at step {step} of the {stage.name} stage "
                    f"(lr={stage.lr}); the run's state at that step is saved in checkpoints/. Lower "
                    f"stages.{stage.name}.lr or enable trainer.max_grad_norm"
                    + (", or use trainer.precision=32." if self.autocast_dtype is not None else ".")
                )
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            if method is not None:
                method.after_backward(step)
            if max_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if stage.weight_updates:
                if self.scaler is not None:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                sched.step()
            opt.zero_grad(set_to_none=True)
            if method is not None:
                method.after_optimizer_step(step)
            running += loss_value
            n_running += 1
            if (step + 1) % log_every == 0 or step + 1 == stage.steps:
                bar.set_postfix(loss=f"{running / n_running:.4f}", refresh=False)  # the bar shows it at its next refresh
                if on_log is not None:
                    on_log({f"{stage.name}/loss": running / n_running, f"{stage.name}/lr": sched.get_last_lr()[0], f"{stage.name}/step": step + 1})
                running, n_running = 0.0, 0
            if checkpoint is not None and every > 0 and (step + 1) % every == 0 and step + 1 < stage.steps:
                checkpoint(step + 1, self._state(opt, sched, step + 1))
                _fault_injection(stage.name, step + 1)
        bar.close()
        return {"time_s": time.perf_counter() - t0}

    def _state(self, opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
        return {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": step,
        }
