"""SQuAD v1.1 / v2.0 metrics as a local ``evaluate`` module (loaded by path, offline).

The official evaluation scripts' definitions (``evaluate-v1.1.py`` and
``evaluate-v2.0.py``): answers are normalised (lowercase, punctuation removed,
articles a/an/the removed, whitespace collapsed); exact match and token F1 take
the maximum over the gold answers. v2.0 drops gold answers that normalise to
nothing, treats a question without gold answers as having the single gold
answer "" and reports the has-answer / no-answer subsets separately. Values are
fractions in [0, 1] (the official scripts print them x100).

Inputs: ``predictions`` the answer texts ("" = no answer), ``references`` the
list of gold texts per question ([] or [""] = unanswerable).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = "SQuAD exact match and F1 (official normalisation); config 'v1' or 'v2' (adds has_ans_* / no_ans_*)."
_KWARGS = """
predictions: list of predicted answer texts ("" for no answer).
references: list of lists of gold answer texts ([""] or [] for an unanswerable question).
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, v2: bool = True) -> float:
    """Token F1 after normalisation. v2: an empty side scores 1 only if both are empty
    (v1.1 scores any empty side 0)."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(ground_truth).split()
    if v2 and (not pred_toks or not gold_toks):
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(references: Sequence[str], v2: bool) -> list[str]:
    if not v2:
        return list(references)
    golds = [a for a in references if normalize_answer(a)]
    return golds or [""]


def has_answer(references: Sequence[str]) -> bool:
    return any(a != "" for a in references)


def score_one(prediction: str, references: Sequence[str], v2: bool) -> tuple[float, float]:
    """(exact match, F1) of one prediction, max over its gold answers."""
    golds = gold_answers(references, v2)
    if not golds:  # v1.1 always has a gold answer; be safe for empty lists
        golds = [""]
    em = max(exact_match_score(prediction, g) for g in golds)
    f1 = max(f1_score(prediction, g, v2=v2) for g in golds)
    return em, f1


def compute_squad(predictions: Sequence[str], references: Sequence[Sequence[str]], version: str = "v1") -> dict[str, float]:
    v2 = version == "v2"
    scores = [score_one(p, r, v2) for p, r in zip(predictions, references, strict=True)]
    n = len(scores)
    out = {
        "exact_match": sum(s[0] for s in scores) / n if n else 0.0,
        "f1": sum(s[1] for s in scores) / n if n else 0.0,
    }
    if v2:  # the official script reports a subset only when it is non-empty
        for name, want in (("has_ans", True), ("no_ans", False)):
            sub = [s for s, r in zip(scores, references, strict=True) if has_answer(r) == want]
            if sub:
                out[f"{name}_exact"] = sum(s[0] for s in sub) / len(sub)
                out[f"{name}_f1"] = sum(s[1] for s in sub) / len(sub)
    return out


class Squad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in ("v1", "v2"):
            raise KeyError(f"Unknown SQuAD version {self.config_name!r}; expected 'v1' or 'v2'")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al. 2016 (SQuAD) and 2018 (Know What You Don't Know: SQuAD 2.0)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        return compute_squad(predictions, references, self.config_name)
