"""Wanda (Sun, Liu, Bair, Kolter, ICLR 2024): prune by weights and activations, one shot.

Score of weight ``W[i, j]``: ``|W[i, j]| * ||X_j||_2``, the input channel's L2 norm over
the calibration tokens. Unstructured: the lowest ``int(in_features * sparsity)`` of each
output row are removed (the comparison group the paper found best); N:M: the lowest
M-N of every M consecutive inputs of a row. No weight update. As the authors'
``prune_wanda`` (locuslab/wanda, lib/prune.py, lib/layerwrapper.py).
"""

from __future__ import annotations

import torch

from pruneflow.methods.oneshot import ActivationNormPruner, OneShotMethod


class WandaPruner(ActivationNormPruner):
    def metric(self) -> torch.Tensor:
        return self.layer.weight.data.abs().float() * self.norms.sq.sqrt().reshape(1, -1)


class Wanda(OneShotMethod):
    name = "wanda"
    pruner_class = WandaPruner
