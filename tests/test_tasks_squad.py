"""SQuAD v1.1 / v2.0: Hub-format data, windows over long contexts, n-best postprocessing, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from task_data import compose, read_jsonl, run_pipeline, squad_rows, write_dataset, write_squad

from pruneflow.errors import UserError
from pruneflow.metrics import compute_squad
from pruneflow.models import build_model
from pruneflow.tasks import build_task
from pruneflow.tasks.squad import max_context_flags, postprocess, sigmoid

# Windows of 24 tokens with a stride of 8: every synthetic context (~30 tokens) overflows.
SMALL = ["task.max_seq_length=24", "task.doc_stride=8"]


def prepared(tmp_path: Path, version: str, fmt: str = "jsonl", extra: list[str] | None = None):  # noqa: ANN201
    path = write_squad(tmp_path / "data", fmt, n_train=12, n_eval=8, v2=version == "v2")
    cfg = compose(["model=bert_tiny", f"task=squad/{version}", f"task.path={path}", f"task.cache_dir={tmp_path / 'cache'}", *(extra or [])])
    task = build_task(cfg.task, 0)
    task.load()
    bundle = build_model(cfg.model, task)
    task.prepare(bundle)
    return task, bundle


def test_configs() -> None:
    for v, hub in (("v1", "rajpurkar/squad"), ("v2", "rajpurkar/squad_v2")):
        cfg = compose([f"task=squad/{v}"])
        assert cfg.task.hub_id == hub and cfg.task.max_seq_length == 384 and cfg.task.doc_stride == 128
        assert cfg.task.n_best_size == 20 and cfg.task.max_answer_length == 30
    assert compose(["task=squad/v2"]).task.null_score_diff_threshold == 0.0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_training_labels_point_at_the_answer(tmp_path: Path, fmt: str) -> None:
    task, bundle = prepared(tmp_path, "v1", fmt, SMALL)
    assert type(bundle.model).__name__ == "BertForQuestionAnswering"
    answers = {a for r in squad_rows(12, 0) for a in r["answers"]["text"]}
    ds = task.train_set
    assert len(ds) > 12  # long contexts were split into several windows
    hits = 0
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["input_ids"]) <= 24
        st, en = item["start_positions"], item["end_positions"]
        if st == 0:  # CLS: the answer is not in this window
            assert en == 0
            continue
        hits += 1
        assert bundle.tokenizer.decode(item["input_ids"][st : en + 1]) in answers
    assert hits >= 12  # every question's answer lies fully inside at least one window



def _run_qa_windows(tok, question: str, context: str, max_seq_length: int, doc_stride: int) -> list[tuple[int, int]]:  # noqa: ANN001
    """run_qa.py's windows (the fast tokenizer's overflow, stride = overlap), transcribed on
    the context's own tokens: (first doc token, doc tokens) of each window, the next window
    starting doc_stride tokens before the end of the previous one."""
    n_doc = len(tok(context, add_special_tokens=False)["input_ids"])
    room = max_seq_length - len(tok(question, add_special_tokens=False)["input_ids"]) - 3  # [CLS] q [SEP] ctx [SEP]
    spans, start = [], 0
    while True:
        spans.append((start, min(room, n_doc - start)))
        if start + room >= n_doc:
            return spans
        start += room - doc_stride


def test_run_qa_windows_overlap_by_doc_stride_and_label_whole_answers(tmp_path: Path) -> None:
    """Windows of 24 tokens overlapping by doc_stride=8 context tokens; a training window is
    labelled with the answer's first and last token exactly when the whole answer is inside
    it (also when it starts at the window's first context token), else CLS (0)."""
    task, bundle = prepared(tmp_path, "v1", "jsonl", SMALL)
    tok = bundle.tokenizer
    for split, rows in (("train", squad_rows(12, 0)), ("validation", squad_rows(8, 1))):
        want_offsets, want_labels = [], []
        for r in rows:
            doc = tok(r["context"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            n_q = len(tok(r["question"], add_special_tokens=False)["input_ids"])
            a0 = r["answers"]["answer_start"][0]
            a1 = a0 + len(r["answers"]["text"][0])
            for start, n in _run_qa_windows(tok, r["question"], r["context"], 24, 8):
                window = [list(o) for o in doc[start : start + n]]
                want_offsets.append(window)
                first = [j for j, o in enumerate(window) if o[0] == a0]
                last = [j for j, o in enumerate(window) if o[1] == a1]
                want_labels.append((n_q + 2 + first[0], n_q + 2 + last[0]) if first and last else (0, 0))
        if split == "validation":
            f = task.features["validation"]
            got = [[list(map(int, o)) for o in offs if o[0] >= 0] for offs in f["offsets"]]
            assert got == want_offsets
        else:
            ds = task.train_set
            assert list(zip(ds["start_positions"], ds["end_positions"], strict=True)) == want_labels
            assert sum(s != 0 for s, _ in want_labels) >= 12 and (0, 0) in want_labels
    # an answer that starts at the second window's first context token is labelled there
    import datasets

    row = squad_rows(1, 0)[0]
    doc = tok(row["context"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    (_, room), (start, _) = _run_qa_windows(tok, row["question"], row["context"], 24, 8)[:2]
    a0, a1 = doc[start][0], doc[start + 1][1]
    row["answers"] = {"text": [row["context"][a0:a1]], "answer_start": [a0]}
    task.raw["train"] = datasets.Dataset.from_list([row])
    task.prepare(bundle)
    n_q = len(tok(row["question"], add_special_tokens=False)["input_ids"])
    assert task.train_set[1]["start_positions"] == n_q + 2 and task.train_set[1]["end_positions"] == n_q + 3



def test_eval_features_map_to_their_examples_past_one_map_batch(tmp_path: Path) -> None:
    """datasets.map tokenises 1,000 examples per call: the features of example 1,000 and
    later must name it (the split's index), not its index inside the call."""
    import datasets

    task, _ = prepared(tmp_path, "v1", "jsonl", SMALL)
    rows = squad_rows(8, 1)
    task.raw["validation"] = datasets.Dataset.from_list([rows[i % 8] for i in range(1004)])
    task._eval_features("validation", {**task.settings(), "max_seq_length": 64})  # one window per example
    assert task.features["validation"]["example"].tolist() == list(range(1004))



@pytest.mark.parametrize("side", ["right", "left"])
def test_predicted_logits_are_trimmed_to_each_features_tokens(tmp_path: Path, side: str) -> None:
    """Batches are padded to their longest feature: each feature's start/end logits are those
    of its own tokens, after the padding for a left-padding tokenizer."""
    from types import SimpleNamespace

    import torch

    task, bundle = prepared(tmp_path, "v1", "jsonl", SMALL)
    bundle.tokenizer.padding_side = side
    full = task.eval_sets["validation"]
    # features of 20..24 tokens (the last one [SEP]) in one batch: the shorter ones are padded
    feats = [{k: v[: 19 + i % 5] + v[-1:] for k, v in full[i].items()} for i in range(6)]
    task.eval_sets["validation"] = feats
    fake = SimpleNamespace(model=torch.nn.Identity(),
                           forward=lambda b: SimpleNamespace(start_logits=b["input_ids"].float(), end_logits=-b["input_ids"].float()))
    starts, ends = task.predict_spans(fake, "validation", 6, torch.device("cpu"))
    assert [s.tolist() for s in starts] == [[float(t) for t in f["input_ids"]] for f in feats]
    assert [(-e).tolist() for e in ends] == [s.tolist() for s in starts]


def test_squad_evaluation_runs_under_the_eval_precision(tmp_path: Path) -> None:
    """trainer.eval_precision reaches the question-answering forward (its own loop)."""
    from types import SimpleNamespace

    import torch

    task, _ = prepared(tmp_path, "v1", "jsonl", SMALL)
    seen: list[object] = []

    def forward(b: dict) -> SimpleNamespace:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return SimpleNamespace(start_logits=b["input_ids"].float(), end_logits=b["input_ids"].float())

    fake = SimpleNamespace(model=torch.nn.Identity(), forward=forward)
    task.predict_spans(fake, "validation", 4, torch.device("cpu"))
    task.eval_autocast = torch.bfloat16
    task.predict_spans(fake, "validation", 4, torch.device("cpu"))
    half = len(seen) // 2
    assert half >= 2 and seen == [None] * half + [torch.bfloat16] * half


def _oracle(task, split: str = "validation", max_context: list | None = None) -> list[tuple[str, float]]:  # noqa: ANN001
    """Logits that point at the gold span (or at CLS for unanswerable questions)."""
    f = task.features[split]
    raw = task.raw[split]
    starts, ends = [], []
    for k, ex in enumerate(f["example"].tolist()):
        offs = f["offsets"][k]
        s, e = np.zeros(len(offs)), np.zeros(len(offs))
        ans = raw[ex]["answers"]
        if ans["text"]:
            a0 = ans["answer_start"][0]
            a1 = a0 + len(ans["text"][0])
            st, en = np.flatnonzero(offs[:, 0] == a0), np.flatnonzero(offs[:, 1] == a1)
            if len(st) and len(en):
                s[st[0]], e[en[0]] = 10.0, 10.0
        else:
            s[f["cls"][k]], e[f["cls"][k]] = 10.0, 10.0
        starts.append(s)
        ends.append(e)
    return postprocess(list(raw["context"]), f["example"], starts, ends, f["offsets"], f["cls"], 20, 30, task.v2, 0.0, max_context)



def test_evaluate_v2_on_oracle_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Squad.evaluate from given logits: gold spans and CLS for unanswerable questions score
    100%; an unanswerable question's record has reference [""] and no_answer_prob > 0.5."""
    task, _ = prepared(tmp_path, "v2", "jsonl", SMALL)
    f, raw = task.features["validation"], task.raw["validation"]
    starts, ends = [], []
    for k, ex in enumerate(f["example"].tolist()):
        offs, ans = f["offsets"][k], raw[ex]["answers"]
        s, e = np.zeros(len(offs)), np.zeros(len(offs))
        if ans["text"]:
            a0 = ans["answer_start"][0]
            s[offs[:, 0] == a0], e[offs[:, 1] == a0 + len(ans["text"][0])] = 10.0, 10.0
        else:
            s[f["cls"][k]], e[f["cls"][k]] = 10.0, 10.0
        starts.append(s)
        ends.append(e)
    monkeypatch.setattr(task, "predict_spans", lambda *a, **k: (starts, ends))
    metrics, records = task.evaluate(None, "validation", 4, None)
    assert metrics == {"exact_match": 1.0, "f1": 1.0, "has_ans_exact": 1.0, "has_ans_f1": 1.0, "no_ans_exact": 1.0, "no_ans_f1": 1.0}
    rows = squad_rows(8, 1, 4)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    for rec, row in zip(records, rows, strict=True):
        if row["answers"]["text"]:
            assert rec["reference"] == row["answers"]["text"] and rec["no_answer_prob"] < 0.5
        else:
            assert rec["reference"] == [""] and rec["prediction"] == "" and rec["no_answer_prob"] > 0.5


def test_oracle_logits_give_the_gold_answers_v1(tmp_path: Path) -> None:
    task, _ = prepared(tmp_path, "v1", "jsonl", SMALL)
    preds = [p for p, _ in _oracle(task)]
    golds = [r["answers"]["text"][0] for r in squad_rows(8, 1)]
    assert preds == golds
    assert len(task.features["validation"]["example"]) > 8


def test_oracle_logits_give_the_gold_answers_v2(tmp_path: Path) -> None:
    task, _ = prepared(tmp_path, "v2", "parquet", SMALL)
    out = _oracle(task)
    golds = [(r["answers"]["text"] or [""])[0] for r in squad_rows(8, 1, 4)]
    assert [p for p, _ in out] == golds and "" in golds
    for (_, p_null), gold in zip(out, golds, strict=True):
        assert (p_null > 0.5) == (gold == "")


def test_postprocess_by_hand() -> None:
    context = "abc def ghi"
    # tokens: CLS, question, SEP, abc, def, ghi, SEP
    offs = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]])
    s = np.array([0, 0, 9, 1, 5, 2, 0], dtype=float)  # 9 outside the context: never an answer
    e = np.array([0, 0, 0, 0, 1, 6, 9], dtype=float)  # 9 on the last SEP: never an answer
    one = np.array([0])
    cls = np.array([0])
    assert postprocess([context], one, [s], [e], [offs], cls)[0][0] == "def ghi"  # 5 + 6
    assert postprocess([context], one, [s], [e], [offs], cls, max_answer_length=1)[0][0] == "ghi"  # 2 + 6
    s2, e2 = s.copy(), e.copy()
    s2[0], e2[0] = 6.0, 6.0  # null score 12 > best span 11
    text, p = postprocess([context], one, [s2], [e2], [offs], cls, v2=True)[0]
    assert text == "" and p == pytest.approx(sigmoid(1.0))
    assert postprocess([context], one, [s2], [e2], [offs], cls, v2=True, null_threshold=2.0)[0][0] == "def ghi"
    # two windows of one example: the null score is the lowest over windows
    two = np.array([0, 0])
    text, p = postprocess([context], two, [s2, s], [e2, e], [offs, offs], np.array([0, 0]), v2=True)[0]
    assert text == "def ghi" and p == pytest.approx(sigmoid(0.0 - 11.0))
    # n_best: with 1, the top start (9, outside the context) and top end (9, on SEP) leave no span;
    # run_qa and run_squad then answer a placeholder "empty" of score 0, which v2 weighs
    # against the null score (0 here: not above the threshold, so "empty" stands)
    assert postprocess([context], one, [s], [e], [offs], cls, n_best=1)[0][0] == "empty"
    assert postprocess([context], one, [s], [e], [offs], cls, n_best=1, v2=True)[0] == ("empty", 0.5)
    assert postprocess([context], one, [s2], [e2], [offs], cls, n_best=1, v2=True)[0] == ("", pytest.approx(sigmoid(12.0)))
    assert postprocess([context], one, [s], [e], [offs], cls, n_best=2)[0][0] == "def ghi"
    # an end before its start is no span: ghi (5 + 2) wins over the reversed (5 + 5)
    s3, e3 = np.array([0, 0, 0, 0, 1, 5, 0.0]), np.array([0, 0, 0, 0, 5, 2, 0.0])
    assert postprocess([context], one, [s3], [e3], [offs], cls)[0][0] == "ghi"
    # a null score equal to the best span's is an answer (run_qa: no answer only when strictly above)
    s4, e4 = np.array([3, 0, 0, 0, 1, 2, 0.0]), np.array([3, 0, 0, 0, 1, 4, 0.0])
    text, p = postprocess([context], one, [s4], [e4], [offs], cls, v2=True)[0]
    assert text == "ghi" and p == pytest.approx(0.5)


# --- task.features=run_squad: the older run_squad.py windows --------------------------------------
def _their_windows(tok, question: str, context: str, max_seq_length: int, doc_stride: int, max_query_length: int):  # noqa: ANN001, ANN202
    """squad_convert_example_to_features (transformers' legacy SQuAD processor), on token
    ids: the question cut to max_query_length tokens; while len(spans) * doc_stride <
    len(doc tokens): a window of the remaining doc tokens, the next one starting doc_stride
    later, until a window reaches the end; each feature [CLS] q [SEP] span [SEP]. Also
    _new_check_is_max_context for every span token."""
    query = tok(question, add_special_tokens=False, truncation=True, max_length=max_query_length)["input_ids"]
    doc = tok(context, add_special_tokens=False)["input_ids"]
    room = max_seq_length - len(query) - 3
    spans = []
    while len(spans) * doc_stride < len(doc):
        start = len(spans) * doc_stride
        spans.append((start, min(room, len(doc) - start)))
        if start + room >= len(doc):
            break

    def is_max_context(cur: int, position: int) -> bool:
        best_score, best = None, None
        for k, (start, length) in enumerate(spans):
            end = start + length - 1
            if position < start or position > end:
                continue
            score = min(position - start, end - position) + 0.01 * length
            if best_score is None or score > best_score:
                best_score, best = score, k
        return cur == best

    ids = [[tok.cls_token_id, *query, tok.sep_token_id, *doc[a : a + n], tok.sep_token_id] for a, n in spans]
    flags = [[is_max_context(k, a + j) for j in range(n)] for k, (a, n) in enumerate(spans)]
    return ids, flags


def test_run_squad_windows_are_squad_convert_examples_to_features(tmp_path: Path) -> None:
    """Windows of 24 tokens, a step of 4, questions cut to 3 tokens: the features (train and
    evaluation) and the max-context flags equal a transcription of their processor."""
    task, bundle = prepared(tmp_path, "v1", "jsonl", ["task.max_seq_length=24", "task.doc_stride=4", "task.features=run_squad", "task.max_query_length=3"])
    tok = bundle.tokenizer
    for split, rows, ds in (("train", squad_rows(12, 0), task.train_set), ("validation", squad_rows(8, 1), task.eval_sets["validation"])):
        want_ids, want_flags = [], []
        for r in rows:
            ids, flags = _their_windows(tok, r["question"], r["context"], 24, 4, 3)
            want_ids += ids
            want_flags += flags
        assert len(want_ids) > 2 * len(rows)  # several windows per context
        assert ds["input_ids"] == want_ids, split
        if split == "validation":
            f = task.features["validation"]
            got = [[bool(m[t]) for t in range(len(m)) if offs[t, 0] >= 0] for m, offs in zip(f["max_context"], f["offsets"], strict=True)]
            assert got == want_flags
    # run_qa's windows differ (doc_stride is their overlap, the question whole)
    qa, _ = prepared(tmp_path / "qa", "v1", "jsonl", ["task.max_seq_length=24", "task.doc_stride=4"])
    assert qa.train_set["input_ids"] != task.train_set["input_ids"]


def _their_doc_tokens(text: str) -> tuple[list[str], list[int]]:
    """SquadExample's doc_tokens and char_to_word_offset, transcribed: whitespace is space,
    tab, CR, LF and U+202F (not U+00A0); a whitespace character maps to the word before it."""
    words: list[str] = []
    char_to_word: list[int] = []
    prev_space = True
    for c in text:
        if c in " \t\r\n" or ord(c) == 0x202F:
            prev_space = True
        else:
            if prev_space:
                words.append(c)
            else:
                words[-1] += c
            prev_space = False
        char_to_word.append(len(words) - 1)
    return words, char_to_word


def _their_training_labels(tok, row: dict, max_seq_length: int, doc_stride: int, max_query_length: int):  # noqa: ANN001, ANN202
    """squad_convert_example_to_features with is_training=True, transcribed as written: the
    context split into whitespace words (SquadExample), the answer's words from its first and
    last character, the question dropped ([]) when those words do not contain the answer
    text, every word tokenized on its own, _improve_answer_span over the words' tokens; per
    window (input ids, start, end), CLS (0) where the span is not inside the window."""
    context, text, char = row["context"], row["answers"]["text"][0], row["answers"]["answer_start"][0]
    words, char_to_word = _their_doc_tokens(context)
    start_word = char_to_word[char]
    end_word = char_to_word[min(char + len(text) - 1, len(char_to_word) - 1)]
    if " ".join(words[start_word : end_word + 1]).find(" ".join(text.strip().split())) == -1:
        return []
    orig_to_tok, doc_tokens = [], []
    for w in words:
        orig_to_tok.append(len(doc_tokens))
        doc_tokens += tok.tokenize(w)
    tok_start = orig_to_tok[start_word]
    tok_end = orig_to_tok[end_word + 1] - 1 if end_word < len(words) - 1 else len(doc_tokens) - 1
    target = " ".join(tok.tokenize(text))
    found = [(a, b) for a in range(tok_start, tok_end + 1) for b in range(tok_end, a - 1, -1) if " ".join(doc_tokens[a : b + 1]) == target]
    tok_start, tok_end = found[0] if found else (tok_start, tok_end)
    ids, _ = _their_windows(tok, row["question"], context, max_seq_length, doc_stride, max_query_length)
    query = len(tok(row["question"], add_special_tokens=False, truncation=True, max_length=max_query_length)["input_ids"])
    out = []
    for k, feature in enumerate(ids):
        doc_start, doc_end = k * doc_stride, k * doc_stride + len(feature) - query - 3 - 1
        inside = tok_start >= doc_start and tok_end <= doc_end
        out.append((feature, *((tok_start - doc_start + query + 2, tok_end - doc_start + query + 2) if inside else (0, 0))))
    return out


def test_run_squad_training_labels_and_dropped_questions_are_their_processors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under task.features=run_squad the training answers are labelled as their processor
    does: "18" inside the word "(1895)" labels the whole word (no sub-span of its tokens reads
    "18"), where the characters alone give the one token "1895"; a question whose
    answer_start does not point at its answer text is dropped; the rest as before."""
    rows = squad_rows(12, 0)
    base = "the year is (1895) and the place is far away from here."
    for i in (0, 1, 2):  # "1895" often enough to be one token of the trained vocabulary
        rows[i] = {**rows[i], "context": base, "question": "what year?", "answers": {"text": ["18"], "answer_start": [base.index("1895")]}}
    rows[3] = {**rows[3], "answers": {"text": ["zulu"], "answer_start": [4]}}  # not what the context says there
    path = write_dataset(tmp_path / "data", {"train": rows, "validation": squad_rows(4, 1)}, "jsonl")
    cfg = compose(["model=bert_tiny", "task=squad/v1", f"task.path={path}", f"task.cache_dir={tmp_path / 'cache'}", "task.features=run_squad",
                   "task.max_seq_length=24", "task.doc_stride=4", "task.max_query_length=3"])
    task = build_task(cfg.task, 0)
    task.load()
    bundle = build_model(cfg.model, task)
    tok = bundle.tokenizer
    assert tok.tokenize("(1895)") == ["(", "1895", ")"]
    with caplog.at_level("WARNING", logger="pruneflow"):
        task.prepare(bundle)
    assert "1 training question(s) dropped" in caplog.text
    want = [f for r in rows for f in _their_training_labels(tok, r, 24, 4, 3)]
    ds = task.train_set
    got = list(zip(ds["input_ids"], ds["start_positions"], ds["end_positions"], strict=True))
    assert got == want
    year = [(st, en) for ids, st, en in got if st and tok.convert_ids_to_tokens(ids[st : en + 1]) == ["(", "1895", ")"]]
    assert len(year) >= 3  # the whole word, in at least one window of each of the three questions


@pytest.mark.parametrize("text", ["  the year is (1895)\tand\n\nmore ", "a\u202fb\u00a0c  d", "", "   ", "x"])
def test_whitespace_words_are_squad_examples_doc_tokens(text: str) -> None:
    """SquadExample's doc_tokens and char_to_word_offset, transcribed: whitespace is space,
    tab, CR, LF and U+202F (not U+00A0); a whitespace character maps to the word before it."""
    from pruneflow.tasks.squad import WhitespaceWords

    words, char_to_word = _their_doc_tokens(text)
    ws = WhitespaceWords(text)
    assert ws.words == words
    assert [ws.word_of(i) for i in range(len(text))] == char_to_word


def _their_basic_tokenize(text: str) -> str:
    """BERT's BasicTokenizer(do_lower_case=True), transcribed: control characters dropped,
    whitespace to spaces, lower-cased, accents stripped (NFD, marks dropped), punctuation
    split off; the tokens joined by spaces."""
    import unicodedata

    def punct(c: str) -> bool:
        o = ord(c)
        return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c).startswith("P")

    text = "".join(" " if c in " \t\n\r" or unicodedata.category(c) == "Zs" else c for c in text
                   if not (ord(c) in (0, 0xFFFD) or (unicodedata.category(c).startswith("C") and c not in "\t\n\r")))
    out = []
    for word in text.split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for c in word:
            if punct(c):
                out += [piece] if piece else []
                out.append(c)
                piece = ""
            else:
                piece += c
        out += [piece] if piece else []
    return " ".join(out)


def _their_final_text(pred_text: str, orig_text: str) -> str:
    """squad_metrics.get_final_text(do_lower_case=True), transcribed as written."""
    def strip_spaces(text: str):  # noqa: ANN202
        chars, ns_to_s = [], {}
        for i, c in enumerate(text):
            if c == " ":
                continue
            ns_to_s[len(chars)] = i
            chars.append(c)
        return "".join(chars), ns_to_s

    tok_text = _their_basic_tokenize(orig_text)
    start = tok_text.find(pred_text)
    if start == -1:
        return orig_text
    end = start + len(pred_text) - 1
    orig_ns, orig_ns_to_s = strip_spaces(orig_text)
    tok_ns, tok_ns_to_s = strip_spaces(tok_text)
    if len(orig_ns) != len(tok_ns):
        return orig_text
    tok_s_to_ns = {i: n for n, i in tok_ns_to_s.items()}
    if start not in tok_s_to_ns or tok_s_to_ns[start] not in orig_ns_to_s:
        return orig_text
    orig_start = orig_ns_to_s[tok_s_to_ns[start]]
    if end not in tok_s_to_ns or tok_s_to_ns[end] not in orig_ns_to_s:
        return orig_text
    return orig_text[orig_start : orig_ns_to_s[tok_s_to_ns[end]] + 1]


@pytest.mark.parametrize(("pred", "orig"), [
    ("1895", "(1895-1943)."), ("95", "(1895-1943)."), ("##95", "(1895-1943)."), ("john smith", "John Smith"),
    ("don ' t", "don't"), ("naive", "naïve,"), ("1943 ) .", "(1895-1943)."), ("xyz", "abc def"), ("a", "A\u00adb"),
    ("tokyo", "Tokyo\u3001Japan"), ("smith", "John Smith"), ("s", "Mr. Smith's"),
])
def test_final_text_is_their_get_final_text(pred: str, orig: str) -> None:
    from pruneflow.tasks.squad import basic_tokenizer, final_text

    assert final_text(pred, orig, basic_tokenizer(True)) == _their_final_text(pred, orig)


def test_run_squad_answer_text_maps_tokens_back_through_the_words(tmp_path: Path) -> None:
    """Under run_squad an answer's text is their get_final_text of its tokens within the
    whitespace-separated words that hold them: a span starting at a word's first piece gives
    those characters ("hoteli" of hotel ##i ##er), a span starting inside a word ("##i ##er")
    gives the whole word, its full stop included; run_qa's text is the tokens' characters."""
    rows = squad_rows(4, 1)
    context = "the code is bravo hotelier. the end."
    rows[0] = {**rows[0], "context": context, "question": "what code?",
               "answers": {"text": ["hotelier"], "answer_start": [context.index("hotelier")]}}
    path = write_dataset(tmp_path / "data", {"train": squad_rows(12, 0), "validation": rows}, "jsonl")
    texts = {}
    for features in ("run_squad", "run_qa"):
        cfg = compose(["model=bert_tiny", "task=squad/v1", f"task.path={path}", f"task.cache_dir={tmp_path / 'cache'}",
                       f"task.features={features}"])
        task = build_task(cfg.task, 0)
        task.load()
        bundle = build_model(cfg.model, task)
        task.prepare(bundle)
        tok, f = bundle.tokenizer, task.features["validation"]
        ids = task.eval_sets["validation"]["input_ids"][0]
        offs = f["offsets"][0]
        word = [t for t in range(len(offs)) if offs[t, 0] >= context.index("hotelier") and offs[t, 1] <= context.index(". the end")]
        pieces = tok.convert_ids_to_tokens(ids[word[0] : word[-1] + 1])
        assert pieces[0] == "hotel" and len(pieces) >= 3 and all(p.startswith("##") for p in pieces[1:])  # e.g. hotel ##i ##er
        texts[features] = []
        for a, b in ((word[0], word[1]), (word[1], word[-1])):
            s, e = np.zeros(len(offs)), np.zeros(len(offs))
            s[a], e[b] = 10.0, 10.0
            starts, ends = [s], [e]
            for k in range(1, len(f["offsets"])):  # the other questions: any answer
                starts.append(np.zeros(len(f["offsets"][k])))
                ends.append(np.zeros(len(f["offsets"][k])))
            span_text = task._their_answer_text("validation", list(task.raw["validation"]["context"])) if features == "run_squad" else None
            got = postprocess(list(task.raw["validation"]["context"]), f["example"], starts, ends, f["offsets"], f["cls"], 20, 30,
                              False, 0.0, f["max_context"], span_text)[0][0]
            texts[features].append(got)
        first_two = context[offs[word[0], 0] : offs[word[1], 1]]  # e.g. "hoteli"
        inside = context[offs[word[1], 0] : offs[word[-1], 1]]  # e.g. "ier"
        assert first_two.startswith("hotel") and len(first_two) > 5 and "hotel" + inside == "hotelier"
        want = [first_two, "hotelier."] if features == "run_squad" else [first_two, inside]
        assert texts[features] == want, features


def test_run_squad_pads_every_window_to_max_seq_length_and_the_pads_take_candidate_slots(tmp_path: Path,
                                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Their processor pads every window to max_seq_length: the training batches are that
    wide (the loss runs over the pads' logits), and at evaluation the pads' logits count
    among the n best starts and ends. A pad with the highest start logit takes the only
    slot at n_best_size=1, so no valid span is left (their placeholder answer "empty");
    run_qa trims the pads away first."""
    import torch

    opts = ["task.max_seq_length=40", "task.doc_stride=8", "task.max_query_length=5", "task.n_best_size=1"]
    preds = {}
    for features in ("run_squad", "run_qa"):
        task, bundle = prepared(tmp_path / features, "v1", "jsonl", [*opts, f"task.features={features}"])
        batch = task.collate([task.train_set[i] for i in range(4)])
        longest = max(len(task.train_set[i]["input_ids"]) for i in range(4))
        assert longest < 40 and batch["input_ids"].shape[1] == (40 if features == "run_squad" else longest)
        starts, ends = task.predict_spans(bundle, "validation", 4, torch.device("cpu"))
        f = task.features["validation"]
        assert [len(x) for x in starts] == ([40] * len(starts) if features == "run_squad" else [len(o) for o in f["offsets"]])
        gold_s, gold_e = [], []  # the gold span, and (run_squad) a pad with a higher start logit
        raw = task.raw["validation"]
        for k, ex in enumerate(f["example"].tolist()):
            offs, ans = f["offsets"][k], raw[ex]["answers"]
            st, en = np.zeros(len(starts[k])), np.zeros(len(starts[k]))
            a0 = ans["answer_start"][0]
            st[np.flatnonzero(offs[:, 0] == a0)], en[np.flatnonzero(offs[:, 1] == a0 + len(ans["text"][0]))] = 10.0, 10.0
            st[len(offs):] = 20.0
            gold_s.append(st)
            gold_e.append(en)
        monkeypatch.setattr(task, "predict_spans", lambda *a, s=gold_s, e=gold_e, **k: (s, e))
        _, records = task.evaluate(None, "validation", 4, None)
        preds[features] = [r["prediction"] for r in records]
        monkeypatch.undo()
    golds = [r["answers"]["text"][0] for r in squad_rows(8, 1)]
    assert preds["run_qa"] == golds
    assert preds["run_squad"] == ["empty"] * len(golds)  # their placeholder when no span is left


def test_run_squad_oracle_gives_the_gold_answers(tmp_path: Path) -> None:
    task, _ = prepared(tmp_path, "v2", "jsonl", ["task.max_seq_length=24", "task.doc_stride=6", "task.features=run_squad", "task.max_query_length=5"])
    golds = [(r["answers"]["text"] or [""])[0] for r in squad_rows(8, 1, 4)]
    f = task.features["validation"]
    assert f["max_context"] is not None
    assert [p for p, _ in _oracle(task, max_context=f["max_context"])] == golds


def test_max_query_length_is_checked_under_run_squad_only() -> None:
    task = build_task(compose(["task=squad/v1", "task.features=run_squad", "task.max_seq_length=64", "task.max_query_length=100",
                               "task.doc_stride=16"]).task, 0)
    with pytest.raises(UserError, match=r"'task.max_query_length': 100.*at most task.max_seq_length - 5 = 59"):
        task.settings()
    assert build_task(compose(["task=squad/v1", "task.max_query_length=0"]).task, 0).settings()["max_query_length"] is None  # run_qa: unused


def test_max_context_by_hand() -> None:
    """Windows [0, 5) and [2, 7): token 2 is 2 from either edge of the first window, 0 of the
    second; token 3 ties (1.05 both) and stays with the first; token 4 goes to the second."""
    first, second = max_context_flags([(0, 5), (2, 5)])
    assert first.tolist() == [True, True, True, True, False]
    assert second.tolist() == [False, False, True, True, True]
    # the start of the best span (score 9 + 9) is not in its max-context window: the next best
    context = "abc def ghi"
    offs = np.array([[-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]])
    s, e = np.array([0, 1, 9, 0.5, 0.0]), np.array([0, 0, 9, 8, 0.0])
    args = ([context], np.array([0]), [s], [e], [offs], np.array([0]))
    assert postprocess(*args)[0][0] == "def"  # 9 + 9
    assert postprocess(*args, max_context=[np.array([False, True, False, True, False])])[0][0] == "abc def"  # 1 + 9


def test_csv_answers_as_json_text(tmp_path: Path) -> None:
    rows = squad_rows(6)
    flat = [{**r, "answers": json.dumps(r["answers"])} for r in rows]
    write_dataset(tmp_path / "d", {"train": flat, "validation": flat}, "csv")
    task = build_task(compose(["task=squad/v1", f"task.path={tmp_path / 'd'}"]).task, 0)
    task.load()
    assert task.raw["validation"]["answers"] == [r["answers"] for r in rows]


def test_v1_rejects_unanswerable_questions(tmp_path: Path) -> None:
    write_squad(tmp_path / "d", "jsonl", 8, 8, v2=True)
    task = build_task(compose(["task=squad/v1", f"task.path={tmp_path / 'd'}"]).task, 0)
    with pytest.raises(UserError, match="squad/v2"):
        task.load()


def test_missing_columns_error(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "context"} for r in squad_rows(4)]
    write_dataset(tmp_path / "d", {"train": rows, "validation": rows}, "jsonl")
    task = build_task(compose(["task=squad/v2", f"task.path={tmp_path / 'd'}"]).task, 0)
    with pytest.raises(UserError, match=r"lacks the column\(s\) \['context'\].*id, title, context, question, answers"):
        task.load()


def test_doc_stride_must_be_below_window(tmp_path: Path) -> None:
    task = build_task(compose(["task=squad/v1", "task.max_seq_length=64", "task.doc_stride=64"]).task, 0)
    with pytest.raises(UserError, match="'task.doc_stride'"):
        task.load()


# --- end to end ------------------------------------------------------------------------------
def _recompute(run_dir: Path, result: dict, version: str) -> list[dict]:
    records = read_jsonl(run_dir / "predictions.jsonl")
    m = compute_squad([r["prediction"] for r in records], [r["reference"] for r in records], version)
    for k, v in m.items():
        assert result["metrics"]["final"][k] == pytest.approx(v)
    return records


@pytest.mark.slow
def test_e2e_squad_v1(tmp_path: Path) -> None:
    path = write_squad(tmp_path / "data", "jsonl", 32, 10)
    result = run_pipeline(tmp_path / "run", ["model=bert_tiny", "task=squad/v1", f"task.path={path}", *SMALL, "sparsity=0.5"], speed=True)
    assert result["speed"]["dense_ms"] > 0 and result["speed"]["final_ms"] > 0  # eval features feed the model as they are
    assert result["main_metric"] == "f1"
    assert set(result["metrics"]["final"]) == {"exact_match", "f1"}
    assert 0.0 <= result["metrics"]["final"]["exact_match"] <= result["metrics"]["final"]["f1"] <= 1.0
    records = _recompute(tmp_path / "run", result, "v1")
    assert [r["id"] for r in records] == [r["id"] for r in squad_rows(10, 1)]
    assert [r["reference"] for r in records] == [r["answers"]["text"] for r in squad_rows(10, 1)]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_e2e_squad_v2(tmp_path: Path) -> None:
    path = write_squad(tmp_path / "data", "parquet", 32, 12, v2=True)
    result = run_pipeline(tmp_path / "run", ["model=bert_tiny", "task=squad/v2", f"task.path={path}", "task.max_seq_length=48", "task.doc_stride=16"])
    final = result["metrics"]["final"]
    assert {"exact_match", "f1", "has_ans_f1", "no_ans_f1"} <= set(final)
    records = _recompute(tmp_path / "run", result, "v2")
    for r in records:
        assert 0.0 <= r["no_answer_prob"] <= 1.0
        assert (r["prediction"] == "") == (r["no_answer_prob"] > 0.5)
    assert [r["reference"] == [""] for r in records] == [not r["answers"]["text"] for r in squad_rows(12, 1, 4)]
