"""Every ``conf/experiment`` config: well formed, composes, and runs as an offline miniature.

A miniature keeps the experiment's method, schedule, trainer settings and
``experiment_info`` but swaps in an offline model (bert_tiny / a tiny ViT,
random init), small local data written in the hub's format (``task.path``) and a
few steps per stage. Experiments whose method or task is not available in this
checkout are skipped with the reason; magnitude/movement experiments whose task
is missing still run their settings on the offline default (digits).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from sweep_helpers import compose

from pruneflow.methods import METHODS
from pruneflow.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))

# DESIGN.md §5: metric keys per task.
TASK_METRICS: dict[str, set[str]] = {
    "glue/cola": {"matthews_correlation"}, "glue/stsb": {"pearson", "spearmanr"},
    "glue/mrpc": {"accuracy", "f1"}, "glue/qqp": {"accuracy", "f1"}, "glue/mnli": {"accuracy", "accuracy_mm"},
    "glue/sst2": {"accuracy"}, "glue/qnli": {"accuracy"}, "glue/rte": {"accuracy"},
    "squad/v1": {"exact_match", "f1"}, "squad/v2": {"exact_match", "f1", "has_ans_f1", "no_ans_f1"},
    "imagenet": {"accuracy", "top5"}, "cifar10": {"accuracy", "top5"}, "cifar100": {"accuracy", "top5"},
    "digits": {"accuracy", "top5"},
}
# Extra overrides a miniature needs: presets that would set paper-length stages are switched off.
SANH_MINI = ["schedule.initial_warmup=2", "schedule.final_warmup=2", "trainer.warmup_steps=2"]  # their 5400-step phases, shrunk
MINIATURE_OVERRIDES: dict[str, list[str]] = {
    "seven/glue_bert_base": ["method.preset=null"],
    **{f"{m}/{t}_bert_base": SANH_MINI for m in ("movement", "magnitude") for t in ("squad", "mnli", "qqp")},
}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())


def choices(name: str) -> dict[str, str]:
    """The experiment's config-group choices, e.g. {"model": "bert_base", "task": "squad/v1", ...}."""
    out = {}
    for entry in load(name).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[key.removeprefix("override ").lstrip("/")] = value
    return out


def missing_pieces(name: str) -> list[str]:
    c = choices(name)
    missing = [f"{g}={c[g]}" for g in ("model", "task", "method", "schedule") if g in c and not (CONF / g / f"{c[g]}.yaml").exists()]
    if c["method"] not in METHODS:
        missing.append(f"method {c['method']} (pruneflow.methods)")
    if c["task"] not in TASKS:
        missing.append(f"task {c['task']} (pruneflow.tasks)")
    return sorted(set(missing))


# ----------------------------------------------------------------------------- well-formed
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_is_well_formed(name: str) -> None:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert "Source:" in text  # a comment citing the source
    cfg = load(name)
    c = choices(name)
    assert {"model", "task", "method"} <= set(c)
    info = cfg["experiment_info"]
    assert info["name"] == name and len(info["source"]) > 20
    for task, metrics in (info.get("published") or {}).items():
        assert task in TASK_METRICS, task
        for metric, value in metrics.items():
            assert metric in TASK_METRICS[task], (task, metric)
            curve = value if isinstance(value, dict) else {None: value}
            for sparsity, v in curve.items():
                assert sparsity is None or 0 <= float(sparsity) < 1
                assert -1 <= float(v) <= 1, "published numbers are fractions, like result.json"
    for key, value in (info.get("published_overall") or {}).items():
        assert key in ("glue_score", "params_reduction") and 0 < float(value) < 1
    for d in info.get("deviations") or []:  # structured: the report prints them under its table
        assert set(d) == {"what", "authors", "here", "restore"} and d["what"] and d["authors"] and d["here"]
    assert info.get("deviations"), "every experiment lists where it differs from its authors (or why it cannot say)"
    sweep = ((cfg.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    for task in str(sweep.get("task", "")).split(",") if "task" in sweep else []:
        assert task in TASK_METRICS, task
    for s in str(sweep.get("sparsity", "")).split(",") if "sparsity" in sweep else []:
        assert 0 <= float(s) < 1


def test_published_numbers_of_design_section_6() -> None:
    """Spot checks against DESIGN.md §6 so a typo in a config is caught."""
    pub = {n: load(n)["experiment_info"].get("published", {}) for n in EXPERIMENTS}
    assert pub["movement/squad_bert_base"]["squad/v1"] == {"exact_match": {0.9: 0.719, 0.97: 0.652}, "f1": {0.9: 0.817, 0.97: 0.763}}
    assert pub["magnitude/squad_bert_base"]["squad/v1"] == {"exact_match": {0.9: 0.677, 0.97: 0.401}, "f1": {0.9: 0.785, 0.97: 0.545}}
    assert pub["movement/mnli_bert_base"]["glue/mnli"] == {"accuracy": {0.9: 0.793, 0.97: 0.761}, "accuracy_mm": {0.9: 0.795, 0.97: 0.767}}
    assert pub["magnitude/qqp_bert_base"]["glue/qqp"] == {"accuracy": {0.9: 0.788, 0.97: 0.721}, "f1": {0.9: 0.751, 0.97: 0.584}}
    assert pub["seven_pre/glue_bert_base"]["glue/qqp"]["accuracy"][0.8] == 0.890
    assert pub["seven_pre/imagenet_vit_b32"]["imagenet"]["accuracy"][0.9] == 0.530
    assert pub["admm/glue_bert_base"] == {"glue/cola": {"matthews_correlation": 0.554}, "glue/rte": {"accuracy": 0.688}}
    assert load("spp/deit_imagenet")["experiment_info"]["published_overall"] == {"params_reduction": 0.706}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str, tmp_path: Path) -> None:
    """Composes through the typed schema; group files missing from this checkout are stubbed."""
    stubs = tmp_path / "stubs"
    for piece in missing_pieces(name):
        if "=" in piece:
            group, option = piece.split("=")
            path = stubs / group / f"{option}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"name: {option}\n")
    cfg = compose([f"experiment={name}"], extra_dir=stubs if stubs.exists() else None)
    assert cfg.experiment_info.name == name
    for group in ("model", "task", "method"):
        assert cfg[group].name == choices(name)[group]
    published = load(name)["experiment_info"].get("published") or {}
    assert {k: dict(v) for k, v in cfg.experiment_info.published.items()} == published



# ----------------------------------------------------------------------------- local data
WORDS = "the a movie film good bad great awful plot actor story fun dull long short very not".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))


