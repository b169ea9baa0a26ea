"""No pruning: the dense reference (the prune stage is skipped)."""

from __future__ import annotations

from omegaconf import DictConfig

from pruneflow.errors import UserError
from pruneflow.methods.base import PruningMethod


class Dense(PruningMethod):
    name = "dense"
    prunes = False

    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float:
        if requested not in (None, 0, 0.0):
            raise UserError(
                f"Invalid value for 'sparsity': {requested!r}. method=dense does not prune; "
                "leave sparsity unset (or 0), or choose a pruning method, e.g. method=magnitude."
            )
        return 0.0

    def unused_settings(self, cfg: DictConfig) -> list[tuple[str, str]]:
        why = "method=dense does not prune (no prune stage, no schedule)"
        return [("stages.prune", why), ("schedule", why), ("sparsity", why)]
