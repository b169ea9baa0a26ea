"""W&B: one offline run per job under the run dir; an unreachable or logged-out W&B never fails a run."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from sweep_helpers import compose, tiny_config_dir

from pruneflow.loggers import NullLogger, WandbLogger, make_logger

# A closed local port: nothing is ever reached, whatever the machine's network.
UNREACHABLE = "http://127.0.0.1:9"


def logger_cfg(**logger) -> OmegaConf:  # noqa: ANN003
    base = {"name": "wandb", "mode": "offline", "project": "pruneflow-test", "entity": None, "group": None,
            "run_name": None, "tags": ["t"], "init_timeout": 5}
    return OmegaConf.create({
        "logger": {**base, **logger}, "method": {"name": "magnitude"}, "model": {"name": "tiny_vit"},
        "task": {"name": "digits"}, "sparsity": 0.7, "seed": 3,
    })


@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", UNREACHABLE)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_init_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or object())
    WandbLogger(logger_cfg(group="sweep-a"), tmp_path)
    assert seen["mode"] == "offline" and seen["dir"] == str(tmp_path) and seen["group"] == "sweep-a"
    assert seen["name"] == "magnitude-tiny_vit-digits-s0.7-seed3"
    assert seen["config"]["sparsity"] == 0.7 and seen["config"]["logger"]["project"] == "pruneflow-test"
    assert seen["reinit"] == "finish_previous"  # one run per job, also in a single-process sweep


@pytest.mark.slow
def test_offline_run_created_under_run_dir(tmp_path: Path, no_wandb_login: None) -> None:
    logger = make_logger(logger_cfg(), tmp_path)
    assert isinstance(logger, WandbLogger)
    logger.log({"prune/loss": 1.0})
    logger.summary({"metrics": {"final": {"accuracy": 0.9}}, "sparsity": {"measured": 0.7, "target": 0.7}, "params": {"nonzero": 5}})
    logger.finish()
    runs = offline_runs(tmp_path)
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))  # what `wandb sync` uploads


@pytest.mark.slow
def test_unreachable_server_falls_back_to_offline(tmp_path: Path, no_wandb_login: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # "logged in", but the server cannot be reached
    logger = make_logger(logger_cfg(mode="online", init_timeout=3), tmp_path)
    assert isinstance(logger, WandbLogger) and logger.mode == "offline"
    logger.finish()
    assert len(offline_runs(tmp_path)) == 1


def test_broken_wandb_never_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import wandb

    def boom(**kw):  # noqa: ANN003, ANN202
        raise RuntimeError("wandb exploded")

    monkeypatch.setattr(wandb, "init", boom)
    assert isinstance(make_logger(logger_cfg(mode="online"), tmp_path), NullLogger)


@pytest.mark.slow
def test_run_online_without_login_finishes_offline(tmp_path: Path, no_wandb_login: None, caplog: pytest.LogCaptureFixture) -> None:
    from pruneflow.runner import run

    conf = tiny_config_dir(tmp_path)
    overrides = ["experiment=pf_tiny", "method=magnitude", "logger=wandb", "logger.mode=online", "logger.init_timeout=5",
                 f"cache_dir={tmp_path / 'cache'}"]
    cfg = compose(overrides, extra_dir=conf)
    with caplog.at_level("WARNING", logger="pruneflow"):
        r = run(cfg, tmp_path / "run", overrides)
    assert r["sparsity"]["measured"] == pytest.approx(0.7, abs=1e-5)
    assert (tmp_path / "run" / "result.json").exists()
    assert len(offline_runs(tmp_path / "run")) == 1
    assert "logging offline instead" in caplog.text
    # the warning points to the failed attempt's folder only where one was made (none when refused for want of a key)
    made = sorted(p.name for p in (tmp_path / "run" / "wandb").glob("run-*"))
    assert (f"failed attempt's own folder (wandb/{made[-1]})" in caplog.text) if made else ("failed attempt" not in caplog.text)


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_its_wandb_run_and_overwrite_starts_a_new_one(tmp_path: Path, no_wandb_login: None) -> None:
    """Every launch of one run folder (the first, and each resume after a stop) logs to one W&B
    run id, so ``wandb sync`` uploads one run per job; overwrite=true removes it with the rest."""
    from pruneflow.runner import remove_run_outputs

    for _ in range(2):
        logger = make_logger(logger_cfg(), tmp_path)
        logger.log({"prune/loss": 1.0})
        logger.finish()
    runs = offline_runs(tmp_path)
    ids = {r.name.split("-")[3] for r in runs}  # offline-run-<date>_<time>-<id>[-<n>]
    assert len(runs) == 2 and ids == {(tmp_path / ".wandb_run_id").read_text().strip()}
    assert {"wandb", ".wandb_run_id"} <= set(remove_run_outputs(tmp_path)) and not (tmp_path / "wandb").exists()
    make_logger(logger_cfg(), tmp_path).finish()
    (new,) = offline_runs(tmp_path)
    assert new.name.split("-")[3] not in ids
