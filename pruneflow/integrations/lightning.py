"""A pruneflow method inside a Lightning ``Trainer`` (``pip install lightning``)::

    from pruneflow.integrations.lightning import PruningCallback
    trainer = lightning.Trainer(max_steps=1000, callbacks=[PruningCallback("seven", sparsity=0.7, start=200, steps=500)])

The same window and settings as the ``transformers`` callback (:class:`pruneflow.integrations.WindowCallback`).
"""

from __future__ import annotations

from pruneflow.errors import UserError
from pruneflow.integrations import WindowCallback

try:
    import lightning as L
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise UserError("pruneflow.integrations.lightning needs Lightning: pip install lightning (or pruneflow[lightning]).") from e


class PruningCallback(WindowCallback, L.Callback):
    """Run a pruneflow method inside a Lightning ``Trainer`` (settings: :class:`WindowCallback`)."""

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.window.plan(int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.window.maybe_attach(int(trainer.global_step), pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        # the optimizer has stepped (global_step counts it); Lightning zeroes gradients before
        # the next backward, so this step's gradients are still there
        self.window.after_step(int(trainer.global_step) - 1)
        sparsity = self.window.sparsity_now()
        if sparsity is not None:
            pl_module.log("pruning/sparsity", sparsity, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.remove_masks()
