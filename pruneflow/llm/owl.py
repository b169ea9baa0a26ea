"""OWL, outlier-weighted layerwise sparsity (Yin et al., ICML 2024).

On the dense model, each block's outlier ratio is the percentage of its Wanda scores
``|W| * ||X_j||`` (all its Linears together) above ``owl_m`` times their mean. Ratios
are min-max scaled to ``[0, 2 * owl_lambda]``, shifted so that their mean is the kept
fraction ``1 - s``, and each block gets sparsity ``1 - ratio``: blocks with more outliers
are pruned less, the average stays ``s``. As the authors' ``prune_wanda_outlier`` and
``check_outlier_mean`` (luuyin/OWL @ dddb7a4, lib/prune_all.py; their README's LLaMA
commands use ``--Hyper_m 5 --Lamda 0.08``); the per-block sparsities then drive
whichever method the run uses (theirs: ``wanda_owl``, ``sparsegpt_owl`` and
``magnitude_owl``; ``magnitude_owl`` has no 0.01 floor). OWL's scripts calibrate on 128
C4 windows of 2048 tokens (``model.seqlen = 2048``): ``calibration.seqlen=2048
task.seqlen=2048`` on LLaMA-2, whose default here is its 4096 positions.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from pruneflow.llm.blocks import BlockPruner
from pruneflow.methods.oneshot import LayerPruner


def outlier_ratio(metrics: list[torch.Tensor], m: float) -> float:
    """Percentage of scores above ``m`` times the mean score (over all given layers)."""
    flat = torch.cat([x.flatten().float() for x in metrics])
    return float((flat > m * flat.mean()).sum()) / flat.numel() * 100


def allocate(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    r = np.asarray(ratios, dtype=np.float64)
    if r.max() == r.min():  # no spread to weight by: uniform
        return [sparsity] * len(r)
    r = (r - r.min()) / (r.max() - r.min()) * lam * 2
    kept = r - r.mean() + (1 - sparsity)
    out = [float(1 - k) if 1 - k > 0 else 0.01 for k in kept]  # theirs: a block at <= 0 gets 0.01
    over = [(i, s) for i, s in enumerate(out) if s >= 1]
    if over:  # as their code, the block is pruned whole: say so
        import logging

        logging.getLogger("pruneflow").warning(
            "allocation.owl_lambda=%g spreads the blocks' kept fractions 2 * %g around %g: block(s) %s get sparsity %s, so "
            "every weight of them is pruned (as OWL's Wanda does; their SparseGPT and magnitude stop with an IndexError). "
            "Their README uses 0.08.",
            lam, lam, 1 - sparsity, [i for i, _ in over], [round(s, 3) for _, s in over])
    return out


def owl_sparsities(pruner: BlockPruner, samples: torch.Tensor, sparsity: float, m: float, lam: float) -> list[float]:
    from pruneflow.methods.wanda import Wanda

    wanda = Wanda(OmegaConf.create({"name": "wanda", "pattern": None}), sparsity)
    ratios: list[float] = []

    def visit(_i: int, pruners: dict[str, LayerPruner]) -> None:
        ratios.append(outlier_ratio([p.metric() for p in pruners.values()], m))

    pruner.dense_pass(samples, wanda, visit)
    return allocate(ratios, sparsity, lam)
