"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): prune by weights and activations, one shot.

Score of weight ``W[i, j]``: ``|W[i, j]| * ||X_j||_2``, the input channel's L2 norm over
the calibration tokens. Unstructured: the lowest ``int(in_features * sparsity)`` of each
output row are removed (the comparison group the paper found best); N:M: the lowest
M-N of every M consecutive inputs of a row. No weight update. As the authors'
``prune_wanda`` (locuslab/wanda, lib/prune.py, lib/layerwrapper.py).
``method.per_outneuron=false``: one threshold per layer (``<=`` the sorted value at
``int(n * sparsity)``), how RIA's code runs Wanda (``prune_ria`` without
``--per_outneuron``), for the Wanda cells of RIA's tables.
"""

from __future__ import annotations

import torch

from pruneflow.methods.oneshot import (
    ActivationNormPruner,
    OneShotMethod,
    prune_unstructured,
    read_per_outneuron,
)


class WandaPruner(ActivationNormPruner):
    def metric(self) -> torch.Tensor:
        return self.layer.weight.data.abs().float() * self.norms.sq.sqrt().reshape(1, -1)

    def pruned_mask(self, metric: torch.Tensor, sparsity: float) -> torch.Tensor:
        if self.method.pattern is not None:
            return super().pruned_mask(metric, sparsity)
        return prune_unstructured(metric, sparsity, self.method.per_outneuron)


class Wanda(OneShotMethod):
    name = "wanda"
    pruner_class = WandaPruner

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.per_outneuron = read_per_outneuron(cfg, True, self.pattern)

    def summary(self) -> dict:
        return {**super().summary(), "per_outneuron": self.per_outneuron}
