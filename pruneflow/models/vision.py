"""Vision Transformers from timm (ViT, DeiT)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pruneflow import hub
from pruneflow.errors import UserError, check_bool
from pruneflow.models import ModelBundle, model_kwargs

if TYPE_CHECKING:
    from pruneflow.tasks.base import Task


def _head_size(architecture: str, weights: Path) -> dict[str, int]:
    """The class count of a local checkpoint's head. timm drops the head of pretrained
    weights whose class count differs from the model's, judged by the pretrained
    config (1000 for ImageNet): without this a user's own 10-class head would be
    re-initialised even for a 10-class task."""
    from safetensors import safe_open
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(architecture)
    head = pcfg.classifier if pcfg is not None else None
    head = head[0] if isinstance(head, (tuple, list)) else head
    if not head or weights.suffix != ".safetensors":
        return {}
    with safe_open(str(weights), "pt") as f:
        key = f"{head}.weight"
        return {"num_classes": f.get_slice(key).get_shape()[0] if key in f.keys() else 0}


def build_timm_model(cfg: DictConfig, task: Task) -> ModelBundle:
    import timm

    kwargs = model_kwargs(cfg)
    kwargs["num_classes"] = task.num_labels
    kwargs.setdefault("in_chans", task.image_channels)
    pretrained = check_bool(cfg.get("pretrained", False), "model.pretrained")
    if cfg.get("path"):
        path = Path(cfg.path)
        weights = path / "model.safetensors" if path.is_dir() else path
        if not weights.exists():
            raise UserError(f"Invalid value for 'model.path': {cfg.path}. Allowed: an existing directory holding model.safetensors (timm weights) or a weights file.")
        try:
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights), **_head_size(cfg.hub_id, weights)}
        except Exception as e:  # noqa: BLE001 - a damaged safetensors file
            raise UserError(f"model.path={cfg.path}: {weights} cannot be read ({type(e).__name__}: {e}); it is not a valid safetensors file.") from e
        pretrained = True
    if pretrained and not cfg.get("path"):
        hub.offline_if_unreachable()
    try:
        model = timm.create_model(cfg.hub_id, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. no network for pretrained weights, damaged weights
        hint = ("Offline, set model.pretrained=false or point model.path at local weights." if pretrained and not cfg.get("path")
                else f"Check model.kwargs (passed to timm.create_model): {', '.join(sorted(kwargs)) or 'none'}.")
        raise UserError(
            f"Could not create timm model '{cfg.hub_id}' (model={cfg.name}, pretrained={pretrained}): {type(e).__name__}: {e}. {hint}"
        ) from e
    arch_kwargs = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    return ModelBundle(model=model, family="timm", name=cfg.name, arch={"architecture": cfg.hub_id, "kwargs": arch_kwargs})
