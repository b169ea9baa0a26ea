"""Inference latency of the dense and the final model, measured side by side."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow.models import ModelBundle
from pruneflow.tasks.base import Task


def _sync(device: torch.device | None) -> None:
    """Wait for the GPU the timed work runs on (``synchronize()`` alone waits for the
    current device only: cuda:0 in a run on cuda:1 that never set it)."""
    if device is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elif torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def time_forward(fns: dict[str, Any], repeats: int = 10, warmup: int = 2, device: torch.device | None = None) -> dict[str, float]:
    """Median milliseconds per call for each function, calls interleaved so that
    machine noise hits all of them alike. ``device``: where the work runs (None: the
    current CUDA device, if any)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_speed(cfg: DictConfig, bundle: ModelBundle, task: Task, device: torch.device) -> dict[str, Any]:
    batch_size = int(cfg.speed.get("batch", 8))
    split = task.main_split
    ds = task.eval_sets[split]
    batch = task.collate([ds[i % len(ds)] for i in range(batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    dense: nn.Module = bundle.fresh_architecture().to(device).eval()
    if (cfg.get("trainer") or {}).get("compile", False):  # the final model runs compiled: so does the one it is timed against
        dense.compile()
    bundle.model.eval()
    dense_bundle = ModelBundle(model=dense, family=bundle.family, name=bundle.name, arch=bundle.arch)
    times = time_forward(
        {"dense": lambda: dense_bundle.forward(batch), "final": lambda: bundle.forward(batch)},
        repeats=int(cfg.speed.get("repeats", 10)),
        device=device,
    )
    out = {"device": str(device), "batch": batch_size, "dense_ms": round(times["dense"], 3), "final_ms": round(times["final"], 3)}
    for key, fn in (("dense", lambda: dense_bundle.forward(batch)), ("final", lambda: bundle.forward(batch))):
        out[f"{key}_flops"] = forward_flops(fn)
    return out


@torch.no_grad()
def forward_flops(fn: Any) -> int | None:  # noqa: ANN401
    """FLOPs of one call as torch's FLOP counter counts them (a multiply-add is 2; fvcore,
    which DeiT's and SPP's papers use, counts it as 1): the matmuls, convolutions and
    attention products. None where the counter cannot follow the call (a compiled model)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # noqa: BLE001 - a count the counter cannot make must not lose the run
        return None
    return int(counter.get_total_flops())
