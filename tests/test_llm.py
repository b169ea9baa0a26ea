"""One-shot pruning of causal LMs (DESIGN.md §9) on the offline tiny_llama.

Each method's mask is checked against an independent transcription of its authors'
rule (numpy, float64, written from the papers' / repositories' definitions), the
perplexity against a hand computation from the logits, and the pipeline end to end.
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from task_data import compose, run_overrides
from torch import nn

from pruneflow.errors import RunStopped, UserError
from pruneflow.methods.magnitude import MagnitudeOneShot
from pruneflow.methods.oneshot import parse_pattern
from pruneflow.methods.ria import RIA
from pruneflow.methods.sparsegpt import SparseGPT
from pruneflow.methods.wanda import Wanda

# random weights (no pre-training) unless a test asks for it: the masks are what is checked
LM = ["model=tiny_llama", "model.pretrain.steps=0", "task=lm/wikitext2", "calibration.dataset=wikitext2",
      "calibration.nsamples=8", "logger=none"]


def run_lm(run_dir: Path, lm_text: Path, *overrides: str) -> dict:
    from pruneflow.methods.magnitude import MagnitudeLayerPruner

    # a data-free run (magnitude, uniform allocation) refuses calibration.* as settings it would ignore
    data_free = "method=magnitude" in overrides and "allocation.name=owl" not in overrides and not MagnitudeLayerPruner.needs_inputs
    return run_overrides(run_dir, [*(o for o in LM if not (data_free and o.startswith("calibration."))), f"task.path={lm_text}", *overrides])


def method_cfg(name: str, **kw: object) -> OmegaConf:
    return OmegaConf.create({"name": name, "pattern": None, **kw})


def make_layer(rows: int = 16, cols: int = 32, seed: int = 0) -> tuple[nn.Linear, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g))
    # calibration inputs with unequal channel scales, so activations matter
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    batches = [torch.randn(1, 24, cols, generator=g) * scale for _ in range(5)]
    return layer, batches


def prune_with(method, layer: nn.Linear, batches: list[torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    pruner = method.layer_pruner(layer)
    for b in batches:
        pruner.add_batch(b)
    pruner.prune(method.sparsity)
    return layer.weight.detach().clone()


# ----------------------------------------------------------------------------- references
def ref_norms(batches: list[torch.Tensor]) -> np.ndarray:
    """||X_j||_2^2 over all calibration tokens, divided by the number of samples (Wanda)."""
    X = np.concatenate([b.reshape(-1, b.shape[-1]).double().numpy() for b in batches])
    return (X**2).sum(0) / len(batches)


def ref_drop_rowwise(metric: np.ndarray, sparsity: float) -> np.ndarray:
    k = int(metric.shape[1] * sparsity)
    drop = np.zeros(metric.shape, bool)
    for r in range(metric.shape[0]):
        drop[r, np.argsort(metric[r], kind="stable")[:k]] = True
    return drop


def ref_drop_nm(metric: np.ndarray, n: int, m: int) -> np.ndarray:
    """Wanda's and RIA's lib/prune.py, per M columns: W_mask.scatter_(1, ii + torch.topk(tmp,
    prune_n, dim=1, largest=False)[1], True), prune_n = M - N pruned (2:4, 4:8)."""
    metric_t = torch.as_tensor(metric)
    drop = torch.zeros(metric_t.shape, dtype=torch.bool)
    for ii in range(0, metric_t.shape[1], m):
        tmp = metric_t[:, ii:ii + m]
        drop.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    return drop.numpy()


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_nm_ties_fall_as_in_the_authors_per_group_topk(pattern: tuple[int, int]) -> None:
    """Scores full of ties (small integers, as fp16 magnitudes at a group boundary): the one
    topk over all groups drops the same entries as their topk per M columns."""
    from pruneflow.methods.oneshot import prune_nm

    n, m = pattern
    metric = torch.randint(0, 3, (64, 256), generator=torch.Generator().manual_seed(0)).float()
    assert np.array_equal(prune_nm(metric, n, m).numpy(), ref_drop_nm(metric.numpy(), n, m))


@pytest.mark.parametrize(("pattern", "per_row", "sparsity"),
                         [(None, True, 0.5), (None, True, 0.3), (None, True, 0.7), (None, False, 0.3), ("2:4", True, 0.5), ("4:8", True, 0.5)])
def test_wanda_mask_is_its_formula(pattern: str | None, per_row: bool, sparsity: float) -> None:
    """Per row: their prune_wanda (int(cols * s) lowest of each row, stable sort); per
    layer (per_outneuron=false): RIA's code running Wanda, <= the sorted value at int(n * s)."""
    layer, batches = make_layer()
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("wanda", pattern=pattern, per_outneuron=per_row)
    W = prune_with(Wanda(cfg, Wanda.resolve_sparsity(cfg, sparsity)), layer, batches).numpy()
    metric = np.abs(W0) * np.sqrt(ref_norms(batches))[None, :]
    if pattern is not None:
        drop = ref_drop_nm(metric, *parse_pattern(pattern))
    elif per_row:
        drop = ref_drop_rowwise(metric, sparsity)
        assert (drop.sum(1) == int(32 * sparsity)).all()  # per output row; int, not round (0.3: 9, not 10)
    else:
        drop = metric <= np.sort(metric.ravel())[int(metric.size * sparsity)]
        assert not (drop == ref_drop_rowwise(metric, sparsity)).all()
    assert ((W == 0) == drop).all()
    assert np.allclose(W[~drop], W0[~drop])  # no weight update


@pytest.mark.parametrize("pattern,per_row,realloc,sparsity", [(None, False, False, 0.5), (None, False, False, 0.3), (None, True, False, 0.5),
                                                               (None, True, False, 0.7), ("2:4", False, False, 0.5), ("2:4", False, True, 0.5)])
