"""trainer.keep_freed_memory: freed memory is reused without new page faults."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from pruneflow import allocator
from pruneflow.results import provenance

# BERT-base's 72 prunable weight shapes: a step's weight gradients (340 MB)
SHAPES = [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    assert allocator.keep_freed_memory()
    assert allocator.keep_freed_memory()  # idempotent
    a = [torch.ones(s) for s in SHAPES]
    pages = sum(x.numel() for x in a) * 4 // 4096
    faults = []
    for _ in range(4):  # a fresh product per weight, freed after the "step", as gradients are
        before = _faults()
        grads = [x * 2 for x in a]
        faults.append(_faults() - before)
        del grads
    # glibc's defaults: every round maps most pages afresh (78,305 of 82,944 faulted in
    # each round on the 2-core VM); kept, only the first round grows the heap.
    assert max(faults[2:]) < pages // 20, (faults, pages)
    assert provenance(torch.device("cpu"))["keep_freed_memory"] is True
