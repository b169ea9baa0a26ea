"""``trainer.keep_freed_memory``: glibc's allocator keeps freed memory for reuse.

A CPU training step allocates and frees the same large tensors every step: the
weights' gradients (zeroed to ``None``), activations, the embedding gradient
(94 MB at BERT-base). By default glibc serves blocks above a size threshold with
``mmap`` and returns them (and the heap's free top) to the kernel on ``free``, so
the next step touches fresh pages: one page fault per 4 KiB. Measured on the
2-core VM, 72 tensors of BERT-base's prunable shapes (340 MB): allocating and
writing them took 118-163 ms with the defaults and 25 ms with freed memory kept.
PyTorch's CPU tuning guide reaches the same by preloading jemalloc or tcmalloc;
this does it with two ``mallopt`` calls and nothing to install.

The process keeps its peak heap for its lifetime (the peak of a training loop is
reached in its first steps anyway). It changes no result: only where memory
comes from. Non-glibc systems (macOS, musl) keep their allocator; the run's
``provenance.keep_freed_memory`` in result.json says whether it applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("pruneflow")

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Serve every block from the heap (no per-block ``mmap``) and never trim it.
    Idempotent; True where it applied (Linux with glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
    except (OSError, AttributeError):
        return False
    gnu.restype = ctypes.c_char_p
    # mallopt returns 1 on success; the trim threshold is an int (2 GiB - 1 at most).
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    if _applied:
        log.debug("glibc %s: freed memory is kept for reuse (trainer.keep_freed_memory)", gnu().decode())
    return _applied


def apply_setting(mode: bool | str, device_type: str) -> bool:
    """``trainer.keep_freed_memory`` (or a benchmark's ``--keep-freed-memory``):
    ``auto`` applies it on CPU, ``true`` everywhere (with a warning where it cannot
    apply), ``false`` never. Returns whether this process keeps freed memory."""
    mode = str(mode).lower()
    if mode == "true" or (mode == "auto" and device_type == "cpu"):
        if not keep_freed_memory() and mode == "true":
            log.warning("trainer.keep_freed_memory=true has no effect here: it needs Linux with glibc (this is %s).", sys.platform)
    return applied()


def applied() -> bool:
    """Whether this process keeps freed memory (set by ``keep_freed_memory``)."""
    return bool(_applied)
