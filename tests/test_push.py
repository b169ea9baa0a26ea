"""Model cards and pruneflow-push (offline: dry run, the upload mocked at the huggingface_hub boundary)."""

from __future__ import annotations

import json

import pytest
import yaml

from pruneflow.push import main as push_main
from pruneflow.runner import run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):  # noqa: ANN001, ANN201
    from conftest import make_config

    tmp = tmp_path_factory.mktemp("push")
    overrides = ["method=magnitude", "sparsity=0.6", "stages.finetune.epochs=null", "stages.finetune.steps=20", "stages.prune.epochs=null",
                 "stages.prune.steps=10", "stages.recover.epochs=null", "stages.recover.steps=5", "task.max_train_samples=256",
                 "logger=none", "speed.enabled=false", "cache=false"]
    run(make_config(overrides, tmp), tmp / "run", overrides)
    return tmp / "run"


def test_model_card_is_in_the_hubs_format(finished_run):
    text = (finished_run / "model" / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    result = json.loads((finished_run / "result.json").read_text())
    assert meta["library_name"] == "timm" and "pruneflow" in meta["tags"] and "magnitude" in meta["tags"]
    assert meta["pruneflow"]["sparsity"] == result["sparsity"]["measured"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == pytest.approx(result["metrics"]["final"], abs=1e-6)
    assert "| `blocks.*.attn.qkv.weight` | 4 |" in text  # sparsity per layer type
    assert "dense (after fine-tuning)" in text and "pruneflow method=magnitude sparsity=0.6" in text
    assert result["provenance"]["git_sha"] is None or str(result["provenance"]["git_sha"]) in text


def test_push_dry_run_lists_without_network(finished_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_main([str(finished_run), "me/tiny-digits-magnitude", "--dry-run", "--with-result"]) == 0
    out = capsys.readouterr().out
    assert "would upload to https://huggingface.co/me/tiny-digits-magnitude (private)" in out
    for name in ("model.safetensors", "config.json", "README.md", "pruneflow/result.json"):
        assert name in out


def test_push_offline_says_it_cannot_reach_the_hub(finished_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert push_main([str(finished_run), "me/x"]) == 2
    assert "Cannot reach the Hugging Face Hub" in capsys.readouterr().err


def test_push_uploads_through_huggingface_hub(finished_run, monkeypatch, capsys):
    import huggingface_hub

    calls: dict = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok, repo_type):  # noqa: ANN001, ANN201
            calls["repo"] = (repo_id, private, exist_ok, repo_type)

        def create_commit(self, repo_id, operations, commit_message, repo_type):  # noqa: ANN001, ANN201
            calls["files"] = sorted(op.path_in_repo for op in operations)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_main([str(finished_run), "me/tiny"]) == 0
    assert calls["repo"] == ("me/tiny", True, True, "model")  # private by default
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert push_main([str(finished_run), "not-a-repo-id"]) == 2
