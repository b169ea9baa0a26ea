"""Gradient-scored pruning of causal LMs (seven_pre, snip, force on task=lm/...).

The masks are checked against step-by-step transcriptions of the published rules in
float64 (SEVEN's sentinel score with its bias corrections, the cubic schedule and one
global top-k; SNIP's |W * sum of G| per layer; N:M as the top N of every M inputs),
computed with their own autograd passes on a copy of the model, and the pipeline end to
end on the offline tiny_llama.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from task_data import run_overrides

from pruneflow.llm.gradient import prunable_weights, score_and_prune, scoring_batches
from pruneflow.methods.seven_pre import SevenPre
from pruneflow.methods.snip import Snip
from pruneflow.schedules import Schedule

NSAMPLES, SEQ = 6, 12


def tiny_lm() -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 64, (NSAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    return model, ids


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}


def run_method(cls, model: torch.nn.Module, ids: torch.Tensor, sparsity: float, batch: int = 1, **cfg: object) -> dict[str, np.ndarray]:  # noqa: ANN001
    method = cls(OmegaConf.create({"name": cls.name, "compile": False, **cfg}), sparsity)
    weights = prunable_weights(linears(model))
    method.validate(model, weights)
    batches = scoring_batches(ids, batch)
    schedule = Schedule(kind="cubic", target=sparsity, total_steps=len(batches))
    score_and_prune(model, method, weights, batches, schedule, torch.device("cpu"))
    return {n: (lin.weight.detach() != 0).numpy() for n, lin in linears(model).items()}


def grads_of(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """dL/dW of the next-token loss, by autograd on this model (masked weights at zero)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: lin.weight.grad.detach().numpy().copy() for n, lin in linears(model).items()}


def topk_keep(scores: dict[str, np.ndarray], keep: int) -> dict[str, np.ndarray]:
    flat = np.concatenate([s.ravel() for s in scores.values()])
    order = np.argsort(-flat, kind="stable")[:keep]
    kept = np.zeros(flat.size, bool)
    kept[order] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = kept[start : start + s.size].reshape(s.shape)
        start += s.size
    return out


def ref_seven_pre(model: torch.nn.Module, ids: torch.Tensor, target: float, nm: tuple[int, int] | None = None,
                  a1: float = 0.8, a2: float = 0.9) -> dict[str, np.ndarray]:
    """SEVEN (Symbolic dEscent): m = a1 m + (1-a1)|g|, v = a2 v + (1-a2) g^2,
    S += |W * |g| * m_hat / (sqrt(v_hat) + 1e-9)| with m_hat = m / (1 - a1^(k+1)),
    v_hat = v / (1 - a2^(k+1)); pruned weights score -inf; after step k of T the global
    top-k keeps n - round(n * s_k), s_k = target (1 - (1 - (k+1)/T)^3). No weight update;
    pruned weights are zero in the next forward. With N:M the mask is set once, at the
    last step, as the N highest scores of every M inputs."""
    model = copy.deepcopy(model)
    lins = linears(model)
    mask = {n: np.ones(tuple(lin.weight.shape), bool) for n, lin in lins.items()}
    m = {n: np.zeros(k.shape) for n, k in mask.items()}
    v = {n: np.zeros(k.shape) for n, k in mask.items()}
    S = {n: np.zeros(k.shape) for n, k in mask.items()}
    total = sum(k.size for k in mask.values())
    T = ids.shape[0]
    for k in range(T):
        G = grads_of(model, ids[k : k + 1])
        for n, lin in lins.items():
            W = lin.weight.detach().numpy()
            g = G[n] * mask[n]
            m[n] = a1 * m[n] + (1 - a1) * np.abs(g)
            v[n] = a2 * v[n] + (1 - a2) * g * g
            ratio = (m[n] / (1 - a1 ** (k + 1))) / (np.sqrt(v[n] / (1 - a2 ** (k + 1))) + 1e-9)
            S[n] = S[n] + np.abs(W * np.abs(g) * ratio)
            S[n][~mask[n]] = -np.inf
        s_k = target * (1 - (1 - (k + 1) / T) ** 3)
        if nm is not None:
            if k == T - 1:
                for n in mask:
                    groups = S[n].reshape(S[n].shape[0], -1, nm[1])
                    order = np.argsort(-groups, axis=-1, kind="stable")[..., : nm[0]]
                    keep = np.zeros(groups.shape, bool)
                    np.put_along_axis(keep, order, True, axis=-1)
                    mask[n] = keep.reshape(S[n].shape)
        else:
            mask = topk_keep(S, total - round(s_k * total))
        with torch.no_grad():
            for n, lin in lins.items():
                lin.weight.mul_(torch.from_numpy(mask[n]).double())
    return mask


