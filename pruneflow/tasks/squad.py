"""SQuAD v1.1 and v2.0 extractive question answering.

Data from the Hub (``rajpurkar/squad``, ``rajpurkar/squad_v2``) or ``task.path``
with the Hub's columns (``id``, ``title``, ``context``, ``question``,
``answers`` = {``text``: [...], ``answer_start``: [...]}) and splits ``train``
and ``validation``. Preprocessing and postprocessing follow the ``transformers``
question-answering example (``run_qa.py``):

- features: question + context, ``task.max_seq_length`` (384) tokens, contexts
  longer than that split into windows overlapping by ``task.doc_stride`` (128),
  using the fast tokenizer's overflowing tokens and offset mapping;
- training labels: start/end token of the first gold answer, or the CLS token
  when the question has no answer or the answer is not inside the window;
- answers: the ``task.n_best_size`` (20) best start and end logits of every
  window, spans of at most ``task.max_answer_length`` (30) tokens inside the
  context, scored start + end, mapped back to context characters;
- v2: the null score (CLS start + end, the lowest over the windows) against the
  best span: no answer when ``null - best > task.null_score_diff_threshold``
  (0.0). ``no_answer_prob`` is sigmoid(null - best span score): above 0.5
  exactly when the default threshold 0 predicts no answer.

Metrics: ``pruneflow/metrics/squad.py`` (official normalisation, EM and F1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from pruneflow.errors import UserError, invalid
from pruneflow.metrics import compute
from pruneflow.tasks.hf_data import first, load_splits, require_columns, sample_limit
from pruneflow.tasks.text import TextTask
from pruneflow.utils import progress

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle

HUB_IDS = {"v1": "rajpurkar/squad", "v2": "rajpurkar/squad_v2"}
COLUMNS = ("id", "title", "context", "question", "answers")
REQUIRED = ("id", "context", "question", "answers")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def best_spans(start: np.ndarray, end: np.ndarray, context_mask: np.ndarray, n_best: int, max_answer_length: int) -> list[tuple[float, int, int]]:
    """(score, start token, end token) of the valid spans among the n-best starts x ends.

    Valid: both tokens inside the context, end >= start, at most ``max_answer_length`` tokens.
    """
    si = np.argsort(start)[::-1][:n_best]
    ei = np.argsort(end)[::-1][:n_best]
    s, e = np.meshgrid(si, ei, indexing="ij")
    ok = context_mask[s] & context_mask[e] & (e >= s) & (e - s + 1 <= max_answer_length)
    s, e = s[ok], e[ok]
    scores = start[s] + end[e]
    return [(float(sc), int(a), int(b)) for sc, a, b in zip(scores, s, e, strict=True)]


def postprocess(
    example_contexts: list[str],
    feature_example: np.ndarray,
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    offsets: list[np.ndarray],
    cls_index: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    v2: bool = False,
    null_threshold: float = 0.0,
) -> list[tuple[str, float]]:
    """(answer text, no-answer probability) per example from the windows' logits.

    ``offsets[f]`` holds the (start, end) character offsets of feature f's tokens
    in the context, -1 for tokens outside the context (question, specials).
    """
    by_example: dict[int, list[int]] = {}
    for f, ex in enumerate(feature_example.tolist()):
        by_example.setdefault(ex, []).append(f)
    out: list[tuple[str, float]] = []
    for ex, context in enumerate(example_contexts):
        null_score: float | None = None
        cands: list[tuple[float, int, int]] = []  # (score, start char, end char)
        for f in by_example.get(ex, []):
            s, e, offs = start_logits[f], end_logits[f], offsets[f]
            c = int(cls_index[f])
            null = float(s[c] + e[c])
            null_score = null if null_score is None or null < null_score else null_score
            for score, a, b in best_spans(s, e, offs[:, 0] >= 0, n_best, max_answer_length):
                cands.append((score, int(offs[a, 0]), int(offs[b, 1])))
        cands = sorted(cands, key=lambda x: -x[0])[:n_best]
        text = context[cands[0][1] : cands[0][2]] if cands else ""
        p_null = 0.0
        if v2:
            diff = math.inf if not cands or null_score is None else null_score - cands[0][0]
            p_null = sigmoid(diff)
            if diff > null_threshold:
                text = ""
        out.append((text, p_null))
    return out


class Squad(TextTask):
    problem = "question_answering"
    main_metric = "f1"
    main_split = "validation"
    eval_splits = ("validation",)
    default_max_seq_length = 384
    needs_fast_tokenizer = True

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.version = str(cfg.get("version") or self.name.split("/")[-1])
        if self.version not in HUB_IDS:
            raise invalid("task.version", self.version, sorted(HUB_IDS))
        self.v2 = self.version == "v2"
        self.hub_id = str(cfg.get("hub_id") or HUB_IDS[self.version])
        self.raw: dict[str, Any] = {}
        self.features: dict[str, dict[str, Any]] = {}

    # --- configuration -------------------------------------------------------------------
    def _int(self, key: str, default: int, lo: int) -> int:
        v = self.cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise invalid(f"task.{key}", v, f"an integer >= {lo}")
        return int(v)

    def settings(self) -> dict[str, Any]:
        length = self.max_seq_length()
        stride = self._int("doc_stride", 128, 1)
        if stride >= length:
            raise invalid("task.doc_stride", stride, f"an integer smaller than task.max_seq_length ({length})")
        thr = self.cfg.get("null_score_diff_threshold", 0.0)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)):
            raise invalid("task.null_score_diff_threshold", thr, "a number (v2: predict no answer when null score - best span score > it)")
        return {
            "max_seq_length": length,
            "doc_stride": stride,
            "n_best_size": self._int("n_best_size", 20, 1),
            "max_answer_length": self._int("max_answer_length", 30, 1),
            "null_score_diff_threshold": float(thr),
        }

    # --- data ----------------------------------------------------------------------------
    def load(self) -> None:
        self.settings()
        n_train, n_eval = sample_limit(self.cfg, "max_train_samples"), sample_limit(self.cfg, "max_eval_samples")
        for split, ds in load_splits(self.cfg, self.hub_id, None, ("train", "validation")).items():
            require_columns(ds, REQUIRED, split, self.cfg, f"{self.hub_id} (columns {', '.join(COLUMNS)})")
            ds = first(ds, n_train if split == "train" else n_eval)
            self.raw[split] = self._check_answers(ds, split)

    def _check_answers(self, ds: Any, split: str) -> Any:
        answers = ds["answers"]
        if answers and isinstance(answers[0], str):  # CSV: the struct written as JSON text
            try:
                ds = ds.map(lambda b: {"answers": [json.loads(a) for a in b["answers"]]}, batched=True)
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(
                    f"task={self.name}: the 'answers' column of the '{split}' split must be a struct "
                    "{'text': [...], 'answer_start': [...]} (in CSV as JSON text); use .parquet or .jsonl for SQuAD data."
                ) from e
            answers = ds["answers"]
        for i, a in enumerate(answers):
            if not isinstance(a, dict) or "text" not in a or "answer_start" not in a or len(a["text"] or []) != len(a["answer_start"] or []):
                raise UserError(
                    f"task={self.name}: row {i} of the '{split}' split has answers={a!r}; expected "
                    "{'text': [...], 'answer_start': [...]} with one start per text."
                )
            if not self.v2 and not a["text"]:
                raise UserError(
                    f"task={self.name}: question {ds[i]['id']!r} of the '{split}' split has no answer, which SQuAD v1.1 "
                    "does not allow. Use task=squad/v2 for data with unanswerable questions."
                )
        return ds

    def tokenizer_corpus(self) -> Iterator[str]:
        yield from dict.fromkeys(self.raw["train"]["context"])  # each paragraph once
        yield from self.raw["train"]["question"]

    def _tokenize(self, batch: dict[str, list], s: dict[str, Any]) -> tuple[Any, int]:
        tok = self.tokenizer
        right = tok.padding_side == "right"
        questions = [q.lstrip() for q in batch["question"]]  # leading spaces waste the window
        pair = (questions, batch["context"]) if right else (batch["context"], questions)
        try:
            enc = tok(
                *pair,
                truncation="only_second" if right else "only_first",
                max_length=s["max_seq_length"],
                stride=s["doc_stride"],
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except Exception as e:  # e.g. a question longer than the window
            raise UserError(
                f"task={self.name}: tokenising failed with task.max_seq_length={s['max_seq_length']} and "
                f"task.doc_stride={s['doc_stride']}: {e}. Raise task.max_seq_length or lower task.doc_stride."
            ) from e
        return enc, 1 if right else 0

    def _cls(self, ids: list[int]) -> int:
        cls = self.tokenizer.cls_token_id
        return ids.index(cls) if cls is not None and cls in ids else 0

    def prepare(self, bundle: ModelBundle) -> None:
        self.tokenizer = bundle.tokenizer
        self.check_model(bundle)
        s = self.settings()

        def encode_train(batch: dict[str, list]) -> dict[str, list]:
            enc, ctx_seq = self._tokenize(batch, s)
            sample = enc.pop("overflow_to_sample_mapping")
            offsets = enc.pop("offset_mapping")
            starts, ends = [], []
            for i, offs in enumerate(offsets):
                cls = self._cls(enc["input_ids"][i])
                ans = batch["answers"][sample[i]]
                seq = enc.sequence_ids(i)
                ctx = [t for t, sid in enumerate(seq) if sid == ctx_seq]
                if not ans["answer_start"] or not ctx:
                    starts.append(cls)
                    ends.append(cls)
                    continue
                a0 = int(ans["answer_start"][0])
                a1 = a0 + len(ans["text"][0])
                lo, hi = ctx[0], ctx[-1]
                if offs[lo][0] > a0 or offs[hi][1] < a1:  # the answer is not (fully) in this window
                    starts.append(cls)
                    ends.append(cls)
                    continue
                st, en = lo, hi
                while st < hi and offs[st + 1][0] <= a0:
                    st += 1
                while en > lo and offs[en - 1][1] >= a1:
                    en -= 1
                starts.append(st)
                ends.append(en)
            enc = dict(enc)
            enc["start_positions"], enc["end_positions"] = starts, ends
            return enc

        raw_train = self.raw["train"]
        self.train_set = raw_train.map(encode_train, batched=True, remove_columns=raw_train.column_names, desc="tokenising train")
        self.eval_sets = {}
        for split in self.eval_splits:
            self.eval_sets[split] = self._eval_features(split, s)

    def _eval_features(self, split: str, s: dict[str, Any]) -> Any:
        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            enc, ctx_seq = self._tokenize(batch, s)
            sample = enc.pop("overflow_to_sample_mapping")
            offsets = enc.pop("offset_mapping")
            out = dict(enc)
            out["example_index"] = [indices[j] for j in sample]
            out["cls_index"] = [self._cls(ids) for ids in enc["input_ids"]]
            out["context_offsets"] = [
                [list(o) if sid == ctx_seq else [-1, -1] for o, sid in zip(offs, enc.sequence_ids(i), strict=True)]
                for i, offs in enumerate(offsets)
            ]
            return out

        raw = self.raw[split]
        feats = raw.map(encode, batched=True, with_indices=True, remove_columns=raw.column_names, desc=f"tokenising {split}")
        offsets: list[np.ndarray] = []
        for chunk in feats.select_columns(["context_offsets"]).iter(batch_size=1000):
            offsets += [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in chunk["context_offsets"]]
        self.features[split] = {
            "example": np.asarray(feats["example_index"], dtype=np.int64),
            "cls": np.asarray(feats["cls_index"], dtype=np.int64),
            "offsets": offsets,
        }
        # Only model inputs reach the batches (and ModelBundle.forward).
        return feats.remove_columns(["example_index", "cls_index", "context_offsets"])

    def check_head(self, bundle: ModelBundle) -> None:
        if not type(bundle.model).__name__.endswith("ForQuestionAnswering"):
            raise UserError(
                f"Model head does not fit task={self.name}: it needs a question-answering head "
                f"(AutoModelForQuestionAnswering), but model={bundle.name} is {type(bundle.model).__name__}."
            )

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict_spans(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every feature, trimmed to its own length."""
        from torch.utils.data import DataLoader

        bundle.model.eval()
        left = self.tokenizer.padding_side == "left"
        loader = DataLoader(self.eval_sets[split], batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for batch in progress(loader, desc=f"{desc} [{split}]", leave=False):
            lengths = batch["attention_mask"].sum(-1).tolist()
            out = bundle.forward({k: v.to(device) for k, v in batch.items()})
            s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, n in enumerate(lengths):
                sl = slice(s.shape[1] - n, None) if left else slice(0, n)
                starts.append(s[row, sl])
                ends.append(e[row, sl])
        return starts, ends

    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        s = self.settings()
        starts, ends = self.predict_spans(bundle, split, batch_size, device, desc)
        f = self.features[split]
        raw = self.raw[split]
        answers = postprocess(
            list(raw["context"]), f["example"], starts, ends, f["offsets"], f["cls"],
            n_best=s["n_best_size"], max_answer_length=s["max_answer_length"], v2=self.v2,
            null_threshold=s["null_score_diff_threshold"],
        )
        preds = [a for a, _ in answers]
        refs = [list(a["text"]) or [""] for a in raw["answers"]]
        metrics = compute("squad", self.version, preds, refs)
        records = []
        for qid, (text, p_null), ref in zip(raw["id"], answers, refs, strict=True):
            r: dict[str, Any] = {"id": qid, "prediction": text, "reference": ref}
            if self.v2:
                r["no_answer_prob"] = round(p_null, 6)
            records.append(r)
        return metrics, records
