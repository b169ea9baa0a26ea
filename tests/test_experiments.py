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
from omegaconf import OmegaConf
from sweep_helpers import command_problem, compose
from task_data import write_lm_text

from pruneflow.methods import METHODS
from pruneflow.published import find_point, published_points
from pruneflow.tasks import TASKS
from pruneflow.validation import unknown_key_problem

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ALL_EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
# Tables (hydra.sweeper.rows): one sweep over per-method experiments; tested apart below.
TABLES = [n for n in ALL_EXPERIMENTS  # a table experiment: hydra.sweeper.rows (not the word "rows:" in a comment)
          if "rows" in ((yaml.safe_load((CONF / "experiment" / f"{n}.yaml").read_text()).get("hydra") or {}).get("sweeper") or {})]
EXPERIMENTS = [n for n in ALL_EXPERIMENTS if n not in TABLES]

# DESIGN.md §5: metric keys per task.
TASK_METRICS: dict[str, set[str]] = {
    "glue/cola": {"matthews_correlation"}, "glue/stsb": {"pearson", "spearmanr"},
    "glue/mrpc": {"accuracy", "f1"}, "glue/qqp": {"accuracy", "f1"}, "glue/mnli": {"accuracy", "accuracy_mm"},
    "glue/sst2": {"accuracy"}, "glue/qnli": {"accuracy"}, "glue/rte": {"accuracy"},
    "squad/v1": {"exact_match", "f1"}, "squad/v2": {"exact_match", "f1", "has_ans_f1", "no_ans_f1"},
    "imagenet": {"accuracy", "top5"}, "cifar10": {"accuracy", "top5"}, "cifar100": {"accuracy", "top5"},
    "digits": {"accuracy", "top5"},
    "lm/wikitext2": {"perplexity"}, "lm/c4": {"perplexity"},
}
# zero-shot accuracies that causal-LM experiments publish (lm-evaluation-harness task/metric)
ZERO_SHOT_METRICS = {f"{t}/{m}" for t in ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
                     for m in ("acc", "acc_norm")} | {"average/acc"}
