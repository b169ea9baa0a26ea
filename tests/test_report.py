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
                 task: str = "digits", experiment: dict | None = None, overrides: list[str] | None = None, metrics: dict | None = None,
                 model: str = "tiny_vit") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".hydra").mkdir(exist_ok=True)
    final = metrics or {"accuracy": acc, "top5": top5}
    result = {
        "method": method, "model": model, "task": task, "seed": seed,
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
    # each row's own dense model (metrics.finetune, 90 %) beside its pruned one
    assert "| **accuracy** | accuracy (dense) | top5 |" in md
    assert "| magnitude | tiny_vit | 50 | 2 (0,1) | 92.0 ± 2.8 | 90.0 ± 0.0 | 100.0 ± 0.0 | 50.00 ± 0.00 |" in md
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
    assert "Mend what the failed jobs' error.txt says and run the same command (with hydra.sweep.dir set to the sweep's folder)" in " ".join(err.split())
    # a sweep's folder (Hydra's multirun.yaml): named, since a sweep's default folder is a new one per command
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    assert main([str(tmp_path)]) == 2
    assert f"run the same command with hydra.sweep.dir={tmp_path} again" in " ".join(capsys.readouterr().err.split())
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_report_of_one_stopped_run_names_its_folder_and_the_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    stop = "Stopped by SIGINT after step 7 of 10 of the prune stage; a checkpoint was saved. Run the same command again to resume from it."
    (run / "stopped.txt").write_text(stop + "\n")
    assert main([str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    # it said "No finished run under ... (0 failed job(s) ..., 1 unfinished)" and labelled the job '.'
    assert f"The run in '{run}' has not finished: Stopped by SIGINT after step 7 of 10" in err
    assert "Run the same command again to resume from it." in err and "\n  ." not in err


def test_a_damaged_result_and_an_unwritable_out_are_one_paragraph(sweep: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose result.json cannot be read is not "unfinished" (its own command says to
    overwrite it); --out naming a file or a read-only place was a FileExistsError traceback."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "result.json").write_text('{"metrics": ')
    assert main([str(run)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"The run in '{run}' has a result.json that cannot be read" in err and "overwrite=true" in err
    taken = tmp_path / "report.txt"
    taken.write_text("mine")
    assert main([str(sweep), "--out", str(taken)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"The report cannot be written to '{taken}' ({taken} is a file)" in err and taken.read_text() == "mine"
    assert main([str(sweep), "--out", str(tmp_path / "new" / "report")]) == 0
    assert "10 runs in 6 configurations ->" in capsys.readouterr().out
    write_result(tmp_path / "one", "magnitude", 0.5, 0, 0.9, 1.0)
    assert main([str(tmp_path / "one")]) == 0
    assert "1 run in 1 configuration ->" in capsys.readouterr().out  # it said "1 runs in 1 configurations"


# ----------------------------------------------------------------------------- reproduction ledger
FIGURE_INFO = {
    "name": "seven_pre/plot1_bert_base", "source": "Xiao et al. 2024, plot1", "figure": "SEVEN plot1",
    "tolerance": 0.002, "tolerance_approx": 0.005,
    "published": [
        {"method": "dense", "task": "glue/mrpc", "metric": "accuracy", "value": 0.852},
        {"method": "snip", "task": "glue/mrpc", "metric": "accuracy", "curve": {"0.1": 0.838, "0.8": "≈0.698", "0.9": "<0.70"}},
        {"method": "grasp", "task": "glue/mrpc", "metric": "accuracy", "curve": {"0.1": 0.860}},
        {"method": "snip", "task": "glue/sst2", "metric": "accuracy", "curve": {"0.1": 0.926}},  # a panel not run here
    ],
}


def test_ledger_rows_tolerances_and_figure(tmp_path: Path) -> None:
    ovr = ["experiment=seven_pre/plot1_bert_base"]
    runs = {  # (method, sparsity): accuracies of two seeds
        ("snip", 0.1): (0.836, 0.838),   # mean 0.837: |diff| 0.001 <= 0.002
        ("snip", 0.8): (0.690, 0.700),   # mean 0.695 vs ≈0.698: 0.003 <= 0.005
        ("snip", 0.9): (0.650, 0.660),   # below the axis (<0.70): within
        ("grasp", 0.1): (0.84, 0.85),    # 0.845 vs 0.860: -1.5 points, outside
    }
    for (method, sp), accs in runs.items():
        for seed, acc in enumerate(accs):
            write_result(tmp_path / f"{method}-{sp}-{seed}", method, sp, seed, 0, 0, task="glue/mrpc", experiment=FIGURE_INFO,
                         overrides=[*ovr, f"method={method}", f"sparsity={sp}", f"seed={seed}"], metrics={"accuracy": acc}, model="bert_base")
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    ledger = md[md.index("## Reproduction ledger"):]
    # dense is published but was not run; the SST-2 panel belongs to another run's task
    assert "**3 of 4 measured rows within tolerance**; 1 published number(s) not run" in ledger
    assert "| snip | glue/mrpc | accuracy | 10 | – | 83.8 [1] | 83.7 ± 0.1 (2) | -0.1 | 0.2 | yes |" in ledger
    assert "| snip | glue/mrpc | accuracy | 80 | – | ≈69.8 [1] | 69.5 ± 0.7 (2) | -0.3 | 0.5 | yes |" in ledger
    assert "| <70.0 [1] | 65.5 ± 0.7 (2) | -4.5 | 0.2 | yes |" in ledger
    assert "| grasp | glue/mrpc | accuracy | 10 | – | 86.0 [1] | 84.5 ± 0.7 (2) | -1.5 | 0.2 | **no** |" in ledger
    assert "| dense | glue/mrpc | accuracy | – | – | 85.2 [1] | not run |" in ledger  # the figure's source, run or not
    assert "glue/sst2" not in ledger
    fig = tmp_path / "figure_SEVEN-plot1.png"
    assert fig.stat().st_size > 10_000 and "![figure_SEVEN-plot1](figure_SEVEN-plot1.png)" in md
    # a line right after a table is one more row of it in Markdown: the figure gets a blank line
    assert "|\n\n![figure_SEVEN-plot1]" in md


def test_ledger_conditions_and_measured_sparsity(tmp_path: Path) -> None:
    """Table 2/3 rows differ only in distillation (``when``); methods without a target
    (soft movement) match the published sparsity their measured one is closest to."""
    info = {
        "name": "soft_movement/mnli_bert_base", "source": "Sanh et al. 2020, Tables 2-3", "tolerance": 0.01,
        "published": [
            {"method": "soft_movement", "task": "glue/mnli", "metric": "accuracy", "when": {"distill.enabled": False}, "curve": {"0.9": 0.807}},
            {"method": "soft_movement", "task": "glue/mnli", "metric": "accuracy", "when": {"distill.enabled": True}, "curve": {"0.9": 0.812}},
        ],
    }
    for distil, acc in ((False, 0.80), (True, 0.79)):
        path = tmp_path / f"distill={distil}"
        write_result(path, "soft_movement", 0.9, 0, 0, 0, task="glue/mnli", experiment=info, metrics={"accuracy": acc}, model="bert_base",
                     overrides=["experiment=soft_movement/mnli_bert_base", f"distill.enabled={str(distil).lower()}"])
        result = json.loads((path / "result.json").read_text())
        result["sparsity"]["target"] = None
        result["sparsity"]["measured"] = 0.904
        result["config"]["distill"] = {"enabled": distil}
        (path / "result.json").write_text(json.dumps(result))
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "**1 of 2 measured rows within tolerance**" in ledger
    assert "| 90 | distill.enabled=false | 80.7 [1] | 80.0 (1) | -0.7 | 1.0 | yes |" in ledger
    assert "| 90 | distill.enabled=true | 81.2 [1] | 79.0 (1) | -2.2 | 1.0 | **no** |" in ledger


def test_ledger_shows_a_stand_in_model_but_does_not_count_it(tmp_path: Path) -> None:
    """``experiment=seven_pre/plot1_bert_base model=bert_tiny``: a smaller model under a
    BERT-base experiment is set beside the paper's number, with no verdict either way,
    and is left out of the count; the paper's model in the same sweep is judged."""
    ovr = ["experiment=seven_pre/plot1_bert_base", "method=snip", "sparsity=0.1"]
    write_result(tmp_path / "paper", "snip", 0.1, 0, 0, 0, task="glue/mrpc", experiment=FIGURE_INFO, overrides=ovr,
                 metrics={"accuracy": 0.837}, model="bert_base")
    write_result(tmp_path / "tiny", "snip", 0.1, 0, 0, 0, task="glue/mrpc", experiment=FIGURE_INFO, overrides=[*ovr, "model=bert_tiny"],
                 metrics={"accuracy": 0.60}, model="bert_tiny")
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "**1 of 1 measured rows within tolerance**; 4 published number(s) not run; 1 row(s) of another model" in ledger
    assert "model=bert_tiny under seven_pre/plot1_bert_base, whose paper used bert_base" in ledger
    rows = [line for line in ledger.splitlines() if line.startswith("| seven_pre/plot1_bert_base | snip | glue/mrpc | accuracy | 10 |")]
    assert len(rows) == 2
    assert any(r.endswith("| 83.7 (1) | -0.1 | 0.2 | yes |") for r in rows)
    assert any(r.endswith("| 60.0 (1) | -23.8 | 0.2 | – (model bert_tiny) |") for r in rows)
    csv_rows = {r["model"]: r for r in read_csv(tmp_path / "report.csv")}
    assert csv_rows["bert_tiny"]["published_model"] == csv_rows["bert_base"]["published_model"] == "bert_base"


def test_a_stand_in_method_is_shown_against_whose_number_it_runs(tmp_path: Path) -> None:
    """experiment=spp/llama2_7b runs RIA against SPP's published ARC-e: the ledger's method
    says both, so that 71.8 does not read as RIA's number."""
    from omegaconf import OmegaConf

    info = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "experiment" / "spp" / "llama2_7b.yaml"))["experiment_info"]
    write_result(tmp_path / "run", "ria", 0.5, 0, 0, 0, task="lm/wikitext2", experiment=info, overrides=["experiment=spp/llama2_7b"],
                 metrics={"arc_easy/acc": 0.70}, model="llama2_7b")
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "| spp/llama2_7b | ria (against spp published) | lm/wikitext2 | arc_easy/acc | 50 |" in ledger


def test_published_points_forms() -> None:
    from pruneflow.published import find_point, parse_value, published_points

    assert parse_value("≈0.857", 0.002, 0.005) == (0.857, "approx", 0.005)
    assert parse_value("<0.70", 0.002, 0.005) == (0.70, "below", 0.002)
    with pytest.raises(ValueError, match="expected a number"):
        parse_value("about 0.8", 0.002, 0.005)
    pts = published_points({"published": FIGURE_INFO["published"], "tolerance": 0.002})
    assert len(pts) == 6 and {p.kind for p in pts} == {"value", "approx", "below"}
    assert find_point(FIGURE_INFO, "snip", "glue/mrpc", "accuracy", 0.9).label() == "<70.0"
    assert find_point(FIGURE_INFO, "grasp", "glue/mrpc", "accuracy", 0.9) is None
    assert find_point(FIGURE_INFO, "magnitude", "glue/mrpc", "accuracy", 0.1) is None  # not this method's number


def test_causal_lm_perplexity_report_and_ledger(tmp_path: Path) -> None:
    """Perplexity is shown as is (not x100), runs that differ only in method.pattern are
    separate rows, the dense line comes from metrics.dense, and the ledger's perplexity
    tolerance is relative (5 % of the published value)."""
    exp = {"name": "wanda/llama2_7b", "source": "Wanda README", "tolerance": 0.05, "published": [
        {"method": "dense", "task": "lm/wikitext2", "metric": "perplexity", "value": 5.12},
        {"method": "wanda", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 6.42, "when": {"method.pattern": None}},
        {"method": "wanda", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 11.02, "when": {"method.pattern": "2:4"}},
    ]}
    root = tmp_path / "lm"
    for pattern, ppl in ((None, 6.61), ("2:4", 12.5)):  # 6.61 is within 5 % of 6.42; 12.5 is 13 % above 11.02
        path = root / f"pattern={pattern}"
        write_result(path, "wanda", 0.5, 0, 0, 0, task="lm/wikitext2", experiment=exp, metrics={"perplexity": ppl}, model="llama2_7b",
                     overrides=["experiment=wanda/llama2_7b", f"method.pattern={pattern if pattern else 'null'}".replace(":", "\\:")])
        r = json.loads((path / "result.json").read_text())
        r["metrics"] = {"dense": {"perplexity": 5.2}, "prune": {"perplexity": ppl}, "final": {"perplexity": ppl}}
        r["config"]["method"] = {"name": "wanda", "pattern": pattern}
        (path / "result.json").write_text(json.dumps(r))
    assert main([str(root)]) == 0
    md = (root / "report.md").read_text()
    table = md[md.index("## lm/wikitext2"):md.index("## Reproduction ledger")]
    assert "| 6.61 |" in table and "| 12.50 |" in table and "661" not in table
    # two rows; the pattern is the row's own column (unescaped), not a setting
    assert "| wanda | llama2_7b | unstructured |" in table and "| wanda | llama2_7b | 2:4 |" in table
    assert "method.pattern" not in table and "\\:" not in table
    ledger = md[md.index("## Reproduction ledger"):]
    assert "**2 of 3 measured rows within tolerance**" in ledger
    lines = {line.split("|")[2].strip() + line.split("|")[6].strip(): line for line in ledger.splitlines() if line.startswith("| wanda/")}
    assert "| 5.12 [" in lines["dense–"] and "5.20 (1)" in lines["dense–"] and "| yes |" in lines["dense–"]
    assert "| 6.42 [" in lines["wandamethod.pattern=None"] and "| yes |" in lines["wandamethod.pattern=None"]
    assert "+1.48" in lines["wandamethod.pattern=2:4"] and "| **no** |" in lines["wandamethod.pattern=2:4"] and "| 5 % |" in lines["wandamethod.pattern=2:4"]


# ----------------------------------------------------------------------------- causal LMs
WANDA_INFO = {  # no ``tolerance``: perplexity defaults to 5 % of the published value
    "name": "wanda/llama2_7b", "source": "Wanda README, LLaMA-2 results",
    "published": [
        {"method": "dense", "task": "lm/wikitext2", "metric": "perplexity", "value": 5.12},
        {"method": "wanda", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 6.42, "when": {"method.pattern": None}},
        {"method": "wanda", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 11.02, "when": {"method.pattern": "2:4"}},
        {"method": "sparsegpt", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 6.51, "when": {"method.pattern": None}},
        {"method": "sparsegpt", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 10.17, "when": {"method.pattern": "2:4"}},
    ],
}


def write_lm_result(path: Path, method: str, pattern: str | None, ppl: float, *, seed: int = 0, dense: float = 5.20,
                    experiment: dict | None = None, overrides: list[str] | None = None, model: str = "tiny_llama") -> None:
    """A result.json as pruneflow/llm/runner.py (finish) writes it, with made-up numbers."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ".hydra").mkdir(exist_ok=True)
    sparsity = {"target": 0.5, "measured": 0.5, "overall": 0.32, "per_layer": {"model.layers.0.mlp.up_proj": 0.5}, "per_block": [0.5]}
    if pattern is not None:
        sparsity.update(pattern=pattern, pattern_verified=True)
    final = {"perplexity": ppl, "arc_easy/acc": 0.71, "arc_easy/acc_norm": 0.69}
    result = {
        "method": method, "model": model, "task": "lm/wikitext2", "seed": seed, "main_metric": "perplexity",
        "sparsity": sparsity,
        "params": {"total": 1000, "prunable": 800, "nonzero": 600, "compressed_total": None},
        "metrics": {"dense": {"perplexity": dense}, "prune": {"perplexity": ppl}, "final": final},
        "calibration": {"dataset": "c4", "nsamples": 128, "seqlen": 4096, "seed": 0},
        "evaluation": {"split": "test", "seqlen": 4096, "windows": 80},
        "memory": {"peak_cpu_rss_bytes": 1 << 30},
        "time_s": {"eval_dense": 1.0, "prune": 5.0, "total": 8.0},
        "config": {"method": {"name": method, "pattern": pattern}, "experiment_info": experiment},
        "overrides": [f"method={method}", f"seed={seed}"] if overrides is None else overrides,
    }
    (path / "result.json").write_text(json.dumps(result))


def test_lm_sweep_perplexity_patterns_and_relative_tolerance(tmp_path: Path) -> None:
    """`-m experiment=wanda/llama2_7b method=wanda,sparsegpt method.pattern=null,2:4`:
    perplexity unscaled, one row per pattern, dense from metrics.dense, 5 % ledger tolerance."""
    root = tmp_path / "sweep"
    runs = {  # (method, pattern): perplexity of each seed
        ("wanda", None): (6.40, 6.44),   # mean 6.42 = published
        ("wanda", "2:4"): (12.50,),      # 13 % above 11.02: not reproduced
        ("sparsegpt", None): (6.80,),    # 4.5 % above 6.51: reproduced
        ("sparsegpt", "2:4"): (10.78,),  # 6 % above 10.17: not reproduced
    }
    for (method, pattern), ppls in runs.items():
        for seed, ppl in enumerate(ppls):
            escaped = "null" if pattern is None else pattern.replace(":", "\\:")  # as Hydra's sweep writes it
            write_lm_result(root / f"{method}-{pattern}-{seed}", method, pattern, ppl, seed=seed, experiment=WANDA_INFO, model="llama2_7b",
                            overrides=["experiment=wanda/llama2_7b", f"method={method}", f"method.pattern={escaped}", f"seed={seed}"])
    assert main([str(root)]) == 0
    md = (root / "report.md").read_text()
    table = md[md.index("## lm/wikitext2"):md.index("## Reproduction ledger")]
    ledger = md[md.index("## Reproduction ledger"):md.index("## Sources")]
    assert "| **perplexity ↓** | perplexity (published) | perplexity (dense) |" in table
    rows = [line for line in table.splitlines() if line.startswith("| wanda/llama2_7b |")]
    assert len(rows) == 4  # 2 methods x (unstructured, 2:4), not merged
    assert rows[2].startswith("| wanda/llama2_7b | wanda | llama2_7b | unstructured | 50 | 2 (0,1) | 6.42 ± 0.03 | 6.42 [1] | 5.20 ± 0.00 |")
    assert rows[3].startswith("| wanda/llama2_7b | wanda | llama2_7b | 2:4 | 50 | 1 (0) | 12.50 | 11.02 [1] | 5.20 |")
    assert "| 71.0 |" in rows[0]  # zero-shot accuracies are fractions: x100
    assert "642" not in table and "642" not in ledger and "1250" not in table
    assert "**3 of 5 measured rows within tolerance**" in ledger
    lines = {(ln.split("|")[2].strip(), ln.split("|")[6].strip()): ln for ln in ledger.splitlines() if ln.startswith("| wanda/")}
    assert "| 5.12 [1] | 5.20 (1) | +0.08 | 5 % | yes |" in lines[("dense", "–")]
    assert "| 6.42 [1] | 6.42 ± 0.03 (2) | +0.00 | 5 % | yes |" in lines[("wanda", "method.pattern=None")]
    assert "| 11.02 [1] | 12.50 (1) | +1.48 | 5 % | **no** |" in lines[("wanda", "method.pattern=2:4")]
    assert "| 6.51 [1] | 6.80 (1) | +0.29 | 5 % | yes |" in lines[("sparsegpt", "method.pattern=None")]
    assert "| 10.17 [1] | 10.78 (1) | +0.61 | 5 % | **no** |" in lines[("sparsegpt", "method.pattern=2:4")]
    csv_rows = read_csv(root / "report.csv")
    assert sorted((r["method"], r["pattern"]) for r in csv_rows) == [("sparsegpt", ""), ("sparsegpt", "2:4"), ("wanda", ""), ("wanda", "2:4")]
    wanda = next(r for r in csv_rows if r["method"] == "wanda" and r["pattern"] == "")
    assert float(wanda["main_mean"]) == pytest.approx(6.42) and float(wanda["perplexity_published"]) == pytest.approx(6.42)
    assert float(wanda["main_dense_mean"]) == pytest.approx(5.20) and wanda["settings"] == ""
    assert (root / "plot_lm-wikitext2_perplexity.png").stat().st_size > 10_000


def test_lm_pattern_from_config_alone_keeps_rows_apart(tmp_path: Path) -> None:
    """Runs started through the API (no overrides) at the same sparsity: the pattern comes
    from config.method.pattern, so unstructured, 2:4 and 4:8 are three rows."""
    for pattern, ppl in ((None, 6.5), ("2:4", 11.0), ("4:8", 8.0)):
        write_lm_result(tmp_path / f"p{pattern}".replace(":", "_"), "wanda", pattern, ppl, overrides=[])
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| wanda | tiny_llama | unstructured | 50 | 1 (0) | 6.50 | 5.20 |" in md
    assert "| wanda | tiny_llama | 2:4 | 50 | 1 (0) | 11.00 | 5.20 |" in md
    assert "| wanda | tiny_llama | 4:8 | 50 | 1 (0) | 8.00 | 5.20 |" in md
    assert [r["pattern"] for r in read_csv(tmp_path / "report.csv")] == ["", "2:4", "4:8"]


def test_perplexity_helpers_tolerances_and_when_null() -> None:
    from pruneflow.published import (
        find_point,
        fmt_metric,
        lower_is_better,
        metric_scale,
        published_points,
    )

    assert metric_scale("perplexity") == 1.0 and metric_scale("wikitext/word_perplexity") == 1.0
    assert metric_scale("arc_easy/acc") == 100.0 and metric_scale("accuracy") == 100.0
    assert lower_is_better("perplexity") and not lower_is_better("arc_easy/acc_norm")
    assert fmt_metric(6.4211, "perplexity") == "6.42" and fmt_metric(0.7134, "arc_easy/acc") == "71.3"
    # default tolerances: 5 % (relative) for perplexity, one point for fractions; the experiment's wins
    mixed = [{"method": "wanda", "task": "lm/wikitext2", "metric": "perplexity", "sparsity": 0.5, "value": 6.42},
             {"method": "wanda", "task": "lm/wikitext2", "metric": "arc_easy/acc", "sparsity": 0.5, "value": 0.71}]
    assert [p.tolerance for p in published_points({"published": mixed})] == [0.05, 0.01]
    assert [p.tolerance for p in published_points({"published": mixed, "tolerance": 0.02})] == [0.02, 0.02]
    ppl = published_points({"published": mixed})[0]
    assert ppl.within(6.42 * 1.049) and ppl.within(6.42 * 0.951) and not ppl.within(6.42 * 1.051)
    assert ppl.label() == "6.42" and ppl.tolerance_label() == "5 %"
    # a perplexity curve that left a figure above 100: reproduced by anything at least that high
    (above,) = published_points({"published": [{"method": "magnitude", "task": "lm/wikitext2", "metric": "perplexity", "curve": {"0.8": ">100"}}]})
    assert above.kind == "above" and above.label() == ">100.00" and above.within(300.0) and not above.within(90.0)
    # when: {method.pattern: null} is the unstructured run (null or no such key), never 2:4
    pt = find_point(WANDA_INFO, "wanda", "lm/wikitext2", "perplexity", 0.5, {"method": {"pattern": None}})
    assert pt is not None and pt.value == 6.42
    assert find_point(WANDA_INFO, "wanda", "lm/wikitext2", "perplexity", 0.5, {"method": {"name": "wanda"}}).value == 6.42
    assert find_point(WANDA_INFO, "wanda", "lm/wikitext2", "perplexity", 0.5, {"method": {"pattern": "2:4"}}).value == 11.02
    assert find_point(WANDA_INFO, "wanda", "lm/wikitext2", "perplexity", 0.5, {"method": {"pattern": "4:8"}}) is None
    # an unquoted 2:4 in YAML is the number 124: said, not silently never matched
    with pytest.raises(ValueError, match="quoted"):
        published_points({"published": [{**mixed[0], "when": {"method.pattern": 124}}]})


def test_a_seed_run_twice_counts_once_and_the_repeat_is_listed(tmp_path: Path) -> None:
    """A sweep launched twice (each launch its own time-stamped folder) and reported over
    outputs/: the same seed is one sample, not two (n and the std would be wrong)."""
    import os

    for launch, accs in (("first", (0.90, 0.94)), ("second", (0.91, 0.93))):
        for seed, acc in enumerate(accs):
            d = tmp_path / launch / f"seed={seed}"
            write_result(d, "random", 0.5, seed, acc, 1.0)
            t = 1_000_000 + (100 if launch == "second" else 0) + seed
            os.utime(d / "result.json", (t, t))
    out = tmp_path / "report"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    (row,) = read_csv(out / "report.csv")
    assert row["n_runs"] == "2" and row["seeds"] == "0 1"
    assert float(row["accuracy_mean"]) == pytest.approx(0.92)  # the later launch's 0.91 and 0.93
    assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev([0.91, 0.93]))
    md = (out / "report.md").read_text()
    repeats = md[md.index("## Repeated runs (not in the table)"):]
    assert "| `first/seed=0` | method=random sparsity=0.5 seed=0 | `second/seed=0` |" in repeats
    assert "| `first/seed=1` |" in repeats and "`second/seed=1` |" in repeats


def test_runs_from_other_weights_or_data_are_other_rows(tmp_path: Path) -> None:
    """model.path (your own checkpoint) and task.path (your own data) change what a run computes."""
    write_result(tmp_path / "hub", "magnitude", 0.5, 0, 0.90, 1.0)
    write_result(tmp_path / "mine", "magnitude", 0.5, 0, 0.80, 1.0,
                 overrides=["method=magnitude", "sparsity=0.5", "seed=0", "model.path=/ckpt/mine"])
    write_result(tmp_path / "data", "magnitude", 0.5, 0, 0.70, 1.0,
                 overrides=["method=magnitude", "sparsity=0.5", "seed=0", "task.path=/data/other"])
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    rows = {r["settings"]: r for r in read_csv(tmp_path / "r" / "report.csv")}
    assert set(rows) == {"", "model.path=/ckpt/mine", "task.path=/data/other"}
    assert [rows[k]["n_runs"] for k in sorted(rows)] == ["1", "1", "1"]


def test_one_configuration_however_its_values_are_spelled(tmp_path: Path) -> None:
    """A single run keeps ``true``/``1e-3`` as typed, a sweep's jobs get ``True``/``0.001``:
    the resolved values are what make a configuration."""
    for seed, (regrowth, lr) in enumerate((("true", "1e-3"), ("True", "0.001"), ("True", "1.0e-03"))):
        d = tmp_path / f"run{seed}"
        write_result(d, "magnitude", 0.5, seed, 0.9, 1.0,
                     overrides=["method=magnitude", "sparsity=0.5", f"seed={seed}", f"method.regrowth={regrowth}", f"stages.prune.lr={lr}"])
        result = json.loads((d / "result.json").read_text())
        result["config"].update(method={"name": "magnitude", "regrowth": True}, stages={"prune": {"lr": 0.001}})
        (d / "result.json").write_text(json.dumps(result))
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    (row,) = read_csv(tmp_path / "r" / "report.csv")
    assert row["n_runs"] == "3" and row["settings"] == "method.regrowth=true stages.prune.lr=0.001"


def test_plot_labels_and_dense_band() -> None:
    """Legend labels carry only what differs between lines (as the table's settings column);
    the dense band counts each seed's dense model once, not once per row."""
    from pruneflow.report import Row, dense_lines, line_label

    def run(seed: int, dense: float) -> dict:
        return {"seed": seed, "main_metric": "accuracy", "metrics": {"finetune": {"accuracy": dense}, "final": {"accuracy": 0.5}}}

    rows = [Row("", m, "tiny_vit", "digits", sp, f"stages.prune.epochs=2 method.regrowth={g}",
                runs=[run(0, 0.9417), run(1, 0.9306)]) for m in ("seven", "random") for sp in (0.5, 0.7) for g in ("true", "false")]
    assert line_label(rows[0], rows) == "seven · method.regrowth=true"
    dense_row = Row("", "dense", "tiny_vit", "digits", 0.0, "stages.prune.epochs=0", runs=[run(0, 0.9)])
    assert line_label(rows[0], [*rows, dense_row]) == "seven · method.regrowth=true"  # not the settings dense lacks
    assert line_label(dense_row, [*rows, dense_row]) == "dense"
    lines = dense_lines(rows, "accuracy")
    assert lines == {"dense": (pytest.approx((0.9417 + 0.9306) / 2), pytest.approx(statistics.stdev([0.9417, 0.9306])))}
    rows[0].runs[0] = run(0, 0.95)  # a row fine-tuned with other settings: another dense model, said so
    assert list(dense_lines(rows, "accuracy")) == ["dense · 3 fine-tuned models"]


def test_a_sweeps_own_experiment_from_its_launch_records_latest_first(tmp_path: Path) -> None:
    """A paper table's own source and deviations are in Hydra's ``multirun.yaml``, in no
    job's result.json; a re-launch moved the earlier record aside (``multirun.<time>.yaml``)."""
    import os

    from omegaconf import OmegaConf

    from pruneflow.config import keep_earlier_launch_record

    write_result(tmp_path / "method=magnitude", "magnitude", 0.5, 0, 0.9, 1.0)

    def launch(info: dict, mtime: float) -> None:
        OmegaConf.save(OmegaConf.create({"experiment_info": info}), tmp_path / "multirun.yaml")
        os.utime(tmp_path / "multirun.yaml", (mtime, mtime))

    dev = {"what": "penalty", "authors": "per run", "here": "a grid", "restore": "none"}
    launch({"name": "sanh2020/x_table2", "source": "old source", "deviations": []}, 1_000_000_000)
    first = keep_earlier_launch_record(tmp_path)
    launch({"name": "sanh2020/x_table2", "source": "new source", "deviations": [dev]}, 1_000_000_000)
    second = keep_earlier_launch_record(tmp_path)  # the same second: a name of its own
    launch({"name": "sanh2020/x_table2", "source": "newest source", "deviations": [dev]}, 1_000_000_100)
    third = keep_earlier_launch_record(tmp_path)
    launch({"name": "platon/glue_table", "source": "PLATON table"}, 1_000_000_200)
    assert None not in (first, second, third) and len({first, second, third}) == 3
    assert sorted(p.name for p in tmp_path.glob("multirun*.yaml")) == sorted(["multirun.yaml", first.name, second.name, third.name])
    assert keep_earlier_launch_record(tmp_path / "method=magnitude") is None  # nothing to keep

    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "- `sanh2020/x_table2`: newest source" in md and "old source" not in md  # the latest launch wins
    assert "- `platon/glue_table`: PLATON table" in md  # an earlier launch's experiment still shows
    assert "| penalty | per run | a grid | none |" in md


def test_runs_without_a_target_match_at_the_papers_count(tmp_path: Path) -> None:
    """A soft-movement run (no target) is set beside the published sparsity its count under
    the paper's definition (sparsity.paper.removed) is closest to, not pruneflow's own
    measured fraction, which counts another set of layers."""
    info = {"name": "soft_movement/mnli_bert_base", "source": "Sanh et al. 2020", "tolerance": 0.01,
            "published": [{"method": "soft_movement", "task": "glue/mnli", "metric": "accuracy", "curve": {"0.9": 0.807}}]}
    write_result(tmp_path / "run", "soft_movement", 0.9, 0, 0, 0, task="glue/mnli", experiment=info, metrics={"accuracy": 0.80},
                 model="bert_base", overrides=["experiment=soft_movement/mnli_bert_base"])
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    result["sparsity"].update(target=None, measured=0.85, paper={"removed": 0.904, "value": 0.096})
    (tmp_path / "run" / "result.json").write_text(json.dumps(result))
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "**1 of 1 measured rows within tolerance**; 0 published number(s) not run" in ledger
    assert "| 90 | – | 80.7 [1] | 80.0 (1) | -0.7 | 1.0 | yes |" in ledger


def test_overall_scores_count_glue_tasks_and_compressed_parameters(tmp_path: Path) -> None:
    """The GLUE score averages the GLUE tasks' main metrics only (a SQuAD row of the same
    configuration is not one of them); the parameter reduction of a physically compressed
    model counts its remaining parameters (params.compressed_total), not its nonzeros."""
    glue = {"name": "admm/glue_bert_base", "source": "Wang 2024", "published_overall": {"glue_score": 0.801}}
    write_result(tmp_path / "rte", "admm", 0.5, 0, 0, 0, task="glue/rte", experiment=glue, metrics={"accuracy": 0.70})
    write_result(tmp_path / "squad", "admm", 0.5, 0, 0, 0, task="squad/v1", experiment=glue, metrics={"f1": 0.90})
    spp = {"name": "spp/deit_imagenet", "source": "SPP", "published_overall": {"params_reduction": 0.706}}
    for seed, kept in enumerate((300, 320)):
        path = tmp_path / f"spp{seed}"
        write_result(path, "spp", 0.5, seed, 0.7, 0.9, experiment=spp)
        result = json.loads((path / "result.json").read_text())
        result["params"].update(total=1000, nonzero=600, compressed_total=kept)
        (path / "result.json").write_text(json.dumps(result))
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    overall = md[md.index("## Overall scores"):]
    assert "| admm/glue_bert_base | admm | tiny_vit | 50 | GLUE score" in overall
    assert "| 70.0 | 80.1 [" in overall and "1 of 8 GLUE tasks" in overall
    assert "| spp/deit_imagenet | spp | tiny_vit | 50 | parameter reduction" in overall
    assert "| 69.0 | 70.6 [" in overall and "2 run(s)" in overall  # 1 - (300 + 320) / 2 / 1000


def test_a_nan_metric_is_left_out_of_the_mean(tmp_path: Path) -> None:
    """A seed whose metric is NaN (a Pearson correlation of constant predictions) does not
    turn the row's mean into NaN: mean and std are over the finite values."""
    for seed, acc in enumerate((0.90, 0.94, float("nan"))):
        write_result(tmp_path / f"seed={seed}", "magnitude", 0.5, seed, acc, 1.0)
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    (row,) = read_csv(tmp_path / "r" / "report.csv")
    assert float(row["accuracy_mean"]) == pytest.approx(0.92)
    assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev([0.90, 0.94]))
    # ... and says over how many: the table's cell and the CSV's count (a run writes null)
    assert (row["n_runs"], row["accuracy_n"], row["main_n"], row["top5_n"]) == ("3", "2", "2", "3")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "92.0 ± 2.8 (2/3)" in md and "(k/n) beside a metric" in md
    assert "100.0 (" not in md  # top5: every run has it


def test_a_metric_every_run_has_gets_no_count(sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    assert "(k/n) beside a metric" not in (tmp_path / "r" / "report.md").read_text()


def test_ledger_of_the_older_form_leaves_the_dense_row_out(tmp_path: Path) -> None:
    """``published: {task: {metric: value}}`` is the experiment's own method at any sparsity:
    a method=dense row of the same experiment does not reproduce it, nor name its method
    (the rows sort the dense one first)."""
    info = {"name": "legacy/exp", "source": "a paper", "published": {"digits": {"accuracy": 0.90}}}
    write_result(tmp_path / "mag", "magnitude", 0.5, 0, 0.895, 1.0, experiment=info, overrides=["experiment=legacy/exp", "method=magnitude"])
    write_result(tmp_path / "dense", "dense", 0.0, 0, 0.95, 1.0, experiment=info, overrides=["experiment=legacy/exp", "method=dense"])
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "**1 of 1 measured rows within tolerance**; 0 published number(s) not run" in ledger
    rows = [line for line in ledger.splitlines() if line.startswith("| legacy/exp |")]
    assert len(rows) == 1 and rows[0].endswith("| 90.0 [1] | 89.5 (1) | -0.5 | 1.0 | yes |")
    assert rows[0].startswith("| legacy/exp | magnitude | digits |")  # the experiment's method, not the dense row's


def test_ledger_lists_a_figures_numbers_once_across_its_experiments(tmp_path: Path) -> None:
    """Two experiments of one figure, each carrying the whole figure: each published number
    is one ledger row, matched against the rows of either experiment."""
    other = {**FIGURE_INFO, "name": "seven_pre/plot1_other"}
    for method, info in (("snip", FIGURE_INFO), ("grasp", other)):
        write_result(tmp_path / method, method, 0.1, 0, 0, 0, task="glue/mrpc", experiment=info, model="bert_base",
                     overrides=[f"experiment={info['name']}", f"method={method}", "sparsity=0.1"], metrics={"accuracy": 0.837})
    assert main([str(tmp_path)]) == 0
    ledger = (tmp_path / "report.md").read_text().split("## Reproduction ledger")[1]
    assert "**1 of 2 measured rows within tolerance**; 3 published number(s) not run" in ledger
    table = [line for line in ledger.splitlines() if line.startswith("| ") and "glue/mrpc" in line]
    assert len(table) == 5  # dense, snip at 10, 80 and 90 %, grasp at 10 %
    assert sum("| 83.7 (1) |" in line for line in table) == 2


def test_tolerances_at_their_edges() -> None:
    """A measured value exactly one tolerance away counts (float error aside); "<x" is
    reproduced up to x plus the tolerance, ">x" down to x minus it; a "≈x" point's
    tolerance is never tighter than the entry's own; a target with float error matches."""
    from pruneflow.published import find_point, published_points

    def point(raw: object, metric: str = "accuracy", **extra: object):  # noqa: ANN202
        (p,) = published_points({"published": [{"method": "snip", "task": "t", "metric": metric, "value": raw, **extra}]})
        return p

    exact = point(0.838)
    assert exact.within(0.848) and exact.within(0.828) and not exact.within(0.8481)
    below = point("<0.70", tolerance=0.002)
    assert below.within(0.60) and below.within(0.7015) and not below.within(0.703)
    above = point(">100", metric="perplexity")  # 5 % of 100
    assert above.within(300.0) and above.within(96.0) and not above.within(94.0)
    approx = point("≈0.80", tolerance=0.02)
    assert approx.kind == "approx" and approx.tolerance == 0.02 and approx.within(0.815)
    assert find_point(FIGURE_INFO, "snip", "glue/mrpc", "accuracy", 1 - 0.9).value == 0.838  # 0.09999999999999998


def test_the_latest_run_of_a_seed_is_the_newest_file_not_the_last_path(tmp_path: Path) -> None:
    """Which of two runs of one seed counts is decided by when result.json was written: a
    later launch in a folder that sorts first still wins."""
    import os

    for launch, acc, t in (("b-first", 0.50, 1_000_000), ("a-second", 0.90, 1_000_100)):
        write_result(tmp_path / launch, "random", 0.5, 0, acc, 1.0)
        os.utime(tmp_path / launch / "result.json", (t, t))
    assert main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    (row,) = read_csv(tmp_path / "r" / "report.csv")
    assert row["n_runs"] == "1" and float(row["accuracy_mean"]) == pytest.approx(0.90)
    assert row["run_dirs"] == str(tmp_path / "a-second")


def test_best_evaluation_during_training_has_its_own_column(tmp_path: Path) -> None:
    """trainer.eval_every runs record their last stage's best evaluation: the report shows it
    beside the final model's metric (never instead of it) and counts the runs that have one."""
    root = tmp_path / "sweep"
    for seed, (acc, best) in enumerate(((0.90, 0.93), (0.80, None))):
        path = root / f"seed={seed}"
        write_result(path, "seven", 0.7, seed, acc, 1.0)
        if best is not None:
            result = json.loads((path / "result.json").read_text())
            result["eval_history"] = {"file": "eval_history.jsonl", "evaluations": 9, "every": 4,
                                      "best": {"stage": "recover", "step": 8, "epoch": 1.0, "metrics": {"accuracy": best, "top5": 1.0}}}
            (path / "result.json").write_text(json.dumps(result))
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0
    (row,) = read_csv(out / "report.csv")
    assert float(row["main_mean"]) == pytest.approx(0.85)  # the final models'
    assert float(row["main_best_eval_mean"]) == pytest.approx(0.93) and row["main_best_eval_n"] == "1"
    text = (out / "report.md").read_text()
    assert "accuracy (best eval)" in text and "93.0 (1/2)" in text

    plain = tmp_path / "plain"
    write_result(plain / "a", "seven", 0.7, 0, 0.9, 1.0)
    assert main([str(plain), "--out", str(tmp_path / "r2")]) == 0
    assert "best eval" not in (tmp_path / "r2" / "report.md").read_text()
    assert read_csv(tmp_path / "r2" / "report.csv")[0]["main_best_eval_n"] == "0"


def test_the_plot_says_its_lines_are_shifted_apart(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines at one sparsity are drawn a little apart (their error bars would overlap): the
    axis label says so, as the points no longer sit at their measured sparsity."""
    import matplotlib.figure

    labels: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def capture(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        labels.append(self.axes[0].get_xlabel())
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    assert main([str(sweep), "--out", str(tmp_path / "r")]) == 0
    assert labels and "drawn up to ±0.2 apart" in labels[0]  # magnitude and random: two lines


def test_unreadable_result_files_are_listed_not_dropped(tmp_path: Path) -> None:
    """A damaged result.json, or one that is not a pruneflow result (a JSON list), is listed
    as unreadable, also outside a Hydra job folder; it was dropped silently (or, a list,
    ended the report in a TypeError)."""
    root = tmp_path / "runs"
    write_result(root / "good", "magnitude", 0.5, 0, 0.9, 1.0)
    for name, text in (("bad", "{bad"), ("list", "[1, 2]")):
        (root / name).mkdir(parents=True)
        (root / name / "result.json").write_text(text)
    assert main([str(root), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "1 finished run(s) in 1 configuration(s); 0 failed, 2 unfinished" in md
    assert "| `bad` | – | result.json is unreadable" in md and "| `list` | – | result.json is unreadable" in md


def test_deviations_name_the_runs_own_overrides(tmp_path: Path) -> None:
    """The deviations table describes the experiment as shipped: a run that overrides one
    of its settings (task.max_seq_length=64 where the table says 512) is listed above it."""
    info = {"name": "platon/sst2_bert_base", "source": "PLATON, Table 1",
            "deviations": [{"what": "tokenizer", "authors": "mt-dnn's, 512 tokens", "here": "task.max_seq_length 512", "restore": "–"}]}
    write_result(tmp_path / "run", "platon", 0.8, 0, 0.9, 1.0, task="glue/sst2", experiment=info, model="minilm",
                 overrides=["experiment=platon/sst2_bert_base", "model=minilm", "task.max_seq_length=64", "seed=0"], metrics={"accuracy": 0.9})
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("### Deviations from the authors' setting: `platon/sst2_bert_base`"):]
    assert "Its runs here also set `model=minilm task.max_seq_length=64`" in section
    assert "| what | the authors | this experiment (as shipped) | to restore theirs |" in section
