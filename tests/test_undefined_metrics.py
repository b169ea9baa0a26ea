"""Undefined metrics and too-small evaluation sets: strict JSON, a warning, a refusal
before training instead of a traceback after it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from task_data import glue_rows, write_dataset

from pruneflow.utils import atomic_write_json, json_safe

from conftest import SMALL, run_cli


def strict_loads(text: str) -> object:
    """json.loads that refuses Python's NaN/Infinity tokens, as other JSON readers do."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    import numpy as np
    import torch

    obj = {"pearson": float("nan"), "ppl": float("inf"), "acc": 0.5, "np": np.float32("nan"), "t": torch.tensor([1.0, float("-inf")]),
           "nested": [{"x": float("nan")}, (1, 2.5)]}
    atomic_write_json(tmp_path / "r.json", obj)
    assert strict_loads((tmp_path / "r.json").read_text()) == {
        "pearson": None, "ppl": None, "acc": 0.5, "np": None, "t": [1.0, None], "nested": [{"x": None}, [1, 2.5]]}
    assert json_safe(3) == 3 and json_safe(True) is True and json_safe("nan") == "nan"


def constant_stsb(folder: Path, n_eval: int = 12) -> Path:
    """STS-B rows whose evaluation scores are all 3.0: Pearson and Spearman are undefined."""
    evals = [{**r, "label": 3.0} for r in glue_rows("stsb", n_eval, seed=1)]
    return write_dataset(folder, {"train": glue_rows("stsb", 96, seed=0), "validation": evals}, "csv")


TINY = [*(o for o in SMALL if not o.startswith("task.max_")), "trainer.checkpoint_every=0", "method=magnitude", "sparsity=0.5"]


def test_an_undefined_correlation_is_null_in_result_json_and_warned(tmp_path: Path) -> None:
    data = constant_stsb(tmp_path / "stsb")
    run_dir = tmp_path / "run"
    p = run_cli(["model=bert_tiny", "task=glue/stsb", f"task.path={data}", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    result = strict_loads((run_dir / "result.json").read_text())  # before: a bare NaN token
    for stage in ("finetune", "prune", "recover", "final"):
        assert result["metrics"][stage]["pearson"] is None and result["metrics"][stage]["spearmanr"] is None
    assert "pearson, spearmanr undefined (NaN; null in result.json)" in p.stderr + p.stdout
    preds = [strict_loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(r["reference"] == 3.0 and math.isfinite(r["prediction"]) for r in preds)


def test_too_small_evaluation_split_is_refused_before_training(tmp_path: Path) -> None:
    """Before: scipy's "x and y must have length at least 2" traceback at the first
    evaluation, after the finetune stage had run."""
    data = constant_stsb(tmp_path / "d")
    run_dir = tmp_path / "run"
    p = run_cli(["model=bert_tiny", "task=glue/stsb", f"task.path={data}", *TINY, "task.max_eval_samples=1",
                 f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    err = " ".join(p.stderr.split())  # the message is wrapped to the terminal
    assert ("task=glue/stsb: the 'validation' evaluation split has 1 example(s) with task.max_eval_samples=1; its metrics "
            "(pearson and the others) need at least 2. Raise task.max_eval_samples.") in err
    assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "result.json").exists()


def test_an_empty_evaluation_split_is_named() -> None:
    from omegaconf import OmegaConf

    from pruneflow.errors import UserError
    from pruneflow.tasks.base import Task

    task = Task(OmegaConf.create({"path": "/data/cola", "max_eval_samples": None}))
    task.eval_sets = {"validation": []}
    with pytest.raises(UserError, match=r"the 'validation' evaluation split has 0 example\(s\); .* need at least 1\. "
                                        r"Check the data under task.path=/data/cola\."):
        task.check_eval_sizes()
    task.eval_sets = {"validation": [0]}
    task.check_eval_sizes()


def test_a_save_to_disk_folder_datasets_cannot_read_is_one_paragraph(tmp_path: Path) -> None:
    """datasets cannot read back a saved split without rows (IndexError inside
    load_from_disk); before, that was a traceback."""
    import datasets

    data = tmp_path / "d"
    rows = glue_rows("cola", 96)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows).select([])}).save_to_disk(str(data))
    p = run_cli(["model=bert_tiny", "task=glue/cola", f"task.path={data}", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    err = " ".join(p.stderr.split())
    assert "Invalid value for 'task.path'" in err and "could not read the save_to_disk folder" in err and "Traceback" not in err
