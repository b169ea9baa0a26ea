"""The task interface: data, loss and metrics for one dataset.

A task loads its raw data (``load``), turns it into model inputs once the model
(and its tokenizer) is known (``prepare``), computes the training loss of a
batch, and evaluates a split into metrics and per-example predictions
(DESIGN.md §5: ``predictions.jsonl``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, default_collate

from pruneflow.utils import progress

log = logging.getLogger("pruneflow")

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle


class Task:
    name: ClassVar[str] = "base"
    modality: ClassVar[str] = "image"  # "image" | "text"
    problem: str = "single_label_classification"  # | "regression" | "question_answering"
    main_metric: str = "accuracy"
    num_labels: int = 0
    image_channels: int = 3
    #: the evaluation split that `metrics` and predictions.jsonl report; others are extra
    main_split: str = "validation"
    eval_splits: tuple[str, ...] = ("validation",)
    #: metrics undefined by the data's make-up, said once when it is loaded, not at every evaluation
    undefined_by_design: frozenset[str] = frozenset()
    #: trainer.eval_precision: the dtype evaluation forwards autocast to (None: as the model is)
    eval_autocast: torch.dtype | None = None
    #: the fewest evaluation examples the task's metrics are defined on
    min_eval_examples: int = 1

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = seed
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}

    # --- data --------------------------------------------------------------------
    def check_path(self) -> None:
        """Check ``task.path``'s layout without reading the data (UserError if wrong): run
        before any work, for every job of a sweep before the first starts."""

    def load(self) -> None:
        """Read the raw data (hub or ``task.path``); raise UserError for bad paths/columns."""
        raise NotImplementedError

    def prepare(self, bundle: ModelBundle) -> None:
        """Build ``train_set`` and ``eval_sets`` as model inputs."""
        raise NotImplementedError

    def check_eval_sizes(self) -> None:
        """After ``prepare``: every evaluation split holds enough examples for the metrics. An
        empty split (a local file without rows) or too few (Pearson needs two) would otherwise
        fail at the first evaluation, after the finetune stage has run."""
        from pruneflow.errors import UserError

        for split, ds in self.eval_sets.items():
            if len(ds) >= self.min_eval_examples:
                continue
            cut, path = self.cfg.get("max_eval_samples"), self.cfg.get("path")
            if cut is not None and cut < self.min_eval_examples:
                what = "Raise task.max_eval_samples."
            else:
                what = f"Check the data under task.path={path}." if path else "Check the data."
            raise UserError(
                f"task={self.name}: the '{split}' evaluation split has {len(ds)} example(s)"
                + (f" with task.max_eval_samples={cut}" if cut is not None else "")
                + f"; its metrics ({self.main_metric} and the others) need at least {self.min_eval_examples}. {what}"
            )

    def tokenizer_corpus(self) -> Iterator[str]:
        """Training text for a locally trained tokenizer (text tasks)."""
        raise NotImplementedError

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return default_collate(examples)

    def data_summary(self) -> dict[str, int]:
        out = {"train": len(self.train_set) if self.train_set is not None else 0}
        out.update({k: len(v) for k, v in self.eval_sets.items()})
        return out

    # --- training --------------------------------------------------------------
    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch (on the run's device) as the model sees it: image tasks may mix it."""
        return batch

    def loss(self, bundle: ModelBundle, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_and_logits(bundle, batch)[0]

    def loss_and_logits(self, bundle: ModelBundle, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The training loss of a batch and the model's output logits (for distillation:
        one tensor, or the start and end logits of question answering)."""
        if bundle.family == "hf":
            out = bundle.model(**{k: v for k, v in batch.items() if k != "example_index"})
            logits = [out.start_logits, out.end_logits] if self.problem == "question_answering" else [out.logits]
            return out.loss, logits
        logits = bundle.forward(batch)
        if self.problem == "regression":
            return torch.nn.functional.mse_loss(logits.squeeze(-1), batch["labels"].float()), [logits]
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), [logits]

    def logits(self, bundle: ModelBundle, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Output logits without labels (a distillation teacher's)."""
        out = bundle.forward(batch)
        if isinstance(out, torch.Tensor):
            return [out]
        return [out.start_logits, out.end_logits] if self.problem == "question_answering" else [out.logits]

    # --- evaluation --------------------------------------------------------------
    def eval_context(self, device: torch.device) -> torch.autocast:
        """Evaluation forwards under trainer.eval_precision's autocast (a no-op at 32)."""
        return torch.autocast(device.type, dtype=self.eval_autocast, enabled=self.eval_autocast is not None)

    @torch.no_grad()
    def predict(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> list[torch.Tensor]:
        """Model outputs (logits) for every example of a split, in order."""
        from torch.utils.data import DataLoader

        bundle.model.eval()
        loader = DataLoader(self.eval_sets[split], batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        outs = []
        for batch in progress(loader, desc=f"{desc} [{split}]", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.eval_context(device):
                out = bundle.forward(batch)
            outs.append(out if isinstance(out, torch.Tensor) else out.logits)
        return [o.float().cpu() for o in outs]

    def split_suffix(self, split: str) -> str:
        """Suffix for metric keys of a secondary evaluation split (MNLI: ``_mm``)."""
        return ""

    def evaluate_all(self, bundle: ModelBundle, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """Metrics over every evaluation split (secondary splits' keys suffixed)."""
        metrics: dict[str, float] = {}
        predictions: dict[str, list[dict[str, Any]]] = {}
        for split in self.eval_splits:
            m, predictions[split] = self.evaluate(bundle, split, batch_size, device, desc)
            suffix = "" if split == self.main_split else self.split_suffix(split)
            metrics.update({k + suffix: v for k, v in m.items()})
        undefined = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v) and k not in self.undefined_by_design)
        if undefined:
            log.warning("%s: %s undefined (NaN; null in result.json), e.g. a correlation of a constant prediction.",
                        desc, ", ".join(undefined))
        return metrics, predictions

    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics for a split and one prediction record per example."""
        raise NotImplementedError

