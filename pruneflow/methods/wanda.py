"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): prune by weights and activations, one shot.

Score of weight ``W[i, j]``: ``|W[i, j]| * ||X_j||_2``, the input channel's L2 norm over
the calibration tokens. Unstructured: the lowest ``int(in_features * sparsity)`` of each
output row are removed (the comparison group the paper found best); N:M: the lowest
M-N of every M consecutive inputs of a row. No weight update. As the authors'
``prune_wanda`` (locuslab/wanda, lib/prune.py, lib/layerwrapper.py).
"""

from __future__ import annotations

import torch

from pruneflow.methods.oneshot import InputNorms, LayerPruner, OneShotMethod


class WandaPruner(LayerPruner):
    def __init__(self, layer: torch.nn.Linear, method: OneShotMethod) -> None:
        super().__init__(layer, method)
        self.norms = InputNorms(layer.in_features, layer.weight.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.norms.add(inp)

    def metric(self) -> torch.Tensor:
        return self.layer.weight.data.abs().float() * self.norms.sq.sqrt().reshape(1, -1)

    def free(self) -> None:
        del self.norms


class Wanda(OneShotMethod):
    name = "wanda"
    pruner_class = WandaPruner