# Extra overrides a miniature needs: presets that would set paper-length stages are switched off.
SANH_MINI = ["schedule.initial_warmup=2", "schedule.final_warmup=2", "trainer.warmup_steps=2"]  # their 5400-step phases, shrunk
MINIATURE_OVERRIDES: dict[str, list[str]] = {
    "seven/glue_bert_base": ["method.preset=null", "method.lengthen_to_fit=false"],
    # PLATON's warm-ups (300-5400 steps) shrunk to the miniature's 9 prune steps
    **{f"platon/{t}_bert_base": ["schedule.initial_warmup=2", "schedule.final_warmup=3", "method.deltaT=2"] for t in
       ("mnli", "qqp", "qnli", "sst2", "rte", "mrpc", "cola", "stsb", "squad")},
    **{f"{m}/{t}_bert_base": SANH_MINI for m in ("movement", "magnitude", "soft_movement") for t in ("squad", "mnli", "qqp")},
    # L0 with equal thresholds has no schedule at all (any schedule.* is rejected as unused)
    **{f"l0/{t}_bert_base": ["trainer.warmup_steps=2"] for t in ("squad", "mnli", "qqp")},
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
    composed = OmegaConf.to_container(compose([f"experiment={name}"]).experiment_info)
    for p in published_points(composed):
        assert p.task in TASK_METRICS, p.task
        assert p.metric in TASK_METRICS[p.task] | (ZERO_SHOT_METRICS if p.task.startswith("lm/") else set()), (p.task, p.metric)
        assert p.method is None or p.method == "dense" or p.method in METHODS, p.method
        assert p.sparsity is None or 0 <= p.sparsity < 1
        assert p.metric == "perplexity" or -1 <= p.value <= 1, "published numbers are fractions (perplexities raw), like result.json"
        assert 0 < p.tolerance <= 0.05
    # every paper setting states its paper's sparsity definition (published.md: they differ;
    # a table's rows are experiments, each stating its own)
    definition = composed.get("sparsity_definition")
    assert definition, "experiment_info.sparsity_definition is missing"
    if definition:
        assert definition["text"]
        if definition.get("include"):  # counted from the weights; else stated in words only
            assert definition["reports"] in ("removed", "remaining")
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
    for m in str(sweep.get("method", "")).split(",") if "method" in sweep else []:
        assert m in METHODS, m


def _point(name: str, method: str | None, task: str, metric: str, sparsity: float | None, **config: Any) -> float | None:
    info = OmegaConf.to_container(compose([f"experiment={name}"]).experiment_info)
    cfg: dict[str, Any] = {}
    for key, value in config.items():  # distill_enabled=True -> {"distill": {"enabled": True}}
        a, b = key.split("_", 1)
        cfg.setdefault(a, {})[b] = value
    p = find_point(info, method, task, metric, sparsity, cfg)
    return None if p is None else p.value


def test_published_numbers_of_shared_published_md() -> None:
    """Spot checks against ../shared/published.md so a typo in a config is caught."""
    assert _point("movement/squad_bert_base", "movement", "squad/v1", "f1", 0.9, distill_enabled=False) == 0.817
    assert _point("movement/squad_bert_base", "movement", "squad/v1", "exact_match", 0.97, distill_enabled=True) == 0.675
    assert _point("magnitude/squad_bert_base", "magnitude", "squad/v1", "f1", 0.97, distill_enabled=False) == 0.545
    assert _point("movement/mnli_bert_base", "soft_movement", "glue/mnli", "accuracy_mm", 0.97, distill_enabled=True) == 0.801
    assert _point("magnitude/qqp_bert_base", "magnitude", "glue/qqp", "f1", 0.9, distill_enabled=True) == 0.650  # not SMP's 75.9
    assert _point("magnitude/qqp_bert_base", "l0", "glue/qqp", "accuracy", 0.97, distill_enabled=False) == 0.865
    assert _point("magnitude/qqp_bert_base", "dense", "glue/qqp", "accuracy", None) == 0.914
    assert _point("seven_pre/plot1_bert_base", "grasp", "glue/mrpc", "accuracy", 0.9) == 0.707
    assert _point("seven_pre/plot1_bert_base", "seven_pre", "glue/sst2", "accuracy", 0.5) == 0.931
    assert _point("seven_pre/plot2_bert_base", "seven_pre", "glue/qqp", "accuracy", 0.8) == 0.890
    assert _point("seven_pre/plot2_bert_base", "force", "squad/v1", "f1", 0.6) == 0.78
    assert _point("seven_pre/plot2_vit_b32", "seven_pre", "imagenet", "accuracy", 0.9) == 0.530
    assert _point("admm/glue_bert_base", "admm", "glue/rte", "accuracy", 0.5) == 0.688
    assert _point("platon/mnli_bert_base", "platon", "glue/mnli", "accuracy_mm", 0.9) == 0.822
    assert _point("platon/cola_bert_base", "platon", "glue/cola", "matthews_correlation", 0.9) == 0.443
    assert _point("platon/stsb_bert_base", "dense", "glue/stsb", "spearmanr", None) == 0.897
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
    raw = load(name)["experiment_info"].get("published")
    if raw is not None:  # written in the experiment itself (else composed from conf/published/)
        assert OmegaConf.to_container(cfg.experiment_info).get("published") == raw
    if not stubs.exists():  # every key the experiment sets is one that a group defines
        assert unknown_key_problem(cfg) is None


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_every_job_of_an_experiment_passes_the_checks_made_before_a_sweep(name: str) -> None:
    """``pruneflow -m experiment=<name>`` checks every job's settings (its table rows,
    its hydra.sweeper.params) before the first starts: a shipped experiment passes them."""
    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    assert precheck(["-m", f"experiment={name}"]) is None


def documented_commands() -> list[tuple[str, list[str]]]:
    """(experiment, arguments) of every ``pruneflow ...`` command in an experiment file's
    comments ("One point: ...", "Dense baseline: ..."), without its trailing remark in
    parentheses; commands with a placeholder (``<dir>``) or a path of the user's are left out."""
    import re
    import shlex

    out = []
    for name in ALL_EXPERIMENTS:
        for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines():
            m = re.match(r"^#.*?\bpruneflow (.*)$", line)
            if m is None:
                continue
            text = re.split(r"\s\(|\s#", m.group(1))[0]
            args = shlex.split(text)
            plain_sweep = args == ["-m", f"experiment={name}"]  # test_every_job_of_an_experiment_... checks it
            if "experiment=" in text and "<" not in text and "/data/" not in text and not plain_sweep:
                out.append((name, args))
    return out


def test_experiment_comments_hold_commands_to_check() -> None:
    assert len(documented_commands()) >= 20  # the parser below still finds the files' commands


# one test per command: a failure names it, and parallel test workers share the ~65 s
@pytest.mark.parametrize("name, args", [pytest.param(n, a, id=" ".join(a)) for n, a in documented_commands()])
def test_the_commands_in_experiment_comments_pass_the_checks(name: str, args: list[str]) -> None:
    """A command an experiment file tells its user to type passes the checks made before
    any work (a sweep's, job by job; a single run's on its composed config)."""
    from pruneflow.config import register_configs

    register_configs()
    # this machine has no GPU: a sweep for one is checked without the device
    problem = command_problem([a for a in args if a != "trainer.device=cuda"] if "-m" in args else args)
    assert not problem, f"{name}: pruneflow {' '.join(args)}\n  -> {problem}"


def test_each_deviations_restore_override_passes_the_checks() -> None:
    """``experiment_info.deviations[].restore`` tells a user how to get the authors'
    behaviour back: its overrides (without the trailing remark in parentheses) must
    compose with the experiment and pass the checks made before any work."""
    from pruneflow.config import register_configs
    from pruneflow.runner import check_settings

    register_configs()
    restores, problems = [], []
    for name in ALL_EXPERIMENTS:
        info = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()).get("experiment_info") or {}
        for d in info.get("deviations") or []:
            if d.get("restore") and "<" not in d["restore"]:  # "sparsity=<their value for the task>" is a placeholder
                restores.append((name, str(d["restore"]).split(" (")[0].split()))
    assert len(restores) >= 8
    for name, overrides in restores:
        args = [f"experiment={name}", *overrides]
        try:
            check_settings(compose(args), False, args)
        except Exception as e:  # noqa: BLE001 - collected, each with its override
            problems.append(f"{name}: restore {' '.join(overrides)} -> {e}")
    assert not problems, "\n".join(problems)


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
    if task.startswith("lm/"):  # one shot: no stages; tiny_llama on local text, no zero-shot download
        data = write_lm_text(tmp / "data", eval_split="test" if task == "lm/wikitext2" else "validation")
        return [f"experiment={name}", "logger=none", "save_model=false", "trainer.device=cpu", "trainer.torch_threads=1",
                "model=tiny_llama", "model.pretrain.steps=0", f"task.path={data}", "task.zero_shot=[]",
                "calibration.nsamples=4", "calibration.seqlen=null", "task.seqlen=null", *([] if task == "lm/c4" else ["calibration.dataset=wikitext2"]),
                *MINIATURE_OVERRIDES.get(name, [])], task
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
    if c["method"] != "spp" and target is not None:  # SPP counts removed structures; soft movement/L0 have no target
        assert r["sparsity"]["measured"] == pytest.approx(target, abs=2e-3)
    definition = r["config"]["experiment_info"].get("sparsity_definition")
    if definition and not definition.get("include"):  # stated in words only: recorded, not counted
        paper = r["sparsity"]["paper"]
        assert paper["definition"] == definition and paper["value"] is None and "no layer set" in paper["why_none"]
    elif definition and c["method"] != "spp":  # the paper's count, from the saved weights
        paper = r["sparsity"]["paper"]
        removed = paper["removed"]
        assert paper["value"] == pytest.approx(removed if definition["reports"] == "removed" else 1 - removed)
        if definition["include"] == ["*encoder.layer.*"]:  # the same Linear weights as pruneflow's default
            prunable, counted = r["params"]["prunable"], paper["counted"]
            if definition.get("layer_norms"):  # counted too, never removed (Sanh et al.'s count)
                assert counted > prunable
            assert removed == pytest.approx(r["sparsity"]["measured"] * prunable / counted, abs=1e-6)
    assert report([str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert name in md
    info = OmegaConf.to_container(cfg.experiment_info)
    if any(p.task == task for p in published_points(info)):
        assert "## Reproduction ledger" in md


@pytest.mark.slow
def test_figure_sweep_runs_every_method_and_fills_the_ledger(tmp_path: Path) -> None:
    """`pruneflow -m experiment=seven_pre/plot1_bert_base` runs the figure's four methods
    (magnitude one-shot without weight updates, SNIP, GraSP, SEVEN_pre), and the report's
    ledger sets each beside the published point, with the figure drawn."""
    from pruneflow.report import main as report

    from conftest import run_cli

    name = "seven_pre/plot1_bert_base"
    overrides, task = miniature_overrides(name, tmp_path)
    overrides = [o for o in overrides if not o.startswith("experiment=")]
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", f"experiment={name}", *overrides, "task=glue/mrpc", "sparsity=0.5", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]
    assert sorted(r["method"] for r in results) == ["grasp", "magnitude", "seven_pre", "snip"]
    for r in results:
        assert r["sparsity"]["paper"]["value"] == pytest.approx(0.5, abs=2e-3)  # SEVEN's count, pooler included
    mag = next(r for r in results if r["method"] == "magnitude")
    assert mag["config"]["stages"]["prune"]["update_weights"] is False
    assert report([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    ledger = md.split("## Reproduction ledger")[1]
    assert "measured rows within tolerance" in ledger
    for method, published in (("magnitude", "80.8"), ("snip", "75.3"), ("grasp", "79.3"), ("seven_pre", "86.2")):
        assert f"| {name} | {method} | glue/mrpc | accuracy | 50 | – | {published} [" in ledger
    assert (sweep / "figure_SEVEN-plot1-pre-pruning-BERT-base.png").exists()


# ----------------------------------------------------------------------------- tables
def table_rows(name: str) -> list[list[str]]:
    return [[str(o) for o in row] for row in load(name)["hydra"]["sweeper"]["rows"]]


@pytest.mark.parametrize("name", TABLES)
def test_table_rows_cover_every_published_method_and_sparsity(name: str) -> None:
    """Every method the table publishes has rows; every row is an existing experiment whose
    published numbers are the table's; magnitude and movement run each published sparsity."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "Source:" in text
    assert load(name)["defaults"] == [{"override /hydra/sweeper": "rows"}]
    rows = table_rows(name)
    by_method: dict[str, list[list[str]]] = {}
    figures = set()
    for row in rows:
        exp = next(o.split("=", 1)[1] for o in row if o.startswith("experiment="))
        assert exp in EXPERIMENTS, exp
        cfg = compose(row)  # the row composes as a run
        by_method.setdefault(str(cfg.method.name), []).append(row)
        figures.add(cfg.experiment_info.figure)
        info = OmegaConf.to_container(cfg.experiment_info)
    if name.startswith("platon/"):  # every per-task experiment; MNLI and RTE at 80, 85, 90 % with the script's beta2
        tasks = {next(o for o in row if o.startswith("experiment=")) for row in rows}
        assert tasks == {f"experiment={n}" for n in EXPERIMENTS if n.startswith("platon/")}
        for task, betas in (("mnli", {0.8: 0.95, 0.85: 0.9, 0.9: 0.85}), ("rte", {0.8: 0.95, 0.85: 0.65, 0.9: 0.95})):
            got = {}
            for row in rows:
                if row[0] == f"experiment=platon/{task}_bert_base":
                    cfg = compose(row)
                    got[float(cfg.sparsity)] = float(cfg.method.beta2)
            assert got == betas, task
        return
    assert len(figures) == 1 and None not in figures  # one ledger group, one plot
    published = {p.method for p in published_points(info)} - {"dense"}
    assert set(by_method) == published
    points = published_points(info)
    for method in ("magnitude", "movement"):
        ran = sorted(float(o.split("=")[1]) for row in by_method[method] for o in row if o.startswith("sparsity="))
        assert ran == sorted({p.sparsity for p in points if p.method == method}), method
    for method in ("soft_movement", "l0"):  # their sparsity follows from the penalty: a grid of it
        assert len({o for row in by_method[method] for o in row if o.startswith("method.final_lambda=")}) >= 3


def test_merge_row_replaces_the_command_lines_key() -> None:
    from hydra_plugins.pruneflow_rows_sweeper.rows_sweeper import merge_row

    job = ["experiment=sanh2020/squad_table2", "seed=1", "sparsity=0.5"]
    assert merge_row(job, ["experiment=movement/squad_bert_base", "sparsity=0.97"]) == [
        "seed=1", "experiment=movement/squad_bert_base", "sparsity=0.97"]


@pytest.mark.parametrize("family", ["magnitude", "movement", "soft_movement"])
def test_sanh_warmups_are_multiples_of_warmup_steps(family: str) -> None:
    """Sanh et al.'s threshold warm-ups are 1 and 2 x warmup_steps in their scripts: 5400 and
    10800 as shipped, and trainer.warmup_steps=N scales all three, so one override shortens
    every row of a table for a miniature run (L0's rows take no schedule setting)."""
    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    for task in ("mnli", "qqp", "squad"):
        cfg = compose([f"experiment={family}/{task}_bert_base"])
        assert (cfg.schedule.initial_warmup, cfg.schedule.final_warmup, cfg.trainer.warmup_steps) == (5400, 10800, 5400)
        cfg = compose([f"experiment={family}/{task}_bert_base", "trainer.warmup_steps=3"])
        assert (cfg.schedule.initial_warmup, cfg.schedule.final_warmup) == (3, 6)
        cfg = compose([f"experiment={family}/{task}_bert_base", "trainer.warmup_steps=3", "schedule.final_warmup=4"])
        assert (cfg.schedule.initial_warmup, cfg.schedule.final_warmup) == (3, 4)  # a typed value still wins
        if family == "movement":  # once per table: every row, L0's included, takes the override
            assert precheck(["-m", f"experiment=sanh2020/{task}_table2", "trainer.warmup_steps=2"]) is None


def test_causal_lm_experiments_load_float16_as_their_authors() -> None:
    """Wanda's, SparseGPT's and RIA's main.py load the model with torch_dtype=torch.float16;
    model=llama3_8b alone is bfloat16, so ria/llama3_8b must set it."""
    lm = [n for n in EXPERIMENTS if compose([f"experiment={n}"]).task.name.startswith("lm/")]
    assert "ria/llama3_8b" in lm and len(lm) >= 5
    for name in lm:
        assert compose([f"experiment={name}"]).model.dtype == "float16", name


def test_admm_w_steps_are_a_few_epochs_as_the_design_brief() -> None:
    """DESIGN.md's ADMM: "W-step: a few epochs of the optimiser"; the experiment's prune stage
    holds method.iterations W-steps, so each gets prune epochs / iterations."""
    cfg = compose(["experiment=admm/glue_bert_base"])
    assert cfg.stages.prune.epochs / cfg.method.iterations >= 2


@pytest.mark.parametrize("name", ["seven_pre/plot1_bert_base", "seven_pre/plot2_bert_base"])
def test_seven_pre_bert_figures_train_and_evaluate_as_sevens_code(name: str) -> None:
    """SEVEN_pre has no public code; its BERT figures take the rest of the recipe from SEVEN's
    train.py, which experiment=seven/glue_bert_base transcribes: the same head, optimizer,
    batches and seed. Plot1 (GLUE only) also takes its 512-token inputs and batch-mean dev
    metrics; plot2 lists them as a deviation, since one setting serves its SQuAD panel too."""
    seven, pre = compose(["experiment=seven/glue_bert_base"]), compose([f"experiment={name}"])
    keys = ["model.config_overrides.classifier_dropout", "seed", "trainer.drop_last", "trainer.optimizer",
            "trainer.lr_scheduler", "trainer.warmup_ratio", "trainer.weight_decay", "trainer.max_grad_norm",
            "stages.recover.lr", "stages.recover.batch_size", "method.include", "method.exclude"]
    if name.endswith("plot1_bert_base"):
        keys += ["task.max_seq_length", "task.metric_average", "stages.eval_batch_size"]
    else:
        restore = [d["restore"] for d in load(name)["experiment_info"]["deviations"] if d["what"] == "GLUE inputs and dev metrics"]
        assert restore and all(k in restore[0] for k in ("task.max_seq_length=512", "task.metric_average=batch_mean"))
    for key in keys:
        ours = OmegaConf.select(pre, key)
        if key == "method.exclude":  # plot2 also leaves SQuAD's head out
            ours = [p for p in ours if p != "*qa_outputs*"]
        assert ours == OmegaConf.select(seven, key), (key, ours, OmegaConf.select(seven, key))


def test_an_experiments_sweep_run_without_multirun_says_which_job_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """experiment=seven/glue_bert_base sweeps task and sparsity under -m; without -m it ran
    one job (sst2, 0.7) without a word."""
    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    assert precheck(["experiment=seven/glue_bert_base"]) is None
    said = " ".join(capsys.readouterr().err.split())
    assert "'experiment=seven/glue_bert_base' sweeps task, sparsity when run with -m" in said
    assert "this one run takes task=glue/sst2 sparsity=0.7" in said
    assert precheck(["experiment=seven/glue_bert_base", "task=glue/rte", "sparsity=0.6"]) is None  # both chosen: no note
    assert "note" not in capsys.readouterr().err
    assert precheck(["experiment=ria/llama3_8b"]) is None
    assert "this one run takes method=ria method.pattern=null." in " ".join(capsys.readouterr().err.split())  # as one types it


def test_a_table_without_multirun_is_one_clear_error() -> None:
    from pruneflow.cli import precheck

    message = precheck(["experiment=sanh2020/squad_table2"])
    assert message is not None and "is a table of 12 runs" in message and "pruneflow -m" in message
    assert precheck(["-m", "experiment=sanh2020/squad_table2", "method.no_such_key=1"]) is not None  # rows are checked too


@pytest.mark.slow
def test_a_table_runs_as_one_sweep_and_fills_one_ledger(tmp_path: Path) -> None:
    """A table of three rows (the miniature of Sanh et al.'s, each row with its own settings)
    and seeds from the command line: every row runs once per seed, and the report's ledger
    lists the table's published numbers once, measured rows beside them."""
    from pruneflow.report import main as report

    from conftest import run_cli

    overrides, _ = miniature_overrides("movement/squad_bert_base", tmp_path)
    common = [o for o in overrides if not o.startswith("experiment=") and o not in SANH_MINI]
    table = tmp_path / "conf" / "experiment" / "mini" / "table.yaml"
    table.parent.mkdir(parents=True)
    mini = ", ".join(SANH_MINI)
    table.write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: rows\n"
        "experiment_info:\n  name: mini/table\n  source: a miniature of Sanh et al.'s table\n  deviations:\n"
        "    - {what: the table's own choice, authors: theirs, here: ours, restore: null}\n"
        "hydra:\n  sweeper:\n    rows:\n"
        f"      - [experiment=magnitude/squad_bert_base, sparsity=0.9, {mini}]\n"
        f"      - [experiment=movement/squad_bert_base, sparsity=0.97, {mini}]\n"
        "      - [experiment=l0/squad_bert_base, method.final_lambda=50, trainer.warmup_steps=2]\n")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=mini/table", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *common, "seed=0,1",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]
    assert sorted((r["method"], r["seed"]) for r in results) == [(m, s) for m in ("l0", "magnitude", "movement") for s in (0, 1)]
    assert report([str(sweep)]) == 0
    ledger = (sweep / "report.md").read_text().split("## Reproduction ledger")[1]
    assert ledger.count("| squad/v1 | f1 | 90 | distill.enabled=false |") == 4  # each published number once
    assert "| magnitude/squad_bert_base | magnitude | squad/v1 | f1 | 90 | distill.enabled=false | 78.5" in ledger
    assert "(2) |" in ledger  # measured over the two seeds
    assert (sweep / "figure_Sanh-et-al.-2020-Tables-2-and-3-SQuAD-v1.1.png").exists()
    # the table's own source and deviations (its jobs carry the rows' experiments)
    md = (sweep / "report.md").read_text()
    assert "- `mini/table`: a miniature of Sanh et al.'s table" in md
    assert "### Deviations from the authors' setting: `mini/table`" in md and "| the table's own choice | theirs | ours | – |" in md
    assert "### Deviations from the authors' setting: `movement/squad_bert_base`" in md


def test_paper_sparsity_counts_the_definitions_layers() -> None:
    """result.json's sparsity.paper: zeros over the Linear layers the definition includes and
    does not exclude, biases only where it says so, reported as removed or remaining."""
    import torch
    from torch import nn

    from pruneflow.results import paper_sparsity

    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))  # 16 + 8 weights, 4 + 2 biases
    model.classifier = nn.Linear(2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model.encoder[0].weight[:2] = 0.0  # 8 of 16
        model.encoder[1].weight[0, :1] = 0.0  # 1 of 8
        model.encoder[0].bias[:1] = 0.0  # 1 of 4
        model.classifier.weight.zero_()  # 4 of 4: excluded below
    removed = paper_sparsity({"include": ["*"], "exclude": ["*classifier*"], "reports": "removed"}, model, False)
    assert (removed["counted"], removed["removed"], removed["value"]) == (24, round(9 / 24, 6), round(9 / 24, 6))
    remaining = paper_sparsity({"include": ["encoder.*"], "biases": True, "reports": "remaining"}, model, False)
    assert (remaining["counted"], remaining["removed"], remaining["value"]) == (30, round(10 / 30, 6), round(20 / 30, 6))
    assert paper_sparsity({"include": ["encoder.*"]}, model, True)["value"] is None  # compressed: counted by sparsity.measured
    # Sanh et al.'s counts_parameters.py: the encoder's biases and LayerNorms count, as remaining
    model.encoder.append(nn.LayerNorm(2))  # 2 weights (1) + 2 biases (0): remaining, as theirs, whatever the values
    with_ln = paper_sparsity({"include": ["encoder.*"], "biases": True, "layer_norms": True, "reports": "remaining"}, model, False)
    assert (with_ln["counted"], with_ln["removed"]) == (34, round(10 / 34, 6))
    without = paper_sparsity({"include": ["encoder.*"], "biases": True, "reports": "remaining"}, model, False)
    assert without["counted"] == 30
