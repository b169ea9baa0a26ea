"""Knowledge distillation from a dense teacher, usable with any method (``distill.*``).

As Sanh et al.'s movement-pruning scripts (``masked_run_glue.py`` /
``masked_run_squad.py``)::

    loss = alpha_distil * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + alpha_ce * task_loss

with the KL summed over classes and averaged over the batch (``batchmean``); for
question answering the term is the mean of the start- and end-logit terms (softmax
over positions). Regression tasks (STS-B), which their script does not support,
use ``alpha_distil * MSE(student, teacher) + alpha_ce * MSE(student, label)``.

The teacher is the model right after the finetune stage (``distill.teacher=finetuned``,
frozen, in eval mode) or a fine-tuned model on disk (a ``save_pretrained`` folder or
a pruneflow ``model/`` folder).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pruneflow.errors import UserError, check_bool, invalid

log = logging.getLogger("pruneflow")

STAGE_NAMES = ("prune", "recover")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, summed over the last
    dimension and averaged over the rest (``batchmean``)."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1).reshape(-1, student.shape[-1])
    t_prob = F.softmax(teacher.float() / t, dim=-1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s_log, t_prob, reduction="batchmean") * t * t


class Distiller:
    def __init__(self, cfg: DictConfig, teacher: nn.Module, problem: str) -> None:
        self.temperature = float(cfg.temperature)
        self.alpha_ce = float(cfg.alpha_ce)
        self.alpha_distil = float(cfg.alpha_distil)
        self.problem = problem
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def loss(self, bundle: Any, task: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN401
        ce, student = task.loss_and_logits(bundle, batch)
        with torch.no_grad():
            teacher_bundle = copy.copy(bundle)
            teacher_bundle.model = self.teacher
            teacher = task.logits(teacher_bundle, batch)
        if self.problem == "regression":
            kd = F.mse_loss(student[0].float().squeeze(-1), teacher[0].float().squeeze(-1))
        else:
            kd = sum(kd_loss(s, t, self.temperature) for s, t in zip(student, teacher, strict=True)) / len(student)
        return self.alpha_distil * kd + self.alpha_ce * ce


def validate(cfg: DictConfig) -> None:
    d = cfg.get("distill")
    if d is None or not check_bool(d.get("enabled", False), "distill.enabled"):
        return
    for key in ("temperature",):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise invalid(f"distill.{key}", v, "a positive number")
    for key in ("alpha_ce", "alpha_distil"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise invalid(f"distill.{key}", v, "a number >= 0")
    if not float(d.alpha_distil) > 0:
        raise invalid("distill.alpha_distil", d.alpha_distil, "a number > 0 with distill.enabled=true")
    stages = list(d.get("stages") or [])
    if not stages or any(s not in STAGE_NAMES for s in stages):
        raise invalid("distill.stages", stages, f"a non-empty list of {', '.join(STAGE_NAMES)}")
    teacher = str(d.get("teacher") or "")
    if teacher != "finetuned" and not Path(teacher).is_dir():
        raise invalid(
            "distill.teacher", d.get("teacher"), "finetuned (the model after the finetune stage) or a directory with a fine-tuned model",
            "Sanh et al. distil from BERT-base fine-tuned on the task.",
        )


def load_teacher(path: str, like: nn.Module) -> nn.Module:
    """A fine-tuned teacher from disk: a pruneflow ``model/`` folder or a ``save_pretrained`` one."""
    from pruneflow.export import load_model

    try:
        return load_model(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"distill.teacher={path}: could not load a model from it ({type(e).__name__}: {e}).") from e
