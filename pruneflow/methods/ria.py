"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"),
one shot.

Score of ``W[i, j]``: ``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a``,
the weight relative to its output row and to its input column, times the input channel's
norm to the power ``a`` (0.5). Unstructured: the lowest ``int(in_features * sparsity)`` of
each output row are removed; N:M: the lowest M-N of every M inputs of a row. No weight
update. As the authors' ``prune_ria`` (biomedical-cybernetics/Relative-importance-and-
activation-pruning).
"""

from __future__ import annotations

import torch

from pruneflow.errors import invalid
from pruneflow.methods.oneshot import InputNorms, LayerPruner, OneShotMethod


class RIAPruner(LayerPruner):
    def __init__(self, layer: torch.nn.Linear, method: OneShotMethod) -> None:
        super().__init__(layer, method)
        self.norms = InputNorms(layer.in_features, layer.weight.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.norms.add(inp)

    def metric(self) -> torch.Tensor:
        A = self.layer.weight.data.abs().float()
        relative = A / A.sum(dim=0, keepdim=True) + A / A.sum(dim=1, keepdim=True)
        return relative * self.norms.sq.sqrt().reshape(1, -1) ** self.method.a

    def free(self) -> None:
        del self.norms


class RIA(OneShotMethod):
    name = "ria"
    pruner_class = RIAPruner

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.a = cfg.get("a", 0.5)
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or self.a < 0:
            raise invalid("method.a", self.a, "a number >= 0 (the power of the activation norm; the authors use 0.5)")

    def summary(self) -> dict:
        return {**super().summary(), "a": self.a}
