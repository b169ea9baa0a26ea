"""GLUE metrics as a local ``evaluate`` module (loaded by path, works offline).

The definitions of the official GLUE evaluation (and of the Hub's ``glue``
metric): CoLA Matthews correlation; STS-B Pearson and Spearman correlation;
MRPC and QQP accuracy and binary F1 (positive class 1); all others accuracy.
Values are fractions (correlations in [-1, 1]). scikit-learn and scipy do the
statistics. This file imports nothing from pruneflow so that ``evaluate`` can
copy and import it on its own; ``pruneflow.metrics.glue_metrics`` calls the
same functions directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

SUBTASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "ax")

_DESCRIPTION = "GLUE metrics: matthews_correlation (cola), pearson/spearmanr (stsb), accuracy/f1 (mrpc, qqp), accuracy (others)."
_KWARGS = """
predictions: predicted labels (int), or scores (float) for stsb.
references: gold labels (int), or scores (float) for stsb.
Returns a dict of fractions, e.g. {"accuracy": 0.9, "f1": 0.88} for mrpc.
"""


def accuracy(predictions: Sequence, references: Sequence) -> float:
    n = len(references)
    return float(sum(int(p) == int(r) for p, r in zip(predictions, references, strict=True)) / n) if n else 0.0


def compute_glue(subtask: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The official metric(s) of one GLUE subtask."""
    if subtask == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if subtask == "stsb":
        return {"pearson": float(pearsonr(predictions, references)[0]), "spearmanr": float(spearmanr(predictions, references)[0])}
    if subtask in ("mrpc", "qqp"):
        return {"accuracy": accuracy(predictions, references), "f1": float(f1_score(references, predictions))}
    if subtask in SUBTASKS:
        return {"accuracy": accuracy(predictions, references)}
    raise KeyError(f"Unknown GLUE subtask {subtask!r}; expected one of {SUBTASKS}")


class Glue(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in SUBTASKS:
            raise KeyError(f"Unknown GLUE subtask {self.config_name!r}; expected one of {SUBTASKS}")
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Wang et al. 2019, GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
        )

    def _compute(self, predictions: Sequence, references: Sequence) -> dict[str, float]:
        return compute_glue(self.config_name, predictions, references)
