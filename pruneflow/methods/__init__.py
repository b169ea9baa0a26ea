"""Pruning methods, one file each; ``conf/method/<name>.yaml`` selects one."""

from __future__ import annotations

import importlib

import pruneflow
from pruneflow.errors import UserError, invalid
from pruneflow.methods.base import PruneContext, PruningMethod

# config name -> "module:Class" (imported lazily so a method's dependencies load only when used)
METHODS: dict[str, str] = {
    "admm": "pruneflow.methods.admm:ADMM",
    "dense": "pruneflow.methods.dense:Dense",
    "force": "pruneflow.methods.force:Force",
    "grasp": "pruneflow.methods.grasp:GraSP",
    "l0": "pruneflow.methods.l0:L0",
    "magnitude": "pruneflow.methods.magnitude:Magnitude",
    "movement": "pruneflow.methods.movement:Movement",
    "platon": "pruneflow.methods.platon:Platon",
    "random": "pruneflow.methods.random:Random",
    "seven": "pruneflow.methods.seven:Seven",
    "seven_pre": "pruneflow.methods.seven_pre:SevenPre",
    "snip": "pruneflow.methods.snip:Snip",
    "soft_movement": "pruneflow.methods.movement:SoftMovement",
    "spp": "pruneflow.methods.spp:SPP",
    # one shot, causal LMs (task=lm/...): see pruneflow.methods.oneshot
    "ria": "pruneflow.methods.ria:RIA",
    "sparsegpt": "pruneflow.methods.sparsegpt:SparseGPT",
    "wanda": "pruneflow.methods.wanda:Wanda",
}

# The methods that prune a causal LM one shot from calibration data; magnitude has a
# one-shot form of its own there.
ONE_SHOT_METHODS: dict[str, str] = {
    "magnitude": "pruneflow.methods.magnitude:MagnitudeOneShot",
    "ria": "pruneflow.methods.ria:RIA",
    "sparsegpt": "pruneflow.methods.sparsegpt:SparseGPT",
    "wanda": "pruneflow.methods.wanda:Wanda",
}


def create(name: str, sparsity: float | None = None, steps: int = 1, **kwargs):  # noqa: ANN003, ANN201
    """A method for your own training loop (see :mod:`pruneflow.api`)."""
    from pruneflow.api import create as _create

    return _create(name, sparsity, steps, **kwargs)


CONF_DIR = pruneflow.CONFIG_DIR / "method"


def unregistered_hint(name: str) -> str:
    """For a method being added, half registered: its config exists, its METHODS line not."""
    if name in METHODS or name in ONE_SHOT_METHODS or not (CONF_DIR / f"{name}.yaml").exists():
        return ""
    return (f"conf/method/{name}.yaml exists, but '{name}' is not in the METHODS dict of "
            f"pruneflow/methods/__init__.py: add \"{name}\": \"pruneflow.methods.{name}:<its class>\" there.")


def get_method_class(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise invalid("method", name, sorted(METHODS), unregistered_hint(name))
    return _load(METHODS, name)


def _load(registry: dict[str, str], name: str) -> type[PruningMethod]:
    """The class a registry entry ``module:Class`` names; a missing class is one paragraph."""
    module, cls = registry[name].split(":")
    mod = importlib.import_module(module)
    if not hasattr(mod, cls):
        classes = sorted(k for k, v in vars(mod).items() if isinstance(v, type) and v.__module__ == mod.__name__)
        raise UserError(f"The METHODS entry of method={name} names {registry[name]}, but {module} has no '{cls}' "
                        f"(its classes: {', '.join(classes) or 'none'}). Correct the entry in pruneflow/methods/__init__.py.")
    return getattr(mod, cls)


def get_one_shot_class(name: str):  # noqa: ANN201
    """The one-shot (causal-LM) form of a method."""
    if name not in ONE_SHOT_METHODS:
        raise invalid("method", name, sorted(ONE_SHOT_METHODS),
                      "A causal-LM task (task=lm/...) is pruned one shot from calibration data.")
    return _load(ONE_SHOT_METHODS, name)


__all__ = ["METHODS", "ONE_SHOT_METHODS", "get_one_shot_class", "PruneContext", "PruningMethod", "create", "get_method_class"]