def test_ria_mask_is_its_formula(pattern: str | None, per_row: bool, realloc: bool, sparsity: float) -> None:
    layer, batches = make_layer(seed=1)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("ria", pattern=pattern, a=0.5, per_outneuron=per_row, reallocation=realloc)
    W = prune_with(RIA(cfg, RIA.resolve_sparsity(cfg, sparsity)), layer, batches).numpy()
    A = np.abs(W0)
    metric = (A / A.sum(0, keepdims=True) + A / A.sum(1, keepdims=True)) * np.sqrt(ref_norms(batches))[None, :] ** 0.5
    if pattern is None and per_row:
        drop = ref_drop_rowwise(metric, sparsity)
    elif pattern is None:  # their default: one threshold over the layer, <=
        drop = metric <= np.sort(metric.ravel())[int(metric.size * sparsity)]
    elif not realloc:
        drop = ref_drop_nm(metric, 2, 4)
    else:  # columns ranked by summed score, cut in 4 quarters, dealt into the groups' positions
        ranked = list(np.argsort(metric.sum(0), kind="stable"))
        q = len(ranked) // 4
        parts = [ranked[0:q], ranked[q:2 * q][::-1], ranked[2 * q:3 * q], ranked[3 * q:][::-1]]
        order = [parts[k][g] for g in range(q) for k in range(4)]
        drop = np.zeros_like(metric, dtype=bool)
        drop[:, order] = ref_drop_nm(metric[:, order], 2, 4)
        assert not (drop == ref_drop_nm(metric, 2, 4)).all()  # the permutation changed the groups
    assert ((W == 0) == drop).all()
    expected = int(32 * sparsity) / 32 if per_row else sparsity  # per row: int(cols * s) of each
    assert abs((W == 0).mean() - expected) < 2 / W.size


def test_ria_scores_a_float16_layer_in_float16_as_theirs() -> None:
    """Their prune_ria: W cloned in the model's dtype, the relative importance computed in
    it, times the float32 activation term (score_dtype=weight); float32 differs."""
    g = torch.Generator().manual_seed(2)
    layer = nn.Linear(512, 256, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 512, generator=g).half())
    batches = [torch.randn(1, 16, 512, generator=g) * (torch.rand(512, generator=g) * 3 + 0.1) for _ in range(4)]
    masks = {}
    for dtype in ("weight", "float32"):
        copy_ = nn.Linear(512, 256, bias=False).half()
        copy_.load_state_dict(layer.state_dict())
        cfg = method_cfg("ria", a=0.5, score_dtype=dtype)
        masks[dtype] = prune_with(RIA(cfg, 0.5), copy_, batches) == 0
    W = layer.weight.data.clone()
    scaler_row = torch.zeros(512)
    for i, b in enumerate(batches):  # their add_batch: running mean over samples of ||X_j||^2
        scaler_row *= i / (i + 1)
        scaler_row += torch.norm(b.reshape(-1, 512).float(), p=2, dim=0) ** 2 / (i + 1)
    W_metric = (torch.abs(W) / torch.sum(torch.abs(W), dim=0) + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)) \
        * (torch.sqrt(scaler_row.reshape((1, -1)))) ** 0.5
    thresh = torch.sort(W_metric.flatten())[0][int(W.shape[0] * W.shape[1] * 0.5)]
    assert torch.equal(masks["weight"], W_metric <= thresh)
    assert not torch.equal(masks["weight"], masks["float32"])


def test_magnitude_one_shot_is_one_threshold_per_layer() -> None:
    layer, _ = make_layer(seed=2)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("magnitude", scope="auto")
    W = prune_with(MagnitudeOneShot(cfg, 0.3), layer, []).numpy()
    thresh = np.sort(np.abs(W0).ravel())[int(W0.size * 0.3)]
    assert ((W == 0) == (np.abs(W0) <= thresh)).all()
    assert abs((W == 0).mean() - 0.3) < 2 / W0.size  # one layer-wide threshold, not per row
    with pytest.raises(UserError, match="method.scope"):
        MagnitudeOneShot(method_cfg("magnitude", scope="global"), 0.5)


def ref_sparsegpt(W0: np.ndarray, batches: list[torch.Tensor], sparsity: float, nm: tuple[int, int] | None, block: int, damp: float = 0.01) -> np.ndarray:
    """SparseGPT transcribed column by column in float64: H = 2/S sum X X^T, dampened;
    U = upper Cholesky factor of H^-1; masks chosen per block of ``block`` columns by
    w^2 / U_jj^2; each column's error e = (w - q) / U_jj is subtracted from all later
    columns as e * U[j, later] (no lazy batching: the update is applied at once)."""
    X = np.concatenate([b.reshape(-1, b.shape[-1]).double().numpy() for b in batches])
    H = 2 * X.T @ X / len(batches)
    W = W0.copy()
    dead = np.diag(H) == 0  # an input that is always 0: its weights go, H gets a 1 there
    H[dead, dead] = 1
    W[:, dead] = 0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: U^T U = H^-1
    cols = W.shape[1]
    drop = np.zeros(W.shape, bool)
    for c in range(cols):
        if c % block == 0 and nm is None:
            seg = W[:, c:c + block] ** 2 / np.diag(U)[c:c + block][None, :] ** 2
            thresh = np.sort(seg.ravel())[int(seg.size * sparsity)]
            drop[:, c:c + block] = seg <= thresh
        if nm is not None and c % nm[1] == 0:
            seg = W[:, c:c + nm[1]] ** 2 / np.diag(U)[c:c + nm[1]][None, :] ** 2
            drop[:, c:c + nm[1]] |= ref_drop_nm(seg, nm[0], nm[1])  # their torch.topk(tmp, prune_n, largest=False)
        w = W[:, c].copy()
        q = np.where(drop[:, c], 0.0, w)
        err = (w - q) / U[c, c]
        W[:, c:] -= np.outer(err, U[c, c:])
        W[:, c] = q
    return W


