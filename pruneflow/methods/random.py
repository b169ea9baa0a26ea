"""Random pruning: the floor every method should beat.

Each weight gets one random score when pruning starts, so the masks along the
schedule are nested (a weight pruned at 30 % stays pruned at 50 %).
"""

from __future__ import annotations

import torch

from pruneflow.methods.score_based import ScoreBasedMethod


class Random(ScoreBasedMethod):
    name = "random"
    scores_without_updates = True
    pruned_weights_unread = True  # the scores never read the weights

    def init_state(self) -> None:
        self.state["scores"].uniform_()  # the global RNG, seeded per stage by the runner

    def selection_scores(self) -> torch.Tensor:
        # The scores never change and top-k breaks ties by position, so each mask is
        # a subset of the previous one without writing -inf into the pruned entries.
        return self.state["scores"]
