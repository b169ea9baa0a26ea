"""pruneflow-report on hand-made result.json files: grouping, mean ± std, published numbers."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from pruneflow.report import main, published_value

SOURCE = "Sanh, Wolf & Rush (2020), Table 2"


def write_result(path: Path, method: str, sparsity: float, seed: int, acc: float, top5: float, *, measured: float | None = None,
                 task: str = "digits", experiment: dict | None = None, overrides: list[str] | None = None, metrics: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".hydra").mkdir(exist_ok=True)
    final = metrics or {"accuracy": acc, "top5": top5}
    result = {
        "method": method, "model": "tiny_vit", "task": task, "seed": seed,
        "main_metric": next(iter(final)),
        "sparsity": {"target": sparsity, "measured": sparsity if measured is None else measured, "overall": sparsity * 0.9, "per_layer": {}},
        "params": {"total": 1000, "prunable": 900, "nonzero": int(1000 - 900 * sparsity), "compressed_total": None},
        "metrics": {"finetune": {"accuracy": 0.9}, "final": final},
        "time_s": {"total": 10.0 + seed},
        "config": {"experiment_info": experiment},
        "overrides": overrides or [f"method={method}", f"sparsity={sparsity}", f"seed={seed}"],
    }
    (path / "result.json").write_text(json.dumps(result))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    accs = {("magnitude", 0.5): (0.90, 0.94), ("magnitude", 0.9): (0.70, 0.76), ("random", 0.5): (0.60, 0.64), ("random", 0.9): (0.20, 0.30)}
    for (method, sp), values in accs.items():
        for seed, acc in enumerate(values):
            write_result(root / f"method={method},seed={seed},sparsity={sp}", method, sp, seed, acc, 1.0)
    # a dense reference and a run that fell short of its target
    write_result(root / "method=dense", "dense", 0.0, 0, 0.95, 1.0)
    write_result(root / "method=magnitude,sparsity=0.7", "magnitude", 0.7, 0, 0.8, 1.0, measured=0.6)
    # a failed job and an unfinished one
    failed = root / "method=random,sparsity=1.5"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "error.txt").write_text("Traceback ...\nInvalid value for 'sparsity': 1.5. Allowed: a number in [0, 1).\n")
    unfinished = root / "method=magnitude,seed=2,sparsity=0.5"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "progress.json").write_text(json.dumps({"done": {"finetune": {}}}))
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_rows_mean_std_and_failures(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    by = {(r["method"], r["target_sparsity"]): r for r in rows}
    assert len(rows) == 6  # 2 methods x 2 sparsities, dense, magnitude@0.7
    mag = by[("magnitude", "0.5")]
    assert mag["n_runs"] == "2" and mag["seeds"] == "0 1"
    assert float(mag["accuracy_mean"]) == pytest.approx(0.92)
    assert float(mag["accuracy_std"]) == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert float(mag["main_mean"]) == pytest.approx(0.92)  # raw fractions in the CSV
    assert float(by[("random", "0.9")]["accuracy_std"]) == pytest.approx(statistics.stdev([0.2, 0.3]))
    assert float(mag["params_nonzero_mean"]) == 550
    assert float(mag["time_s_mean"]) == pytest.approx(10.5)
    assert by[("dense", "0.0")]["accuracy_std"] == ""  # one seed: no std

    md = (out / "report.md").read_text()
    assert "| magnitude | tiny_vit | 50 | 2 (0,1) | 92.0 ± 2.8 | 100.0 ± 0.0 | 50.00 ± 0.00 |" in md
    assert "60.00 !" in md  # measured 60 % for a 70 % target is flagged
    assert "method=random,sparsity=1.5" in md and "Invalid value for 'sparsity': 1.5" in md
    assert "method=magnitude,seed=2,sparsity=0.5" in md and "stages done: finetune" in md
    assert (out / "plot_digits_accuracy.png").stat().st_size > 10_000
    assert "![digits: accuracy vs sparsity](plot_digits_accuracy.png)" in md
    assert not (sweep / "report.md").exists()  # --out respected


def test_report_published_numbers_beside_measured(tmp_path: Path) -> None:
    info = {
        "name": "movement/squad_bert_base", "source": SOURCE, "note": "LR restarts per stage.",
        # as result.json stores it: OmegaConf float keys became strings in JSON
        "published": {"squad/v1": {"exact_match": {"0.9": 0.719}, "f1": {"0.9": 0.817}}},
    }
    for seed, (em, f1) in enumerate([(0.70, 0.80), (0.72, 0.82)]):
        write_result(tmp_path / f"seed={seed}", "movement", 0.9, seed, 0, 0, task="squad/v1", experiment=info,
                     overrides=["experiment=movement/squad_bert_base", f"seed={seed}"], metrics={"f1": f1, "exact_match": em})
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| movement/squad_bert_base | movement | bert" not in md  # model is tiny_vit here
    assert "| **f1** | f1 (published) | exact_match | exact_match (published) |" in md
    assert "| 81.0 ± 1.4 | 81.7 [1] | 71.0 ± 1.4 | 71.9 [1] |" in md
    assert f"[1] {SOURCE}" in md and "LR restarts per stage." in md
    row = read_csv(tmp_path / "report.csv")[0]
    assert row["experiment"] == "movement/squad_bert_base"
    assert float(row["f1_published"]) == pytest.approx(0.817) and row["published_source"] == SOURCE
    assert (tmp_path / "plot_squad-v1_f1.png").exists()


def test_overall_scores(tmp_path: Path) -> None:
    info = {"name": "admm/glue_bert_base", "source": "Wang 2024", "published": {"glue/rte": {"accuracy": 0.688}},
            "published_overall": {"glue_score": 0.801}}
    write_result(tmp_path / "rte", "admm", 0.5, 0, 0, 0, task="glue/rte", experiment=info, metrics={"accuracy": 0.70})
    write_result(tmp_path / "cola", "admm", 0.5, 0, 0, 0, task="glue/cola", experiment=info, metrics={"matthews_correlation": 0.50})
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    # measured GLUE score: mean of the two tasks' main metrics = 60.0; published 80.1
    assert "| admm/glue_bert_base | admm | tiny_vit | 50 | GLUE score" in md
    assert "| 60.0 | 80.1 [" in md and "2 of 8 GLUE tasks" in md
    assert "68.8 [" in md  # the RTE published accuracy beside the measured one


def test_published_value_lookup() -> None:
    info = {"published": {"glue/mnli": {"accuracy": {"0.5": 0.835, "0.9": 0.756}}, "imagenet": {"accuracy": 0.802}}}
    assert published_value(info, "glue/mnli", "accuracy", 0.9) == 0.756
    assert published_value(info, "glue/mnli", "accuracy", 0.7) is None
    assert published_value(info, "glue/mnli", "accuracy_mm", 0.9) is None
    assert published_value(info, "imagenet", "accuracy", 0.73) == 0.802  # one setting, any sparsity
    assert published_value(None, "imagenet", "accuracy", 0.73) is None


def test_report_errors_clearly_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = tmp_path / "job"
    failed.mkdir()
    (failed / "error.txt").write_text("boom\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No finished run under" in err and "1 failed job(s)" in err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
