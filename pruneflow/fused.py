"""Optional ``torch.compile`` of the per-step elementwise kernels of the pruning methods.

At BERT-base scale (85M prunable weights) a pruning step that updates scores and
masks every step is bound by memory traffic: each eager op is one more pass over
hundreds of MB. ``torch.compile`` (Inductor) fuses a method's whole score update
into one loop that reads each input once. Compiling costs seconds (cached on disk
by torch afterwards), so it is used only where it pays off: on CPU, for models with
many prunable weights. Any compile failure (e.g. no C++ compiler) falls back to
the same function run eagerly, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("pruneflow")

#: below this many prunable weights eager kernels are fast enough and compiling is not worth it
COMPILE_MIN_NUMEL = 8_000_000
MODES = ("auto", "true", "false")


def want_compile(mode: Any, numel: int, device: torch.device) -> bool:
    """``method.compile``: auto = on CPU with >= COMPILE_MIN_NUMEL prunable weights."""
    mode = str(mode).lower()
    if mode == "true":
        return True
    if mode == "false":
        return False
    return device.type == "cpu" and numel >= COMPILE_MIN_NUMEL


class Kernel:
    """Calls ``fn`` compiled (dynamic shapes: one graph for every tensor size) or eagerly."""

    def __init__(self, fn: Callable[..., Any], compiled: bool) -> None:
        self.fn = fn
        self.compiled_fn = torch.compile(fn, dynamic=True) if compiled else None
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled_fn is not None:
            try:
                return self.compiled_fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any backend failure: run eagerly instead
                log.warning("torch.compile of %s failed (%s: %s); using eager kernels.", self.__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.compiled_fn = None
        return self.fn(*args, **kwargs)
