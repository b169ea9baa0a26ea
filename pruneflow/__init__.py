"""pruneflow: fine-tune → prune → fine-tune experiment runner for Transformer pruning."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def _config_dir() -> Path:
    """The Hydra config folder: the copy a wheel ships inside the package (pruneflow/conf),
    else the checkout's top-level conf/ (a source tree or an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "config.yaml").is_file() else here.parent / "conf"


CONFIG_DIR = _config_dir()

__all__ = ["__version__", "load_model", "sparsity_report"]


def load_model(path):  # noqa: ANN001, ANN201 - thin re-export, see pruneflow.export
    """Load a model saved by a pruneflow run (``<run>/model``), compressed or masked."""
    from pruneflow.export import load_model as _load

    return _load(path)


def sparsity_report(model, include=None, exclude=None):  # noqa: ANN001, ANN201 - see pruneflow.api
    """Zeros counted from the weights: per prunable layer, over the prunable set and overall."""
    from pruneflow.api import sparsity_report as _report

    return _report(model, include, exclude)


def __getattr__(name: str):  # noqa: ANN202 - ``pruneflow.methods.create(...)`` after a plain ``import pruneflow``
    if name in ("methods", "integrations"):
        import importlib

        return importlib.import_module(f"pruneflow.{name}")
    raise AttributeError(f"module 'pruneflow' has no attribute '{name}'")
