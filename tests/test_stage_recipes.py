"""Stage recipes (``conf/stages/``): each model config picks the stage lengths and learning
rates it is fine-tuned with, so ``pruneflow model=bert_base task=glue/sst2 method=...``
fine-tunes a pretrained BERT at lr 2e-5 instead of the offline default's from-scratch
3e-3 (at which a pretrained encoder does not learn)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from sweep_helpers import compose
from task_data import glue_rows, write_split

from pruneflow.methods import METHODS, get_method_class
from pruneflow.runner import recipe_note, run
from pruneflow.validation import explicit_settings

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STAGES = ("finetune", "prune", "recover")


def _recipe(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "stages" / f"{name}.yaml"))


@pytest.mark.parametrize(("model", "recipe"), [
    ("bert_base", "pretrained_text"), ("roberta_base", "pretrained_text"), ("minilm", "pretrained_text"),
    ("deit_tiny", "pretrained_vision"), ("deit_small", "pretrained_vision"), ("vit_b32", "pretrained_vision"),
    ("tiny_vit", "default"), ("bert_tiny", "default"), ("tiny_llama", "default"),
])
def test_each_model_composes_its_stage_recipe(model: str, recipe: str) -> None:
    stages = OmegaConf.to_container(compose([f"model={model}"]).stages)
    want = _recipe(recipe)
    assert stages["name"] == recipe
    for stage in STAGES:
        for key in ("epochs", "steps", "lr", "batch_size"):
            assert stages[stage][key] == want[stage][key], (stage, key)
    pretrained = OmegaConf.load(CONF / "model" / f"{model}.yaml").get("pretrained", False)
    if pretrained:  # fine-tuning rates; the from-scratch recipe's 3e-3 / 1e-3 are 15-150x these
        assert all(stages[s]["lr"] <= 1e-4 for s in STAGES)


def test_the_command_line_still_chooses_the_recipe_and_its_values() -> None:
    cfg = compose(["model=bert_base", "stages=default"])
    assert cfg.stages.name == "default" and cfg.stages.finetune.lr == _recipe("default")["finetune"]["lr"]
    cfg = compose(["model=bert_base", "stages.finetune.lr=5e-5"])
    assert cfg.stages.name == "pretrained_text" and cfg.stages.finetune.lr == 5e-5 and cfg.stages.prune.lr == 2e-5
    cfg = compose(["model=tiny_vit", "stages=pretrained_vision"])
    assert cfg.stages.name == "pretrained_vision" and cfg.stages.finetune.lr == 1e-4


def test_a_recipe_is_no_setting_of_its_own() -> None:
    """A model's recipe, or a recipe chosen with stages=..., counts as the stage defaults:
    method=dense (no prune stage) is not told that the recipe's stages.prune would be
    ignored; a stage value typed on top of it still is a setting."""
    assert not any(k.startswith("stages") for k in explicit_settings(compose(["model=minilm", "method=dense"])))
    assert not any(k.startswith("stages") for k in explicit_settings(compose(["model=minilm", "stages=default", "method=dense"])))
    explicit = explicit_settings(compose(["model=minilm", "method=dense", "stages.prune.epochs=1"]))
    assert explicit == {"stages.prune.epochs": 1.0}


def test_spp_searches_its_masks_at_its_own_rate_whatever_the_recipe(config, tmp_path: Path) -> None:  # noqa: ANN001
    """SPP's search trains masks, not weights: it runs at method.search_lr (the authors' 1e-3),
    not at a recipe's weight-training rate (1e-4 for pretrained ViTs, 2e-5 for BERT)."""
    result = run(config("method=spp", "sparsity=0.5", "stages=pretrained_vision", "speed.enabled=false"), tmp_path / "run")
    assert result["config"]["stages"]["prune"]["lr"] == 1e-4
    assert result["method_info"]["search_lr"] == 1e-3
    result = run(config("method=spp", "sparsity=0.5", "method.search_lr=0.01", "speed.enabled=false"), tmp_path / "run2")
    assert result["method_info"]["search_lr"] == 0.01


def test_a_model_trained_from_scratch_under_a_pretrained_recipe_is_noted() -> None:
    typed = ["model=deit_tiny", "model.pretrained=false"]
    note = recipe_note(compose(typed), typed)
    assert note is not None and "stages=pretrained_vision" in note and "stages=default" in note
    for typed in (["model=deit_tiny"],                                                       # pretrained weights
                  ["model=deit_tiny", "model.pretrained=false", "stages=pretrained_vision"],  # chosen on the command line
                  ["model=deit_tiny", "model.pretrained=false", "model.path=/weights"],       # the user's own weights
                  ["model=tiny_vit"], ["model=bert_tiny"]):                                  # from scratch, from-scratch recipe
        assert recipe_note(compose(typed), typed) is None, typed


EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_does_not_depend_on_its_models_recipe(name: str) -> None:
    """A paper setting pins every stage value its run uses, so a recipe can change without
    changing any experiment (a prune stage without weight updates, scoring-only or SPP's
    search, has no learning rate to pin)."""
    cfg = compose([f"experiment={name}"])
    a = OmegaConf.to_container(cfg.stages)
    b = OmegaConf.to_container(compose([f"experiment={name}", "stages=default"]).stages)
    trains = cfg.method.name in METHODS and get_method_class(cfg.method.name).updates_weights and a["prune"]["update_weights"] is not False
    for stage in STAGES:
        for key in ("epochs", "steps", "lr", "batch_size", "update_weights"):
            if stage == "prune" and key == "lr" and not trains:
                continue
            assert a[stage][key] == b[stage][key], (stage, key)
    assert a["eval_batch_size"] == b["eval_batch_size"]


@pytest.mark.slow
def test_pretrained_minilm_learns_with_its_default_stages(tmp_path: Path) -> None:
    """The command a user types without stage settings: the pretrained MiniLM learns an
    easy sentiment task (under the from-scratch recipe it stayed at chance, 0.41 on the
    same kind of data)."""
    data = tmp_path / "sst2"
    write_split(data, "train", glue_rows("sst2", 256), "jsonl")
    write_split(data, "validation", glue_rows("sst2", 64, seed=1), "jsonl")
    overrides = ["model=minilm", "task=glue/sst2", f"task.path={data}", "task.max_seq_length=32", "method=magnitude",
                 "sparsity=0.5", "logger=none", "cache=false", "speed.enabled=false"]
    result = run(compose(overrides), tmp_path / "run", overrides)
    assert result["metrics"]["finetune"]["accuracy"] >= 0.9
    assert result["metrics"]["final"]["accuracy"] >= 0.9
    assert result["config"]["stages"]["name"] == "pretrained_text"
    assert result["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
