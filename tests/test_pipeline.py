"""End-to-end runs on the offline default (tiny ViT on digits) with short stages."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruneflow.errors import UserError
from pruneflow.runner import run

pytestmark = pytest.mark.slow


def recount(model_dir, names):
    state = load_file(str(model_dir / "model.safetensors"))
    zeros = sum(int(state[n].numel() - state[n].count_nonzero()) for n in names)
    return zeros / sum(state[n].numel() for n in names)


def test_total_time_leaves_out_the_logger_start(config, tmp_path, monkeypatch):
    """W&B online with the server unreachable waits ~30 s before falling back to offline:
    start-up, which time_s.total leaves out (it counted it: 40.8 s for 9.6 s of stages)."""
    import time

    from pruneflow import runner
    from pruneflow.loggers import NullLogger

    wait = 10.0

    def slow_logger(cfg, run_dir):  # noqa: ANN001, ANN202
        time.sleep(wait)
        return NullLogger()

    monkeypatch.setattr(runner, "make_logger", slow_logger)
    short = [f"stages.{s}.{k}={v}" for s in ("finetune", "prune", "recover") for k, v in (("epochs", "null"), ("steps", 2))]
    result = run(config("method=magnitude", "sparsity=0.5", "cache=false", *short), tmp_path / "run", [])
    times = result["time_s"]
    stages = sum(v for k, v in times.items() if k != "total")
    assert stages <= times["total"] < stages + wait, times  # evaluation and saving: a few seconds at most


def test_magnitude_run_writes_the_result_contract(config, tmp_path):
    run_dir = tmp_path / "run"
    result = run(config("method=magnitude", "sparsity=0.7", "speed.enabled=true"), run_dir, ["method=magnitude", "sparsity=0.7"])
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(result["metrics"]))
    for key in ("method", "model", "task", "seed", "main_metric", "sparsity", "params", "metrics", "speed", "export", "time_s", "config", "overrides", "provenance"):
        assert key in on_disk
    assert (on_disk["method"], on_disk["model"], on_disk["task"]) == ("magnitude", "tiny_vit", "digits")
    assert set(on_disk["metrics"]) == {"finetune", "prune", "recover", "final"}
    assert on_disk["metrics"]["final"] == on_disk["metrics"]["recover"]

    # Sparsity recounted from the saved weights, independently of the runner.
    names = list(on_disk["sparsity"]["per_layer"])
    assert len(names) == 16 and all(n.startswith("blocks.") for n in names)
    measured = recount(run_dir / "model", names)
    assert abs(measured - 0.7) < 1e-4
    assert on_disk["sparsity"]["measured"] == pytest.approx(measured, abs=1e-6)
    assert on_disk["params"]["total"] == 202058 and on_disk["params"]["prunable"] == 196608
    state = load_file(str(run_dir / "model" / "model.safetensors"))
    assert on_disk["params"]["nonzero"] == sum(int(v.count_nonzero()) for v in state.values())
    # overall: the zeros among every parameter of the model (embeddings, norms, head too)
    assert on_disk["sparsity"]["overall"] == pytest.approx(1 - sum(int(v.count_nonzero()) for v in state.values()) / 202058, abs=1e-6)
    assert on_disk["speed"]["dense_ms"] > 0 and on_disk["speed"]["final_ms"] > 0

    # Accuracy recomputed from predictions.jsonl.
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 360 and len({p["id"] for p in preds}) == 360
    acc = sum(p["prediction"] == p["reference"] for p in preds) / len(preds)
    assert acc == pytest.approx(on_disk["metrics"]["final"]["accuracy"], abs=1e-6)
    assert all(p["prediction"] == p["top5"][0] for p in preds)

    # The saved model loads back and gives the same predictions.
    from pruneflow import load_model

    model = load_model(run_dir / "model").eval()
    from omegaconf import OmegaConf

    from pruneflow.tasks.digits import Digits

    task = Digits(OmegaConf.create({"name": "digits"}))
    task.load()
    x = torch.stack([task.eval_sets["validation"][i]["pixel_values"] for i in range(20)])
    assert model(x).argmax(-1).tolist() == [p["prediction"] for p in preds[:20]]


def test_finetune_is_cached_across_methods_and_sparsities(config, tmp_path, caplog):
    caplog.set_level("INFO", logger="pruneflow")
    a = run(config("method=magnitude", "sparsity=0.5"), tmp_path / "a")
    caplog.clear()
    b = run(config("method=random", "sparsity=0.9"), tmp_path / "b")
    assert any("Reusing cached finetune" in r.getMessage() for r in caplog.records)
    assert a["metrics"]["finetune"] == b["metrics"]["finetune"]
    assert b["sparsity"]["measured"] == pytest.approx(0.9, abs=1e-4)
    # result.json says which entry the dense model came from and which run computed it
    made, used = a["provenance"]["finetune"], b["provenance"]["finetune"]
    assert made["reused"] is False and used["reused"] is True and made["cache"] == used["cache"]
    assert Path(used["cache"]).parent == tmp_path / "cache" / "finetune"
    assert made["computed_by"] == used["computed_by"] and used["computed_by"]["run_dir"] == str(tmp_path / "a")
    assert used["computed_by"]["torch_threads"] == torch.get_num_threads()
    assert not any("computed on" in r.getMessage() for r in caplog.records)  # same machine: no note
    # an entry computed with another thread count is reused, and the run says so
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    caplog.clear()
    c = run(config("method=random", "sparsity=0.7", f"trainer.torch_threads={other}"), tmp_path / "c")
    assert torch.get_num_threads() == threads and c["provenance"]["finetune"]["reused"] is True
    (note,) = [r.getMessage() for r in caplog.records if "The cached finetune was computed on" in r.getMessage()]
    assert f"with {threads} torch threads ({tmp_path / 'a'}); this run uses cpu with {other}" in note
    assert "cache=false" in note


def test_a_cache_dir_that_cache_false_leaves_unused_is_said(config, tmp_path, caplog):
    """cache=false with a cache_dir on the command line: the run says the folder is not
    used (a warning, so that a sweep may switch the cache off for some of its jobs), and
    writes nothing there."""
    caplog.set_level("INFO", logger="pruneflow")
    typed = ["cache=false", f"cache_dir={tmp_path / 'mine'}", "method=magnitude", "sparsity=0.5"]
    run(config(*typed), tmp_path / "run", typed)
    assert any(f"cache_dir={tmp_path / 'mine'} is not used: cache=false" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "mine").exists()
    caplog.clear()
    run(config("cache=false", "method=magnitude", "sparsity=0.5"), tmp_path / "run2", ["cache=false"])
    assert not any("is not used: cache=false" in r.getMessage() for r in caplog.records)  # the default cache_dir: nothing to say


def test_a_finetune_cached_by_other_code_is_not_reused(config, tmp_path, caplog, monkeypatch):
    """The cache key holds the code: an entry made by an older pruneflow (or other library
    versions) is computed again, not reused with the new code's settings."""
    from pruneflow import cache

    run(config("method=magnitude", "sparsity=0.5"), tmp_path / "a")
    edited = {**cache.code_fingerprint(), "pruneflow_source": "0" * 16}
    monkeypatch.setattr(cache, "code_fingerprint", lambda skip=(): edited)
    caplog.set_level("INFO", logger="pruneflow")
    run(config("method=magnitude", "sparsity=0.5"), tmp_path / "b")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("Reusing cached finetune" in m for m in messages)
    assert any("Cached finetune" in m for m in messages)
    entries = [d for d in (tmp_path / "cache" / "finetune").iterdir() if d.is_dir()]
    codes = {json.loads((d / "key.json").read_text())["code"]["pruneflow_source"] for d in entries}
    assert len(codes) == 2 and "0" * 16 in codes


