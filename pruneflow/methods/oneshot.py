"""One-shot layer-wise pruning of causal LMs from a calibration set (Wanda, SparseGPT,
RIA, magnitude): the interface shared by ``wanda.py``, ``sparsegpt.py``, ``ria.py`` and
the one-shot side of ``magnitude.py``.

The LLM pipeline (``pruneflow.llm``) goes block by block: it attaches a
:class:`LayerPruner` to every prunable ``nn.Linear`` of a decoder block, feeds the
block's calibration inputs through it (``add_batch`` sees each Linear's input), then
calls ``prune`` on each, which zeroes weights in place (SparseGPT also updates the kept
ones). A method is a :class:`OneShotMethod`; it only says which pruner a layer gets.

Sparsity: either unstructured (``sparsity`` of each layer's comparison group removed)
or N:M (``method.pattern="N:M"``: N weights kept in every M consecutive inputs of a
row, as 2:4 kernels need).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow.errors import UserError, check_bool, invalid
from pruneflow.methods.base import PruningMethod


def parse_pattern(value: Any) -> tuple[int, int] | None:  # noqa: ANN401
    """``method.pattern``: null (unstructured) or "N:M" with 0 < N < M (N kept of M)."""
    if value is None:
        return None
    text = str(value).strip()
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if 0 < n < m:
            return n, m
    raise invalid("method.pattern", value, 'null (unstructured) or "N:M" with 0 < N < M, N weights kept in every M (e.g. "2:4", "4:8")')


def pattern_sparsity(cfg: DictConfig, requested: float | None, default: float) -> float:
    """The sparsity of a run: ``1 - N/M`` when ``method.pattern`` is N:M (a different
    explicit ``sparsity`` is an error), else ``requested`` or the method's default."""
    pattern = parse_pattern(cfg.get("pattern"))
    if pattern is None:
        return default if requested is None else float(requested)
    implied = 1 - pattern[0] / pattern[1]
    if requested is not None and abs(float(requested) - implied) > 1e-9:
        raise UserError(
            f"'sparsity={requested}' conflicts with method.pattern={cfg.pattern}: N:M keeps {pattern[0]} of every "
            f"{pattern[1]} weights, sparsity {implied:g}. Leave sparsity=null (or set it to {implied:g})."
        )
    return implied


def check_nm_layer(pattern: tuple[int, int] | None, name: str, in_features: int) -> None:
    """N:M groups run along a layer's inputs: M must divide their number."""
    if pattern is not None and in_features % pattern[1]:
        raise invalid("method.pattern", f"{pattern[0]}:{pattern[1]}", f"an M that divides {in_features}",
                      f"The layer {name} has {in_features} inputs, not a multiple of M={pattern[1]}.")


def prune_nm(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the pruned entries: in every M consecutive columns of each row,
    the M-N lowest ``metric`` values by ``torch.topk(largest=False)``, as the authors'
    code (ties: where topk puts them, not always the first columns; one call over all
    groups picks as their call per M columns does, checked on tie-heavy data)."""
    rows, cols = metric.shape
    groups = metric.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def prune_lowest_per_row(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned entries: the ``int(cols * sparsity)`` lowest of each row (stable sort, so
    ties go to the earlier column), Wanda's comparison group."""
    k = int(metric.shape[1] * sparsity)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def prune_lowest_per_layer(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned entries: everything at or below the value at index ``int(n * sparsity)`` of
    the sorted matrix (Wanda's magnitude baseline: one threshold per layer, compared with
    ``<=``, so the entry at that index and ties with it are pruned too)."""
    if sparsity <= 0:
        return torch.zeros_like(metric, dtype=torch.bool)
    k = int(metric.numel() * sparsity)
    thresh = torch.sort(metric.flatten())[0][min(k, metric.numel() - 1)]
    return metric <= thresh


def read_per_outneuron(cfg, default: bool, pattern: tuple[int, int] | None) -> bool:  # noqa: ANN001
    """``method.per_outneuron``: unstructured ranking per output row (True) or one
    threshold per layer (False); N:M groups are within rows already."""
    value = check_bool(cfg.get("per_outneuron", default), "method.per_outneuron")
    if pattern is not None and value != default:
        raise invalid("method.per_outneuron", value, f"{str(default).lower()} (its default) with method.pattern",
                      "It chooses the comparison group of unstructured pruning; N:M groups are within each row.")
    return value


def prune_unstructured(metric: torch.Tensor, sparsity: float, per_outneuron: bool) -> torch.Tensor:
    return prune_lowest_per_row(metric, sparsity) if per_outneuron else prune_lowest_per_layer(metric, sparsity)


class InputNorms:
    """Running mean over calibration samples of each input channel's squared L2 norm
    (Wanda's ``scaler_row``): after S samples, ``sum_s ||X_s[:, j]||^2 / S``."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.sq = torch.zeros(columns, device=device, dtype=torch.float32)
        self.samples = 0

    def add(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sq *= self.samples / (self.samples + batch)
        self.samples += batch
        self.sq += x.pow(2).sum(0) / self.samples


class LayerPruner:
    """Prunes one ``nn.Linear`` from the statistics of its calibration inputs."""

    needs_inputs: ClassVar[bool] = True

    def __init__(self, layer: nn.Linear, method: OneShotMethod) -> None:
        self.layer = layer
        self.method = method

    def add_batch(self, inp: torch.Tensor) -> None:
        """One calibration batch's input to the layer, shape (batch, tokens, in_features)."""

    def metric(self) -> torch.Tensor:
        """The importance of each weight (higher = kept); shape of the weight."""
        raise NotImplementedError

    def pruned_mask(self, metric: torch.Tensor, sparsity: float) -> torch.Tensor:
        pattern = self.method.pattern
        if pattern is not None:
            return prune_nm(metric, *pattern)
        return prune_lowest_per_row(metric, sparsity)

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        W = self.layer.weight.data
        mask = self.pruned_mask(self.metric(), sparsity)
        W[mask] = 0

    def free(self) -> None:
        """Drop the statistics (a 7B block's Hessians are large)."""


class ActivationNormPruner(LayerPruner):
    """A pruner whose score uses the input channels' norms (Wanda, RIA)."""

    def __init__(self, layer: nn.Linear, method: OneShotMethod) -> None:
        super().__init__(layer, method)
        self.norms = InputNorms(layer.in_features, layer.weight.device)

    def add_batch(self, inp: torch.Tensor) -> None:
        self.norms.add(inp)

    def free(self) -> None:
        del self.norms


class OneShotMethod(PruningMethod):
    """A method that prunes a causal LM once, layer by layer, from calibration inputs."""

    one_shot: ClassVar[bool] = True
    default_sparsity: ClassVar[float] = 0.5
    pruner_class: ClassVar[type[LayerPruner]] = LayerPruner

    def __init__(self, cfg: DictConfig, sparsity: float) -> None:
        super().__init__(cfg, sparsity)
        self.pattern = parse_pattern(cfg.get("pattern"))

    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float:
        return pattern_sparsity(cfg, requested, cls.default_sparsity)

    def check_layer(self, name: str, layer: nn.Linear) -> None:
        check_nm_layer(self.pattern, name, layer.in_features)

    def layer_pruner(self, layer: nn.Linear) -> LayerPruner:
        return self.pruner_class(layer, self)

    def summary(self) -> dict[str, Any]:
        return {"pattern": None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"}
