"""Zero-shot accuracy through lm-evaluation-harness, checked against a hand computation.

Offline: a tiny random LLaMA, a byte-level BPE tokenizer trained here, and a local
multiple-choice task (jsonl + lm-eval YAML) in tmp_path.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from pruneflow.errors import UserError  # noqa: E402
from pruneflow.llm.zeroshot import PAPER_TASKS, evaluate_zero_shot  # noqa: E402

WORDS = ("the sky is blue and the grass is green while a red apple falls from a tall tree near "
         "the old house where yellow birds sing every morning to the quiet river and purple "
         "flowers grow by the stone wall under a bright sun or a pale moon").split()
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "white", "dark red", "pale blue"]


@pytest.fixture(scope="module")
def lm() -> Iterator[tuple[torch.nn.Module, object]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60)]
    corpus += [f"Question: what colour is the {w}? Answer: {c}" for w in WORDS[:20] for c in COLOURS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # Prepend BOS like LLaMA's tokenizer, so the harness's BOS handling is exercised too.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    model = LlamaForCausalLM(cfg).eval()
    # One thread: on 2 busy cores, multi-threaded kernels on these tiny tensors run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, tokenizer
    torch.set_num_threads(threads)


def docs() -> list[dict]:
    rng = random.Random(1)
    out = []
    for i in range(20):
        # choices of different lengths (characters) so that length normalisation matters
        choices = rng.sample(COLOURS, 4)
        out.append({"question": f"what colour is the {WORDS[i]}?", "choices": choices, "label": rng.randrange(4)})
    return out


def write_task(folder: Path, name: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


@torch.no_grad()
def by_hand(model, tokenizer, rows: list[dict]) -> tuple[dict[tuple[str, str], float], list[int], list[int]]:
    """Summed continuation log-probs per (context, continuation), and per example the argmax of
    them raw (acc) and divided by the choice's length (acc_norm).

    Mirrors lm-eval's HFLM for a causal LM: context = doc_to_text, continuation = " " + choice
    (target_delimiter); the context's trailing spaces would move to the continuation (none here);
    context+continuation is tokenized whole (BOS added by the tokenizer) and split after
    len(tokenize(context)). acc_norm divides by len(choice) in characters, without the delimiter.
    """
    lls_by_pair: dict[tuple[str, str], float] = {}
    preds, preds_norm = [], []
    for r in rows:
        context = f"Question: {r['question']}\nAnswer:"
        lls = []
        for choice in r["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            n_ctx = len(tokenizer(context)["input_ids"])
            cont = whole[n_ctx:]
            assert whole[0] == tokenizer.bos_token_id and cont
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
            lls.append(sum(logp[n_ctx - 1 + j, t].item() for j, t in enumerate(cont)))
            lls_by_pair[(context, " " + choice)] = lls[-1]
        preds.append(max(range(len(lls)), key=lambda k: lls[k]))
        preds_norm.append(max(range(len(lls)), key=lambda k: lls[k] / len(r["choices"][k])))
    return lls_by_pair, preds, preds_norm


def test_zero_shot_matches_hand_computed_accuracy(lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = lm
    rows = docs()
    lls, preds, preds_norm = by_hand(model, tokenizer, rows)
    assert preds != preds_norm  # otherwise the data cannot tell acc_norm from acc
    n = len(rows)
    # Per-example checks through the aggregate: labels set to the hand-computed predictions must
    # score 1.0, labels shifted away from them must score 0.0.
    write_task(tmp_path, "mc_orig", rows)
    write_task(tmp_path, "mc_pred", [dict(r, label=p) for r, p in zip(rows, preds, strict=True)])
    write_task(tmp_path, "mc_norm", [dict(r, label=p) for r, p in zip(rows, preds_norm, strict=True)])
    write_task(tmp_path, "mc_wrong", [dict(r, label=(p + 1) % 4) for r, p in zip(rows, preds, strict=True)])
    names = ["mc_orig", "mc_pred", "mc_norm", "mc_wrong"]

    # Spy on the harness's log-likelihoods (batched, right-padded) to compare them one by one.
    seen: dict[tuple[str, str], float] = {}
    original = HFLM.loglikelihood

    def spy(self, requests, disable_tqdm: bool = False):
        out = original(self, requests, disable_tqdm=disable_tqdm)
        seen.update({tuple(req.args): ll for req, (ll, _) in zip(requests, out, strict=True)})
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    res = evaluate_zero_shot(model, tokenizer, names, batch_size=4, include_path=str(tmp_path), offline=True)

    import lm_eval

    assert res["harness"] == {"name": "lm-eval", "version": lm_eval.__version__}
    assert set(seen) == set(lls)
    for pair, ll in lls.items():
        assert seen[pair] == pytest.approx(ll, abs=1e-4), pair
    t = res["tasks"]
    assert set(t) == set(names)
    expect_acc = sum(p == r["label"] for p, r in zip(preds, rows, strict=True)) / n
    expect_norm = sum(p == r["label"] for p, r in zip(preds_norm, rows, strict=True)) / n
    assert t["mc_orig"]["acc"] == pytest.approx(expect_acc)
    assert t["mc_orig"]["acc_norm"] == pytest.approx(expect_norm)
    assert t["mc_pred"]["acc"] == 1.0
    assert t["mc_norm"]["acc_norm"] == 1.0
    assert t["mc_wrong"]["acc"] == 0.0
    for m in t.values():
        assert m["n"] == n and m["acc_stderr"] is not None and m["acc_norm"] is not None
    assert res["average"]["acc"] == pytest.approx(sum(m["acc"] for m in t.values()) / 4)
    assert not model.training


def test_zero_shot_limit_and_errors(lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = lm
    write_task(tmp_path, "mc_small", docs())
    res = evaluate_zero_shot(model, tokenizer, ["mc_small"], limit=3, include_path=str(tmp_path), offline=True)
    assert res["tasks"]["mc_small"]["n"] == 3

    import lm_eval.tasks

    class LocalOnly(lm_eval.tasks.TaskManager):
        # skips indexing lm-eval's bundled tasks (~10 s), which an unknown name otherwise triggers
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    with pytest.raises(UserError, match=r"Invalid value for 'task.zero_shot'.*Unknown: \['no_such_task'\]"):
        evaluate_zero_shot(model, tokenizer, ["mc_small", "no_such_task"], include_path=str(tmp_path), offline=True)
    with pytest.raises(UserError, match="'task.zero_shot_include'.*a folder of lm-eval task YAMLs"):
        evaluate_zero_shot(model, tokenizer, ["mc_small"], include_path=str(tmp_path / "missing"), offline=True)
    assert set(PAPER_TASKS) == {"boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                "openbookqa", "piqa"}



def test_zero_shot_results_are_read_as_the_harness_reports_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's results dict, by hand: the "none" filter's value wins over another filter's,
    "N/A" and NaN stderrs are None, a task without acc (generation) is left out, a group's n is
    its subtasks' examples, the average is over the names asked for and acc_norm's only when
    every one of them has it; the harness runs zero-shot with the given seed."""
    import pruneflow.llm.zeroshot as zs

    seen: dict = {}

    class Manager:
        all_tasks = ("grp", "a", "b", "gen")

        def __init__(self, **kwargs) -> None:
            pass

    class Harness:
        def __init__(self, pretrained, tokenizer, batch_size) -> None:  # noqa: ANN001
            pass

    def simple_evaluate(**kwargs):  # noqa: ANN202
        seen.update(kwargs)
        return {
            "results": {
                "grp": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
                "a": {"acc,none": 0.4, "acc_norm,none": 0.6, "acc_stderr,none": 0.1, "acc_norm_stderr,none": float("nan")},
                "b": {"acc,strict": 0.0, "acc,none": 0.8, "acc_norm,none": 0.2, "acc_stderr,none": 0.05, "acc_norm_stderr,none": 0.07},
                "gen": {"exact_match,none": 0.3},
            },
            "n-samples": {"a": {"effective": 10}, "b": {"effective": 20}, "gen": {"effective": 5}},
            "groups": {"grp": {}},
            "group_subtasks": {"grp": ["a", "b"]},
        }

    fake = type("LmEval", (), {"simple_evaluate": staticmethod(simple_evaluate)})
    monkeypatch.setattr(zs, "_import_lm_eval", lambda: (fake, Harness, Manager, "9.9"))
    model = torch.nn.Linear(2, 2)
    res = evaluate_zero_shot(model, None, ["grp", "b", "gen"], seed=5, offline=False)
    assert seen["num_fewshot"] == 0 and seen["tasks"] == ["grp", "b", "gen"]
    assert (seen["random_seed"], seen["numpy_random_seed"], seen["torch_random_seed"], seen["fewshot_random_seed"]) == (5, 5, 5, 5)
    t = res["tasks"]
    assert set(t) == {"grp", "a", "b"}
    assert t["grp"] == {"acc": 0.5, "acc_norm": None, "acc_stderr": None, "acc_norm_stderr": None, "n": 30}
    assert t["a"] == {"acc": 0.4, "acc_norm": 0.6, "acc_stderr": 0.1, "acc_norm_stderr": None, "n": 10}
    assert t["b"] == {"acc": 0.8, "acc_norm": 0.2, "acc_stderr": 0.05, "acc_norm_stderr": 0.07, "n": 20}
    assert res["average"] == {"acc": pytest.approx(0.65), "acc_norm": None}  # grp and b; grp has no acc_norm
    res = evaluate_zero_shot(model, None, ["a", "b"], offline=False)
    assert res["average"] == {"acc": pytest.approx(0.6), "acc_norm": pytest.approx(0.4)}
    assert res["harness"] == {"name": "lm-eval", "version": "9.9"} and model.training


def test_zero_shot_runs_in_the_pipeline_and_lands_in_result_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`task.zero_shot` on a local task: both accuracies and the harness version in result.json."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a user without network: no Hub lookups at all
    from task_data import write_lm_text
    from test_llm import run_lm

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "pf_colours", docs())
    r = run_lm(tmp_path / "run", write_lm_text(tmp_path / "text"), "method=wanda", "task.zero_shot=[pf_colours]",
               f"task.zero_shot_include={tasks}", "task.eval_dense=false")
    zs = r["zero_shot"]
    assert zs["harness"]["name"] == "lm-eval" and zs["harness"]["version"]
    got = zs["tasks"]["pf_colours"]
    assert got["n"] == len(docs()) and 0 <= got["acc"] <= 1 and got["acc_norm"] is not None
    final = r["metrics"]["final"]
    assert final["pf_colours/acc"] == got["acc"] and final["pf_colours/acc_norm"] == got["acc_norm"]
    assert "perplexity" in final and "dense" not in r["metrics"]