@pytest.mark.parametrize("pattern,block", [(None, 8), (None, 128), ("2:4", 8)])
def test_sparsegpt_matches_a_column_by_column_transcription(pattern: str | None, block: int) -> None:
    layer, batches = make_layer(rows=12, cols=32, seed=3)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("sparsegpt", pattern=pattern, block_size=block, dampening=0.01)
    W = prune_with(SparseGPT(cfg, SparseGPT.resolve_sparsity(cfg, 0.5)), layer, batches).double().numpy()
    ref = ref_sparsegpt(W0, batches, 0.5, parse_pattern(pattern), block)
    assert ((W == 0) == (ref == 0)).all()
    assert np.allclose(W, ref, atol=1e-4)
    assert not np.allclose(W[W != 0], W0[W != 0])  # the kept weights were updated


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_ria_activation_power_is_method_a(a: float) -> None:
    """RIA's ``(|W|/col sum + |W|/row sum) * (||X||_2)^a`` with a other than the 0.5 of
    every other test; a = 0 is pure relative importance."""
    layer, batches = make_layer(seed=1)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("ria", pattern=None, a=a, per_outneuron=False, reallocation=False)
    W = prune_with(RIA(cfg, 0.5), layer, batches).numpy()
    A = np.abs(W0)
    metric = (A / A.sum(0, keepdims=True) + A / A.sum(1, keepdims=True)) * np.sqrt(ref_norms(batches))[None, :] ** a
    drop = metric <= np.sort(metric.ravel())[int(metric.size * 0.5)]
    assert ((W == 0) == drop).all()
    half = (A / A.sum(0, keepdims=True) + A / A.sum(1, keepdims=True)) * np.sqrt(ref_norms(batches))[None, :] ** 0.5
    assert not (drop == (half <= np.sort(half.ravel())[int(half.size * 0.5)])).all()  # a changes the mask


def test_wanda_default_compares_within_each_output_row() -> None:
    """conf/method/wanda.yaml's default (their prune_wanda): int(cols * s) of every row."""
    layer, batches = make_layer()
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / "wanda.yaml")
    assert cfg.pattern is None
    W = prune_with(Wanda(cfg, 0.3), layer, batches)
    assert ((W == 0).sum(1) == int(32 * 0.3)).all()


def test_sparsegpt_drops_the_weights_of_an_input_that_is_always_zero() -> None:
    """An input channel that is 0 in every calibration sample: its weights are set to 0
    and H gets a 1 on its diagonal (their ``dead`` rule), then the usual pruning."""
    layer, batches = make_layer(rows=12, cols=32, seed=5)
    for b in batches:
        b[..., 3] = 0
    with torch.no_grad():  # large enough to be kept if they were scored as weights of a live input
        layer.weight[:, 3] *= 100
    W0 = layer.weight.detach().double().numpy().copy()
    assert (W0[:, 3] != 0).all()
    cfg = method_cfg("sparsegpt", pattern=None, block_size=8, dampening=0.01)
    W = prune_with(SparseGPT(cfg, 0.5), layer, batches).double().numpy()
    ref = ref_sparsegpt(W0, batches, 0.5, None, 8)
    assert (W[:, 3] == 0).all()
    assert ((W == 0) == (ref == 0)).all() and np.allclose(W, ref, atol=1e-4)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda() -> None:
    layer, batches = make_layer(rows=32, cols=64, seed=4)
    W0 = layer.weight.detach().clone()
    X = torch.cat([b.reshape(-1, 64) for b in batches])
    errors = {}
    for name, method in (("magnitude", MagnitudeOneShot(method_cfg("magnitude", scope="auto"), 0.5)),
                         ("wanda", Wanda(method_cfg("wanda"), 0.5)),
                         ("sparsegpt", SparseGPT(method_cfg("sparsegpt", block_size=128, dampening=0.01), 0.5))):
        with torch.no_grad():
            layer.weight.copy_(W0)
        W = prune_with(method, layer, batches)
        errors[name] = float(((X @ W0.T - X @ W.T) ** 2).sum())
        assert abs(float((W == 0).float().mean()) - 0.5) < 0.01
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_pattern_and_sparsity_settings_are_checked() -> None:
    with pytest.raises(UserError, match="method.pattern"):
        parse_pattern("4:2")
    with pytest.raises(UserError, match="conflicts with method.pattern"):
        Wanda.resolve_sparsity(method_cfg("wanda", pattern="2:4"), 0.3)
    assert Wanda.resolve_sparsity(method_cfg("wanda", pattern="4:8"), None) == 0.5
    with pytest.raises(UserError, match="method.block_size"):
        SparseGPT(method_cfg("sparsegpt", pattern="2:4", block_size=6, dampening=0.01), 0.5)
    with pytest.raises(UserError, match="method.pattern"):
        parse_pattern("4:4")  # N = M: nothing would be pruned


# ----------------------------------------------------------------------------- perplexity, calibration
def test_perplexity_is_the_hand_computed_one() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.tasks.lm import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 50, (53,))
    out = perplexity(model, ids, seqlen=16, device=torch.device("cpu"))
    assert out["windows"] == 3  # 53 // 16; the last 5 tokens are dropped
    nll = 0.0
    with torch.no_grad():
        for w in range(3):
            chunk = ids[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), -1)
            for t in range(15):  # 15 predicted tokens per window, weighted by seqlen=16 as the authors do
                nll -= float(logp[t, chunk[t + 1]]) * 16 / 15
    assert out["perplexity"] == pytest.approx(math.exp(nll / 48), rel=1e-5)



