"""A pruneflow method inside a Lightning ``Trainer`` (``pip install lightning``)::

    from pruneflow.integrations.lightning import PruningCallback
    trainer = lightning.Trainer(max_steps=1000, callbacks=[PruningCallback("seven", sparsity=0.7, start=200, steps=500)])

The same window and settings as the ``transformers`` callback (:class:`pruneflow.integrations.WindowCallback`).
A checkpoint saved inside or after the window resumes there (``trainer.fit(..., ckpt_path=...)``):
the method's state travels in the checkpoint's callback state.
"""

from __future__ import annotations

from typing import Any

from pruneflow.errors import UserError
from pruneflow.integrations import WindowCallback
from pruneflow.masking import strip_parametrization_names

try:
    import lightning as L
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise UserError("pruneflow.integrations.lightning needs Lightning: pip install lightning (or pruneflow[lightning]).") from e


class PruningCallback(WindowCallback, L.Callback):
    """Run a pruneflow method inside a Lightning ``Trainer`` (settings: :class:`WindowCallback`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.strict_loading: bool | None = None  # the module's own setting while a checkpoint loads
        self.pending: tuple[dict[str, Any], dict[str, Any]] | None = None  # a resume waiting for the window's plan

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001
        # Lightning loads the weights before any callback sees the checkpoint, strictly by default,
        # and the masked layers are saved under parametrization names a new model lacks: load
        # loosely, then check the keys here as strict loading would (on_load_checkpoint). Whether
        # a checkpoint comes is not known yet; the setting is put back by on_train_start at the latest.
        if stage == "fit":
            self.strict_loading, pl_module.strict_loading = pl_module.strict_loading, False

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.strict_loading is not None:  # no checkpoint was loaded
            pl_module.strict_loading, self.strict_loading = self.strict_loading, None

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.window.plan(int(trainer.estimated_stepping_batches))
        self.resume_pending(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:  # noqa: ANN001
        if self.pruner is not None and self.pruner.model is not None:
            checkpoint.setdefault("callbacks", {})[self.state_key] = self.window.state_dict(int(trainer.global_step))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:  # noqa: ANN001
        strict, self.strict_loading = self.strict_loading, None
        if strict is not None:
            pl_module.strict_loading = strict
        weights = checkpoint.get("state_dict", {})
        masked = {k: v for k, v in weights.items() if ".parametrizations." in k}
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if strict:
            expected, found = set(pl_module.state_dict()), set(strip_parametrization_names(weights))
            if expected != found:
                raise UserError(f"The checkpoint {trainer.ckpt_path} does not fit the model: missing {sorted(expected - found)[:5]}, "
                                f"unexpected {sorted(found - expected)[:5]} (Lightning's strict loading, which pruneflow's "
                                "callback checks itself so that it can restore the masked layers).")
        if not masked and not saved:
            return  # saved before the window: nothing of the method's to restore
        if not saved:
            self.window.refuse_resume(int(checkpoint.get("global_step", 0)), "this checkpoint has none")
        self.pending = (saved, masked)
        if self.pruner is not None:  # strategies that restore after on_fit_start (restore_checkpoint_after_setup)
            self.resume_pending(trainer, pl_module)

    def resume_pending(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.pending is not None:
            saved, masked = self.pending
            self.pending = None
            self.window.resume(int(saved["step"]), pl_module, saved, masked)
            # movement's scores join the optimizer before Lightning loads its state, which has their group
            self.window.add_groups(trainer.optimizers[0])

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
