"""SEVEN as pre-pruning (the setting compared against SNIP, GraSP and FORCE).

The prune stage scores the model on training batches *without weight updates*:
each step is a forward and backward pass, the sentinel score of ``seven``
accumulates, and the mask follows the schedule (iterative pruning, so later
gradients are those of the already-pruned model). The model is then the
(pre)trained one with the mask applied; ``metrics.prune`` in result.json is that
model, before any recovery. The recover stage fine-tunes with the mask frozen.

The finetune stage runs as configured: with ``stages.finetune.epochs=0`` the
model pruned is the pretrained one, the paper's setting; on the offline default
(a ViT trained from scratch) the finetune stage gives it something to score.
"""

from __future__ import annotations

from pruneflow.methods.seven import Seven


class SevenPre(Seven):
    name = "seven_pre"
    # The trainer runs forward/backward and the hooks in the prune stage, no optimizer step.
    updates_weights = False