def test_editing_a_method_keeps_the_cached_finetune(config, tmp_path, caplog, monkeypatch):
    """The finetune's key leaves the methods' source out (no method runs in it): adding or
    editing a method file (README, "Adding a method") reused nothing before."""
    from pruneflow import cache

    real = cache.code_fingerprint
    edits = iter(range(10))
    # every call sees "edited" methods/ unless the caller leaves methods/ out of its key
    monkeypatch.setattr(cache, "code_fingerprint",
                        lambda skip=(): real(skip) if "methods/" in skip else {**real(skip), "pruneflow_source": f"edit{next(edits)}"})
    run(config("method=magnitude", "sparsity=0.5"), tmp_path / "a")
    caplog.set_level("INFO", logger="pruneflow")
    b = run(config("method=random", "sparsity=0.5"), tmp_path / "b")
    assert b["provenance"]["finetune"]["reused"] is True
    assert any("Reusing cached finetune" in r.getMessage() for r in caplog.records)


def test_source_hash_follows_every_python_file(tmp_path):
    from pruneflow.cache import source_hash

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = source_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert source_hash(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert source_hash(tmp_path) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    # an editor's lock link to nowhere and a notebook checkpoint are not code: same hash, no error
    (tmp_path / ".#a.py").symlink_to(tmp_path / "nowhere")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.py").write_text("x = 5\n")
    assert source_hash(tmp_path) == first
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")  # same content, other place
    assert source_hash(tmp_path) != first


def test_source_hash_skips_what_cannot_change_a_stage(tmp_path):
    """The report, the model card, uploads, W&B and the callbacks are left out of the cache
    key: a release that only touches them keeps the cached fine-tunes."""
    from pruneflow.cache import NOT_IN_STAGES, source_hash

    (tmp_path / "integrations").mkdir()
    for name in ("trainer.py", "report.py", "integrations/lightning.py"):
        (tmp_path / name).write_text("x = 1\n")
    first = source_hash(tmp_path, NOT_IN_STAGES)
    (tmp_path / "report.py").write_text("x = 2\n")
    (tmp_path / "integrations" / "lightning.py").write_text("x = 2\n")
    assert source_hash(tmp_path, NOT_IN_STAGES) == first
    assert source_hash(tmp_path) != source_hash(tmp_path, NOT_IN_STAGES)
    from pruneflow.cache import NOT_IN_FINETUNE

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "taylor.py").write_text("x = 1\n")  # a method added: the finetune's key stays
    assert source_hash(tmp_path, NOT_IN_STAGES + NOT_IN_FINETUNE) == first != source_hash(tmp_path, NOT_IN_STAGES)
    (tmp_path / "trainer.py").write_text("x = 2\n")
    assert source_hash(tmp_path, NOT_IN_STAGES) != first
    # every name is a module of the package (a renamed one would silently join the key again)
    import pruneflow

    root = Path(pruneflow.__file__).parent
    assert all((root / name).exists() for name in NOT_IN_STAGES + NOT_IN_FINETUNE)


