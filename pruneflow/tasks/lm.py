"""Language-modelling tasks for causal LMs: WikiText-2 and C4 perplexity.

Perplexity is computed as SparseGPT and Wanda compute it: the evaluation text is joined
into one string (WikiText-2: the test split's rows joined with ``"\\n\\n"``; C4: the first
1,100 validation documents joined with ``" "``), tokenized once, and cut into
non-overlapping windows of ``seqlen`` tokens; the last partial window is dropped (C4:
only the first 256 windows). Each window's mean next-token loss is weighted by ``seqlen``:
``ppl = exp(sum_w seqlen * loss_w / (windows * seqlen))``.

``task.path``: a local directory with one file per split (``train``, ``test`` /
``validation``) as ``.txt`` (one row per line) or ``.jsonl``/``.parquet``/``.csv``
with a ``text`` column, the Hub datasets' column.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from pruneflow import hub
from pruneflow.errors import UserError, invalid
from pruneflow.tasks.base import Task
from pruneflow.tasks.hf_data import load_splits, require_columns
from pruneflow.utils import progress

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle

log = logging.getLogger("pruneflow")

# task name -> (hub id, hub config or c4's data files, evaluation split, join string, eval documents)
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
SOURCES: dict[str, dict[str, Any]] = {
    "lm/wikitext2": {"hub_id": "wikitext", "hub_config": "wikitext-2-raw-v1", "eval_split": "test", "join": "\n\n", "train_join": " "},
    "lm/c4": {"hub_id": "allenai/c4", "hub_config": None, "eval_split": "validation", "join": " ", "train_join": None},
}


def load_text_splits(cfg: DictConfig, name: str, splits: list[str]) -> dict[str, Any]:
    """The raw ``text`` rows of a language-modelling dataset's splits (hub or ``path``)."""
    src = SOURCES[name]
    if name == "lm/c4" and not cfg.get("path"):
        import datasets

        hub.offline_if_unreachable()
        try:
            return {s: datasets.load_dataset(src["hub_id"], data_files={s: C4_FILES[s]}, split=s) for s in splits}
        except Exception as e:  # no network, renamed files
            raise UserError(
                f"Could not load C4 ({src['hub_id']}, files {[C4_FILES[s] for s in splits]}) from the Hugging Face Hub: "
                f"{type(e).__name__}: {e}. Offline, set the path to a directory with train and validation files "
                "(.txt, or .jsonl/.parquet with a 'text' column)."
            ) from e
    out = load_splits(cfg, src["hub_id"], src["hub_config"], splits)
    for split, ds in out.items():
        require_columns(ds, ["text"], split, cfg, src["hub_id"])
    return out


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> int:
    n = ids.numel() // seqlen
    return n if limit is None else min(n, limit)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, device: torch.device, limit: int | None = None, desc: str = "perplexity") -> dict[str, float]:
    """Perplexity over non-overlapping ``seqlen`` windows of ``ids`` (1-D token ids)."""
    n = windows(ids, seqlen, limit)
    if n == 0:
        raise UserError(f"The evaluation text has {ids.numel()} tokens, fewer than one window of task.seqlen={seqlen}.")
    nll = 0.0
    model.eval()
    for i in progress(range(n), desc=desc, leave=False):
        batch = ids[i * seqlen:(i + 1) * seqlen].reshape(1, -1).to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nll += float(loss) * seqlen
    return {"perplexity": math.exp(nll / (n * seqlen)), "windows": n, "tokens": n * seqlen}


class LanguageModeling(Task):
    modality = "text"
    problem = "causal_lm"
    main_metric = "perplexity"

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.name = str(cfg.get("name"))
        self.source = SOURCES[self.name]
        self.main_split = self.eval_split = str(cfg.get("eval_split") or self.source["eval_split"])
        self.eval_splits = (self.eval_split,)
        self.rows: dict[str, Any] = {}
        self.eval_ids: torch.Tensor | None = None

    def check(self) -> None:
        for key in ("seqlen", "max_eval_windows", "eval_documents"):
            v = self.cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise invalid(f"task.{key}", v, "an integer >= 2, or null")

    def load(self) -> None:
        self.check()
        self.rows = load_text_splits(self.cfg, self.name, ["train", self.eval_split])
        # the datasets are the full ones: a language-modelling task needs no train_set of examples
        self.train_set = self.rows["train"]

    def tokenizer_corpus(self) -> Iterator[str]:
        for row in self.rows["train"]["text"]:
            if row.strip():
                yield row

    def eval_text(self) -> str:
        rows = self.rows[self.eval_split]["text"]
        docs = self.cfg.get("eval_documents")
        if docs is not None:
            rows = rows[:docs]
        return self.source["join"].join(rows)

    def prepare(self, bundle: ModelBundle) -> None:
        self.eval_ids = bundle.tokenizer(self.eval_text(), return_tensors="pt").input_ids[0]
        self.eval_sets = {self.eval_split: self.eval_ids}

    def seqlen(self, model: torch.nn.Module) -> int:
        """``task.seqlen``, or the model's context length (Wanda and SparseGPT use
        ``max_position_embeddings``: 2048 for LLaMA-1/OPT, 4096 for LLaMA-2)."""
        v = self.cfg.get("seqlen")
        limit = getattr(model.config, "max_position_embeddings", None)
        if v is None:
            if limit is None:
                raise UserError(f"task={self.name}: the model has no max_position_embeddings; set task.seqlen.")
            return int(limit)
        if limit is not None and v > limit:
            raise invalid("task.seqlen", v, f"at most {limit} (the model's max_position_embeddings)")
        return int(v)

    def evaluate_lm(self, bundle: ModelBundle, device: torch.device, desc: str = "eval") -> dict[str, float]:
        """``{"perplexity": ...}``; the windowing is in ``self.windowing``."""
        seqlen = self.seqlen(bundle.model)
        out = perplexity(bundle.model, self.eval_ids, seqlen, device, self.cfg.get("max_eval_windows"), desc=f"{desc} [{self.name}]")
        self.windowing = {"split": self.eval_split, "seqlen": seqlen, "windows": out["windows"], "tokens": out["tokens"],
                          "text_tokens": int(self.eval_ids.numel()), "join": self.source["join"],
                          "rule": "non-overlapping windows of seqlen tokens; the last partial window is dropped"}
        return {"perplexity": out["perplexity"]}

    def data_summary(self) -> dict[str, int]:
        return {"train_rows": len(self.rows.get("train", [])), "eval_tokens": 0 if self.eval_ids is None else int(self.eval_ids.numel())}
