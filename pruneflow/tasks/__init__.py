"""Tasks (dataset + metric), one per ``conf/task/<name>.yaml``."""

from __future__ import annotations

import importlib

from omegaconf import DictConfig

from pruneflow.errors import invalid
from pruneflow.tasks.base import Task

# task name (as in conf/task, e.g. "glue/sst2") -> "module:Class"
TASKS: dict[str, str] = {
    "digits": "pruneflow.tasks.digits:Digits",
    **{f"glue/{t}": "pruneflow.tasks.glue:Glue" for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")},
    "squad/v1": "pruneflow.tasks.squad:Squad",
    "squad/v2": "pruneflow.tasks.squad:Squad",
    "cifar10": "pruneflow.tasks.cifar:Cifar",
    "cifar100": "pruneflow.tasks.cifar:Cifar",
    "imagenet": "pruneflow.tasks.imagenet:ImageNet",
    "lm/wikitext2": "pruneflow.tasks.lm:LanguageModeling",
    "lm/c4": "pruneflow.tasks.lm:LanguageModeling",
}


def build_task(cfg: DictConfig, seed: int) -> Task:
    name = cfg.get("name")
    if name not in TASKS:
        raise invalid("task", name, sorted(TASKS))
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, seed)


__all__ = ["TASKS", "Task", "build_task"]