def test_dense_method_skips_the_prune_stage(config, tmp_path):
    r = run(config("method=dense", "stages.prune.steps=0"), tmp_path / "d")
    assert set(r["metrics"]) == {"finetune", "recover", "final"}
    assert r["sparsity"]["target"] == 0.0 and r["sparsity"]["measured"] == 0.0
    # a prune-stage setting dense would ignore is an error, not silently dropped
    with pytest.raises(UserError, match="stages.prune.steps=20"):
        run(config("method=dense"), tmp_path / "d2")


def test_finished_run_is_not_run_again(config, tmp_path, caplog):
    cfg = config("method=magnitude")
    first = run(cfg, tmp_path / "r")
    caplog.set_level("INFO", logger="pruneflow")
    again = run(cfg, tmp_path / "r")
    assert again == json.loads((tmp_path / "r" / "result.json").read_text())
    assert any("skipping" in r.getMessage() for r in caplog.records)
    assert first["metrics"] == again["metrics"]


def test_nan_loss_stops_with_a_clear_error_and_saved_state(config, tmp_path):
    from pruneflow.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="stages.finetune.lr") as first:
        run(config("stages.finetune.lr=1e30", "trainer.max_grad_norm=0", "cache=false"), tmp_path / "nan")
    assert (tmp_path / "nan" / "checkpoints" / "diverged.pt").exists()  # last.pt, if any, stays the state to resume from
    assert not (tmp_path / "nan" / "result.json").exists()
    # at the first step there is no last.pt: the message says the re-run starts over, not that one is kept
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()
    assert "no checkpoint had been written" in str(first.value) and "last.pt" not in str(first.value)
    with pytest.raises(TrainingDiverged, match="stages.prune.lr") as later:  # after the finetune stage's checkpoint
        run(config("method=magnitude", "stages.prune.lr=1e30", "trainer.max_grad_norm=0", "cache=false"), tmp_path / "nan2")
    assert (tmp_path / "nan2" / "checkpoints" / "last.pt").exists()
    assert "checkpoints/last.pt, the last checkpoint before it, is kept" in str(later.value)


