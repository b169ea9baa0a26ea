"""The project's metrics as local ``evaluate`` modules, loaded by path (offline).

``evaluate.load("glue", ...)`` fetches the metric script from the Hub; these
files are the same kind of script shipped inside the package, so
``evaluate.load(<path>)`` needs no network, and ``evaluate`` can gather
predictions across processes (``num_process``/``process_id``) for multi-GPU
evaluation. The statistics are scikit-learn / scipy; the plain functions
(``compute_glue``, ``compute_squad``, ``normalize_answer``) are importable too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pruneflow.metrics.glue import compute_glue
from pruneflow.metrics.squad import compute_squad, normalize_answer

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Path of a metric script: ``glue`` or ``squad``."""
    return str(METRICS_DIR / f"{name}.py")


@lru_cache(maxsize=32)
def _load(name: str, config_name: str, num_process: int, process_id: int) -> Any:
    import evaluate

    # In one process the predictions stay in memory; across processes evaluate
    # gathers them through its (file-locked) cache files.
    return evaluate.load(
        metric_path(name), config_name=config_name, num_process=num_process, process_id=process_id, keep_in_memory=num_process == 1
    )


def load_metric(name: str, config_name: str, num_process: int = 1, process_id: int = 0) -> Any:
    """The ``evaluate`` module for a metric, e.g. ``load_metric("glue", "cola")``."""
    return _load(name, config_name, num_process, process_id)


def compute(name: str, config_name: str, predictions: list, references: list) -> dict[str, float]:
    """Compute a metric through its ``evaluate`` module."""
    result = load_metric(name, config_name).compute(predictions=predictions, references=references)
    return {k: float(v) for k, v in (result or {}).items()}


__all__ = ["compute", "compute_glue", "compute_squad", "load_metric", "metric_path", "normalize_answer"]
