"""Saving and loading final models as safetensors.

``transformers`` models go through ``save_pretrained`` (loadable with
``from_pretrained``); timm models are ``model.safetensors`` plus a
``config.json`` naming the timm architecture and its arguments. A method that
changes the architecture (SPP) adds what is needed to rebuild it, and
``pruneflow.load_model(dir)`` reads all of these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from pruneflow.models import ModelBundle
from pruneflow.utils import atomic_write_json


def save_model(bundle: ModelBundle, out_dir: Path, method: Any = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = method.export_config() if method is not None and hasattr(method, "export_config") else None
    if bundle.family == "hf":
        bundle.model.save_pretrained(out_dir, safe_serialization=True)
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(out_dir)
        if extra:
            atomic_write_json(out_dir / "pruneflow.json", extra)
        return
    st_save_model(bundle.model, str(out_dir / "model.safetensors"))
    cfg = {"library": "timm", **bundle.arch}
    if extra:
        cfg["pruneflow"] = extra
    atomic_write_json(out_dir / "config.json", cfg)


def saved_metadata(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """What ``save_model`` added to rebuild a model (SPP: ``compressed`` and the kept
    units), with the file it is in: ``pruneflow.json`` beside a transformers model, the
    ``pruneflow`` entry of a timm model's ``config.json``. None for a plain model."""
    path = Path(path)
    extra_file = path / "pruneflow.json"
    if extra_file.exists():
        return extra_file, json.loads(extra_file.read_text())
    config_file = path / "config.json"
    extra = json.loads(config_file.read_text()).get("pruneflow") if config_file.exists() else None
    return (config_file, extra) if extra else None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild and load a model written by ``save_model`` (masked or compressed)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    saved = saved_metadata(path)
    extra = saved[1] if saved is not None else None
    if config.get("library") == "timm":
        import timm

        model = timm.create_model(config["architecture"], pretrained=False, **config["kwargs"])
    else:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForQuestionAnswering,
            AutoModelForSequenceClassification,
        )

        hf_config = AutoConfig.from_pretrained(path)
        archs = hf_config.architectures or []
        # the head the run trained, as config.json names it (causal LMs: task=lm/...)
        auto = (AutoModelForQuestionAnswering if any("QuestionAnswering" in a for a in archs)
                else AutoModelForCausalLM if any("CausalLM" in a for a in archs)
                else AutoModelForSequenceClassification)
        if not extra:
            return auto.from_pretrained(path)
        model = auto.from_config(hf_config)
    if extra and extra.get("compressed"):
        from pruneflow.compress import apply_structure

        apply_structure(model, extra)
    st_load_model(model, str(path / "model.safetensors"))
    return model