def test_torch_threads_applies_to_the_run_only(config, tmp_path):
    """trainer.torch_threads sets the run's threads; the calling process gets its own back."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = run(config("method=magnitude", "sparsity=0.5", "trainer.torch_threads=1"), tmp_path / "run", [])
        assert result["provenance"]["torch_threads"] == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_results_are_saved_when_the_speed_measurement_fails(config, tmp_path, monkeypatch):
    import pruneflow.speed

    def out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(pruneflow.speed, "measure_speed", out_of_memory)
    run_dir = tmp_path / "run"
    result = run(config("method=magnitude", "sparsity=0.5", "speed.enabled=true"), run_dir, [])
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["speed"] is None and "out of memory" in on_disk["output_errors"]["speed"]
    assert on_disk["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-4) == result["sparsity"]["measured"]
    assert (run_dir / "model" / "model.safetensors").exists()


def test_a_compiled_model_is_timed_against_a_compiled_dense_one(config, tmp_path, monkeypatch):
    """trainer.compile=true: speed.final_ms is the compiled model's, so the dense model it is
    compared with is compiled too (torch.compile itself is recorded, not run, here)."""
    import pruneflow.validation

    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(pruneflow.validation, "compile_toolchain_missing", lambda cuda: None)
    result = run(config("method=magnitude", "sparsity=0.5", "speed.enabled=true", "trainer.compile=true"), tmp_path / "run", [])
    assert result["speed"]["dense_ms"] > 0
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # the trained model, then the dense copy


def test_fp16_scaler_runs_a_prune_stage_without_weight_updates(config, tmp_path, monkeypatch):
    """seven_pre scores without optimizer steps: the fp16 scaler's unscale_ must be closed by
    update() every step (torch's CPU GradScaler stands in for CUDA's here)."""
    import pruneflow.runner

    check = pruneflow.runner.validate_trainer
    monkeypatch.setattr(pruneflow.runner, "validate_trainer", lambda cfg, cuda, here=True: check(cfg, cuda=True, here=here))
    result = run(config("method=seven_pre", "sparsity=0.5", "trainer.precision=fp16"), tmp_path / "run", [])
    assert result["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-4)


def test_other_weights_at_the_same_model_path_are_fine_tuned_again(config, tmp_path, caplog):
    """The finetune cache keys on what lies at model.path, not only the path string: a
    user who puts another checkpoint there gets it fine-tuned, not the old one's entry."""
    import os
    import shutil

    run(config("method=magnitude", "sparsity=0.5"), tmp_path / "a")
    run(config("method=magnitude", "sparsity=0.9"), tmp_path / "b")
    mine = tmp_path / "mine"
    shutil.copytree(tmp_path / "a" / "model", mine)
    caplog.set_level("INFO", logger="pruneflow")
    run(config("method=random", "sparsity=0.5", f"model.path={mine}"), tmp_path / "c")
    caplog.clear()
    run(config("method=random", "sparsity=0.7", f"model.path={mine}"), tmp_path / "c2")  # the same files: reused
    assert any("Reusing cached finetune" in r.getMessage() for r in caplog.records)
    shutil.rmtree(mine)
    shutil.copytree(tmp_path / "b" / "model", mine)  # other weights, same path
    for f in mine.iterdir():  # copytree keeps times: make sure they differ from the first copy's
        os.utime(f, ns=(f.stat().st_mtime_ns + 10**9, f.stat().st_mtime_ns + 10**9))
    caplog.clear()
    run(config("method=random", "sparsity=0.5", f"model.path={mine}"), tmp_path / "d")
    assert not any("Reusing cached finetune" in r.getMessage() for r in caplog.records)
    assert any("Cached finetune" in r.getMessage() for r in caplog.records)