GLUE_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_glue(root: Path, task: str, n_train: int = 64, n_eval: int = 32) -> None:
    rng = random.Random(0)
    n_labels = {"mnli": 3, "stsb": 0}.get(task, 2)
    splits = {"train": n_train}
    splits.update({"validation_matched": n_eval, "validation_mismatched": n_eval} if task == "mnli" else {"validation": n_eval})
    for split, n in splits.items():
        rows = []
        for i in range(n):
            row: dict[str, Any] = {col: sentence(rng) for col in GLUE_COLUMNS[task]}
            row["label"] = round(rng.uniform(0, 5), 2) if n_labels == 0 else rng.randrange(n_labels)
            row["idx"] = i
            rows.append(row)
        write_jsonl(root / f"{split}.jsonl", rows)


def write_squad(root: Path, n_train: int = 48, n_eval: int = 24) -> None:
    rng = random.Random(0)
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = []
        for i in range(n):
            context = sentence(rng) + " paris is the capital . " + sentence(rng)
            start = context.index("paris")
            rows.append({"id": f"{split}-{i}", "title": "t", "context": context, "question": "what is the capital ?",
                         "answers": {"text": ["paris"], "answer_start": [start]}})
        write_jsonl(root / f"{split}.jsonl", rows)


def write_imagefolder(root: Path, classes: int = 3, n_train: int = 8, n_eval: int = 3) -> None:
    from PIL import Image

    rng = random.Random(0)
    for split, n in (("train", n_train), ("val", n_eval)):
        for c in range(classes):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                color = tuple(min(255, 60 * c + rng.randint(0, 40)) for _ in range(3))
                Image.new("RGB", (32, 32), color).save(d / f"img{i}.png")


def miniature_overrides(name: str, tmp: Path) -> tuple[list[str], str]:
    """Offline overrides for an experiment, and the task the miniature runs."""
    c = choices(name)
    task = c["task"]
    steps = ["stages.finetune.steps=3", "stages.prune.steps=9", "stages.recover.steps=2", "stages.eval_batch_size=32"]
    steps += [f"stages.{s}.epochs=null" for s in ("finetune", "prune", "recover")]
    steps += [f"stages.{s}.batch_size=8" for s in ("finetune", "prune", "recover")]
    common = [f"experiment={name}", "logger=none", "speed.enabled=false", "save_model=false", "cache=false",
              "trainer.device=cpu", "trainer.torch_threads=1", *steps, *MINIATURE_OVERRIDES.get(name, [])]
    if task not in TASKS:  # substitute the offline default to exercise the experiment's settings
        return [*common, "task=digits", "model=tiny_vit", "task.max_train_samples=96", "task.max_eval_samples=40"], "digits"
    data = tmp / "data"
    if task.startswith("glue/"):
        write_glue(data, task.split("/")[1])
        model = ["model=bert_tiny"]
    elif task.startswith("squad/"):
        write_squad(data)
        model = ["model=bert_tiny"]
    else:
        write_imagefolder(data)
        model = ["model=tiny_vit", "model.kwargs.img_size=224", "model.kwargs.patch_size=32"]
    return [*common, *model, "model.pretrained=false", f"task.path={data}", "task.max_train_samples=64", "task.max_eval_samples=32"], task


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_miniature_runs(name: str, tmp_path: Path) -> None:
    c = choices(name)
    if c["method"] not in METHODS or not (CONF / "method" / f"{c['method']}.yaml").exists():
        pytest.skip(f"method {c['method']} is not in this checkout")
    if c["task"] not in TASKS and c["method"] not in ("magnitude", "movement"):
        pytest.skip(f"task {c['task']} is not in this checkout")
    from pruneflow.report import main as report
    from pruneflow.runner import run

    overrides, task = miniature_overrides(name, tmp_path)
    cfg = compose(overrides)
    r = run(cfg, tmp_path / "run", overrides)
    assert r["config"]["experiment_info"]["name"] == name
    assert r["task"] == task and r["method"] == c["method"]
    assert TASK_METRICS[task] <= set(r["metrics"]["final"])
    target = r["sparsity"]["target"]
    if c["method"] != "spp":  # SPP counts structurally removed weights against the original shapes
        assert r["sparsity"]["measured"] == pytest.approx(target, abs=2e-3)
    assert report([str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert name in md
    published = load(name)["experiment_info"].get("published") or {}
    if task in published:
        assert "(published)" in md
