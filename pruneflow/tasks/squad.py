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

``task.features=run_squad`` builds the windows as the older ``run_squad.py``
(transformers' ``squad_convert_examples_to_features``, which movement pruning's
``masked_run_squad.py`` and PLATON's SQuAD code use): questions cut to
``task.max_query_length`` (64) tokens, a new window every ``task.doc_stride`` tokens
of the context (a step, where run_qa's stride is the overlap), and an answer may
start only at a token whose window gives it the most context on both sides
(their ``_new_check_is_max_context``).

Metrics: ``pruneflow/metrics/squad.py`` (official normalisation, EM and F1).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from pruneflow.errors import UserError, invalid
from pruneflow.metrics import compute
from pruneflow.tasks.hf_data import (
    check_local_splits,
    first,
    load_splits,
    require_columns,
    sample_limit,
)
from pruneflow.tasks.text import TextTask
from pruneflow.utils import progress

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle

log = logging.getLogger("pruneflow")

HUB_IDS = {"v1": "rajpurkar/squad", "v2": "rajpurkar/squad_v2"}
FEATURES = ("run_qa", "run_squad")
COLUMNS = ("id", "title", "context", "question", "answers")
REQUIRED = ("id", "context", "question", "answers")


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def best_spans(start: np.ndarray, end: np.ndarray, context_mask: np.ndarray, n_best: int, max_answer_length: int,
               start_mask: np.ndarray | None = None) -> list[tuple[float, int, int]]:
    """(score, start token, end token) of the valid spans among the n-best starts x ends.

    Valid: both tokens inside the context, end >= start, at most ``max_answer_length`` tokens,
    and the start allowed by ``start_mask`` if given (run_squad's max-context rule).
    """
    si = np.argsort(start)[::-1][:n_best]
    ei = np.argsort(end)[::-1][:n_best]
    s, e = np.meshgrid(si, ei, indexing="ij")
    starts_ok = context_mask if start_mask is None else context_mask & start_mask
    ok = starts_ok[s] & context_mask[e] & (e >= s) & (e - s + 1 <= max_answer_length)
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
    max_context: list[np.ndarray] | None = None,
    span_text: Callable[[int, int, int, int], str] | None = None,
) -> list[tuple[str, float]]:
    """(answer text, no-answer probability) per example from the windows' logits.

    ``offsets[f]`` holds the (start, end) character offsets of feature f's tokens
    in the context, -1 for tokens outside the context (question, specials).
    ``max_context[f]`` (run_squad): the tokens an answer may start at in feature f.
    ``span_text(example, feature, start token, end token)``: the answer's text (run_squad:
    their get_final_text); by default the context's characters between the tokens' offsets.
    """
    by_example: dict[int, list[int]] = {}
    for f, ex in enumerate(feature_example.tolist()):
        by_example.setdefault(ex, []).append(f)
    out: list[tuple[str, float]] = []
    for ex, context in enumerate(example_contexts):
        null_score: float | None = None
        cands: list[tuple[float, int, int, int, int, int]] = []  # (score, start char, end char, feature, start, end token)
        for f in by_example.get(ex, []):
            s, e, offs = start_logits[f], end_logits[f], offsets[f]
            c = int(cls_index[f])
            null = float(s[c] + e[c])
            null_score = null if null_score is None or null < null_score else null_score
            allowed = None if max_context is None else max_context[f]
            for score, a, b in best_spans(s, e, offs[:, 0] >= 0, n_best, max_answer_length, allowed):
                cands.append((score, int(offs[a, 0]), int(offs[b, 1]), f, a, b))
        cands = sorted(cands, key=lambda x: -x[0])[:n_best]
        best = cands[0] if cands else None
        # No span among the n best: both scripts (run_qa's postprocess_qa_predictions, run_squad's
        # compute_predictions_logits) fall back to a placeholder answer "empty" of score 0, which
        # v2 then weighs against the null score like any answer.
        text, score = ("empty", 0.0) if best is None else (
            span_text(ex, *best[3:]) if span_text is not None else context[best[1] : best[2]], best[0])
        p_null = 0.0
        if v2:
            diff = math.inf if null_score is None else null_score - score
            p_null = sigmoid(diff)
            if diff > null_threshold:
                text = ""
        out.append((text, p_null))
    return out


def max_context_flags(windows: list[tuple[int, int]]) -> list[np.ndarray]:
    """run_squad.py's ``_new_check_is_max_context`` for the windows (start, length) of one
    example, in doc-token units: per window, whether each of its tokens has the highest
    ``min(left, right context) + 0.01 * window length`` there (the first window wins a tie)."""
    n = max(start + length for start, length in windows)
    best = np.full(n, -np.inf)
    owner = np.full(n, -1)
    for k, (start, length) in enumerate(windows):
        pos = np.arange(start, start + length)
        score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
        better = score > best[pos]
        best[pos[better]], owner[pos[better]] = score[better], k
    return [owner[start : start + length] == k for k, (start, length) in enumerate(windows)]


# SquadExample's whitespace: what separates the words answers are mapped through
_WORD = re.compile("[^ \t\r\n\u202f]+")


class WhitespaceWords:
    """SquadExample's doc_tokens: the runs of non-whitespace characters of a context, and the
    word a character belongs to (a whitespace character to the word before it, as their
    char_to_word_offset; -1 before the first word)."""

    def __init__(self, text: str) -> None:
        matches = list(_WORD.finditer(text))
        self.words = [m.group() for m in matches]
        self.starts = [m.start() for m in matches]

    def word_of(self, char: int) -> int:
        return bisect.bisect_right(self.starts, char) - 1


def improve_answer_span(doc_tokens: list[str], start: int, end: int, answer_tokens: list[str]) -> tuple[int, int]:
    """The first (earliest start, then longest) token span inside [start, end] whose
    tokens read as the answer's own tokens; [start, end] itself when none does."""
    target = " ".join(answer_tokens)
    for new_start in range(start, end + 1):
        for new_end in range(end, new_start - 1, -1):
            if " ".join(doc_tokens[new_start : new_end + 1]) == target:
                return new_start, new_end
    return start, end


def run_squad_answer_chars(context: str, text: str, answer_start: int, doc_tokens: list[str],
                           doc_offsets: list[tuple[int, int]], answer_tokens: list[str]) -> tuple[int, int] | None:
    """The characters of the training answer as squad_convert_examples_to_features labels it,
    or None where it drops the question. The answer is mapped to whitespace words (its first
    and last character's words); when those words do not contain the answer text, the question
    is dropped. Otherwise the span is the words' tokens, narrowed to the sub-span that
    tokenizes as the answer does (their _improve_answer_span): e.g. "18" in the word "(1895)"
    keeps the whole word where no sub-span of its tokens reads "18"."""
    ws = WhitespaceWords(context)
    words = ws.words
    if not words or not doc_tokens:
        return None
    first_word = max(ws.word_of(answer_start), 0)
    last_word = max(ws.word_of(min(answer_start + len(text) - 1, len(context) - 1)), 0)
    if " ".join(words[first_word : last_word + 1]).find(" ".join(text.strip().split())) == -1:
        return None
    token_words = [ws.word_of(a) for a, _ in doc_offsets]  # non-decreasing: tokens never start on whitespace

    def first_token(word: int) -> int:  # their orig_to_tok_index[word]
        return bisect.bisect_left(token_words, word)

    tok_start = first_token(first_word)
    tok_end = first_token(last_word + 1) - 1 if last_word < len(words) - 1 else len(doc_tokens) - 1
    if tok_start > tok_end or tok_start >= len(doc_tokens):  # words without tokens: keep the characters asked for
        return answer_start, answer_start + len(text)
    tok_start, tok_end = improve_answer_span(doc_tokens, tok_start, tok_end, answer_tokens)
    return doc_offsets[tok_start][0], doc_offsets[tok_end][1]


def _without_spaces(text: str) -> tuple[str, dict[int, int]]:
    """The text without its spaces, and each remaining character's index in the text."""
    kept = [(i, c) for i, c in enumerate(text) if c != " "]
    return "".join(c for _, c in kept), {n: i for n, (i, _) in enumerate(kept)}


def final_text(pred_text: str, orig_text: str, basic_tokenize: Callable[[str], str]) -> str:
    """squad_metrics.get_final_text: the predicted tokens' text (lower-cased, punctuation split
    off) found in the basic tokenization of the original words and mapped back character by
    character, space-free positions aligned; the original words whole when it is not found or
    the two differ in length without spaces (e.g. a stripped accent)."""
    tok_text = basic_tokenize(orig_text)
    start = tok_text.find(pred_text)
    if start == -1:
        return orig_text
    end = start + len(pred_text) - 1
    orig_ns, orig_map = _without_spaces(orig_text)
    tok_ns, tok_map = _without_spaces(tok_text)
    if len(orig_ns) != len(tok_ns):
        return orig_text
    tok_to_ns = {i: n for n, i in tok_map.items()}
    if start not in tok_to_ns or end not in tok_to_ns:
        return orig_text
    return orig_text[orig_map[tok_to_ns[start]] : orig_map[tok_to_ns[end]] + 1]


def basic_tokenizer(lowercase: bool) -> Callable[[str], str]:
    """BERT's BasicTokenizer (text cleaned, CJK characters and punctuation split off,
    lower-cased and accents stripped with ``lowercase``), tokens joined by spaces; from the
    ``tokenizers`` library's BertNormalizer and BertPreTokenizer, which implement it."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    pre = BertPreTokenizer()
    return lambda text: " ".join(piece for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))


def tokens_to_string(tok: Any, tokens: list[str]) -> str:  # noqa: ANN401
    """The slow tokenizers' convert_tokens_to_string, which their scripts use: WordPiece
    pieces joined (" ##" removed) without the fast decoder's clean-up of spaces before
    punctuation; other tokenizers' own conversion."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordPiece":
        return " ".join(tokens).replace(" ##", "").strip()
    return tok.convert_tokens_to_string(tokens)


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
        self.pads_to_max_length = False  # set by prepare (task.features=run_squad)

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
        features = self.cfg.get("features", "run_qa")
        if features not in FEATURES:
            raise invalid("task.features", features, FEATURES,
                          "run_qa: the transformers run_qa.py windows (doc_stride = their overlap); run_squad: the older "
                          "run_squad.py's (questions cut to task.max_query_length tokens, doc_stride = the step between windows).")
        query = self._int("max_query_length", 64, 1) if features == "run_squad" else None  # run_qa: unused
        if query is not None:
            if query > length - 5:
                raise invalid("task.max_query_length", query, f"at most task.max_seq_length - 5 = {length - 5} under task.features=run_squad",
                              "A window must hold the question, up to 4 special tokens and some context.")
            if stride > length - query - 4:
                raise invalid("task.doc_stride", stride, f"at most task.max_seq_length - task.max_query_length - 4 = {length - query - 4} "
                              "under task.features=run_squad", "Each window moves by doc_stride tokens: it must hold the question, up to 4 "
                              "special tokens and at least doc_stride tokens of context, or context tokens would be skipped.")
        thr = self.cfg.get("null_score_diff_threshold", 0.0)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)):
            raise invalid("task.null_score_diff_threshold", thr, "a number (v2: predict no answer when null score - best span score > it)")
        return {
            "max_seq_length": length,
            "doc_stride": stride,
            "features": features,
            "max_query_length": query,
            "n_best_size": self._int("n_best_size", 20, 1),
            "max_answer_length": self._int("max_answer_length", 30, 1),
            "null_score_diff_threshold": float(thr),
        }

    # --- data ----------------------------------------------------------------------------
    def check_path(self) -> None:
        if self.cfg.get("path"):
            check_local_splits(self.cfg, None, ("train", "validation"))

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
        if s["features"] == "run_squad":
            return self._tokenize_run_squad(questions, batch["context"], s), 1 if right else 0
        return self._encode(questions, batch["context"], s, s["doc_stride"]), 1 if right else 0

    def _encode(self, questions: list[str], contexts: list[str], s: dict[str, Any], overlap: int) -> Any:
        """Question + context windows of the fast tokenizer, ``overlap`` context tokens shared
        by consecutive windows."""
        tok = self.tokenizer
        right = tok.padding_side == "right"
        pair = (questions, contexts) if right else (contexts, questions)
        try:
            return tok(
                *pair,
                truncation="only_second" if right else "only_first",
                max_length=s["max_seq_length"],
                stride=overlap,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except Exception as e:  # e.g. a question longer than the window
            raise UserError(
                f"task={self.name}: tokenising failed with task.max_seq_length={s['max_seq_length']} and "
                f"task.doc_stride={s['doc_stride']}: {e}. Raise task.max_seq_length or lower task.doc_stride."
            ) from e

    def _tokenize_run_squad(self, questions: list[str], contexts: list[str], s: dict[str, Any]) -> Any:
        """run_squad.py's windows: the question cut to ``max_query_length`` tokens, then
        windows of the rest of ``max_seq_length`` starting every ``doc_stride`` context
        tokens, i.e. an overlap of max_seq_length - doc_stride - question - specials,
        which depends on the question's length: one tokenizer call per length."""
        from transformers import BatchEncoding

        tok = self.tokenizer
        limit = s["max_query_length"]
        q_enc = tok(questions, add_special_tokens=False, return_offsets_mapping=True)
        lengths = []
        for i, (ids, offs) in enumerate(zip(q_enc["input_ids"], q_enc["offset_mapping"], strict=True)):
            if len(ids) > limit:  # their tokenizer.encode(question, truncation=True, max_length=64)
                questions[i] = questions[i][: offs[limit - 1][1]]
                ids = tok(questions[i], add_special_tokens=False)["input_ids"]
            lengths.append(len(ids))
        specials = tok.num_special_tokens_to_add(pair=True)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(s["max_seq_length"] - s["doc_stride"] - n - specials, []).append(i)
        rows: list[tuple[int, int, Any, int]] = []  # (example, window, encoding, its feature)
        for overlap, members in groups.items():
            enc = self._encode([questions[i] for i in members], [contexts[i] for i in members], s, overlap)
            for f, j in enumerate(enc["overflow_to_sample_mapping"]):
                rows.append((members[j], f, enc, f))
        rows.sort(key=lambda r: (r[0], r[1]))
        data: dict[str, list] = {key: [r[2][key][r[3]] for r in rows] for key in rows[0][2].keys()} if rows else {}
        data["overflow_to_sample_mapping"] = [r[0] for r in rows]
        return BatchEncoding(data, encoding=[r[2].encodings[r[3]] for r in rows])

    def _run_squad_answers(self, batch: dict[str, list]) -> list[tuple[int, int] | None]:
        """Per question, the characters of its training answer as run_squad.py labels it
        (:func:`run_squad_answer_chars`), None where it drops the question or has no answer."""
        tok = self.tokenizer
        docs = tok(batch["context"], add_special_tokens=False, return_offsets_mapping=True)
        out: list[tuple[int, int] | None] = []
        for j, (context, ans) in enumerate(zip(batch["context"], batch["answers"], strict=True)):
            if not ans["answer_start"]:
                out.append(None)
                continue
            text = ans["text"][0]
            out.append(run_squad_answer_chars(
                context, text, int(ans["answer_start"][0]), tok.convert_ids_to_tokens(docs["input_ids"][j]),
                [tuple(o) for o in docs["offset_mapping"][j]], tok.tokenize(text),
            ))
        return out

    def _cls(self, ids: list[int]) -> int:
        cls = self.tokenizer.cls_token_id
        return ids.index(cls) if cls is not None and cls in ids else 0

    def prepare(self, bundle: ModelBundle) -> None:
        self.tokenizer = bundle.tokenizer
        self.check_model(bundle)
        s = self.settings()
        # run_squad: every window padded to task.max_seq_length, as their processor builds its
        # dataset (padding_strategy="max_length"): the loss and the distillation term run over
        # the pads' logits too, and at evaluation the pads count among the n best starts and
        # ends (where they are then refused). Right-padding tokenizers only (BERT's).
        self.pads_to_max_length = s["features"] == "run_squad" and self.tokenizer.padding_side == "right"
        if self.pads_to_max_length:
            from transformers import DataCollatorWithPadding

            self._collator = DataCollatorWithPadding(self.tokenizer, padding="max_length", max_length=s["max_seq_length"],
                                                     return_tensors="pt")

        dropped: list[int] = []

        def encode_train(batch: dict[str, list]) -> dict[str, list]:
            enc, ctx_seq = self._tokenize(batch, s)
            sample = enc.pop("overflow_to_sample_mapping")
            offsets = enc.pop("offset_mapping")
            answer_chars = self._run_squad_answers(batch) if s["features"] == "run_squad" else None
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
                if answer_chars is not None:
                    if answer_chars[sample[i]] is None:  # dropped below
                        starts.append(cls)
                        ends.append(cls)
                        continue
                    a0, a1 = answer_chars[sample[i]]
                else:
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
            if answer_chars is not None and None in answer_chars:  # their processor gives such a question no feature
                drop = {j for j, chars in enumerate(answer_chars) if chars is None and batch["answers"][j]["answer_start"]}
                dropped.append(len(drop))
                keep = [i for i in range(len(sample)) if sample[i] not in drop]
                enc = {key: [values[i] for i in keep] for key, values in enc.items()}
            return enc

        raw_train = self.raw["train"]
        self.train_set = raw_train.map(encode_train, batched=True, remove_columns=raw_train.column_names, desc="tokenising train")
        if sum(dropped):
            log.warning(
                "task.features=run_squad: %d training question(s) dropped, as squad_convert_examples_to_features "
                "drops them: the whitespace-separated words at answer_start do not contain the answer text.", sum(dropped),
            )
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
            seq_ids = [enc.sequence_ids(i) for i in range(len(offsets))]
            out["context_offsets"] = [
                [list(o) if sid == ctx_seq else [-1, -1] for o, sid in zip(offs, ids, strict=True)]
                for offs, ids in zip(offsets, seq_ids, strict=True)
            ]
            if s["features"] == "run_squad":
                out["max_context"] = self._max_context(seq_ids, sample, ctx_seq, s["doc_stride"])
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
            "max_context": [np.asarray(m, dtype=bool) for m in feats["max_context"]] if "max_context" in feats.column_names else None,
        }
        # Only model inputs reach the batches (and ModelBundle.forward).
        return feats.remove_columns([c for c in ("example_index", "cls_index", "context_offsets", "max_context") if c in feats.column_names])

    @staticmethod
    def _max_context(seq_ids: list[list[int | None]], sample: list[int], ctx_seq: int, step: int) -> list[list[bool]]:
        """Per feature and token: may an answer start here (run_squad's max-context rule)?
        ``seq_ids``: each feature's ``sequence_ids``. The windows of an example are
        consecutive features, the k-th starting at context token k * doc_stride."""
        flags: list[list[bool]] = []
        i = 0
        while i < len(sample):
            j = i
            while j < len(sample) and sample[j] == sample[i]:
                j += 1
            positions = [[t for t, sid in enumerate(seq_ids[f]) if sid == ctx_seq] for f in range(i, j)]
            per_window = max_context_flags([(k * step, len(p)) for k, p in enumerate(positions)])
            for f, (p, ok) in enumerate(zip(positions, per_window, strict=True), start=i):
                row = [False] * len(seq_ids[f])
                for t, flag in zip(p, ok.tolist(), strict=True):
                    row[t] = flag
                flags.append(row)
            i = j
        return flags

    def check_head(self, bundle: ModelBundle) -> None:
        if not type(bundle.model).__name__.endswith("ForQuestionAnswering"):
            raise UserError(
                f"Model head does not fit task={self.name}: it needs a question-answering head "
                f"(AutoModelForQuestionAnswering), but model={bundle.name} is {type(bundle.model).__name__}."
            )

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict_spans(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every feature, trimmed to its own length (under run_squad
        kept over the whole padded window, as theirs)."""
        from torch.utils.data import DataLoader

        bundle.model.eval()
        left = self.tokenizer.padding_side == "left"
        whole = self.pads_to_max_length
        loader = DataLoader(self.eval_sets[split], batch_size=batch_size, shuffle=False, collate_fn=self.collate)
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for batch in progress(loader, desc=f"{desc} [{split}]", leave=False):
            lengths = batch["attention_mask"].sum(-1).tolist()
            with self.eval_context(device):
                out = bundle.forward({k: v.to(device) for k, v in batch.items()})
            s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for row, n in enumerate(lengths):
                sl = slice(None) if whole else slice(s.shape[1] - n, None) if left else slice(0, n)
                starts.append(s[row, sl])
                ends.append(e[row, sl])
        return starts, ends

    def _their_answer_text(self, split: str, contexts: list[str]) -> Callable[[int, int, int, int], str]:
        """run_squad's answer text (compute_predictions_logits): the span's tokens joined, the
        whitespace-separated words they lie in, then :func:`final_text`; lower-cased when the
        tokenizer lower-cases (their commands pass --do_lower_case with uncased BERT)."""
        tok = self.tokenizer
        normalizer = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
        basic = basic_tokenizer(normalizer is not None and normalizer.normalize_str("A") == "a")
        ids = self.eval_sets[split]["input_ids"]
        offsets = self.features[split]["offsets"]

        def span_text(example: int, feature: int, a: int, b: int) -> str:
            ws = WhitespaceWords(contexts[example])
            words, first, last = ws.words, ws.word_of(offsets[feature][a, 0]), ws.word_of(offsets[feature][b, 0])
            pred = " ".join(tokens_to_string(tok, tok.convert_ids_to_tokens(ids[feature][a : b + 1])).split())
            return final_text(pred, " ".join(words[first : last + 1]), basic)

        return span_text

    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        s = self.settings()
        starts, ends = self.predict_spans(bundle, split, batch_size, device, desc)
        f = self.features[split]
        raw = self.raw[split]
        contexts = list(raw["context"])
        offsets, max_context = f["offsets"], f["max_context"]
        if self.pads_to_max_length:  # the pads' positions: outside the context
            offsets = [np.pad(o, ((0, len(st) - len(o)), (0, 0)), constant_values=-1) for o, st in zip(offsets, starts, strict=True)]
            if max_context is not None:
                max_context = [np.pad(m, (0, len(st) - len(m))) for m, st in zip(max_context, starts, strict=True)]
        answers = postprocess(
            contexts, f["example"], starts, ends, offsets, f["cls"],
            n_best=s["n_best_size"], max_answer_length=s["max_answer_length"], v2=self.v2,
            null_threshold=s["null_score_diff_threshold"], max_context=max_context,
            span_text=self._their_answer_text(split, contexts) if s["features"] == "run_squad" else None,
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