def test_overwrite_leaves_nothing_of_the_replaced_run(config, tmp_path, caplog):
    """overwrite=true with save_model=false: the folder must not keep the old run's model/
    beside the new result.json (it said sparsity 0.9 next to a 0.5 model)."""
    run(config("method=magnitude", "sparsity=0.5"), tmp_path / "r")
    (tmp_path / "r" / "notes.txt").write_text("mine")  # the user's own file stays
    with caplog.at_level("INFO", logger="pruneflow"):
        result = run(config("method=magnitude", "sparsity=0.9", "overwrite=true", "save_model=false"), tmp_path / "r")
    # the log file is appended to: the line says where the new run's lines start
    assert "the log lines above this one are that run's, this run's start here" in caplog.text
    assert result["sparsity"]["measured"] == pytest.approx(0.9, abs=1e-4)
    assert not (tmp_path / "r" / "model").exists() and (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "r" / "result.json").read_text())["sparsity"]["target"] == 0.9


def test_the_finetune_key_holds_what_the_dense_model_depends_on(config, tmp_path):
    """Another method, sparsity or bookkeeping setting reuses the cached fine-tune; another
    seed, finetune stage, task or trainer setting, or another length, fine-tunes again."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pruneflow.runner import Run
    from pruneflow.utils import stable_hash

    base = config("method=magnitude", "sparsity=0.5")

    def key(steps: int = 40, total: int | None = None, **changes: object) -> str:
        cfg = base.copy()
        for k, v in changes.items():
            OmegaConf.update(cfg, k.replace("__", "."), v, merge=False)
        r = Run(cfg, tmp_path)
        r.plan = SimpleNamespace(stages={"finetune": SimpleNamespace(steps=steps)})
        # trainer.continuous: the finetune's LR follows the schedule over every stage
        r.optim = None if total is None else SimpleNamespace(schedule=SimpleNamespace(total_steps=total, warmup_steps=0))
        return stable_hash(r.finetune_key())

    first = key()
    assert key(sparsity=0.9, stages__prune__steps=5, method__name="random") == first
    assert key(trainer__checkpoint_every=7, trainer__log_every=3, trainer__device="cpu", trainer__torch_threads=1, cache_dir="x") == first
    for other in ({"seed": 1}, {"stages__finetune__lr": 0.01}, {"task__max_train_samples": 256}, {"trainer__weight_decay": 0.1},
                  {"model__pretrained": True}, {"steps": 41}):
        assert key(**other) != first, other
    assert key(total=100) != key(total=120)
    # other data at the same task.path (its files' sizes and times) is another fine-tune
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    same_path = key(task__path=str(data))
    assert key(task__path=str(data)) == same_path
    (data / "train.jsonl").write_text("{}\n{}\n")
    assert key(task__path=str(data)) != same_path


def test_a_finished_run_is_skipped_only_for_its_own_settings(config, tmp_path):
    """Bookkeeping settings (checkpoint_every, eval_batch_size, ...) may differ; others are
    refused, from checkpoints/config.json or, once checkpoints/ was deleted, from result.json."""
    from omegaconf import OmegaConf

    from pruneflow.runner import _comparable, _differences, check_finished_config
    from pruneflow.utils import atomic_write_json

    cfg = config("method=magnitude", "sparsity=0.5")
    done = {"config": OmegaConf.to_container(cfg, resolve=True)}
    same = config("method=magnitude", "sparsity=0.5", "trainer.checkpoint_every=7", "stages.eval_batch_size=32")
    other = config("method=magnitude", "sparsity=0.9")
    saved = tmp_path / "r" / "checkpoints" / "config.json"
    atomic_write_json(saved, _comparable(cfg))
    for _ in ("checkpoints/config.json", "result.json"):
        check_finished_config(same, tmp_path / "r", done)
        with pytest.raises(UserError, match=r"holds a finished run with other settings \(sparsity: 0.5 -> 0.9\)"):
            check_finished_config(other, tmp_path / "r", done)
        saved.unlink(missing_ok=True)
    # under task.metric_average=batch_mean (SEVEN's per-batch GLUE metrics) the evaluation
    # batch size changes the metric: a setting there (it was free everywhere)
    run = {"task": {"name": "glue/mrpc", "metric_average": "batch_mean"}, "stages": {"eval_batch_size": 32}, "seed": 0}
    assert _comparable(run)["stages.eval_batch_size"] == 32
    run["task"]["metric_average"] = "corpus"
    assert "stages.eval_batch_size" not in _comparable(run)
    from pruneflow.report import settings_of

    batch_mean = {"task": {"name": "glue/mrpc", "metric_average": "batch_mean"}, "stages": {"eval_batch_size": 64}}
    assert settings_of({"config": batch_mean, "overrides": ["stages.eval_batch_size=64"]}) == "stages.eval_batch_size=64"
    corpus = {"task": {"name": "glue/mrpc", "metric_average": "corpus"}, "stages": {"eval_batch_size": 64}}
    assert settings_of({"config": corpus, "overrides": ["stages.eval_batch_size=64"]}) == ""
    # a float-typed setting typed as 3 resolves to 3.0: one spelling, the one typed
    epochs = {"stages": {"finetune": {"epochs": 3.0, "lr": 0.001}}}
    assert settings_of({"config": epochs, "overrides": ["stages.finetune.epochs=3", "stages.finetune.lr=1e-3"]}) == (
        "stages.finetune.epochs=3 stages.finetune.lr=0.001")
    assert settings_of({"config": epochs, "overrides": ["stages.finetune.epochs=3.0"]}) == "stages.finetune.epochs=3"
    # a setting that only one side has is a difference too
    assert _differences({"seed": 0}, {"seed": 0, "method.beta": 1}) == "method.beta: '<unset>' -> 1"
    assert _differences({"seed": 0, "method.beta": 1}, {"seed": 0}) == "method.beta: 1 -> '<unset>'"


def test_resuming_with_changed_settings_needs_allow_config_change_once(config, tmp_path):
    """allow_config_change=true resumes with the changes and keeps them as the run's
    settings: resuming again with them needs no second allow_config_change."""
    from pruneflow.runner import _comparable, check_resume_config
    from pruneflow.utils import atomic_write_json

    atomic_write_json(tmp_path / "checkpoints" / "config.json", _comparable(config("stages.recover.lr=0.001")))
    lower = config("stages.recover.lr=0.0001")
    with pytest.raises(UserError, match=r"unfinished run with other settings \(stages.recover.lr: 0.001 -> 0.0001\)"):
        check_resume_config(lower, tmp_path)
    check_resume_config(config("stages.recover.lr=0.0001", "allow_config_change=true"), tmp_path)
    check_resume_config(lower, tmp_path)
    with pytest.raises(UserError, match=r"stages.recover.lr: 0.0001 -> 0.001"):
        check_resume_config(config("stages.recover.lr=0.001"), tmp_path)


def test_allow_config_change_with_no_run_to_resume_is_refused(config, tmp_path):
    """Before, it was ignored and a new run started: typically a re-run without the stopped
    run's hydra.run.dir, taken for a resume."""
    from pruneflow.runner import check_resume_config

    with pytest.raises(UserError, match=r"allow_config_change=true resumes an unfinished run .* holds no run to resume"):
        check_resume_config(config("allow_config_change=true"), tmp_path)
    check_resume_config(config(), tmp_path)  # a new run
    (tmp_path / "checkpoints").mkdir()  # a run of an older version, without checkpoints/config.json: resumable
    check_resume_config(config("allow_config_change=true"), tmp_path)


