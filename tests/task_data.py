"""Small datasets written in the Hub's (or the distributed) formats, for the task tests.

The examples carry a learnable signal (a label word in the text, an answer span
the question points to, a colour per image class) so that short runs give
metrics above chance, but the tests only rely on their format.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np

from pruneflow.tasks.glue import SUBTASKS

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
POS, NEG = "wonderful", "terrible"


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def glue_rows(subtask: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows with the Hub's columns for a GLUE subtask; the label follows a marker word."""
    rng = random.Random(seed)
    spec = SUBTASKS[subtask]
    c1, c2 = spec.text
    rows = []
    for i in range(n):
        if spec.labels:
            label = i % len(spec.labels)
            marker = [NEG, POS, "maybe"][label]
        else:
            label = round(5.0 * (i % 6) / 5, 2)  # 0, 1, ..., 5
            marker = " ".join([POS] * (i % 6)) or NEG
        row: dict[str, Any] = {c1: f"{_sentence(rng)} {marker} {_sentence(rng, 3)}"}
        if c2 is not None:
            row[c2] = _sentence(rng)
        row["label"] = label
        row["idx"] = i
        rows.append(row)
    return rows


def write_split(folder: Path, split: str, rows: list[dict[str, Any]], fmt: str) -> Path:
    """One split file as the Hub / a user would have it: parquet, jsonl, json or csv."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        raise ValueError(fmt)
    return path


def write_dataset(folder: Path, splits: dict[str, list[dict[str, Any]]], fmt: str) -> Path:
    """All splits in one format; ``fmt="disk"`` writes a ``DatasetDict.save_to_disk`` folder."""
    if fmt == "disk":
        import datasets

        datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}).save_to_disk(str(folder))
        return folder
    for split, rows in splits.items():
        write_split(folder, split, rows, fmt)
    return folder


def write_glue(folder: Path, subtask: str, fmt: str = "parquet", n_train: int = 64, n_eval: int = 24) -> Path:
    eval_splits = SUBTASKS[subtask].eval_splits
    splits = {"train": glue_rows(subtask, n_train, seed=0)}
    for k, s in enumerate(eval_splits):
        splits[s] = glue_rows(subtask, n_eval, seed=1 + k)
    return write_dataset(folder, splits, fmt)


def squad_rows(n: int, seed: int = 0, unanswerable_every: int = 0) -> list[dict[str, Any]]:
    """SQuAD-format rows: the question names a key whose value in the context is the answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        keys = rng.sample(WORDS, 4)
        values = [f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in keys]
        parts = [f"the {k} is {v}." for k, v in zip(keys, values, strict=True)]
        context = " ".join(parts)
        target = rng.randrange(4)
        if unanswerable_every and i % unanswerable_every == 0:
            absent = next(w for w in WORDS if w not in keys)
            question = f"what is the {absent}?"
            answers = {"text": [], "answer_start": []}
        else:
            question = f"what is the {keys[target]}?"
            start = context.index(parts[target]) + len(f"the {keys[target]} is ")
            text = values[target]
            assert context[start : start + len(text)] == text
            answers = {"text": [text, text], "answer_start": [start, start]}
        rows.append({"id": f"q{seed}_{i:04d}", "title": "synthetic", "context": context, "question": question, "answers": answers})
    return rows


def write_squad(folder: Path, fmt: str = "jsonl", n_train: int = 48, n_eval: int = 16, v2: bool = False) -> Path:
    every = 4 if v2 else 0
    splits = {"train": squad_rows(n_train, 0, every), "validation": squad_rows(n_eval, 1, every)}
    return write_dataset(folder, splits, fmt)


def cifar_arrays(n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) uint8 rows (channel-major, as in the python CIFAR files): class = colour."""
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(n)]
    img = rng.integers(0, 60, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        img[i, y % 3] += np.uint8(120 + 60 * (y // 3 % 2))
    return img.reshape(n, 3072), labels


def write_cifar(folder: Path, num_classes: int = 10, n_per_batch: int = 8, n_test: int = 12) -> Path:
    """The extracted python version: data_batch_1..5 + test_batch + batches.meta (CIFAR-10),
    or train + test + meta (CIFAR-100), pickled with byte-string keys as distributed."""
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if num_classes == 10:
        for b in range(1, 6):
            data, labels = cifar_arrays(n_per_batch, 10, seed=b)
            dump(f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)})
        data, labels = cifar_arrays(n_test, 10, seed=99)
        dump("test_batch", {b"batch_label": b"testing batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)})
        dump("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": n_per_batch, b"num_vis": 3072})
    else:
        data, labels = cifar_arrays(5 * n_per_batch, 100, seed=1)
        dump("train", {b"fine_labels": labels, b"coarse_labels": [y // 5 for y in labels], b"data": data})
        data, labels = cifar_arrays(n_test, 100, seed=99)
        dump("test", {b"fine_labels": labels, b"coarse_labels": [y // 5 for y in labels], b"data": data})
        dump("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return folder


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("n01", "n02", "n03"), n_train: int = 6, n_val: int = 3, size: int = 20) -> Path:
    """train/<class>/*.JPEG and val/<class>/*.JPEG, as ImageNet after the usual val reorganisation."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(size, size + 4, 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"{name}_{i}.JPEG", quality=95)
    return root


# --- running the pipeline on composed configs -------------------------------------------
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TINY_STAGES = [
    "stages.finetune.epochs=null", "stages.prune.epochs=null", "stages.recover.epochs=null",
    "stages.finetune.steps=6", "stages.prune.steps=3", "stages.recover.steps=3",
    "stages.finetune.batch_size=8", "stages.prune.batch_size=8", "stages.recover.batch_size=8",
    "stages.eval_batch_size=16", "logger=none", "cache=false", "trainer.torch_threads=1",
]


def compose(overrides: list[str]) -> Any:
    """The config the CLI would build for these overrides (Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pruneflow.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_pipeline(run_dir: Path, overrides: list[str], speed: bool = False) -> dict[str, Any]:
    """Run finetune -> prune -> recover with tiny stages; returns result.json's content."""
    from pruneflow.runner import run

    ov = [*TINY_STAGES, f"speed.enabled={str(speed).lower()}", *overrides]
    run(compose(ov), run_dir, ov)
    return json.loads((run_dir / "result.json").read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lm_lines(n: int, seed: int = 0) -> list[str]:
    """Lines of word-level text with some structure (repeated phrases) for causal LMs:
    one phrase book for every split (one language), lines drawn by ``seed``."""
    book = random.Random(1234)
    phrases = [" ".join(book.choice(WORDS) for _ in range(4)) for _ in range(12)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(phrases) for _ in range(rng.randint(3, 8))) + " ." for _ in range(n)]


def write_lm_text(folder: Path, n_train: int = 300, n_test: int = 80, eval_split: str = "test", fmt: str = "txt") -> Path:
    """A language-modelling dataset as WikiText-2 / C4 are read: train and test (or
    validation) splits, one row per line (.txt) or a 'text' column."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", lm_lines(n_train, 0)), (eval_split, lm_lines(n_test, 1))):
        if fmt == "txt":
            (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
        else:
            write_split(folder, split, [{"text": r} for r in rows], fmt)
    return folder


def run_overrides(run_dir: Path, overrides: list[str]) -> dict:
    """Run the pipeline in-process as the CLI composes ``overrides``; the result.json."""
    from pruneflow.runner import run

    run(compose(overrides), run_dir, overrides)
    return json.loads((run_dir / "result.json").read_text())
