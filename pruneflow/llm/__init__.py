"""One-shot pruning of causal language models (DESIGN.md §9): calibration data,
block-by-block pruning, perplexity and zero-shot evaluation, the pipeline.

From your own code (the CLI runs the same implementation)::

    from pruneflow.llm import prune_causal_lm
    report = prune_causal_lm(model, calibration_ids, method="wanda", sparsity=0.5)   # or pattern="2:4"
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prune_causal_lm(model: nn.Module, calibration_ids: torch.Tensor, method: str = "wanda", sparsity: float | None = None,
                    *, device: str | torch.device | None = None, offload: bool = False, **settings: Any) -> dict[str, Any]:  # noqa: ANN401
    """Prune a ``transformers`` causal LM in place, block by block, from calibration token
    ids of shape (nsamples, seqlen). ``method``: wanda, sparsegpt, ria or magnitude, with
    its config keys as keyword arguments (``pattern="2:4"``, ``block_size=128``, ...).
    Returns the sparsity counted from the weights (overall and per block)."""
    from pruneflow.api import method_config
    from pruneflow.llm.blocks import BlockPruner
    from pruneflow.methods import get_one_shot_class
    from pruneflow.runner import validate_sparsity

    validate_sparsity(sparsity)
    cfg = method_config(method, settings)
    cls = get_one_shot_class(method)
    target = cls.resolve_sparsity(cfg, sparsity)
    impl = cls(cfg, target)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pruner = BlockPruner(model, impl, dev, offload, list(cfg.get("include") or []) or None, list(cfg.get("exclude") or []) or None)
    pruner.run(calibration_ids, [target] * len(pruner.blocks))
    per_block, zeros, total = [], 0, 0
    for i in range(len(pruner.blocks)):
        z = sum(int((lin.weight == 0).sum()) for lin in pruner.linears(i).values())
        n = sum(lin.weight.numel() for lin in pruner.linears(i).values())
        per_block.append(z / max(n, 1))
        zeros, total = zeros + z, total + n
    return {"method": method, "target": target, "measured": zeros / max(total, 1), "per_block": per_block}


__all__ = ["prune_causal_lm"]
