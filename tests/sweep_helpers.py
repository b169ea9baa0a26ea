"""Helpers for end-to-end CLI tests of sweeps, launchers and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Seconds-long runs on the offline default (digits + tiny ViT). An experiment file in a
# test-only config dir keeps the sweep's job directory names short.
TINY = """# @package _global_
defaults:
  - override /logger: none
speed:
  enabled: false
save_model: false
stages:
  finetune: {epochs: null, steps: 3, batch_size: 32}
  prune: {epochs: null, steps: 3, batch_size: 32}
  recover: {epochs: null, steps: 2, batch_size: 32}
  eval_batch_size: 64
task:
  max_train_samples: 128
  max_eval_samples: 40
trainer:
  torch_threads: 1
"""


def tiny_config_dir(tmp: Path) -> Path:
    conf = tmp / "testconf"
    (conf / "experiment").mkdir(parents=True, exist_ok=True)
    (conf / "experiment" / "pf_tiny.yaml").write_text(TINY)
    return conf


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["HYDRA_FULL_ERROR"] = "1"
    e.update(extra)
    return e


def run_cli(args: list[str], cwd: Path, config_dir: Path | None = None, prefix: list[str] | None = None,
            extra_env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(prefix or ["-m", "pruneflow.cli"])]
    if config_dir is not None:
        cmd += ["--config-dir", str(config_dir)]
    cmd += args
    return subprocess.run(cmd, cwd=cwd, env=env(**(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def result(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "result.json").read_text())


def compose(overrides: list[str], extra_dir: Path | None = None, config_dir: Path = ROOT / "conf"):  # noqa: ANN201
    """The job config the ``pruneflow`` command would build (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pruneflow.config import register_configs

    register_configs()
    if extra_dir is not None:
        overrides = [*overrides, f"hydra.searchpath=[file://{extra_dir}]"]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def command_problem(args: list[str]) -> str | None:
    """What the checks made before any work say about ``pruneflow ARGS`` (None: accepted):
    a sweep's jobs one by one through the CLI's pre-check, as the command checks them; a
    single run's composed config through the runner's checks, devices not checked."""
    from pruneflow.cli import precheck
    from pruneflow.config import register_configs
    from pruneflow.runner import check_settings

    register_configs()  # as the command does before its pre-check
    if "-m" in args:
        return precheck(args)
    try:
        check_settings(compose(args), False, args)
    except Exception as e:  # noqa: BLE001 - reported with its command
        return str(e)
    return None