def test_perplexity_max_eval_windows_keeps_the_first_windows() -> None:
    """task.max_eval_windows (C4: 256) scores only the first windows; a limit above the
    number of windows changes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.tasks.lm import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 50, (53,))
    out = perplexity(model, ids, seqlen=16, device=torch.device("cpu"), limit=2)
    assert (out["windows"], out["tokens"]) == (2, 32)
    nll = 0.0
    with torch.no_grad():
        for w in range(2):
            chunk = ids[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), -1)
            nll -= sum(float(logp[t, chunk[t + 1]]) for t in range(15)) * 16 / 15
    assert out["perplexity"] == pytest.approx(math.exp(nll / 32), rel=1e-5)
    assert perplexity(model, ids, seqlen=16, device=torch.device("cpu"), limit=10)["windows"] == 3


def test_lm_evaluation_text_is_the_authors_join() -> None:
    """WikiText-2: the test rows joined with "\\n\\n"; C4: the first task.eval_documents (1,100)
    validation documents joined with " ", and at most 256 windows."""
    from pruneflow.tasks import build_task

    wiki = build_task(compose(["task=lm/wikitext2"]).task, 0)
    wiki.rows = {"test": {"text": ["a b", "", "c"]}}
    assert wiki.eval_split == "test" and wiki.eval_text() == "a b\n\n\n\nc"
    cfg = compose(["task=lm/c4"]).task
    assert (cfg.eval_documents, cfg.max_eval_windows) == (1100, 256)
    c4 = build_task(compose(["task=lm/c4", "task.eval_documents=2"]).task, 0)
    c4.rows = {"validation": {"text": ["x y", "z", "w"]}}
    assert c4.eval_split == "validation" and c4.eval_text() == "x y z"



def test_block_linears_follow_include_and_exclude() -> None:
    """The prunable Linears of a decoder block: include and exclude are fnmatch patterns on the
    block-local names; no include means every Linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.llm.blocks import block_linears, decoder_blocks

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(block_linears(blocks[0], None, None)) == sorted(attn + mlp)
    assert sorted(block_linears(blocks[0], None, ["mlp.*"])) == sorted(attn)
    assert sorted(block_linears(blocks[1], ["self_attn.*", "mlp.down_proj"], ["*.k_proj"])) == sorted(
        ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"])


def test_calibration_windows_follow_the_authors_rule(lm_text: Path) -> None:
    from pruneflow.llm.calibration import calibration_samples
    from pruneflow.models.causal import train_bpe_tokenizer

    tok = train_bpe_tokenizer((lm_text / "train.txt").read_text().splitlines(), vocab_size=300)
    cal = OmegaConf.create({"dataset": "wikitext2", "path": None, "nsamples": 4, "seqlen": 32, "seed": 7})
    task = OmegaConf.create({"name": "lm/wikitext2", "path": str(lm_text)})
    got = calibration_samples(cal, task, tok, 32)
    rows = (lm_text / "train.txt").read_text().splitlines()
    ids = tok(" ".join(rows), return_tensors="pt").input_ids[0]
    rng = random.Random(7)
    want = []
    for _ in range(4):
        i = rng.randint(0, ids.numel() - 32 - 1)
        want.append(ids[i:i + 32])
    assert torch.equal(got, torch.stack(want))


def test_c4_calibration_follows_the_authors_rule(lm_text: Path) -> None:
    """Wanda's get_c4, transcribed: per sample, random documents until one has more than
    seqlen tokens, then a random window of it; one random.Random(seed) stream for both."""
    from pruneflow.llm.calibration import calibration_samples
    from pruneflow.models.causal import train_bpe_tokenizer

    rows = (lm_text / "train.txt").read_text().splitlines()
    tok = train_bpe_tokenizer(rows, vocab_size=300)
    lengths = [tok(r, return_tensors="pt").input_ids.shape[1] for r in rows]
    seqlen = sorted(lengths)[len(lengths) // 2]  # about half the documents are too short: rejections happen
    cal = OmegaConf.create({"dataset": "c4", "path": str(lm_text), "nsamples": 6, "seqlen": seqlen, "seed": 3})
    got = calibration_samples(cal, OmegaConf.create({"name": "lm/wikitext2", "path": None}), tok, seqlen)
    random.seed(3)
    want, rejected = [], 0
    for _ in range(6):
        while True:
            i = random.randint(0, len(rows) - 1)
            enc = tok(rows[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
            rejected += 1
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        want.append(enc.input_ids[0, i:i + seqlen])
    assert rejected > 0
    assert torch.equal(got, torch.stack(want))


# ----------------------------------------------------------------------------- the pipeline
def test_ria_reallocation_says_its_mask_is_nm_only_in_the_permuted_order(tmp_path: Path, lm_text: Path) -> None:
    """RIA's channel reallocation cuts the 2:4 groups in a permuted column order and maps
    the mask back (their code): the run says so, and never times the semi-structured
    kernels on weights that are not 2:4 (it did, on CUDA, reporting a speed-up)."""
    r = run_lm(tmp_path / "run", lm_text, "method=ria", "method.pattern='2:4'", "method.reallocation=true")
    sp = r["sparsity"]
    assert sp["pattern_verified"] is False and "reallocated channel order" in sp["pattern_note"]
    assert r["export"]["semi_structured"]["available"] is False
    assert "not 2:4 in the layers' column order" in r["export"]["semi_structured"]["reason"]
    assert sp["measured"] == 0.5  # half of every permuted group of 4


def test_a_lora_target_that_matches_no_module_is_refused_before_pruning(tmp_path: Path, lm_text: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """recovery.target_modules=[q_projj]: peft refused it only after the whole pruning
    (on a 7B model, the hour before); now before any block is pruned, naming the Linears."""
    from pruneflow.llm import calibration

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("calibration data read: the run got past its checks")

    monkeypatch.setattr(calibration, "calibration_samples", refuse)
    with pytest.raises(UserError, match=r"recovery.target_modules.*down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
                                        r".*'q_projj' matches no module"):
        run_lm(tmp_path / "run", lm_text, "method=wanda", "sparsity=0.5", "recovery=lora", "recovery.target_modules=[q_proj,q_projj]")


def test_blocks_with_different_attention_masks_need_the_whole_model_path(tmp_path: Path, lm_text: Path) -> None:
    """A Qwen2 with sliding-window layers after full-attention ones: transformers gives each
    block its own mask, which the block-by-block path (block 0's arguments for every block)
    would not; refused with the setting that handles it, which then runs."""
    qwen = ["model.config.model_type=qwen2", "+model.config.use_sliding_window=true", "+model.config.max_window_layers=1",
            "+model.config.sliding_window=16", "method=wanda", "sparsity=0.5"]
    with pytest.raises(UserError, match=r"calibration.blockwise.*full_attention, sliding_attention.*blockwise=false"):
        run_lm(tmp_path / "a", lm_text, *qwen)
    r = run_lm(tmp_path / "b", lm_text, *qwen, "calibration.blockwise=false")
    assert r["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)


def test_magnitude_reads_no_calibration_data_unless_owl_allocates(tmp_path: Path, lm_text: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wanda's magnitude baseline needs no data: the run neither loads calibration windows
    nor runs them through the blocks, and prunes the same weights as the block-by-block
    path fed with windows; OWL's per-block ratios do need them."""
    from safetensors.torch import load_file

    from pruneflow.llm import blocks, calibration
    from pruneflow.methods.magnitude import MagnitudeLayerPruner

    owl = run_lm(tmp_path / "owl", lm_text, "method=magnitude", "sparsity=0.5", "allocation.name=owl")
    assert owl["calibration"]["used"] is True and owl["time_s"]["calibrate"] > 0
    with monkeypatch.context() as m:  # the path every magnitude run took before: windows captured and fed
        m.setattr(MagnitudeLayerPruner, "needs_inputs", True)
        fed = run_lm(tmp_path / "fed", lm_text, "method=magnitude", "sparsity=0.5")
    assert fed["calibration"]["used"] is True

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("calibration data read")

    monkeypatch.setattr(calibration, "calibration_samples", refuse)
    monkeypatch.setattr(blocks.BlockPruner, "capture", refuse)
    free = run_lm(tmp_path / "free", lm_text, "method=magnitude", "sparsity=0.5")
    assert free["calibration"]["used"] is False and free["calibration"]["source"] is None
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("fed", "free"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert free["sparsity"]["measured"] == fed["sparsity"]["measured"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria", "magnitude"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_every_method_prunes_tiny_llama(tmp_path: Path, lm_text: Path, method: str, pattern: str | None, caplog: pytest.LogCaptureFixture) -> None:
    extra = ["sparsity=0.5"] if pattern is None else [f"method.pattern='{pattern}'"]
    caplog.set_level("INFO", logger="pruneflow")
    r = run_lm(tmp_path / "run", lm_text, f"method={method}", *extra)
    sp = r["sparsity"]
    assert sp["target"] == 0.5
    # counted from the saved weights
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    names = [k for k in state if ".layers." in k and k.endswith("proj.weight")]
    assert set(names) == set(sp["per_layer"]) and len(names) == 14
    zeros = sum(int((state[k] == 0).sum()) for k in names)
    total = sum(state[k].numel() for k in names)
    assert sp["measured"] == pytest.approx(zeros / total, abs=1e-6)
    if pattern is None:
        assert abs(sp["measured"] - 0.5) < (0.01 if method == "sparsegpt" else 1e-3)
    else:
        assert sp["pattern_verified"] is True and sp["measured"] == 0.5
        for k in names:
            assert int((state[k].reshape(state[k].shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    m = r["metrics"]
    assert set(m) == {"dense", "prune", "final"} and math.isfinite(m["final"]["perplexity"])
    assert m["final"]["perplexity"] != m["dense"]["perplexity"]
    assert r["calibration"]["nsamples"] == (128 if method == "magnitude" else 8) and r["calibration"]["seqlen"] == 128
    # magnitude scores |W| alone (Wanda's prune_magnitude): no calibration text is read
    assert r["calibration"]["used"] is (method != "magnitude") and ("calibrate" in r["time_s"]) is (method != "magnitude")
    assert r["evaluation"]["windows"] >= 1 and r["evaluation"]["seqlen"] == 128
    assert r["memory"]["peak_cpu_rss_bytes"] > 0 and r["time_s"]["prune"] > 0
    if method == "wanda" and pattern is None:  # the saved folder loads back as the causal LM it is
        import pruneflow

        card = (tmp_path / "run" / "model" / "README.md").read_text()
        assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
        assert f"| dense (before pruning) | {m['dense']['perplexity']:.2f} |" in card  # a perplexity, not a percentage
        assert f"| **final** | {m['final']['perplexity']:.2f} |" in card
        log_text = caplog.text  # the console and pruneflow.log show the perplexities, as the encoder runs' metrics
        assert f"dense: perplexity={m['dense']['perplexity']:.4f}" in log_text and f"pruned: perplexity={m['prune']['perplexity']:.4f}" in log_text

        loaded = pruneflow.load_model(tmp_path / "run" / "model")
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()) and len(loaded.state_dict()) == len(state)


def test_blockwise_gives_the_masks_of_the_whole_model_reference(tmp_path: Path, lm_text: Path) -> None:
    a = run_lm(tmp_path / "blockwise", lm_text, "method=wanda")
    b = run_lm(tmp_path / "whole", lm_text, "method=wanda", "calibration.blockwise=false")
    from safetensors.torch import load_file

    sa = load_file(str(tmp_path / "blockwise" / "model" / "model.safetensors"))
    sb = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    assert all(torch.equal(sa[k] == 0, sb[k] == 0) for k in sa)
    assert a["metrics"]["final"]["perplexity"] == pytest.approx(b["metrics"]["final"]["perplexity"], rel=1e-6)


def test_a_stopped_prune_resumes_from_its_last_block(tmp_path: Path, lm_text: Path) -> None:
    from pruneflow.stop import STOP

    whole = run_lm(tmp_path / "whole", lm_text, "method=sparsegpt")
    STOP.signum = signal.SIGTERM  # as if SIGTERM arrived during block 0
    try:
        with pytest.raises(RunStopped, match="after block 0"):
            run_lm(tmp_path / "stopped", lm_text, "method=sparsegpt")
    finally:
        STOP.signum = None
    assert json.loads((tmp_path / "stopped" / "checkpoints" / "progress.json").read_text())["blocks_done"] == 1
    resumed = run_lm(tmp_path / "stopped", lm_text, "method=sparsegpt")
    assert resumed["metrics"]["final"] == whole["metrics"]["final"]
    assert resumed["sparsity"]["per_layer"] == whole["sparsity"]["per_layer"]


def test_owl_allocation_keeps_the_mean_sparsity(tmp_path: Path, lm_text: Path) -> None:
    r = run_lm(tmp_path / "owl", lm_text, "method=wanda", "sparsity=0.6", "allocation.name=owl", "allocation.owl_lambda=0.05")
    per_block = r["allocation"]["per_block"]
    assert len(per_block) == 2 and sum(per_block) / 2 == pytest.approx(0.6, abs=1e-9)
    assert all(0.55 - 1e-9 <= s <= 0.65 + 1e-9 for s in per_block)
    assert r["sparsity"]["per_block"] == pytest.approx(per_block, abs=0.01)


@pytest.mark.parametrize("overrides,needle", [
    (["method=seven"], "prunes while training"),
    (["method=wanda", "stages.recover.epochs=2"], "stages.recover.epochs=2"),
    (["method=wanda", "method.pattern='2:3'"], "method.pattern"),
    (["method=wanda", "calibration.nsamples=0"], "calibration.nsamples"),
    (["method=wanda", "method.per_outneuron=false", "method.pattern='2:4'"], "method.per_outneuron"),
    (["method=ria", "method.score_dtype=half"], "method.score_dtype"),
    (["method=wanda", "task.seqlen=4096"], "task.seqlen"),
    (["method=wanda", "allocation.name=owl", "method.pattern='2:4'"], "allocation.name"),
    (["method=wanda", "recovery=full", "recovery.steps=-1"], "recovery.steps"),
])
def test_bad_llm_settings_are_one_clear_error(tmp_path: Path, lm_text: Path, overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("=", "=")):
        run_lm(tmp_path / "bad", lm_text, *overrides)


def test_attention_implementation_is_the_configured_one(lm_text: Path) -> None:
    """model.attn_implementation reaches transformers (eager: the attention of Wanda's and
    RIA's transformers versions; null: its default, sdpa); the two give the same logits up to
    rounding; a name transformers does not know is one error naming the key."""
    from pruneflow.models import build_model
    from pruneflow.tasks import build_task

    logits = {}
    for attn in ("null", "eager"):
        cfg = compose(["model=tiny_llama", "model.pretrain.steps=0", "task=lm/wikitext2", f"task.path={lm_text}",
                       f"model.attn_implementation={attn}"])
        task = build_task(cfg.task, 0)
        task.load()
        torch.manual_seed(0)
        bundle = build_model(cfg.model, task)
        assert bundle.model.config._attn_implementation == ("sdpa" if attn == "null" else "eager")
        logits[attn] = bundle.model(torch.arange(1, 33).view(1, 32)).logits
    assert torch.allclose(logits["null"], logits["eager"], atol=1e-5)
    for name in ("experiment=wanda/llama2_7b", "experiment=sparsegpt/llama2_7b", "experiment=ria/llama2_7b", "experiment=ria/llama3_8b",
                 "experiment=spp/llama2_7b"):
        assert compose([name]).model.attn_implementation == "eager", name
    cfg = compose(["model=tiny_llama", "model.pretrain.steps=0", "task=lm/wikitext2", f"task.path={lm_text}", "model.attn_implementation=bogus"])
    task = build_task(cfg.task, 0)
    task.load()
    with pytest.raises(UserError, match="model.attn_implementation"):
        build_model(cfg.model, task)


def test_one_shot_methods_refuse_encoder_tasks_and_models(tmp_path: Path, lm_text: Path) -> None:
    from pruneflow.runner import run

    ov = ["method=wanda", "logger=none"]
    with pytest.raises(UserError, match="causal LM one shot"):
        run(compose(ov), tmp_path / "x", ov)
    ov = ["method=wanda", "logger=none", "model=bert_tiny", "task=lm/wikitext2", f"task.path={lm_text}", "calibration.dataset=wikitext2"]
    with pytest.raises(UserError, match="model=bert_tiny is not one"):
        run(compose(ov), tmp_path / "y", ov)


def test_tiny_llama_pretraining_and_recovery(tmp_path: Path, lm_text: Path) -> None:
    """A briefly trained tiny LLaMA: magnitude pruning raises its perplexity, SparseGPT's
    reconstruction much less; full recovery keeps the zeros and lowers it again; LoRA
    leaves the sparse weights as magnitude pruned them and saves its adapters apart."""
    from safetensors.torch import load_file

    pre = ["model.pretrain.steps=60", "model.pretrain.batch_size=8", "model.pretrain.seqlen=32", "task.seqlen=64", "sparsity=0.8"]
    mag = run_lm(tmp_path / "mag", lm_text, "method=magnitude", *pre, "recovery=lora", "recovery.steps=10", "recovery.lr=1e-3")
    pre.append("calibration.seqlen=64")  # SparseGPT's windows (magnitude reads none)
    assert mag["pretrain"]["last_loss"] < mag["pretrain"]["first_loss"] - 1.0
    dense = mag["metrics"]["dense"]["perplexity"]
    assert dense < 20  # trained: far below the vocabulary size (~500) of a random model
    full = run_lm(tmp_path / "full", lm_text, "method=sparsegpt", *pre, "recovery=full", "recovery.steps=20", "recovery.lr=1e-3")
    assert full["metrics"]["dense"]["perplexity"] == pytest.approx(dense)  # the same pre-trained model
    assert full["metrics"]["prune"]["perplexity"] < mag["metrics"]["prune"]["perplexity"]
    assert mag["metrics"]["prune"]["perplexity"] > dense * 1.05
    assert full["metrics"]["recover"]["perplexity"] < full["metrics"]["prune"]["perplexity"]
    assert full["metrics"]["final"] == full["metrics"]["recover"]
    assert abs(full["sparsity"]["measured"] - 0.8) < 0.01  # the zeros survived 20 AdamW steps
    # LoRA: the saved base weights are the pre-trained ones with magnitude's zeros, nothing else
    trained = load_file(str(tmp_path / "mag" / "checkpoints" / "pretrained.safetensors"))
    saved = load_file(str(tmp_path / "mag" / "model" / "model.safetensors"))
    for name in mag["sparsity"]["per_layer"]:
        W0, W = trained[name], saved[name]
        thresh = torch.sort(W0.abs().flatten())[0][int(W0.numel() * 0.8)]
        assert torch.equal(W, torch.where(W0.abs() <= thresh, torch.zeros_like(W0), W0)), name
    assert (tmp_path / "mag" / "adapter" / "adapter_config.json").exists()
    assert mag["metrics"]["recover"]["perplexity"] != mag["metrics"]["prune"]["perplexity"]


def test_owl_ratios_come_from_the_dense_models_wanda_scores() -> None:
    """OWL's per-block sparsities from an independent pass: hooks on a dense forward give
    each Linear's inputs, Wanda's |W| * ||X_j|| (any common scale cancels in the ratio),
    the percentage above m x the block's mean, then the allocation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.llm.blocks import BlockPruner, block_linears, decoder_blocks
    from pruneflow.llm.owl import allocate, outlier_ratio, owl_sparsities
    from pruneflow.methods.wanda import Wanda

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    _, blocks = decoder_blocks(model)
    sq: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, None, None).items():
            def hook(mod, inp, out, key=(i, name)):  # noqa: ANN001, ANN202
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                sq[key] = sq.get(key, 0) + (x**2).sum(0)
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    m, lam, sparsity = 2.0, 0.08, 0.5
    ratios = [outlier_ratio([lin.weight.detach().double().abs() * sq[(i, name)].sqrt()[None, :]
                             for name, lin in block_linears(block, None, None).items()], m) for i, block in enumerate(blocks)]
    plain = [outlier_ratio([lin.weight.detach().abs() for lin in block_linears(block, None, None).values()], m) for block in blocks]
    assert len(set(ratios)) == 4 and allocate(ratios, sparsity, lam) != pytest.approx(allocate(plain, sparsity, lam))
    pruner = BlockPruner(model, Wanda(method_cfg("wanda", pattern=None), sparsity), torch.device("cpu"), False)
    assert owl_sparsities(pruner, ids, sparsity, m, lam) == pytest.approx(allocate(ratios, sparsity, lam), abs=1e-9)


def test_prune_causal_lm_from_your_own_code() -> None:
    """The API prunes as the CLI does: the same masks as the method's own pruners."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.api import create
    from pruneflow.llm import prune_causal_lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    rep = prune_causal_lm(model, ids, method="wanda", pattern="2:4")
    assert rep["target"] == 0.5 and rep["measured"] == 0.5 and rep["per_block"] == [0.5, 0.5]
    W = model.model.layers[1].mlp.down_proj.weight
    assert int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) == 2
    with pytest.raises(UserError, match="prune_causal_lm"):
        create("wanda", 0.5)
    with pytest.raises(UserError, match="Allowed: force, magnitude, ria, seven_pre, snip, sparsegpt, wanda"):  # the gradient ones too
        prune_causal_lm(model, ids, method="platon", sparsity=0.5)


def test_owl_outlier_ratio_and_allocation_by_hand() -> None:
    from pruneflow.llm.owl import allocate, outlier_ratio

    a, b = torch.tensor([[1.0, 1.0], [1.0, 13.0]]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    # mean of all 8 scores = 20/8 = 2.5; above 2 x 2.5 = 5: only 13 -> 1 of 8 = 12.5 %
    assert outlier_ratio([a, b], 2.0) == pytest.approx(12.5)
    # ratios 1, 3, 2 -> scaled to [0, 0.16] -> 0, 0.16, 0.08; mean-shifted to kept 1 - 0.7
    assert allocate([1.0, 3.0, 2.0], 0.7, 0.08) == pytest.approx([0.78, 0.62, 0.70])
    assert allocate([1.0, 1.0], 0.5, 0.08) == [0.5, 0.5]  # no spread: uniform
    assert allocate([0.0, 1.0], 0.01, 0.5)[1] == 0.01  # a block pushed to <= 0 gets 0.01, as theirs


# ----------------------------------------------------------------------------- edge cases of the rules
def test_n_m_keeps_n_of_every_m_when_n_is_not_half() -> None:
    """1:4 keeps the highest of every 4 inputs (sparsity 0.75): 2:4 and 4:8 prune as many
    as they keep, so only an N other than M/2 tells kept from pruned counts apart."""
    cfg = method_cfg("wanda", pattern="1:4")
    assert Wanda.resolve_sparsity(cfg, None) == 0.75
    layer, batches = make_layer()
    W0 = layer.weight.detach().double().numpy().copy()
    W = prune_with(Wanda(cfg, 0.75), layer, batches).double().numpy()
    groups = (np.abs(W0) * np.sqrt(ref_norms(batches))[None, :]).reshape(16, 8, 4)
    keep = (groups == groups.max(-1, keepdims=True)).reshape(16, 32)
    assert ((W != 0) == keep).all()
    layer, batches = make_layer(rows=12, cols=32, seed=3)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("sparsegpt", pattern="1:4", block_size=8, dampening=0.01)
    W = prune_with(SparseGPT(cfg, 0.75), layer, batches).double().numpy()
    assert ((W != 0).reshape(12, 8, 4).sum(-1) == 1).all()
    assert np.allclose(W, ref_sparsegpt(W0, batches, 0.75, (1, 4), 8), atol=1e-4)


def test_wanda_row_ties_drop_the_earlier_columns() -> None:
    """Their per-row torch.sort(stable=True): among equal scores the lower column index goes first."""
    layer = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1, 1, 1, 2, 2, 2, 2], [2, 1, 2, 1, 2, 1, 2, 1]]))
    W = prune_with(Wanda(method_cfg("wanda"), 0.25), layer, [torch.ones(1, 3, 8)])  # equal norms: score = |W|
    assert (W == 0).nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 3]]


def test_zero_sparsity_leaves_a_layer_dense_with_one_threshold_per_layer() -> None:
    """Sparsity 0 (a dense baseline): <= the lowest score would still drop the minimum."""
    for cfg, cls in ((method_cfg("ria", a=0.5), RIA), (method_cfg("wanda", per_outneuron=False), Wanda)):
        layer, batches = make_layer(seed=1)
        W = prune_with(cls(cfg, 0.0), layer, batches)
        assert (W != 0).all(), cfg.name


def test_statistics_count_samples_over_uneven_batches() -> None:
    """Their add_batch counts samples (inp.shape[0]) in the running means: batches of 1, 3
    and 2 samples give the statistics of the 6 samples together."""
    from pruneflow.methods.oneshot import InputNorms

    layer, _ = make_layer(rows=12, cols=32, seed=6)
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(32, generator=g) * 3 + 0.1
    batches = [torch.randn(b, 8, 32, generator=g) * scale for b in (1, 3, 2)]
    X = torch.cat([b.reshape(-1, 32) for b in batches]).double()
    norms = InputNorms(32, torch.device("cpu"))
    for b in batches:
        norms.add(b)
    assert np.allclose(norms.sq.numpy(), ((X**2).sum(0) / 6).numpy(), rtol=1e-5)
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("sparsegpt", pattern=None, block_size=8, dampening=0.01)
    W = prune_with(SparseGPT(cfg, 0.5), layer, batches).double().numpy()
    ref = ref_sparsegpt(W0, batches, 0.5, None, 8)  # H from all tokens at once
    assert ((W == 0) == (ref == 0)).all() and np.allclose(W, ref, atol=1e-4)


def test_sparsegpt_dead_input_counts_one_in_the_dampening_mean() -> None:
    """Their H[dead, dead] = 1 comes before damp = percdamp * mean(diag H): with small
    activations (diag H << 1) that 1 sets the dampening, and so the masks."""
    layer, batches = make_layer(rows=12, cols=32, seed=5)
    batches = [b * 0.01 for b in batches]
    for b in batches:
        b[..., 3] = 0
    W0 = layer.weight.detach().double().numpy().copy()
    cfg = method_cfg("sparsegpt", pattern=None, block_size=8, dampening=0.01)
    W = prune_with(SparseGPT(cfg, 0.5), layer, batches).double().numpy()
    ref = ref_sparsegpt(W0, batches, 0.5, None, 8)
    assert ((W == 0) == (ref == 0)).all() and np.allclose(W, ref, atol=1e-4)


def test_owl_outliers_are_strictly_above_m_times_the_mean() -> None:
    """check_outlier_mean: W > mean * M, so a score equal to the threshold is no outlier; a
    kept fraction of exactly 0 is 'pruned at <= 0' and gets their 0.01."""
    from pruneflow.llm.owl import allocate, outlier_ratio

    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])], 3.0) == 0.0  # mean 2, threshold 6
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])], 2.9) == pytest.approx(20.0)
    # one pool over the block's Linears: mean 17/6, threshold 5.67, 1 of 6 (not 25 % and 0 % averaged)
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 13.0]), torch.tensor([1.0, 1.0])], 2.0) == pytest.approx(100 / 6)
    # ratios 0, 1 -> 0, 1 (lambda 0.5) -> kept 0, 1 around 1 - 0.5: sparsities 1 and 0 -> 0.01
    assert allocate([0.0, 1.0], 0.5, 0.5) == [1.0, 0.01]


