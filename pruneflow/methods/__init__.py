"""Pruning methods, one file each; ``conf/method/<name>.yaml`` selects one."""

from __future__ import annotations

import importlib

from pruneflow.errors import invalid
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


def get_method_class(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise invalid("method", name, sorted(METHODS))
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_one_shot_class(name: str):  # noqa: ANN201
    """The one-shot (causal-LM) form of a method."""
    if name not in ONE_SHOT_METHODS:
        raise invalid("method", name, sorted(ONE_SHOT_METHODS),
                      "A causal-LM task (task=lm/...) is pruned one shot from calibration data.")
    module, cls = ONE_SHOT_METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["METHODS", "ONE_SHOT_METHODS", "get_one_shot_class", "PruneContext", "PruningMethod", "create", "get_method_class"]
