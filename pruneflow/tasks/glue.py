"""GLUE (Wang et al. 2019): the eight tasks of ``nyu-mll/glue``.

Data from the Hub (``nyu-mll/glue``, config = subtask) or from ``task.path`` with
the Hub's split and column names (see ``pruneflow.tasks.hf_data``). Inputs are
tokenised once with the model's tokenizer (``task.max_seq_length``, default
128, longest-first truncation) and padded per batch. STS-B is a regression
(one output, MSE loss); MNLI is evaluated on ``validation_matched`` (the main
split) and ``validation_mismatched`` (metric keys suffixed ``_mm``).

Metrics (``pruneflow/metrics/glue.py``, a local ``evaluate`` module): cola
matthews_correlation; stsb pearson, spearmanr; mrpc, qqp accuracy, f1; the
others accuracy. ``task.metric_average=batch_mean`` is SEVEN's ``train.py``:
accuracy and F1 computed per evaluation batch of a shuffled loader and averaged
over the batches (the last, smaller one counting as much as the others); CoLA's
and STS-B's metrics stay over the whole set, as in their code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from pruneflow.errors import UserError, invalid
from pruneflow.metrics import compute, compute_glue
from pruneflow.tasks.hf_data import (
    check_local_splits,
    first,
    load_splits,
    require_columns,
    sample_limit,
)
from pruneflow.tasks.text import TextTask

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    text: tuple[str, str | None]  # the Hub's input columns
    labels: tuple[str, ...]  # class names (the Hub's ClassLabel order); () = regression
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)


SUBTASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec(("sentence", None), ("unacceptable", "acceptable"), "matthews_correlation"),
    "sst2": GlueSpec(("sentence", None), ("negative", "positive"), "accuracy"),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "accuracy"),
    "stsb": GlueSpec(("sentence1", "sentence2"), (), "pearson"),
    "qqp": GlueSpec(("question1", "question2"), ("not_duplicate", "duplicate"), "accuracy"),
    "mnli": GlueSpec(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy", ("validation_matched", "validation_mismatched")),
    "qnli": GlueSpec(("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueSpec(("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
}


METRIC_AVERAGES = ("corpus", "batch_mean")
CORPUS_IN_SEVEN = ("cola", "stsb")  # SEVEN's train.py evaluates these over the whole set


def batch_mean(subtask: str, predictions: Sequence[Any], references: Sequence[Any], batch_size: int, seed: int) -> dict[str, float]:
    """SEVEN's evaluation: the examples in a shuffled order (a seeded permutation here, their
    DataLoader's ``shuffle=True`` there), cut into batches of ``batch_size``, each batch's
    metrics computed alone, then the plain mean over batches."""
    order = torch.randperm(len(references), generator=torch.Generator().manual_seed(seed)).tolist()
    per_batch = []
    with warnings.catch_warnings():  # F1 of a batch without positives: sklearn warns and gives 0, as theirs
        warnings.simplefilter("ignore")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            per_batch.append(compute_glue(subtask, [predictions[i] for i in chunk], [references[i] for i in chunk]))
    return {k: sum(m[k] for m in per_batch) / len(per_batch) for k in per_batch[0]}


class Glue(TextTask):
    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.subtask = str(cfg.get("subtask") or self.name.split("/")[-1])
        if self.subtask not in SUBTASKS:
            raise invalid("task.subtask", self.subtask, sorted(SUBTASKS))
        self.spec = SUBTASKS[self.subtask]
        self.metric_average = str(cfg.get("metric_average", "corpus"))
        if self.metric_average not in METRIC_AVERAGES:
            raise invalid("task.metric_average", cfg.get("metric_average"), METRIC_AVERAGES,
                          "corpus: every metric over the whole evaluation set (the official definitions); batch_mean: "
                          "SEVEN's code, accuracy and F1 averaged over shuffled evaluation batches of stages.eval_batch_size.")
        self.hub_id = str(cfg.get("hub_id") or HUB_ID)
        self.problem = "regression" if not self.spec.labels else "single_label_classification"
        self.num_labels = len(self.spec.labels) or 1
        self.main_metric = self.spec.main_metric
        self.min_eval_examples = 2 if self.problem == "regression" else 1  # Pearson and Spearman need two points
        self.eval_splits = self.spec.eval_splits
        self.main_split = self.spec.eval_splits[0]
        self.raw: dict[str, Any] = {}
        self.ids: dict[str, list[Any]] = {}
        self.references: dict[str, list[Any]] = {}

    @property
    def columns(self) -> list[str]:
        return [c for c in self.spec.text if c is not None] + ["label"]

    def split_suffix(self, split: str) -> str:
        return "_mm" if split == "validation_mismatched" else f"_{split}"

    # --- data --------------------------------------------------------------------------
    def check_path(self) -> None:
        if self.cfg.get("path"):
            check_local_splits(self.cfg, self.subtask, ("train", *self.eval_splits))

    def load(self) -> None:
        n_train, n_eval = sample_limit(self.cfg, "max_train_samples"), sample_limit(self.cfg, "max_eval_samples")
        splits = load_splits(self.cfg, self.hub_id, self.subtask, ("train", *self.eval_splits))
        for split, ds in splits.items():
            require_columns(ds, self.columns, split, self.cfg, f"{self.hub_id} ({self.subtask})")
            ds = first(ds, n_train if split == "train" else n_eval)
            self.raw[split] = self._check_labels(ds, split)
            self.ids[split] = list(ds["idx"]) if "idx" in ds.column_names else list(range(len(ds)))
            self.references[split] = list(self.raw[split]["label"])

    def _check_labels(self, ds: Any, split: str) -> Any:
        """Integer class labels in range (string class names are mapped), floats for STS-B."""
        labels = ds["label"]
        if self.problem == "regression":
            bad = [v for v in labels if not isinstance(v, (int, float)) or isinstance(v, bool)]
            if bad:
                raise UserError(f"task={self.name}: the 'label' column of the '{split}' split must hold similarity scores (numbers); found {bad[:3]}.")
            return ds
        names = list(self.spec.labels)
        if any(isinstance(v, str) for v in labels):  # e.g. a CSV with "entailment"
            unknown = sorted({v for v in labels if v not in names})
            if unknown:
                raise UserError(f"task={self.name}: unknown label name(s) {unknown[:5]} in the '{split}' split; allowed: {names} or their indices 0..{len(names) - 1}.")
            import datasets

            features = ds.features.copy()
            features["label"] = datasets.Value("int64")
            ds = ds.map(lambda b: {"label": [names.index(v) for v in b["label"]]}, batched=True, features=features)
            labels = ds["label"]
        bad = sorted({v for v in labels if not isinstance(v, int) or not 0 <= v < len(names)})
        if bad:
            why = " (-1 marks the unlabelled test split)" if -1 in bad else ""
            raise UserError(
                f"task={self.name}: the '{split}' split has label(s) {bad[:5]} outside 0..{len(names) - 1} ({names}){why}. "
                "Evaluation needs a labelled split such as the Hub's validation split."
            )
        return ds

    def tokenizer_corpus(self) -> Iterator[str]:
        for col in self.spec.text:
            if col is not None:
                yield from (t for t in self.raw["train"][col] if t)

    def prepare(self, bundle: ModelBundle) -> None:
        self.tokenizer = bundle.tokenizer
        self.check_model(bundle)
        c1, c2 = self.spec.text
        tok, length = self.tokenizer, self.max_seq_length()
        regression = self.problem == "regression"

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = (batch[c1],) if c2 is None else (batch[c1], batch[c2])
            enc = dict(tok(*texts, truncation=True, max_length=length))
            enc["labels"] = [float(v) for v in batch["label"]] if regression else batch["label"]
            return enc

        def tokenised(split: str) -> Any:
            ds = self.raw[split]
            return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenising {split}")

        self.train_set = tokenised("train")
        self.eval_sets = {s: tokenised(s) for s in self.eval_splits}

    def check_head(self, bundle: ModelBundle) -> None:
        model = bundle.model
        n = getattr(model.config, "num_labels", None)
        if not type(model).__name__.endswith("ForSequenceClassification") or n != self.num_labels:
            raise UserError(
                f"Model head does not fit task={self.name}: it needs a sequence-classification head with "
                f"{self.num_labels} output(s) ({self.problem}), but model={bundle.name} is {type(model).__name__} with num_labels={n}."
            )

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        logits = torch.cat(self.predict(bundle, split, batch_size, device, desc))
        if self.problem == "regression":
            preds: list[Any] = [float(v) for v in logits.squeeze(-1).tolist()]
        else:
            preds = [int(v) for v in logits.argmax(-1).tolist()]
        refs = self.references[split]
        if self.metric_average == "batch_mean" and self.subtask not in CORPUS_IN_SEVEN:
            metrics = batch_mean(self.subtask, preds, refs, batch_size, self.seed)
        else:
            metrics = compute("glue", self.subtask, preds, refs)
        records = [{"id": i, "prediction": p, "reference": r} for i, p, r in zip(self.ids[split], preds, refs, strict=True)]
        return metrics, records
