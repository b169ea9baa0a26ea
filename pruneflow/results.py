"""``result.json`` and ``predictions.jsonl`` (the contract of DESIGN.md §5)."""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch import nn

from pruneflow import __version__, allocator
from pruneflow.utils import atomic_write_text, json_text

if TYPE_CHECKING:
    from pruneflow.runner import Run
    from pruneflow.tasks.base import Task


def sparsity_report(run: Run, model: nn.Module) -> dict[str, Any]:
    """Zeros counted from the final weights (after masks are baked in)."""
    override = run.method.sparsity_report(model, run.original_shapes) if hasattr(run.method, "sparsity_report") else None
    if override is not None:
        return override
    state = model.state_dict()
    per_layer, zeros, total = {}, 0, 0
    for name in run.original_shapes:
        w = state[name]
        z = int(w.numel() - w.count_nonzero())
        per_layer[name] = round(z / w.numel(), 6)
        zeros += z
        total += w.numel()
    return {"measured": round(zeros / max(total, 1), 6), "per_layer": per_layer}


@torch.no_grad()
def paper_sparsity(definition: dict[str, Any] | None, model: nn.Module, compressed: bool) -> dict[str, Any] | None:
    """The measured sparsity under an experiment's paper definition (``experiment_info.
    sparsity_definition``), counted from the final weights."""
    if not definition:
        return None
    if not definition.get("include"):  # a definition in words only: stated, not counted here
        return {"definition": dict(definition), "value": None,
                "why_none": "the paper's definition names no layer set to count (see definition.text)"}
    from pruneflow.masking import _matches

    include, exclude = list(definition["include"]), list(definition.get("exclude") or [])
    biases = bool(definition.get("biases", False))
    layer_norms = bool(definition.get("layer_norms", False))
    reports = str(definition.get("reports", "removed"))
    out: dict[str, Any] = {"definition": dict(definition)}
    if compressed:
        out["value"] = None
        out["why_none"] = "the model was physically compressed; its removed weights are counted by sparsity.measured"
        return out
    zeros = total = 0
    for name, module in model.named_modules():
        if not _matches(name, include) or _matches(name, exclude):
            continue
        tensors: list[torch.Tensor] = []
        if isinstance(module, nn.Linear):
            tensors = [module.weight] + ([module.bias] if biases and module.bias is not None else [])
        elif isinstance(module, nn.LayerNorm) and layer_norms:  # never pruned: remaining whatever their values
            total += sum(t.numel() for t in (module.weight, module.bias) if t is not None)
        for t in tensors:
            zeros += int(t.numel() - t.count_nonzero())
            total += t.numel()
    removed = zeros / total if total else None
    out["counted"] = total
    out["removed"] = None if removed is None else round(removed, 6)
    out["value"] = None if removed is None else round(removed if reports == "removed" else 1 - removed, 6)
    return out


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def git_dirty() -> bool | None:
    """Whether the checkout's tracked files differ from ``git_sha`` (None outside git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=1)
def pruneflow_source() -> str:
    """A hash of pruneflow's own source files: tells two versions of the code apart where
    ``git_sha`` cannot (uncommitted changes, an installed copy)."""
    from pruneflow.cache import source_hash

    return source_hash(Path(__file__).resolve().parent)


def provenance(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"pruneflow": __version__, "torch": torch.__version__, "python": platform.python_version()}
    # from the installed packages' metadata: importing transformers or datasets here only
    # for their versions took ~1 s at the end of every run
    for key, dist in (("transformers", "transformers"), ("timm", "timm"), ("datasets", "datasets"), ("hydra", "hydra-core"), ("wandb", "wandb")):
        try:
            versions[key] = version(dist)
        except PackageNotFoundError:
            pass
    return {
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "pruneflow_source": pruneflow_source(),
        "host": socket.gethostname(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "keep_freed_memory": allocator.applied(),
        "versions": versions,
    }


def build_result(run: Run, model: nn.Module, metrics: dict[str, dict[str, float]], times: dict[str, float], speed: dict[str, Any] | None, export: dict[str, Any] | None) -> dict[str, Any]:
    cfg = run.cfg
    model = run.bundle.model
    sp = sparsity_report(run, model)
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    compressed = getattr(run.method, "compressed", False)
    prunable_total = sum(int(torch.tensor(s).prod()) for s in run.original_shapes.values())
    result = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": int(cfg.seed),
        "main_metric": run.task.main_metric,
        "sparsity": {
            "target": run.sparsity,
            "measured": sp["measured"],
            "overall": round(1 - nonzero / run.total_params, 6),
            "per_layer": sp["per_layer"],
        },
        "params": {
            "total": run.total_params,
            "prunable": prunable_total,
            "nonzero": nonzero,
            "compressed_total": sum(p.numel() for p in model.parameters()) if compressed else None,
        },
        "metrics": metrics,
        "speed": speed,
        "export": export or {"semi_structured": {"available": False, "reason": "the method does not produce 2:4 masks" if torch.cuda.is_available() else "no CUDA device"}},
        "time_s": {k: round(v, 3) for k, v in times.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": list(run.overrides),
        "provenance": provenance(run.device),
    }
    definition = (result["config"].get("experiment_info") or {}).get("sparsity_definition")
    paper = paper_sparsity(definition, model, compressed)
    if paper is not None:
        result["sparsity"]["paper"] = paper
    info = run.method.summary()
    if info:
        result["method_info"] = info
    return result


def write_predictions(run_dir: Path, task: Task, predictions: dict[str, list[dict[str, Any]]]) -> None:
    """``predictions.jsonl`` for the main split, ``predictions_<split>.jsonl`` for the others."""
    for split, records in predictions.items():
        name = "predictions.jsonl" if split == task.main_split else f"predictions_{split}.jsonl"
        atomic_write_text(Path(run_dir) / name, "".join(json_text(r) + "\n" for r in records))


def load_results(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result.json under ``root`` (used by the report)."""
    out = []
    for p in sorted(Path(root).rglob("result.json")):
        if ".cache" in p.parts:
            continue
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):  # the report lists it as unreadable
            continue
        if not isinstance(r, dict):
            continue
        r["_path"] = str(p.parent)
        r["_mtime"] = p.stat().st_mtime  # which of two runs of one configuration and seed is the later
        out.append(r)
    return out
