"""Shared fixtures: compose configs with Hydra's compose API, run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# `make test` runs the suite on every core (pytest-xdist, one worker per core): each worker
# and the runs it starts then use one thread, as two 2-thread workers on 2 cores spin-wait
# on each other (an in-process test took 4x its time alone). Before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from pruneflow.cli import CONFIG_DIR
from pruneflow.config import register_configs

ROOT = Path(__file__).resolve().parent.parent

# Small stages for the offline default: a full pipeline in a few seconds.
FAST = [
    "stages.finetune.epochs=null",
    "stages.finetune.steps=40",
    "stages.prune.epochs=null",
    "stages.prune.steps=20",
    "stages.recover.epochs=null",
    "stages.recover.steps=20",
    "task.max_train_samples=512",
    "logger=none",
    "speed.enabled=false",
]


# Shorter still, for tests that start the CLI several times (resume, signals, faults):
# each process start costs seconds, the stages should not add many more.
SMALL = [
    "stages.finetune.epochs=null", "stages.finetune.steps=12",
    "stages.prune.epochs=null", "stages.prune.steps=10",
    "stages.recover.epochs=null", "stages.recover.steps=6",
    "task.max_train_samples=256", "task.max_eval_samples=120",
    "logger=none", "speed.enabled=false", "trainer.checkpoint_every=3",
]


def make_config(overrides: list[str], tmp_path: Path) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture
def config(tmp_path: Path):  # noqa: ANN201
    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        return make_config([*(FAST if fast else []), *overrides], tmp_path)

    return _make


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `pruneflow ARGS` as a user would (a fresh process), from `cwd`."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("PRUNEFLOW_TEST_KILL_AT", None) if not env or "PRUNEFLOW_TEST_KILL_AT" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "pruneflow.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def read_result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


@pytest.fixture(scope="module")
def lm_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small WikiText-2-shaped text folder (train/test .txt) for the causal-LM tests."""
    from task_data import write_lm_text

    return write_lm_text(tmp_path_factory.mktemp("lm") / "wikitext2")