def test_overwrite_removes_every_output_of_a_run_and_nothing_else(tmp_path):
    from pruneflow.runner import RUN_OUTPUTS, remove_run_outputs

    for name in ("checkpoints", "model", "adapter", "wandb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    for name in ("result.json", "predictions.jsonl", "predictions_mnli_mm.jsonl", "spp_path.json", "error.txt", "stopped.txt", ".wandb_run_id"):
        (tmp_path / name).write_text("x")
    for name in ("notes.txt", ".hydra", "run.log"):
        (tmp_path / name).write_text("mine")
    removed = remove_run_outputs(tmp_path)
    assert len(removed) == 11 and all(any(Path(tmp_path / r).match(p) for p in RUN_OUTPUTS) for r in removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "notes.txt", "run.log"]


def test_a_refused_setting_marks_only_a_new_folder_for_removal(config, tmp_path):
    """The CLI removes a refused run's folder only when it held no run before (``before_work``):
    a resume refused for changed settings keeps the run that is there."""
    from pruneflow.runner import _comparable
    from pruneflow.utils import atomic_write_json

    with pytest.raises(UserError, match="trainer.weight_decay") as fresh:
        run(config("trainer.weight_decay=-1"), tmp_path / "new")
    assert fresh.value.before_work is True
    atomic_write_json(tmp_path / "old" / "checkpoints" / "config.json", _comparable(config("sparsity=0.5")))
    with pytest.raises(UserError, match="unfinished run with other settings") as old:
        run(config("sparsity=0.7"), tmp_path / "old")
    assert old.value.before_work is False


def test_a_finished_run_is_answered_from_its_result_and_overwrite_starts_it_over(config, tmp_path, monkeypatch):
    """run() on a folder with a result.json returns it without any work, but only for the
    run's own settings; overwrite=true removes the old outputs and prepares a new run."""
    from omegaconf import OmegaConf

    from pruneflow import runner
    from pruneflow.utils import atomic_write_json

    cfg = config("method=magnitude", "sparsity=0.5")
    done = {"config": OmegaConf.to_container(cfg, resolve=True), "metrics": {"final": {"accuracy": 0.5}}}
    atomic_write_json(tmp_path / "r" / "result.json", done)
    atomic_write_json(tmp_path / "r" / "checkpoints" / "config.json", runner._comparable(cfg))
    (tmp_path / "r" / "model").mkdir()

    def prepared(self):  # noqa: ANN001, ANN202
        raise UserError("prepared a new run")

    monkeypatch.setattr(runner.Run, "prepare", prepared)
    assert run(config("method=magnitude", "sparsity=0.5", "trainer.checkpoint_every=7"), tmp_path / "r") == done
    with pytest.raises(UserError, match=r"holds a finished run with other settings \(sparsity: 0.5 -> 0.9\)"):
        run(config("method=magnitude", "sparsity=0.9"), tmp_path / "r")
    assert (tmp_path / "r" / "result.json").exists() and (tmp_path / "r" / "model").exists()
    with pytest.raises(UserError, match="prepared a new run"):
        run(config("method=magnitude", "sparsity=0.9", "overwrite=true"), tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".pruneflow.lock"]


def test_a_refused_command_leaves_the_record_of_the_run_in_the_folder(config, tmp_path):
    """The command's record (.hydra/) is written at once into a folder with no run, but into
    one holding an unfinished run only once its settings are accepted."""
    from pruneflow.runner import _comparable
    from pruneflow.utils import atomic_write_json

    recorded = []
    with pytest.raises(UserError, match="trainer.weight_decay"):
        run(config("trainer.weight_decay=-1"), tmp_path / "new", record=recorded.append)
    assert recorded == [tmp_path / "new"]
    atomic_write_json(tmp_path / "old" / "checkpoints" / "config.json", _comparable(config("sparsity=0.5")))
    with pytest.raises(UserError, match="unfinished run with other settings"):
        run(config("sparsity=0.7"), tmp_path / "old", record=recorded.append)
    assert recorded == [tmp_path / "new"]


def test_a_sparsity_that_keeps_no_weight_says_so(config, tmp_path, caplog):
    """sparsity=0.999999 keeps round(1e-6 * n) = 0 of the prunable weights: the run ends
    as asked, and says that every one of them is zero (it said nothing)."""
    with caplog.at_level("WARNING", logger="pruneflow"):
        result = run(config("method=magnitude", "sparsity=0.999999"), tmp_path / "r")
    assert result["sparsity"]["measured"] == 1.0
    assert "Every prunable weight of the final model is zero" in caplog.text
