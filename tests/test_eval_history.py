"""trainer.eval_every: evaluations inside the training stages, in eval_history.jsonl.

They must not change the training (same weights and metrics as without them), must
match result.json at each stage's end, and must read after a kill and resume exactly as
an uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pruneflow.history import EvalHistory

from conftest import SMALL, read_result, run_cli

ARGS = [*SMALL, "method=seven", "sparsity=0.7"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_history.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run without evaluations during training and one with them every 4 steps."""
    tmp = tmp_path_factory.mktemp("history")
    out = {}
    for name, extra in (("plain", []), ("every4", ["trainer.eval_every=4"])):
        done = run_cli([*ARGS, *extra, f"hydra.run.dir={tmp / name}", f"cache_dir={tmp / name}_cache"], cwd=tmp)
        assert done.returncode == 0, done.stderr
        out[name] = tmp / name
    return out


@pytest.mark.slow
def test_evaluations_during_training_change_nothing_and_end_rows_match_the_result(runs: dict[str, Path]) -> None:
    plain, every = runs["plain"], runs["every4"]
    assert not (plain / "eval_history.jsonl").exists()  # off by default: no new file
    a, b = read_result(plain), read_result(every)
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
    assert same_weights(plain, every)  # the RNG state the evaluation loaders draw from is restored

    got = rows(every)
    # SMALL: finetune 12 steps, prune 10, recover 6; every 4 steps before each stage's last, then its end
    assert [(r["stage"], r["step"], r["end"]) for r in got] == [
        ("finetune", 4, False), ("finetune", 8, False), ("finetune", 12, True),
        ("prune", 4, False), ("prune", 8, False), ("prune", 10, True),
        ("recover", 4, False), ("recover", 6, True)]
    for r in got:
        if r["end"]:
            assert r["metrics"] == b["metrics"][r["stage"]]
    assert "sparsity" not in got[0]
    ramp = [r["sparsity"] for r in got if r["stage"] != "finetune"]
    assert ramp == sorted(ramp) and 0 < ramp[0] < 0.7
    assert ramp[-1] == pytest.approx(b["sparsity"]["measured"], abs=1e-6)
    # 256 training examples: 4 steps an epoch in the finetune's batches of 64, 8 in the prune stage's of 32
    assert [r["epoch"] for r in got[:5]] == [1.0, 2.0, 3.0, 0.5, 1.0]

    summary = b["eval_history"]
    assert summary["file"] == "eval_history.jsonl" and summary["evaluations"] == 8 and summary["every"] == 4
    recover = [r for r in got if r["stage"] == "recover"]
    best = max(recover, key=lambda r: r["metrics"]["accuracy"])
    assert summary["best"]["stage"] == "recover" and summary["best"]["metrics"] == best["metrics"]
    assert "eval_history" not in a


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_history(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    cmd = [*ARGS, "trainer.eval_every=4", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    killed = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"})
    assert killed.returncode == -9
    # rows written after the checkpoint (prune step 6) that a resume trains and evaluates again
    with (run_dir / "eval_history.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "prune", "step": 8, "epoch": 1.0, "end": False, "metrics": {"accuracy": -1.0}}) + "\n")
        f.write('{"stage": "prune", "st')  # a line cut short by the kill
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(run_dir) == rows(runs["every4"])
    assert read_result(run_dir)["eval_history"] == read_result(runs["every4"])["eval_history"]
    assert same_weights(run_dir, runs["every4"])


@pytest.mark.slow
def test_a_resume_without_eval_every_keeps_the_earlier_rows_up_to_its_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    common = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]
    killed = run_cli([*common, "trainer.eval_every=4"], cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"})
    assert killed.returncode == -9
    with (run_dir / "eval_history.jsonl").open("a") as f:  # a row past the checkpoint
        f.write(json.dumps({"stage": "prune", "step": 8, "epoch": 1.0, "end": False, "metrics": {"accuracy": -1.0}}) + "\n")
    resumed = run_cli(common, cwd=tmp_path)  # trainer.eval_every may change on resume: it changes no result
    assert resumed.returncode == 0, resumed.stderr
    assert [(r["stage"], r["step"]) for r in rows(run_dir)] == [("finetune", 4), ("finetune", 8), ("finetune", 12), ("prune", 4)]
    assert "adds none, so the file ends at the checkpoint it resumes from (prune step 6)" in (run_dir / "pruneflow.log").read_text()
    assert "eval_history" not in read_result(run_dir)
    assert read_result(run_dir)["metrics"] == read_result(runs["plain"])["metrics"]


@pytest.mark.slow
def test_a_reused_finetune_brings_its_evaluations(runs: dict[str, Path], tmp_path: Path) -> None:
    # the every4 run's cache entry holds its finetune rows; another method reuses it
    cache = f"cache_dir={runs['every4']}_cache"
    done = run_cli([*SMALL, "method=magnitude", "sparsity=0.5", "trainer.eval_every=4", f"hydra.run.dir={tmp_path / 'm'}", cache], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_result(tmp_path / "m")["provenance"]["finetune"]["reused"]
    finetune = [r for r in rows(tmp_path / "m") if r["stage"] == "finetune"]
    assert finetune == [r for r in rows(runs["every4"]) if r["stage"] == "finetune"]
    # an entry computed without evaluations: only the stage-end row, and the log says why
    cache = f"cache_dir={runs['plain']}_cache"
    done = run_cli([*SMALL, "method=magnitude", "sparsity=0.5", "trainer.eval_every=4", f"hydra.run.dir={tmp_path / 'p'}", cache], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [(r["step"], r["end"]) for r in rows(tmp_path / "p") if r["stage"] == "finetune"] == [(12, True)]
    assert "computed without trainer.eval_every" in (tmp_path / "p" / "pruneflow.log").read_text()
    # another evaluation precision: the same dense weights (before, a second fine-tuning), but
    # the entry's evaluations were made in fp32, so only this run's stage-end row
    cache = f"cache_dir={runs['every4']}_cache"
    done = run_cli([*SMALL, "method=magnitude", "sparsity=0.5", "trainer.eval_every=4", "trainer.eval_precision=bf16",
                    f"hydra.run.dir={tmp_path / 'b'}", cache], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_result(tmp_path / "b")["provenance"]["finetune"]["reused"]
    assert [(r["step"], r["end"]) for r in rows(tmp_path / "b") if r["stage"] == "finetune"] == [(12, True)]
    assert "evaluated during training with {'eval_precision': '32'}; this run evaluates with {'eval_precision': 'bf16'}" in (
        " ".join((tmp_path / "b" / "pruneflow.log").read_text().split()))


def test_trim_keeps_what_the_checkpoint_covers(tmp_path: Path) -> None:
    history = EvalHistory(tmp_path, enabled=True)
    for stage, step, end in (("finetune", 4, False), ("finetune", 8, True), ("prune", 3, False), ("prune", 6, False), ("prune", 9, False)):
        history.record(stage, step, 4, {"accuracy": step / 10}, end=end)
    history.trim_to("prune", 6, complete=False)
    assert [(r["stage"], r["step"]) for r in history.rows()] == [("finetune", 4), ("finetune", 8), ("prune", 3), ("prune", 6)]
    history.trim_to("finetune", 8, complete=True)
    assert [(r["stage"], r["step"]) for r in history.rows()] == [("finetune", 4), ("finetune", 8)]
    history.start_over()
    assert history.rows() == [] and not history.path.exists()


def test_best_is_the_last_stages_at_its_final_sparsity(tmp_path: Path) -> None:
    history = EvalHistory(tmp_path, enabled=True)
    history.record("finetune", 4, 4, {"accuracy": 0.99}, end=True)  # dense: never the best of a pruned run
    history.record("prune", 2, 4, {"accuracy": 0.95}, sparsity=0.3)  # before the schedule reached its target
    history.record("prune", 4, 4, {"accuracy": 0.90}, sparsity=0.7)
    history.record("prune", 6, 4, {"accuracy": 0.92}, sparsity=0.7)
    history.record("prune", 8, 4, {"accuracy": 0.92}, sparsity=0.7, end=True)
    best = history.best("accuracy", "prune")
    assert (best["step"], best["metrics"]["accuracy"]) == (6, 0.92)  # the earliest of the tied best
    assert history.best("accuracy", "recover") is None