def test_seven_pre_on_a_causal_lm_is_its_update_rule() -> None:
    model, ids = tiny_lm()
    ref = ref_seven_pre(model, ids, 0.5)
    got = run_method(SevenPre, model, ids, 0.5, scope="global")
    total = sum(r.size for r in ref.values())
    assert sum(int(g.sum()) for g in got.values()) == total - round(0.5 * total)
    # the state is float32 in the method: at most a near-tie or two may fall the other way
    differ = sum(int((ref[n] != got[n]).sum()) for n in ref)
    assert differ <= 4, differ
    # iterative: the mask follows the cubic ramp, so the early steps' pruning shapes later scores
    assert any(not g.all() for g in got.values())


def test_seven_pre_n_m_keeps_the_n_highest_scores_of_every_m() -> None:
    model, ids = tiny_lm()
    ref = ref_seven_pre(model, ids, 0.5, nm=(2, 4))
    got = run_method(SevenPre, model, ids, 0.5, scope="global", pattern="2:4")
    for g in got.values():
        assert (g.reshape(g.shape[0], -1, 4).sum(-1) == 2).all()
    differ = sum(int((ref[n] != got[n]).sum()) for n in ref)
    assert differ <= 4, differ


def test_snip_on_a_causal_lm_is_w_times_the_summed_gradient_per_layer() -> None:
    model, ids = tiny_lm()
    G = grads_of(copy.deepcopy(model), ids[:2])  # the mean loss of a batch of 2 ...
    G2 = grads_of(copy.deepcopy(model), ids[2:4])
    G3 = grads_of(copy.deepcopy(model), ids[4:6])
    got = run_method(Snip, model, ids, 0.6, batch=2, scope="local")
    for n, lin in linears(tiny_lm()[0]).items():
        W = lin.weight.detach().numpy()
        score = np.abs(W * (G[n] + G2[n] + G3[n]))  # ... summed over the 3 scoring batches
        keep = W.size - round(0.6 * W.size)
        ref = topk_keep({n: score}, keep)[n]
        assert got[n].sum() == keep
        assert int((ref != got[n]).sum()) <= 2, n


def test_scoring_leaves_plain_sparse_weights_and_restores_requires_grad() -> None:
    model, ids = tiny_lm()
    model.model.embed_tokens.weight.requires_grad_(False)
    run_method(SevenPre, model, ids, 0.5, scope="local")
    from torch.nn.utils import parametrize

    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.model.embed_tokens.weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed" not in n)
    for lin in linears(model).values():
        assert lin.weight.grad is None
        assert (lin.weight == 0).sum().item() == round(0.5 * lin.weight.numel())


# ----------------------------------------------------------------------------- pipeline
LM = ["model=tiny_llama", "model.pretrain.steps=0", "task=lm/wikitext2", "calibration.dataset=wikitext2",
      "calibration.nsamples=4", "logger=none", "task.max_eval_windows=8"]


def run_lm(run_dir: Path, lm_text: Path, *overrides: str) -> dict:
    return run_overrides(run_dir, [*LM, f"task.path={lm_text}", *overrides])


