"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017): keep the largest ``|W|``."""

from __future__ import annotations

import torch

from pruneflow.methods.score_based import ScoreBasedMethod


class Magnitude(ScoreBasedMethod):
    name = "magnitude"

    def init_scores(self) -> None:
        self.scores = []  # computed from the weights when needed; nothing to keep

    @torch.no_grad()
    def current_scores(self) -> list[torch.Tensor]:
        return [w.param.abs() for w in self.ctx.weights]
