"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"),
one shot.

Score of ``W[i, j]``: ``(|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** a``:
the weight relative to its input column and to its output row, times the input
channel's norm to the power ``a`` (0.5). As the authors' ``prune_ria``
(biomedical-cybernetics/Relative-importance-and-activation-pruning @ 7bc55b0,
lib/prune.py):

- unstructured: one threshold per layer, everything at or below the value at index
  ``int(n * sparsity)`` of the sorted scores removed (``method.per_outneuron=true``:
  the lowest ``int(in_features * sparsity)`` of each row, their ``--per_outneuron``);
- N:M: the lowest M-N of every M consecutive inputs of a row; with
  ``method.reallocation=true`` (their ``--reallocation``, importance "sum") the input
  channels are first permuted so that strong and weak channels share groups: channels
  sorted by their summed score, cut into M equal parts, part k's channels dealt to
  position k of every group (every other part in reverse order). The mask is chosen
  in that order and mapped back, so the weights stay in place.

The relative importance is computed in the weight's dtype, float16 for their LLaMA
runs (``method.score_dtype=weight``; ``float32`` computes it in float32), and multiplied
by the float32 activation term. No weight update (their ``--reconstruction`` and
``--lsa`` refinements are not offered).
"""

from __future__ import annotations

import torch

from pruneflow.errors import check_bool, invalid
from pruneflow.methods.oneshot import (
    ActivationNormPruner,
    OneShotMethod,
    prune_nm,
    prune_unstructured,
    read_per_outneuron,
)


def reallocation_order(metric: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation: the column order in which N:M groups are cut."""
    cols = metric.shape[1]
    ranked = torch.sort(metric.sum(dim=0))[1]
    index = torch.zeros_like(ranked)
    for k in range(1, m + 1):
        part = ranked[int(cols * (k - 1) / m):int(cols * k / m)]
        index[k - 1::m] = part if k % 2 == 1 else part.flip(0)
    return index


SCORE_DTYPES = ("weight", "float32")


class RIAPruner(ActivationNormPruner):
    def metric(self) -> torch.Tensor:
        A = self.layer.weight.data.abs()
        if self.method.score_dtype == "float32":
            A = A.float()
        # score_dtype=weight: the relative importance in the weight's dtype (float16 for
        # their LLaMA runs), then times the float32 activation term, as their prune_ria
        relative = A / A.sum(dim=0, keepdim=True) + A / A.sum(dim=1, keepdim=True)
        return relative * self.norms.sq.sqrt().reshape(1, -1) ** self.method.a

    def pruned_mask(self, metric: torch.Tensor, sparsity: float) -> torch.Tensor:
        method: RIA = self.method  # type: ignore[assignment]
        if method.pattern is not None:
            if not method.reallocation:
                return prune_nm(metric, *method.pattern)
            index = reallocation_order(metric, method.pattern[1])
            mask = torch.zeros_like(metric, dtype=torch.bool)
            mask[:, index] = prune_nm(metric[:, index], *method.pattern)
            return mask
        return prune_unstructured(metric, sparsity, method.per_outneuron)


class RIA(OneShotMethod):
    name = "ria"
    pruner_class = RIAPruner

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.a = cfg.get("a", 0.5)
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or self.a < 0:
            raise invalid("method.a", self.a, "a number >= 0 (the power of the activation norm; the authors use 0.5)")
        self.per_outneuron = read_per_outneuron(cfg, False, self.pattern)
        self.reallocation = check_bool(cfg.get("reallocation", False), "method.reallocation")
        if self.reallocation and self.pattern is None:
            raise invalid("method.reallocation", True, "false for unstructured sparsity", "Channel reallocation arranges N:M groups (method.pattern).")
        self.score_dtype = cfg.get("score_dtype", "weight")
        if self.score_dtype not in SCORE_DTYPES:
            raise invalid("method.score_dtype", self.score_dtype, SCORE_DTYPES,
                          "weight: the relative importance in the weight's dtype, as the authors' code; float32: in float32.")

    def summary(self) -> dict:
        return {**super().summary(), "a": self.a, "per_outneuron": self.per_outneuron, "reallocation": self.reallocation,
                "score_dtype": self.score_dtype}