@pytest.mark.parametrize("method,extra", [
    ("seven_pre", []),
    ("seven_pre", ["method.pattern='2:4'"]),
    ("snip", ["method.scope=local", "calibration.batch_size=2"]),
    ("force", ["schedule=exponential"]),
])
def test_gradient_methods_prune_tiny_llama(tmp_path: Path, lm_text: Path, method: str, extra: list[str]) -> None:
    r = run_lm(tmp_path / "run", lm_text, f"method={method}", *extra)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    names = [k for k in state if ".layers." in k and k.endswith("proj.weight")]
    zeros = sum(int((state[k] == 0).sum()) for k in names)
    total = sum(state[k].numel() for k in names)
    sp = r["sparsity"]
    assert sp["target"] == 0.5 and sp["measured"] == pytest.approx(zeros / total, abs=1e-6)
    assert abs(zeros / total - 0.5) < 1e-4
    info = r["method_info"]["scoring"]
    batch = 2 if method == "snip" else 1
    assert info["steps"] == 4 // batch and info["batch_size"] == batch and info["whole_model"] is True
    if "method.pattern='2:4'" in extra:
        assert sp["pattern_verified"] is True and r["method_info"]["pattern"] == "2:4"
        for k in names:
            assert int((state[k].reshape(state[k].shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert math.isfinite(r["metrics"]["final"]["perplexity"])
    assert r["metrics"]["final"]["perplexity"] != r["metrics"]["dense"]["perplexity"]


@pytest.mark.parametrize("overrides,needle", [
    (["method=seven_pre", "model.offload=true"], "model.offload"),
    (["method=snip", "allocation.name=owl"], "allocation.name"),
    (["method=wanda", "calibration.batch_size=4"], "calibration.batch_size=4"),
    (["method=seven_pre", "method.pattern='2:4'", "sparsity=0.7"], "conflicts with method.pattern"),
    (["method=seven_pre", "calibration.batch_size=0"], "calibration.batch_size"),
])
def test_bad_gradient_settings_are_one_clear_error(tmp_path: Path, lm_text: Path, overrides: list[str], needle: str) -> None:
    from pruneflow.errors import UserError

    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        run_lm(tmp_path / "bad", lm_text, *overrides)


def test_prune_causal_lm_scores_with_gradients_from_your_own_code() -> None:
    from pruneflow.llm import prune_causal_lm

    model, ids = tiny_lm()
    ref = ref_seven_pre(model, ids, 0.5)
    rep = prune_causal_lm(model, ids, method="seven_pre", scope="global", compile=False)
    assert rep["target"] == 0.5 and rep["measured"] == pytest.approx(0.5, abs=1e-4)
    got = {n: (lin.weight.detach() != 0).numpy() for n, lin in linears(model).items()}
    assert sum(int((ref[n] != got[n]).sum()) for n in ref) <= 4
    from pruneflow.errors import UserError

    with pytest.raises(UserError, match="offload"):
        prune_causal_lm(tiny_lm()[0], ids, method="snip", offload=True)


def test_scoring_batches_keep_the_short_last_batch() -> None:
    """5 windows in batches of 2: 3 steps (ceil), the last of 1 window; none is dropped."""
    from pruneflow.llm.gradient import n_steps

    ids = torch.arange(5 * 3).reshape(5, 3)
    batches = scoring_batches(ids, 2)
    assert [b.shape[0] for b in batches] == [2, 2, 1] and torch.equal(torch.cat(batches), ids)
    assert n_steps(5, 2) == len(batches) == 3


def test_scoring_gives_gradients_to_the_prunable_weights_only() -> None:
    """During scoring the embeddings, norms and head take no gradient (memory), and every
    prunable weight does; the flags come back afterwards."""
    model, ids = tiny_lm()
    seen: list[tuple[bool, bool]] = []

    def on_step(_step: int, _loss: float) -> None:
        others = [p.requires_grad for n, p in model.named_parameters() if not (".layers." in n and "proj" in n)]
        seen.append((any(others), all(lin.weight.requires_grad for lin in linears(model).values())))

    method = Snip(OmegaConf.create({"name": "snip", "compile": False, "scope": "local"}), 0.5)
    weights = prunable_weights(linears(model))
    method.validate(model, weights)
    batches = scoring_batches(ids, 2)
    schedule = Schedule(kind="cubic", target=0.5, total_steps=len(batches))
    score_and_prune(model, method, weights, batches, schedule, torch.device("cpu"), on_step)
    assert seen == [(False, True)] * 3
    assert all(p.requires_grad for p in model.parameters())


def test_scoring_is_free_of_dropout() -> None:
    """OPT has dropout (here 0.5): the gradients are taken in eval mode, so SNIP's masks are
    those of dropout-free gradients, and the model's training flag comes back."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.5,
                                     attention_dropout=0.5)).double()
    ids = torch.randint(0, 64, (4, SEQ), generator=torch.Generator().manual_seed(1))
    dense = copy.deepcopy(model).eval()
    G = [grads_of(dense, ids[i : i + 2]) for i in (0, 2)]
    W0 = {n: lin.weight.detach().numpy().copy() for n, lin in linears(model).items()}
    model.train()
    got = run_method(Snip, model, ids, 0.5, batch=2, scope="local")
    assert model.training
    for n, W in W0.items():
        ref = topk_keep({n: np.abs(W * (G[0][n] + G[1][n]))}, W.size - round(0.5 * W.size))[n]
        assert int((ref != got[n]).sum()) <= 2, n
