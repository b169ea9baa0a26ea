"""Sparsity schedules: the target sparsity as a function of the pruning step.

Independent of the methods (as ``torch.ao.pruning``'s schedulers): a method asks
``schedule.sparsity(k)`` and ``schedule.is_update_step(k)`` for step ``k`` of the
prune stage (0-based) and never computes sparsity levels itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pruneflow.errors import UserError

KINDS = ("cubic", "linear", "exponential", "oneshot")


@dataclass
class Schedule:
    kind: str
    target: float
    total_steps: int  # steps in the prune stage
    initial_warmup: int = 0  # steps at the start of the stage with no pruning
    final_warmup: int = 0  # steps at the end held at the target (masks may still update)
    frequency: int = 1  # update the mask every `frequency` steps
    # how far the schedule's step counter runs ahead of the prune stage's: 1 is
    # masked_run_squad.py's global_step, which starts at 1 (masked_run_glue.py's at 0)
    step_offset: int = 0

    @classmethod
    def from_config(cls, cfg, target: float, total_steps: int) -> Schedule:  # noqa: ANN001
        """Build from the `schedule` config group; warm-ups given as a float < 1 are
        fractions of the prune stage, integers are steps."""

        def steps(v: float | int) -> int:
            if v is None:
                return 0
            if isinstance(v, float) and 0 < v < 1:
                return int(round(v * total_steps))
            return int(v)

        return cls(
            kind=cfg.name,
            target=float(target),
            total_steps=int(total_steps),
            initial_warmup=steps(cfg.get("initial_warmup", 0)),
            final_warmup=steps(cfg.get("final_warmup", 0)),
            frequency=int(cfg.get("frequency", 1)),
            step_offset=cfg.get("step_offset", 0),
        )

    @property
    def ramp_steps(self) -> int:
        return self.total_steps - self.initial_warmup - self.final_warmup

    @property
    def last_ramp_step(self) -> int:
        """The step at which the target is first reached."""
        if self.kind == "oneshot":
            return self.initial_warmup - self.step_offset
        return self.initial_warmup + self.ramp_steps - 1 - self.step_offset

    def check_settings(self) -> None:
        """The checks that need no step count: run before any data is read, so a sweep
        checks them for every job before the first starts."""
        if self.kind not in KINDS:
            raise UserError(f"Invalid value for 'schedule': {self.kind!r}. Allowed: {', '.join(KINDS)}.")
        for key in ("initial_warmup", "final_warmup"):
            if getattr(self, key) < 0:
                raise UserError(f"Invalid value for 'schedule.{key}': {getattr(self, key)}. Allowed: a number of steps >= 0, or a fraction of the prune stage in (0, 1).")
        if self.frequency < 1:
            raise UserError(f"Invalid value for 'schedule.frequency': {self.frequency}. Allowed: an integer >= 1 (update the mask every N steps).")

    def validate(self) -> None:
        self.check_settings()
        offset = self.step_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= max(self.initial_warmup, 0):
            raise UserError(
                f"Invalid value for 'schedule.step_offset': {offset}. Allowed: an integer from 0 to "
                f"schedule.initial_warmup ({self.initial_warmup}): how many steps the schedule's counter runs ahead of "
                "the prune stage's (1: masked_run_squad.py's global_step, which starts at 1). It may not exceed the "
                "initial warm-up, since the prune stage's first forward pass runs unpruned."
            )
        if self.target > 0 and (self.ramp_steps < 1 or self.last_ramp_step >= self.total_steps):
            raise UserError(
                f"The sparsity schedule cannot reach its target {self.target} within the prune stage: "
                f"the stage has {self.total_steps} steps, but schedule.initial_warmup={self.initial_warmup} "
                f"and schedule.final_warmup={self.final_warmup} leave {self.ramp_steps} steps for pruning. "
                "Lengthen stages.prune (epochs or steps) or shorten the warm-ups; at least 1 pruning step is needed."
            )

    def progress(self, step: int) -> float:
        """Fraction of the ramp done after `step` (0 before, 1 at and after the end)."""
        step += self.step_offset
        if step < self.initial_warmup:
            return 0.0
        if self.kind == "oneshot":
            return 1.0
        return min(1.0, (step - self.initial_warmup + 1) / max(self.ramp_steps, 1))

    def sparsity(self, step: int) -> float:
        """Sparsity the mask must have after the update at `step`."""
        p = self.progress(step)
        if p <= 0.0:
            return 0.0
        if p >= 1.0:
            return self.target
        if self.kind == "cubic":  # Zhu & Gupta 2017; SEVEN's r_k = keep + (1-keep)(1-(k+1)/T)^3
            return self.target * (1.0 - (1.0 - p) ** 3)
        if self.kind == "linear":
            return self.target * p
        if self.kind == "exponential":  # kept fraction decays geometrically: keep(p) = keep^p
            return 1.0 - math.pow(1.0 - self.target, p)
        return self.target

    def is_update_step(self, step: int) -> bool:
        """Whether the mask is recomputed after `step`."""
        if step == self.last_ramp_step:  # always land exactly on the target
            return True
        step += self.step_offset
        if step < self.initial_warmup:
            return False
        return (step - self.initial_warmup + 1) % self.frequency == 0 or (
            self.kind == "oneshot" and step == self.initial_warmup
        )
