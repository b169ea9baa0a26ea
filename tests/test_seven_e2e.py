"""End-to-end runs of SEVEN on the offline default (tiny ViT on digits), cut short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruneflow.errors import UserError
from pruneflow.runner import run


def recount(run_dir: Path, names: list[str]) -> float:
    state = load_file(str(run_dir / "model" / "model.safetensors"))
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros / sum(state[n].numel() for n in names)


@pytest.mark.slow
def test_seven_reaches_the_target_sparsity(config, tmp_path: Path) -> None:  # noqa: ANN001
    result = run(config("method=seven", "sparsity=0.7"), tmp_path / "run")
    names = list(result["sparsity"]["per_layer"])
    assert len(names) == 16  # 4 blocks x (qkv, proj, fc1, fc2)
    measured = recount(tmp_path / "run", names)
    assert abs(measured - 0.7) <= 0.005
    assert measured == pytest.approx(result["sparsity"]["measured"], abs=1e-6)
    assert set(result["metrics"]) == {"finetune", "prune", "recover", "final"}


@pytest.mark.slow
def test_seven_pre_prunes_without_updating_weights(config, tmp_path: Path) -> None:  # noqa: ANN001
    result = run(config("method=seven_pre", "sparsity=0.5", "stages.recover.steps=0"), tmp_path / "run")
    assert "prune" in result["metrics"] and "recover" not in result["metrics"]
    names = list(result["sparsity"]["per_layer"])
    pruned = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    (finetuned_file,) = (tmp_path / "cache").rglob("model.safetensors")
    finetuned = load_file(str(finetuned_file))
    for n in names:  # kept weights are exactly the finetuned ones; the rest is zero
        kept = pruned[n] != 0
        assert torch.equal(pruned[n][kept], finetuned[n][kept])
    assert abs(recount(tmp_path / "run", names) - 0.5) <= 0.005
    json.dumps(result)  # serialisable


def test_a_glue_preset_on_another_task_is_a_user_error(config, tmp_path: Path) -> None:  # noqa: ANN001
    # (a preset whose window does not fit its task: tests/test_score_methods.py)
    with pytest.raises(UserError, match="method.preset.*not a GLUE task"):
        run(config("method=seven", "method.preset=rte", "logger=none", fast=False), tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()
