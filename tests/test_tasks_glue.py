"""GLUE: local data in the Hub's formats through the real datasets loaders, errors, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from task_data import (
    compose,
    glue_rows,
    read_jsonl,
    run_pipeline,
    write_dataset,
    write_glue,
    write_split,
)

from pruneflow.errors import UserError
from pruneflow.metrics import compute_glue
from pruneflow.models import build_model
from pruneflow.tasks import TASKS, build_task

from conftest import run_cli


def make_task(overrides: list[str]):  # noqa: ANN201
    cfg = compose(overrides)
    task = build_task(cfg.task, 0)
    return cfg, task


def test_every_glue_task_is_registered_with_a_config() -> None:
    conf = Path(__file__).resolve().parent.parent / "conf" / "task"
    for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"):
        assert f"glue/{name}" in TASKS
        assert (conf / "glue" / f"{name}.yaml").is_file()
        cfg = compose([f"task=glue/{name}"])
        assert cfg.task.name == f"glue/{name}" and cfg.task.max_seq_length == 128


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv", "disk"])
def test_pair_task_loads_each_format(tmp_path: Path, fmt: str) -> None:
    path = write_glue(tmp_path / "rte", "rte", fmt, n_train=20, n_eval=7)
    cfg, task = make_task(["model=bert_tiny", "task=glue/rte", f"task.path={path}", f"task.cache_dir={tmp_path / 'cache'}"])
    task.load()
    assert len(task.raw["train"]) == 20 and len(task.raw["validation"]) == 7
    assert task.ids["validation"] == list(range(7))
    assert task.references["validation"] == [r["label"] for r in glue_rows("rte", 7, seed=1)]
    bundle = build_model(cfg.model, task)
    task.prepare(bundle)
    item = task.train_set[3]
    text = bundle.tokenizer.decode(item["input_ids"], skip_special_tokens=True)
    row = glue_rows("rte", 20, seed=0)[3]
    assert text == f"{row['sentence1']} {row['sentence2']}"  # both sentences, in order
    assert item["token_type_ids"].count(1) > 0  # the second segment is marked
    batch = task.collate([task.train_set[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [0, 1, 0, 1]


def test_hub_layout_subfolder_and_shards(tmp_path: Path) -> None:
    """The Hub's parquet layout: <path>/sst2/train-00000-of-00001.parquet."""
    root = tmp_path / "glue"
    rows = glue_rows("sst2", 30)
    import pandas as pd

    (root / "sst2").mkdir(parents=True)
    pd.DataFrame(rows[:20]).to_parquet(root / "sst2" / "train-00000-of-00002.parquet")
    pd.DataFrame(rows[20:]).to_parquet(root / "sst2" / "train-00001-of-00002.parquet")
    pd.DataFrame(glue_rows("sst2", 5, 1)).to_parquet(root / "sst2" / "validation-00000-of-00001.parquet")
    pd.DataFrame(glue_rows("sst2", 4, 2)).assign(label=-1).to_parquet(root / "sst2" / "test-00000-of-00001.parquet")
    _, task = make_task(["task=glue/sst2", f"task.path={root}", f"task.cache_dir={tmp_path / 'cache'}"])
    task.load()
    assert len(task.raw["train"]) == 30 and len(task.raw["validation"]) == 5
    assert task.raw["train"]["sentence"] == [r["sentence"] for r in rows]


