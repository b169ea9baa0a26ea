"""GLUE and SQuAD metrics against values computed by hand, through the local evaluate modules."""

from __future__ import annotations

import math

import pytest

from pruneflow.metrics import compute, compute_glue, compute_squad, load_metric, normalize_answer
from pruneflow.metrics.squad import f1_score


def test_matthews_correlation_by_hand() -> None:
    refs = [1, 1, 1, 0, 0, 0]
    preds = [1, 1, 0, 0, 0, 1]  # TP 2, TN 2, FP 1, FN 1
    expected = (2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3)  # (TP*TN - FP*FN) / sqrt(...)
    assert compute("glue", "cola", preds, refs)["matthews_correlation"] == pytest.approx(expected)
    assert expected == pytest.approx(1 / 3)


def test_accuracy_and_f1_by_hand() -> None:
    refs = [1, 0, 1, 1, 0, 1]
    preds = [1, 1, 1, 0, 0, 1]  # TP 3, FP 1, FN 1, TN 1
    for subtask in ("mrpc", "qqp"):
        m = compute("glue", subtask, preds, refs)
        assert m == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})
    assert compute("glue", "rte", preds, refs) == pytest.approx({"accuracy": 4 / 6})
    assert compute("glue", "mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx({"accuracy": 0.75})


def test_pearson_spearman_by_hand() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 4.0, 5.0, 9.0]
    # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): sum of products 11, squares 5 and 26
    m = compute("glue", "stsb", x, y)
    assert m["pearson"] == pytest.approx(11 / math.sqrt(5 * 26))
    assert m["spearmanr"] == pytest.approx(1.0)  # same ranks
    # Spearman is Pearson of the ranks: ranks (1,2,3,4) vs (2,1,3,4) -> 0.8
    assert compute("glue", "stsb", [1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 6.0, 7.0])["spearmanr"] == pytest.approx(0.8)


def test_evaluate_module_equals_plain_functions() -> None:
    """The module loaded by path (offline) computes the same as the plain functions."""
    metric = load_metric("glue", "mrpc")
    assert type(metric).__name__ == "Glue"
    preds, refs = [1, 0, 0, 1, 1], [1, 0, 1, 1, 0]
    assert metric.compute(predictions=preds, references=refs) == compute_glue("mrpc", preds, refs)
    squad = load_metric("squad", "v2")
    assert squad.compute(predictions=["a cat", ""], references=[["cat"], [""]]) == compute_squad(["a cat", ""], [["cat"], [""]], "v2")


def test_squad_normalisation() -> None:
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("  An apple, a pear and THE end. ") == "apple pear and end"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("a an the") == ""
    # punctuation goes before articles, as the official script's order: "a-b" is one word "ab"
    assert normalize_answer("a-b") == "ab" and normalize_answer("the-end") == "theend"
    m = compute("squad", "v1", ["The  Cat!"], [["cat"]])
    assert m == {"exact_match": 1.0, "f1": 1.0}


def test_squad_f1_and_max_over_golds() -> None:
    # prediction tokens [big, black, cat]; gold [black, cat, sat]: 2 common -> P = R = 2/3
    assert f1_score("the big black cat", "black cat sat") == pytest.approx(2 / 3)
    m = compute("squad", "v1", ["the big black cat", "Paris"], [["black cat sat", "dog"], ["London", "paris."]])
    assert m["exact_match"] == pytest.approx(0.5)  # second one matches its second gold answer
    assert m["f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_squad_v2_no_answer_subsets() -> None:
    preds = ["cat", "", "", "dog house"]
    refs = [["the cat"], [""], ["mouse"], ["dog"]]
    m = compute("squad", "v2", preds, refs)
    # has-answer: 1 EM (cat) + 0 + 0 = 1/3 EM; F1 1 + 0 + 2/3 (dog house vs dog: P .5 R 1)
    assert m["has_ans_exact"] == pytest.approx(1 / 3)
    assert m["has_ans_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert m["no_ans_exact"] == 1.0 and m["no_ans_f1"] == 1.0
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)


def test_squad_v1_and_v2_empty_answer_conventions() -> None:
    # v1.1 scores an empty side 0; v2.0 scores "" vs "" as a match
    assert f1_score("", "", v2=False) == 0.0
    assert f1_score("", "", v2=True) == 1.0
    # v2 drops gold answers that normalise to nothing: gold ["the"] becomes [""]
    assert compute_squad([""], [["the"]], "v2")["exact_match"] == 1.0
    # ... but the question still counts as answerable (the official has_ans is bool(answers))
    m = compute_squad([""], [["the"]], "v2")
    assert m["has_ans_exact"] == 1.0 and "no_ans_exact" not in m
    # an empty-normalising gold beside a real one is dropped, so "" no longer matches
    assert compute_squad([""], [["the", "cat"]], "v2")["exact_match"] == 0.0