def test_owl_says_when_a_block_is_pruned_whole(caplog: pytest.LogCaptureFixture) -> None:
    from pruneflow.llm.owl import allocate

    with caplog.at_level("WARNING", logger="pruneflow"):
        assert allocate([0.0, 1.0], 0.5, 2.0) == [2.5, 0.01]  # their arithmetic; block 0 loses every weight
    assert "block(s) [0] get sparsity [2.5], so every weight of them is pruned" in caplog.text


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "ria", "magnitude"])
def test_a_block_whose_owl_sparsity_passes_one_is_pruned_whole(name: str) -> None:
    """OWL can hand a block a sparsity >= 1 (the warning above): every method prunes that
    layer whole; SparseGPT raised an IndexError (as the authors' code does)."""
    from pruneflow.methods import ONE_SHOT_METHODS, _load

    layer, batches = make_layer()
    method = _load(ONE_SHOT_METHODS, name)(method_cfg(name), 0.5)
    method.sparsity = 2.5
    assert int(prune_with(method, layer, batches).count_nonzero()) == 0


def test_omitted_settings_take_the_authors_values() -> None:
    """A hand-built config without the keys gets the authors' blocksize 128, percdamp 0.01
    and RIA's a = 0.5, as the packaged conf/method files do."""
    sparsegpt, ria = SparseGPT(method_cfg("sparsegpt"), 0.5), RIA(method_cfg("ria"), 0.5)
    assert (sparsegpt.block_size, sparsegpt.dampening, ria.a) == (128, 0.01, 0.5)
    for name, want in (("sparsegpt", {"block_size": 128, "dampening": 0.01}), ("ria", {"a": 0.5})):
        cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / f"{name}.yaml")
        assert {k: cfg[k] for k in want} == want


