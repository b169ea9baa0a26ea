"""One-shot pruning of causal language models (DESIGN.md §9): calibration data,
block-by-block pruning, perplexity and zero-shot evaluation, the pipeline.

From your own code (the CLI runs the same implementation)::

    from pruneflow.llm import prune_causal_lm
    report = prune_causal_lm(model, calibration_ids, method="wanda", sparsity=0.5)   # or pattern="2:4"
    report = prune_causal_lm(model, calibration_ids, method="seven_pre", scope="local")  # loss gradients
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prune_causal_lm(model: nn.Module, calibration_ids: torch.Tensor, method: str = "wanda", sparsity: float | None = None,
                    *, device: str | torch.device | None = None, offload: bool = False, batch_size: int = 1,
                    schedule: str = "cubic", **settings: Any) -> dict[str, Any]:  # noqa: ANN401
    """Prune a ``transformers`` causal LM in place from calibration token ids of shape
    (nsamples, seqlen). ``method``: wanda, sparsegpt, ria or magnitude (block by block), or
    seven_pre, snip, force (loss gradients of the whole model, ``batch_size`` windows per
    scoring step, the mask along ``schedule`` over the steps), with its config keys as
    keyword arguments (``pattern="2:4"``, ``block_size=128``, ``scope="local"``, ...).
    Returns the sparsity counted from the weights (overall and per block)."""
    from pruneflow.api import method_config
    from pruneflow.errors import invalid
    from pruneflow.llm.blocks import BlockPruner
    from pruneflow.llm.gradient import lm_method_class, n_steps, prune_blocks_with_gradients
    from pruneflow.methods.oneshot import OneShotMethod
    from pruneflow.runner import validate_sparsity
    from pruneflow.schedules import Schedule

    validate_sparsity(sparsity)
    cfg = method_config(method, settings)
    cls, gradient = lm_method_class(method)
    if gradient and sparsity is None and cfg.get("pattern") is None:
        sparsity = OneShotMethod.default_sparsity
    target = cls.resolve_sparsity(cfg, sparsity)
    impl = cls(cfg, target)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    pruner = BlockPruner(model, impl, dev, offload and not gradient, list(cfg.get("include") or []) or None,
                         list(cfg.get("exclude") or []) or None)
    if gradient:
        if offload:
            raise invalid("offload", True, f"False with method={method} (it back-propagates through the whole model)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise invalid("batch_size", batch_size, "an integer >= 1 (calibration windows per scoring step)")
        plan = Schedule(kind=schedule, target=impl.schedule_target(), total_steps=n_steps(calibration_ids.shape[0], batch_size))
        plan.validate()
        prune_blocks_with_gradients(pruner, impl, calibration_ids, batch_size, plan, dev)
    else:
        pruner.run(calibration_ids, [target] * len(pruner.blocks))
    per_block, zeros, total = [], 0, 0
    for i in range(len(pruner.blocks)):
        z = sum(int((lin.weight == 0).sum()) for lin in pruner.linears(i).values())
        n = sum(lin.weight.numel() for lin in pruner.linears(i).values())
        per_block.append(z / max(n, 1))
        zeros, total = zeros + z, total + n
    return {"method": method, "target": target, "measured": zeros / max(total, 1), "per_block": per_block}


__all__ = ["prune_causal_lm"]