def test_stsb_is_regression_and_sample_limits(tmp_path: Path) -> None:
    path = write_glue(tmp_path / "stsb", "stsb", "csv", n_train=30, n_eval=12)
    cfg, task = make_task(["model=bert_tiny", "task=glue/stsb", f"task.path={path}", "task.max_train_samples=10", "task.max_eval_samples=5"])
    assert (task.problem, task.num_labels, task.main_metric) == ("regression", 1, "pearson")
    task.load()
    assert len(task.raw["train"]) == 10 and len(task.raw["validation"]) == 5
    bundle = build_model(cfg.model, task)
    assert bundle.model.config.problem_type == "regression" and bundle.model.config.num_labels == 1
    task.prepare(bundle)
    batch = task.collate([task.train_set[i] for i in range(6)])
    assert batch["labels"].dtype.is_floating_point
    assert batch["labels"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_mnli_splits_and_string_labels(tmp_path: Path) -> None:
    rows = glue_rows("mnli", 12)
    names = ["entailment", "neutral", "contradiction"]
    named = [{**r, "label": names[r["label"]]} for r in rows]  # a CSV with class names
    write_dataset(tmp_path / "mnli", {"train": named, "validation_matched": rows[:6], "validation_mismatched": rows[6:]}, "csv")
    _, task = make_task(["task=glue/mnli", f"task.path={tmp_path / 'mnli'}"])
    assert task.eval_splits == ("validation_matched", "validation_mismatched") and task.main_split == "validation_matched"
    assert task.split_suffix("validation_mismatched") == "_mm"
    task.load()
    assert task.raw["train"]["label"] == [r["label"] for r in rows]
    assert task.ids["validation_mismatched"] == list(range(6, 12))



def test_subtask_specs_are_the_hubs_label_order_and_glues_main_metric() -> None:
    """Class names in the Hub's ClassLabel order (a label index means the Hub's class) and the
    main metric of the GLUE leaderboard per task (CoLA: Matthews, STS-B: Pearson)."""
    want = {
        "cola": (("unacceptable", "acceptable"), "matthews_correlation"),
        "sst2": (("negative", "positive"), "accuracy"),
        "mrpc": (("not_equivalent", "equivalent"), "accuracy"),
        "stsb": ((), "pearson"),
        "qqp": (("not_duplicate", "duplicate"), "accuracy"),
        "mnli": (("entailment", "neutral", "contradiction"), "accuracy"),
        "qnli": (("entailment", "not_entailment"), "accuracy"),
        "rte": (("entailment", "not_entailment"), "accuracy"),
    }
    for name, (labels, metric) in want.items():
        _, task = make_task([f"task=glue/{name}"])
        assert (task.spec.labels, task.main_metric, task.num_labels) == (labels, metric, len(labels) or 1), name


def test_evaluate_scores_cola_with_matthews_and_stsb_by_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    """Glue.evaluate on given logits: CoLA argmax labels scored by Matthews correlation, STS-B
    the single output as a score (Pearson), records keyed by the split's idx."""
    import torch

    _, cola = make_task(["task=glue/cola"])
    cola.references["validation"] = [1, 1, 0, 0, 1]
    cola.ids["validation"] = [10, 11, 12, 13, 14]
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # predicts 1 1 0 1 0
    monkeypatch.setattr(cola, "predict", lambda *a, **k: [logits[:2], logits[2:]])
    metrics, records = cola.evaluate(None, "validation", 2, torch.device("cpu"))
    # tp=2 tn=1 fp=1 fn=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert metrics == {"matthews_correlation": pytest.approx(1 / 6)}
    assert records[3] == {"id": 13, "prediction": 1, "reference": 0}
    _, stsb = make_task(["task=glue/stsb"])
    stsb.references["validation"] = [0.0, 1.0, 2.0]
    stsb.ids["validation"] = [0, 1, 2]
    monkeypatch.setattr(stsb, "predict", lambda *a, **k: [torch.tensor([[0.5], [1.0], [3.0]])])
    metrics, records = stsb.evaluate(None, "validation", 3, torch.device("cpu"))
    assert set(metrics) == {"pearson", "spearmanr"} and metrics["spearmanr"] == pytest.approx(1.0)
    # deviations (-1, -0.5, 1.5) and (-1, 0, 1): 2.5 / sqrt(3.5 * 2)
    assert metrics["pearson"] == pytest.approx(2.5 / 7**0.5)
    assert records[2] == {"id": 2, "prediction": 3.0, "reference": 2.0}



def test_batch_mean_is_sevens_evaluation_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """task.metric_average=batch_mean: SEVEN's train.py computes accuracy and F1 per
    evaluation batch and prints the plain mean over batches. By hand on 5 examples in
    batches of 2 (the order the seeded permutation gives): batch accuracies and F1s, the
    last batch of one example counting as much as the others, and a batch without a
    positive label or prediction scoring F1 0 (sklearn's zero_division, as their metric)."""
    import torch

    _, mrpc = make_task(["task=glue/mrpc", "task.metric_average=batch_mean"])
    refs = [1, 0, 0, 1, 1]
    preds = [1, 0, 0, 0, 1]
    mrpc.references["validation"] = refs
    mrpc.ids["validation"] = list(range(5))
    logits = torch.tensor([[0.0, 1.0] if p else [1.0, 0.0] for p in preds])
    monkeypatch.setattr(mrpc, "predict", lambda *a, **k: [logits])
    metrics, _ = mrpc.evaluate(None, "validation", 2, torch.device("cpu"))
    order = torch.randperm(5, generator=torch.Generator().manual_seed(mrpc.seed)).tolist()
    batches = [order[0:2], order[2:4], order[4:5]]
    acc, f1 = [], []
    for b in batches:
        r, q = [refs[i] for i in b], [preds[i] for i in b]
        acc.append(sum(x == y for x, y in zip(r, q, strict=True)) / len(b))
        tp = sum(x == 1 and y == 1 for x, y in zip(r, q, strict=True))
        fp = sum(x == 0 and y == 1 for x, y in zip(r, q, strict=True))
        fn = sum(x == 1 and y == 0 for x, y in zip(r, q, strict=True))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert metrics == {"accuracy": pytest.approx(sum(acc) / 3), "f1": pytest.approx(sum(f1) / 3)}
    assert metrics != pytest.approx(compute_glue("mrpc", preds, refs))  # not the whole-set values (0.8, 0.8)
    # a fixed order by hand: [0, 3] [1, 2] [4] -> accuracy (1/2 + 1 + 1) / 3, F1 (2/3 + 0 + 1) / 3
    from pruneflow.tasks.glue import batch_mean

    monkeypatch.setattr(torch, "randperm", lambda n, generator=None: torch.tensor([0, 3, 1, 2, 4]))
    assert batch_mean("mrpc", preds, refs, 2, 0) == {"accuracy": pytest.approx(2.5 / 3), "f1": pytest.approx((2 / 3 + 1) / 3)}


def test_batch_mean_leaves_cola_and_stsb_over_the_whole_set_and_other_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _, cola = make_task(["task=glue/cola", "task.metric_average=batch_mean"])
    cola.references["validation"] = [1, 1, 0, 0, 1]
    cola.ids["validation"] = list(range(5))
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    monkeypatch.setattr(cola, "predict", lambda *a, **k: [logits])
    metrics, _ = cola.evaluate(None, "validation", 2, torch.device("cpu"))
    assert metrics == {"matthews_correlation": pytest.approx(1 / 6)}  # their code: over the whole set
    with pytest.raises(UserError, match="task.metric_average"):
        make_task(["task=glue/sst2", "task.metric_average=macro"])


def test_pairs_are_truncated_longest_first(tmp_path: Path) -> None:
    """run_glue's truncation=True: a pair longer than task.max_seq_length loses tokens from its
    longer text, here only the long second sentence: [CLS] s1 [SEP] s2[:room] [SEP]."""
    rows = glue_rows("mrpc", 6)
    rows = [{**r, "sentence2": " ".join([r["sentence2"]] * 4)} for r in rows]
    write_dataset(tmp_path / "mrpc", {"train": rows, "validation": rows}, "jsonl")
    cfg, task = make_task(["model=bert_tiny", "task=glue/mrpc", f"task.path={tmp_path / 'mrpc'}", "task.max_seq_length=32"])
    task.load()
    bundle = build_model(cfg.model, task)
    task.prepare(bundle)
    tok = bundle.tokenizer
    for r, item in zip(rows, task.train_set, strict=True):
        s1 = tok(r["sentence1"], add_special_tokens=False)["input_ids"]
        s2 = tok(r["sentence2"], add_special_tokens=False)["input_ids"]
        assert len(s1) < 32 - 3 - len(s1) < len(s2)
        want = [tok.cls_token_id, *s1, tok.sep_token_id, *s2[: 32 - 3 - len(s1)], tok.sep_token_id]
        assert item["input_ids"] == want


# --- errors ---------------------------------------------------------------------------------
def _load_error(tmp_path: Path, overrides: list[str]) -> str:
    _, task = make_task(overrides)
    with pytest.raises(UserError) as e:
        task.load()
    return str(e.value)


def test_missing_path_error(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, ["task=glue/sst2", f"task.path={tmp_path / 'nope'}"])
    assert "'task.path'" in msg and "not an existing directory" in msg and ".parquet" in msg


def test_no_split_files_error(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_split(tmp_path / "d", "train", glue_rows("mnli", 4), "jsonl")
    write_split(tmp_path / "d", "validation", glue_rows("mnli", 4), "jsonl")  # MNLI needs _matched/_mismatched
    msg = _load_error(tmp_path, ["task=glue/mnli", f"task.path={tmp_path / 'd'}"])
    assert "'task.path'" in msg and "validation_matched" in msg and "train.jsonl" in msg


def test_missing_column_error(tmp_path: Path) -> None:
    rows = [{"text": r["sentence1"], "label": r["label"]} for r in glue_rows("mrpc", 6)]
    write_dataset(tmp_path / "d", {"train": rows, "validation": rows}, "parquet")
    msg = _load_error(tmp_path, ["task=glue/mrpc", f"task.path={tmp_path / 'd'}"])
    assert "['sentence1', 'sentence2']" in msg and "['sentence1', 'sentence2', 'label']" in msg and "text" in msg


def test_label_index_beyond_the_classes_error(tmp_path: Path) -> None:
    rows = glue_rows("cola", 4)
    write_dataset(tmp_path / "d", {"train": rows, "validation": [{**rows[0], "label": 2}, *rows[1:]]}, "jsonl")
    msg = _load_error(tmp_path, ["task=glue/cola", f"task.path={tmp_path / 'd'}"])
    assert "[2] outside 0..1" in msg and "'validation'" in msg


def test_unlabelled_split_error(tmp_path: Path) -> None:
    rows = glue_rows("qnli", 6)
    write_dataset(tmp_path / "d", {"train": rows, "validation": [{**r, "label": -1} for r in rows]}, "jsonl")
    msg = _load_error(tmp_path, ["task=glue/qnli", f"task.path={tmp_path / 'd'}"])
    assert "-1" in msg and "validation" in msg


def test_bad_sample_limit(tmp_path: Path) -> None:
    write_glue(tmp_path / "d", "cola", "jsonl", 6, 4)
    msg = _load_error(tmp_path, ["task=glue/cola", f"task.path={tmp_path / 'd'}", "task.max_train_samples=0"])
    assert "'task.max_train_samples'" in msg


def test_max_seq_length_beyond_the_model(tmp_path: Path) -> None:
    path = write_glue(tmp_path / "d", "sst2", "jsonl", 6, 4)
    cfg, task = make_task(["model=bert_tiny", "task=glue/sst2", f"task.path={path}", "task.max_seq_length=1000"])
    task.load()
    bundle = build_model(cfg.model, task)
    with pytest.raises(UserError, match=r"'task.max_seq_length': 1000.*at most 512"):
        task.prepare(bundle)


def test_hub_unreachable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = _load_error(tmp_path, ["task=glue/cola"])
    assert "nyu-mll/glue (cola)" in msg and "task.path" in msg


def test_head_that_does_not_fit(tmp_path: Path) -> None:
    """A saved 2-label classifier cannot serve 3-label MNLI: one clear error, not a traceback."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pruneflow.models.text import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer((r["premise"] for r in glue_rows("mnli", 30)), vocab_size=200)
    config = AutoConfig.for_model("bert", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    write_glue(tmp_path / "d", "mnli", "jsonl", 6, 3)
    cfg, task = make_task(["model=bert_base", f"model.path={tmp_path / 'ckpt'}", "task=glue/mnli", f"task.path={tmp_path / 'd'}"])
    task.load()
    with pytest.raises(UserError, match="Model head does not fit task=glue/mnli"):
        build_model(cfg.model, task)


# --- end to end -------------------------------------------------------------------------------
def _check_predictions(run_dir: Path, result: dict, subtask: str, split_file: str = "predictions.jsonl", suffix: str = "") -> None:
    records = read_jsonl(run_dir / split_file)
    preds = [r["prediction"] for r in records]
    refs = [r["reference"] for r in records]
    recomputed = compute_glue(subtask, preds, refs)
    for k, v in recomputed.items():
        assert result["metrics"]["final"][k + suffix] == pytest.approx(v)


@pytest.mark.slow
def test_e2e_mrpc_with_speed(tmp_path: Path) -> None:
    path = write_glue(tmp_path / "data", "mrpc", "parquet", 48, 20)
    result = run_pipeline(tmp_path / "run", ["model=bert_tiny", "task=glue/mrpc", f"task.path={path}", "method=magnitude", "sparsity=0.5"], speed=True)
    assert result["task"] == "glue/mrpc" and result["main_metric"] == "accuracy"
    for stage in ("finetune", "prune", "recover", "final"):
        assert set(result["metrics"][stage]) == {"accuracy", "f1"}
    assert result["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    assert result["speed"]["dense_ms"] > 0 and result["speed"]["final_ms"] > 0
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["id"] for r in records] == list(range(20))
    assert all(isinstance(r["prediction"], int) and r["prediction"] in (0, 1) for r in records)
    _check_predictions(tmp_path / "run", result, "mrpc")


@pytest.mark.slow
def test_e2e_stsb_regression(tmp_path: Path) -> None:
    path = write_glue(tmp_path / "data", "stsb", "jsonl", 48, 18)
    result = run_pipeline(tmp_path / "run", ["model=bert_tiny", "task=glue/stsb", f"task.path={path}"])
    assert result["main_metric"] == "pearson"
    assert set(result["metrics"]["final"]) == {"pearson", "spearmanr"}
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert all(isinstance(r["prediction"], float) for r in records)
    assert [r["reference"] for r in records] == [r["label"] for r in glue_rows("stsb", 18, seed=1)]
    _check_predictions(tmp_path / "run", result, "stsb")


@pytest.mark.slow
def test_e2e_mnli_matched_and_mismatched(tmp_path: Path) -> None:
    path = write_glue(tmp_path / "data", "mnli", "disk", 48, 15)
    result = run_pipeline(tmp_path / "run", ["model=bert_tiny", "task=glue/mnli", f"task.path={path}", "task.max_eval_samples=12"])
    assert set(result["metrics"]["final"]) == {"accuracy", "accuracy_mm"}
    assert len(read_jsonl(tmp_path / "run" / "predictions.jsonl")) == 12
    _check_predictions(tmp_path / "run", result, "mnli")
    _check_predictions(tmp_path / "run", result, "mnli", "predictions_validation_mismatched.jsonl", "_mm")


@pytest.mark.slow
def test_cli_reports_a_missing_path_without_traceback(tmp_path: Path) -> None:
    out = run_cli(["model=bert_tiny", "task=glue/cola", f"task.path={tmp_path / 'missing'}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 2
    assert "task.path" in out.stderr and "Traceback" not in out.stderr


def test_a_sweep_checks_every_jobs_data_folder_before_the_first_starts(tmp_path: Path) -> None:
    """A task.path without a split the task needs is refused before any job of a sweep
    starts (it was found only when that job loaded its data, after the others had run)."""
    import datasets

    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    good = write_glue(tmp_path / "good", "sst2", fmt="jsonl")
    bad = tmp_path / "bad"
    write_split(bad, "train", glue_rows("sst2", 8), "jsonl")
    args = ["-m", "model=bert_tiny", "task=glue/sst2", "method=magnitude", "sparsity=0.5"]
    assert precheck([*args, f"task.path={good}"]) is None
    problem = precheck([*args, f"task.path={good},{bad}"]) or ""
    assert "'task.path'" in problem and "no 'validation' file" in problem and "no job was started" in problem
    # MNLI needs both of its evaluation splits
    mnli = write_glue(tmp_path / "mnli", "mnli", fmt="jsonl")
    (mnli / "validation_mismatched.jsonl").unlink()
    assert "no 'validation_mismatched' file" in (precheck(["-m", "model=bert_tiny", "task=glue/mnli", f"task.path={mnli}", "seed=0,1"]) or "")
    # a save_to_disk folder: its dataset_dict.json lists the splits
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(glue_rows("sst2", 4))}).save_to_disk(str(disk))
    assert "has the splits ['train']" in (precheck([*args, f"task.path={disk}"]) or "")


def test_the_local_tokenizer_is_the_same_in_every_process() -> None:
    """bert_tiny's vocabulary is built from the task's text at every start: a cached
    fine-tune and a resumed run meet the tokenizer of a new process. tokenizers'
    WordPieceTrainer broke merge ties in hash order (4 processes, 4 vocabularies of one
    text); a reused fine-tune then scored 0.5 where it had scored 1.0."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, 'tests'); from task_data import glue_rows; "
            "from pruneflow.models.text import train_wordpiece_tokenizer as t; "
            "tok = t([r['sentence'] for r in glue_rows('sst2', 200)], vocab_size=300); "
            "print(json.dumps([sorted(tok.get_vocab().items()), tok('wonderful plots unseenword')['input_ids']]))")
    root = Path(__file__).resolve().parent.parent
    outs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout for _ in range(3)]
    vocab, ids = json.loads(outs[0])
    assert outs[0] == outs[1] == outs[2] and 60 < len(vocab) <= 300
    assert 1 not in ids  # no [UNK]: an unseen word falls back to characters


def test_wordpiece_vocab_order() -> None:
    from collections import Counter

    from pruneflow.models.text import wordpiece_vocab

    vocab = wordpiece_vocab(Counter({"ab": 2, "ba": 2, "abc": 3, "a": 5}), 12, ["[PAD]"])
    assert list(vocab) == ["[PAD]", "a", "b", "c", "##a", "##b", "##c", "abc", "ab", "ba"]  # count, then spelling
    assert list(wordpiece_vocab(Counter({"ab": 2, "ba": 2}), 6, ["[PAD]"])) == ["[PAD]", "a", "b", "##a", "##b", "ab"]
