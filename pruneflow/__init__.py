"""pruneflow: fine-tune → prune → fine-tune experiment runner for Transformer pruning."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path):  # noqa: ANN001, ANN201 - thin re-export, see pruneflow.export
    """Load a model saved by a pruneflow run (``<run>/model``), compressed or masked."""
    from pruneflow.export import load_model as _load

    return _load(path)