class WordIds:
    """A stand-in tokenizer: the word "w7" is token 7, so a window shows where it starts."""

    def __call__(self, text: str, return_tensors: str = "pt") -> object:
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[int(w[1:]) for w in text.split()]]))


def test_calibration_text_one_token_longer_than_a_window_gives_the_window_at_0(tmp_path: Path) -> None:
    """Their loader draws randint(0, n - seqlen - 1): n = seqlen + 1 tokens has one window
    (start 0); n = seqlen has none and is refused with the key to lower."""
    from pruneflow.errors import UserError
    from pruneflow.llm.calibration import calibration_samples

    text = tmp_path / "train.txt"
    cal = OmegaConf.create({"dataset": "local", "path": str(text), "nsamples": 3, "seqlen": 8, "seed": 0})
    task = OmegaConf.create({"name": "lm/wikitext2", "path": None})
    text.write_text(" ".join(f"w{i}" for i in range(9)) + "\n")
    assert calibration_samples(cal, task, WordIds(), 8).tolist() == [list(range(8))] * 3
    text.write_text(" ".join(f"w{i}" for i in range(8)) + "\n")
    with pytest.raises(UserError, match="calibration.seqlen=8"):
        calibration_samples(cal, task, WordIds(), 8)


def test_calibration_windows_never_end_at_the_last_token_and_c4_draws_every_document(tmp_path: Path) -> None:
    """Their loaders: start = randint(0, n - seqlen - 1) (a window never ends on the last
    token), and C4 documents by randint(0, len - 1), the last one included."""
    from pruneflow.llm.calibration import calibration_samples

    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"w{i}" for i in range(10)) + "\n")  # 10 tokens, seqlen 8: starts 0 or 1
    cal = OmegaConf.create({"dataset": "local", "path": str(text), "nsamples": 64, "seqlen": 8, "seed": 0})
    got = calibration_samples(cal, OmegaConf.create({"name": "lm/wikitext2", "path": None}), WordIds(), 8)
    rng = random.Random(0)
    assert got[:, 0].tolist() == [rng.randint(0, 10 - 8 - 1) for _ in range(64)]
    assert set(got[:, 0].tolist()) == {0, 1}
    # C4: only the last of three documents is longer than seqlen
    c4 = tmp_path / "c4"
    c4.mkdir()
    (c4 / "train.txt").write_text("w0 w1\nw2 w3\n" + " ".join(f"w{i}" for i in range(20)) + "\n")
    (c4 / "validation.txt").write_text("w0 w1\n")
    cal = OmegaConf.create({"dataset": "c4", "path": str(c4), "nsamples": 3, "seqlen": 8, "seed": 1})
    got = calibration_samples(cal, OmegaConf.create({"name": "lm/wikitext2", "path": None}), WordIds(), 8)
    rng, want = random.Random(1), []
    for _ in range(3):
        while rng.randint(0, 2) != 2:
            pass
        i = rng.randint(0, 20 - 8 - 1)
        want.append(list(range(i, i + 8)))
    assert got.tolist() == want
