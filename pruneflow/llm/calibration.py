"""Calibration samples for one-shot pruning, drawn as Wanda and SparseGPT draw them.

``calibration.dataset``:

- ``c4``: for each sample, random documents of the first C4 training shard until one is
  longer than ``seqlen`` tokens, then a random window of ``seqlen`` tokens from it;
- ``wikitext2``: the training rows joined with ``" "``, tokenized once, and a random
  window of ``seqlen`` tokens per sample;
- ``local``: ``calibration.path`` (a text file, or a file/directory with a ``text``
  column), joined and windowed as WikiText-2.

Python's ``random`` seeded with ``calibration.seed`` picks the positions, as in the
authors' loaders, so the same seed and tokenizer give the same samples.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruneflow.errors import UserError, invalid

DATASETS = ("c4", "wikitext2", "local")


def check_config(cal: DictConfig) -> None:
    if cal.get("dataset") not in DATASETS:
        raise invalid("calibration.dataset", cal.get("dataset"), DATASETS)
    for key, low in (("nsamples", 1), ("seqlen", 2)):
        v = cal.get(key)
        if v is None and key == "seqlen":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise invalid(f"calibration.{key}", v, f"an integer >= {low}" + (", or null for the model's context length" if key == "seqlen" else ""))
    seed = cal.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid("calibration.seed", seed, "an integer (seeds the positions of the calibration windows)")
    path = cal.get("path")
    if cal.dataset == "local" and not path:
        raise invalid("calibration.path", path, "a text file or a directory with a train split", "calibration.dataset=local reads it.")
    if path and not Path(str(path)).expanduser().exists():
        raise invalid("calibration.path", path, "an existing file or directory", f"'{path}' does not exist.")


def describe_source(cal: DictConfig, task_cfg: DictConfig) -> str:
    """Where the calibration text comes from, for result.json."""
    from pruneflow.tasks.lm import C4_FILES, SOURCES

    name = {"c4": "lm/c4", "wikitext2": "lm/wikitext2"}.get(str(cal.dataset))
    path = cal.get("path")
    if name is not None and path is None and str(task_cfg.get("name")) == name:
        path = task_cfg.get("path")
    if path:
        return f"local: {path}"
    if name == "lm/c4":
        return f"hub: allenai/c4 {C4_FILES['train']}"
    return f"hub: {SOURCES[name]['hub_id']}/{SOURCES[name]['hub_config']} train"


def _rows(cal: DictConfig, task_cfg: DictConfig) -> list[str]:
    from pruneflow.tasks.hf_data import BUILDERS
    from pruneflow.tasks.lm import load_text_splits

    name = {"c4": "lm/c4", "wikitext2": "lm/wikitext2"}.get(str(cal.dataset))
    path = cal.get("path")
    if name is not None:
        # the task's own local copy serves calibration from the same dataset
        if path is None and str(task_cfg.get("name")) == name:
            path = task_cfg.get("path")
        cfg = OmegaConf.create({"name": name, "path": path})
        return list(load_text_splits(cfg, name, ["train"])["train"]["text"])
    p = Path(str(path)).expanduser()
    if p.is_file():
        if p.suffix == ".txt":
            return p.read_text(encoding="utf-8").splitlines()
        import datasets

        if p.suffix not in BUILDERS:
            raise invalid("calibration.path", str(path), f"a file ending in {', '.join(BUILDERS)}, or a directory")
        ds = datasets.load_dataset(BUILDERS[p.suffix], data_files={"train": str(p)}, split="train")
        if "text" not in ds.column_names:
            raise UserError(f"calibration.path={path} has no 'text' column (columns: {ds.column_names}).")
        return list(ds["text"])
    cfg = OmegaConf.create({"name": "lm/wikitext2", "path": str(p)})
    return list(load_text_splits(cfg, "lm/wikitext2", ["train"])["train"]["text"])


def calibration_samples(cal: DictConfig, task_cfg: DictConfig, tokenizer: Any, seqlen: int) -> torch.Tensor:  # noqa: ANN401
    """``nsamples`` windows of ``seqlen`` token ids, shape (nsamples, seqlen)."""
    rows = _rows(cal, task_cfg)
    rng = random.Random(int(cal.seed))
    n = int(cal.nsamples)
    out = []
    if cal.dataset == "c4":
        docs = len(rows)
        for _ in range(n):
            for _attempt in range(max(1000, 10 * docs)):
                ids = tokenizer(rows[rng.randint(0, docs - 1)], return_tensors="pt").input_ids[0]
                if ids.numel() > seqlen:
                    break
            else:
                raise UserError(f"No C4 training document found with more than calibration.seqlen={seqlen} tokens; lower it.")
            i = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[i:i + seqlen])
        return torch.stack(out)
    ids = tokenizer(" ".join(rows), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:  # their randint(0, n - seqlen - 1) has a window from n = seqlen + 1 on
        raise UserError(
            f"The calibration text ({cal.dataset}) has {ids.numel()} tokens: too few for windows of calibration.seqlen={seqlen}. "
            "Lower calibration.seqlen or give more text."
        )
    for _ in range(n):
        i = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return torch.stack(out)
