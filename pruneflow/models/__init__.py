"""Model factories: ``timm.create_model`` for vision, ``transformers`` Auto classes for text.

``conf/model/<name>.yaml`` chooses one. ``model.path`` (a local directory) replaces
the hub id for users with their own checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pruneflow.errors import UserError

if TYPE_CHECKING:
    from pruneflow.tasks.base import Task

FAMILIES = ("timm", "hf", "causal_lm")


@dataclass
class ModelBundle:
    """A model with what it needs to be fed and saved."""

    model: nn.Module
    family: str  # "timm" | "hf" | "causal_lm"
    name: str
    tokenizer: Any = None
    # How to rebuild the architecture (saved in model/config.json for timm models).
    arch: dict[str, Any] = field(default_factory=dict)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Model outputs for a batch prepared by the task (labels are not passed)."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions", "example_index")}
        if self.family == "timm":
            return self.model(inputs["pixel_values"])
        return self.model(**inputs)

    def fresh_architecture(self) -> nn.Module:
        """Same architecture with random weights (a dense reference for latency)."""
        if self.family == "timm":
            import timm

            return timm.create_model(self.arch["architecture"], pretrained=False, **self.arch["kwargs"])
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        auto = AutoModelForQuestionAnswering if self.arch.get("head") == "question_answering" else AutoModelForSequenceClassification
        return auto.from_config(self.model.config)


def check_pairing(cfg: DictConfig, task: Task) -> None:
    """A model family that cannot run the task is an error; it needs only the task's kind,
    so runners call it before any data is read."""
    family = cfg.get("family")
    if family not in FAMILIES:
        raise UserError(f"Invalid value for 'model.family': {family!r}. Allowed: {', '.join(FAMILIES)}.")
    causal = getattr(task, "problem", None) == "causal_lm"
    if family == "timm" and task.modality != "image":
        kind, examples = (("causal language model", "model=tiny_llama (offline), opt_125m or llama2_7b") if causal
                          else ("text model", "model=bert_tiny or model=bert_base"))
        raise UserError(
            f"Model/task mismatch: model={cfg.name} is an image model (timm) but task={task.name} is a "
            f"{task.modality} task. Choose a {kind} for it (e.g. {examples})."
        )
    if family == "causal_lm" and not causal:
        raise UserError(
            f"Model/task mismatch: model={cfg.name} is a causal language model, which is pruned one shot and evaluated "
            f"by perplexity: use it with task=lm/wikitext2 or task=lm/c4, not task={task.name}."
        )
    if family == "hf" and causal:
        raise UserError(
            f"Model/task mismatch: task={task.name} prunes a causal language model, but model={cfg.name} is not one. "
            "Choose a causal LM, e.g. model=tiny_llama (offline), opt_125m or llama2_7b."
        )
    if family == "hf" and task.modality != "text":
        raise UserError(
            f"Model/task mismatch: model={cfg.name} is a text model (transformers) but task={task.name} is an "
            f"{task.modality} task. Choose an image model for it (e.g. "
            + ("model=tiny_vit, built for its {}x{} images).".format(*task.image_size) if getattr(task, "image_size", None)
               else "model=tiny_vit or model=deit_small).")
        )


def build_model(cfg: DictConfig, task: Task) -> ModelBundle:
    check_pairing(cfg, task)
    family = cfg.get("family")
    if family == "timm":
        from pruneflow.models.vision import build_timm_model

        return build_timm_model(cfg, task)
    if family == "causal_lm":
        from pruneflow.models.causal import build_causal_lm

        return build_causal_lm(cfg, task)
    from pruneflow.models.text import build_hf_model

    return build_hf_model(cfg, task)


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = cfg.get("kwargs") or {}
    return OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs)
