"""method=l0 (Sanh et al.'s L0-regularization baseline: Louizos et al.'s hard-concrete gates)
against a transcription, written here in plain PyTorch, of their code
(``emmental/modules/masked_nn.py`` ``pruning_method="l0"``, ``regularization(mode="l0")``
and ``schedule_threshold`` of ``masked_run_glue.py``, ``bertarize.py`` /
``counts_parameters.py`` for the final model), step by step; gates and penalty by hand;
one CLI run with its sparsity recounted from the saved weights, and its resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sweep_helpers import run_cli as run_cli_in
from sweep_helpers import tiny_config_dir
from torch import nn
from transformers import get_linear_schedule_with_warmup

import pruneflow.methods
import pruneflow.trainer
from pruneflow.errors import UserError
from pruneflow.methods import get_method_class
from pruneflow.runner import Run, run
from pruneflow.trainer import EpochBatches
from pruneflow.validation import check_unused

from conftest import SMALL, make_config, read_result, run_cli

# ----------------------------------------------------------------------------- their code, transcribed
STRETCH_LO, STRETCH_HI, TEMPERATURE = -0.1, 1.1, 2 / 3


def their_gate(scores: torch.Tensor, training: bool) -> torch.Tensor:
    """MaskedLinear(pruning_method="l0"): a fresh uniform draw per forward in training."""
    if training:
        u = torch.zeros_like(scores).uniform_().clamp(0.0001, 0.9999)
        s = torch.sigmoid((u.log() - (1 - u).log() + scores) / TEMPERATURE)
    else:
        s = torch.sigmoid(scores)
    return (s * (STRETCH_HI - STRETCH_LO) + STRETCH_LO).clamp(min=0.0, max=1.0)


def their_regularization(scores: list[torch.Tensor]) -> torch.Tensor:
    """regularization(mode="l0"): per matrix sum(sigmoid(S - 2/3 log(0.1/1.1))) / numel, averaged."""
    total = 0
    for s in scores:
        total = total + torch.sigmoid(s - 2 / 3 * math.log(0.1 / 1.1)).sum() / s.numel()
    return total / len(scores)


def their_threshold(step: int, total: int, t_init: int, t_final: int, initial: float, final: float) -> float:
    """schedule_threshold with warmup_steps = 1 (initial_warmup / final_warmup in steps)."""
    if step <= t_init:
        return initial
    if step > total - t_final:
        return final
    c = 1 - (step - t_init) / (total - (t_init + t_final))
    return final + (initial - final) * c**3


def make_masked(layer: nn.Linear, scores: torch.Tensor) -> None:
    """Their masked Linear: F.linear(x, mask * W, b), the gate by the module's training flag."""
    layer.forward = lambda x: F.linear(x, their_gate(scores, layer.training) * layer.weight, layer.bias)  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- a small network
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(16, 8, generator=g)
        out.append({"x": x, "labels": (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()})
    return out


def adamw(model: nn.Module, extra: list[dict], lr: float) -> torch.optim.AdamW:
    """Their optimizer groups; a group without ``weight_decay`` (their scores) gets the
    default of transformers' AdamW, 0 (torch's would be 0.01)."""
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}, *extra]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


# ----------------------------------------------------------------------------- (1) steps vs their loop
@pytest.mark.parametrize("ramp", [False, True], ids=["readme_constant_lambda", "threshold_ramp"])
def test_training_steps_match_their_loop(ramp: bool) -> None:
    steps, lr, score_lr, final_lambda, init = 8, 1e-2, 0.3, 0.3, -1.0
    t_init, t_final, initial_thr, final_thr = (2, 2, 0.25, 1.0) if ramp else (0, 0, 1.0, 1.0)
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    batches = data(steps)

    pruner = pruneflow.methods.create(
        "l0", steps=steps, model=model, include=["blocks.*"], exclude=["head"], initial_warmup=t_init, final_warmup=t_final,
        final_lambda=final_lambda, score_lr=score_lr, score_init=init, initial_threshold=initial_thr, final_threshold=final_thr,
    )
    opt = adamw(model, pruner.param_groups(), lr)
    scores = pruner.method.score_param  # flat view of every layer's trainable scores
    ours: list[tuple[float, torch.Tensor]] = []
    torch.manual_seed(7)
    for step, b in enumerate(batches):
        loss = F.cross_entropy(model(b["x"]), b["labels"])
        extra = pruner.extra_loss()
        loss = loss + extra if extra is not None else loss
        loss.backward()
        nn.utils.clip_grad_norm_([*model.parameters(), *pruner.method.score_params], 1.0)
        opt.step()
        pruner.after_optimizer_step(step)
        opt.zero_grad()
        ours.append((float(loss.detach()), scores.detach().clone()))
    pruner.end()

    # Their loop: scores per MaskedLinear, AdamW (scores at their lr, no decay), clipping over all.
    layers = [ref.blocks[0], ref.blocks[2]]
    ref_scores = [torch.full_like(m.weight, init, requires_grad=True) for m in layers]
    for m, s in zip(layers, ref_scores, strict=True):
        make_masked(m, s)
    ref_opt = adamw(ref, [{"params": ref_scores, "lr": score_lr}], lr)
    torch.manual_seed(7)
    for step, b in enumerate(batches):
        lam = final_lambda * their_threshold(step, steps, t_init, t_final, initial_thr, final_thr) / final_thr
        loss = F.cross_entropy(ref(b["x"]), b["labels"]) + lam * their_regularization(ref_scores)
        loss.backward()
        nn.utils.clip_grad_norm_([*ref.parameters(), *ref_scores], 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
        our_loss, our_scores = ours[step]
        assert our_loss == pytest.approx(float(loss.detach()), rel=1e-5), f"loss differs at step {step}"
        theirs = torch.cat([s.detach().reshape(-1) for s in ref_scores])
        assert torch.allclose(our_scores, theirs, rtol=1e-5, atol=1e-6), f"scores differ after step {step}"

    # The final model: bertarize.py's W * eval gate; remaining = gate > 0 (counts_parameters.py).
    ref.eval()
    gates = [their_gate(s.detach(), training=False) for s in ref_scores]
    assert sum(int((g == 0).sum()) for g in gates) > 0 and sum(int(((g > 0) & (g < 1)).sum()) for g in gates) > 0
    model.eval()
    with torch.no_grad():
        x = torch.randn(5, 8)
        assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-6)
    for w, m, g in zip(pruner.weights, layers, gates, strict=True):
        assert torch.allclose(w.param.detach(), m.weight.detach() * g, rtol=1e-5, atol=1e-7)
        assert torch.equal(w.mask, (g > 0).float())
    kept = sum(int((g > 0).sum()) for g in gates) / sum(g.numel() for g in gates)
    assert pruner.method.summary()["gates"]["kept_fraction"] == pytest.approx(kept, abs=1e-6)
    final = pruner.remove()
    assert pruner.sparsity == pytest.approx(1 - kept, abs=1e-6)
    assert all(int((final.blocks[i].weight == 0).sum()) >= int((g == 0).sum()) for i, g in zip((0, 2), gates, strict=True))


# ----------------------------------------------------------------------------- (2) gates by hand
def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_gates_by_hand() -> None:
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(6, 1, bias=False))
    with torch.no_grad():
        model.blocks[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.5, -1.5, 2.0]]))
    w0 = model.blocks[0].weight.detach().clone()
    pruner = pruneflow.methods.create("l0", steps=2, model=model, include=["blocks.*"])
    s = [-3.0, -2.5, 0.0, 1.0, 2.5, -1.0]
    with torch.no_grad():
        pruner.method.score_param.copy_(torch.tensor(s))
    pruner.extra_loss()
    pruner.after_optimizer_step(0)  # as if an optimizer step had set the scores
    # evaluation: clamp(sigmoid(S) * 1.2 - 0.1, 0, 1), no noise and no temperature
    by_hand = [0.0, 0.0, 0.5, 1.2 * _sig(1.0) - 0.1, 1.0, 1.2 * _sig(-1.0) - 0.1]
    model.eval()
    assert model.blocks[0].weight.detach()[0].tolist() == pytest.approx([w * g for w, g in zip(w0[0].tolist(), by_hand, strict=True)], abs=1e-6)
    # training: u ~ U(0, 1) from the global RNG, clamped to [1e-4, 1 - 1e-4]; temperature 2/3
    model.train()
    torch.manual_seed(11)
    effective = model.blocks[0].weight.detach()[0].tolist()
    torch.manual_seed(11)
    u = torch.empty(1, 6).uniform_().clamp(1e-4, 1 - 1e-4)[0].tolist()
    sampled = [min(1.0, max(0.0, 1.2 * _sig((math.log(ui) - math.log(1 - ui) + si) * 1.5) - 0.1)) for ui, si in zip(u, s, strict=True)]
    assert effective == pytest.approx([w * g for w, g in zip(w0[0].tolist(), sampled, strict=True)], abs=1e-6)
    assert 0 < sum(0 < g < 1 for g in sampled)  # the seed gives a non-trivial draw
    # the mask buffers show the evaluation gate during pruning
    assert pruner.weights.weights[0].mask[0].tolist() == pytest.approx(by_hand, abs=1e-6)
    # end: the gate folded into W, the 0/1 mask frozen (training mode no longer samples)
    pruner.end()
    assert pruner.weights.weights[0].param.detach()[0].tolist() == pytest.approx([w * g for w, g in zip(w0[0].tolist(), by_hand, strict=True)], abs=1e-6)
    assert pruner.weights.weights[0].mask[0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert model.blocks[0].weight.detach()[0].tolist() == pytest.approx([0, 0, 1.5, 0.5 * by_hand[3], -1.5, 2.0 * by_hand[5]], abs=1e-6)


# ----------------------------------------------------------------------------- (3) penalty by hand
def test_penalty_and_lambda_schedule_by_hand() -> None:
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # matrices of 6 and 2 weights
    pruner = pruneflow.methods.create("l0", steps=6, model=model, include=["blocks.*"], initial_warmup=1, final_warmup=1,
                                      final_lambda=10.0, initial_threshold=0.5, final_threshold=1.0)
    s1, s2 = [-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], [4.0, -4.0]
    with torch.no_grad():
        pruner.method.score_param.copy_(torch.tensor(s1 + s2))
    shift = 2 / 3 * math.log(0.1 / 1.1)  # P(gate != 0) = sigmoid(S - beta log(-l/r))
    mean1 = sum(_sig(v - shift) for v in s1) / 6
    mean2 = sum(_sig(v - shift) for v in s2) / 2
    per_matrix = (mean1 + mean2) / 2
    assert abs(per_matrix - sum(_sig(v - shift) for v in s1 + s2) / 8) > 0.05  # averaged per matrix, not per weight
    # their schedule_threshold (t_init = t_final = 1, 6 steps): 0.5, 0.5, 1 - 0.5 c^3 for c = 3/4, 1/2, 1/4, then 1
    lambdas = [10 * t for t in (0.5, 0.5, 1 - 0.5 * 0.75**3, 1 - 0.5 * 0.5**3, 1 - 0.5 * 0.25**3, 1.0)]
    for step, lam in enumerate(lambdas):
        assert pruner.method.regu_lambda(step) == pytest.approx(lam, rel=1e-12)
        assert float(pruner.extra_loss().detach()) == pytest.approx(lam * per_matrix, rel=1e-6)
        pruner.after_optimizer_step(step)  # no optimizer: the scores stay, the step advances
    with pytest.raises(UserError, match="extra_loss"):  # a loop that never adds the penalty would not prune
        pruner.after_optimizer_step(6)
    pruner.end()
    assert pruner.extra_loss() is None  # frozen: no penalty in the recover stage


def test_lambda_runs_one_step_ahead_with_the_squad_scripts_counter() -> None:
    """masked_run_squad.py's global_step starts at 1 (schedule.step_offset=1): lambda at loop
    step j is final_lambda times their schedule_threshold(j + 1) (j in masked_run_glue.py)."""
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(3, 2))
    kw = {"steps": 8, "model": model, "include": ["blocks.*"], "initial_warmup": 2, "final_warmup": 1,
          "final_lambda": 10.0, "initial_threshold": 0.5, "final_threshold": 1.0}
    glue = pruneflow.methods.create("l0", **kw)
    squad = pruneflow.methods.create("l0", **kw, step_offset=1)
    for j in range(8):
        assert glue.method.regu_lambda(j) == pytest.approx(10 * their_threshold(j, 8, 2, 1, 0.5, 1.0), rel=1e-12)
        assert squad.method.regu_lambda(j) == pytest.approx(10 * their_threshold(j + 1, 8, 2, 1, 0.5, 1.0), rel=1e-12)
    assert squad.method.regu_lambda(6) != glue.method.regu_lambda(6)


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="final_lambda"):
        pruneflow.methods.create("l0", sparsity=0.5)
    for key, value in (("final_threshold", 0.0), ("score_lr", -1.0), ("final_lambda", "a lot"), ("initial_threshold", -0.5)):
        with pytest.raises(UserError, match=f"method.{key}"):
            pruneflow.methods.create("l0", **{key: value})
    # their README's constant lambda: a schedule setting would be ignored, hence an error
    cfg = make_config(["method=l0", "schedule.initial_warmup=3"], tmp_path)
    with pytest.raises(UserError, match="schedule.initial_warmup=3"):
        check_unused(cfg, get_method_class("l0")(cfg.method, None).unused_settings(cfg))
    cfg = make_config(["method=l0", "method.initial_threshold=0.5", "schedule.initial_warmup=3"], tmp_path)
    check_unused(cfg, get_method_class("l0")(cfg.method, None).unused_settings(cfg))  # used by the ramp
    with pytest.raises(UserError, match="exponential"):
        pruneflow.methods.create("l0", steps=4, schedule="exponential", initial_threshold=0.5)


# ----------------------------------------------------------------------------- the runner vs their loop
TINY = [
    "task.max_train_samples=256", "task.max_eval_samples=64", "logger=none", "speed.enabled=false", "save_model=false",
    "cache=false", "model.kwargs.drop_path_rate=0.0", "model.kwargs.proj_drop_rate=0.0", "trainer.continuous=true",
    "trainer.torch_threads=1", "stages.eval_batch_size=64",
]


def test_runner_trains_as_their_loop(tmp_path: Path) -> None:
    """The real trainer (one AdamW, linear warm-up/decay for weights and scores, clipping
    over both, weight decay 0.01 on the weights only) on the tiny ViT against their loop."""
    total, warmup, lr, score_lr, final_lambda = 6, 2, 2e-3, 0.5, 50.0
    stage = [f"stages.{n}.{k}={v}" for n, s in (("finetune", 0), ("prune", total), ("recover", 0))
             for k, v in (("epochs", "null"), ("steps", s), ("lr", lr), ("batch_size", 32))]
    cfg = make_config([*TINY, *stage, "method=l0", f"method.score_lr={score_lr}", f"method.final_lambda={final_lambda}",
                       "method.score_init=-1.0", "trainer.lr_scheduler=linear", f"trainer.warmup_steps={warmup}"], tmp_path)
    r = Run(cfg, tmp_path / "run")
    r.prepare()
    ref = copy.deepcopy(r.bundle.model)
    ours: list[torch.Tensor] = []
    hook = r.method.after_optimizer_step

    def record(step: int, grads_finite: bool = True) -> None:
        hook(step, grads_finite)
        ours.append(r.method.score_param.detach().clone())

    r.method.after_optimizer_step = record  # type: ignore[method-assign]
    r.execute()

    layers = [m for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    scores = [torch.full_like(m.weight, -1.0, requires_grad=True) for m in layers]
    for m, s in zip(layers, scores, strict=True):
        make_masked(m, s)
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    rest = [p for n, p in ref.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0},
                             {"params": scores, "lr": score_lr, "weight_decay": 0.0}], lr=lr, eps=1e-8)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    spec = r.plan.stages["prune"]
    data = EpochBatches(r.task.train_set, spec.batch_size, spec.seed, r.task.collate)
    ref.train()
    torch.manual_seed(spec.seed)  # the runner seeds the stage so
    for step in range(total):
        b = next(data)
        loss = F.cross_entropy(ref(b["pixel_values"]), b["labels"]) + final_lambda * their_regularization(scores)
        loss.backward()
        nn.utils.clip_grad_norm_([*ref.parameters(), *scores], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        theirs = torch.cat([s.detach().reshape(-1) for s in scores])
        assert torch.allclose(ours[step], theirs, rtol=1e-5, atol=1e-6), f"scores differ after step {step}"
    assert len(ours) == total
    with torch.no_grad():
        for w, m, s in zip(r.weights, layers, scores, strict=True):
            assert torch.allclose(w.param, m.weight * their_gate(s, training=False), rtol=1e-5, atol=1e-6), w.name


# ----------------------------------------------------------------------------- (4) the CLI, (5) resume
ARGS = [*SMALL, "method=l0", "method.score_init=0.0", "method.score_lr=1.0", "method.final_lambda=1.0", "trainer.continuous=true",
        "stages.prune.batch_size=64", "stages.recover.batch_size=64", "trainer.torch_threads=1"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("l0cli")
    out = run_cli([*ARGS, f"hydra.run.dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}"], cwd=tmp)
    assert out.returncode == 0, out.stderr
    return tmp / "run"


@pytest.mark.slow
def test_cli_run_counts_sparsity_from_the_saved_weights(cli_run: Path) -> None:
    result = read_result(cli_run)
    assert result["method"] == "l0" and result["sparsity"]["target"] is None
    names = list(result["sparsity"]["per_layer"])
    state = load_file(str(cli_run / "model" / "model.safetensors"))
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    measured = zeros / sum(state[n].numel() for n in names)
    assert result["sparsity"]["measured"] == pytest.approx(measured, abs=1e-6)
    assert 0.05 < measured < 0.999  # the penalty pruned, not everything
    info = result["method_info"]
    assert info["final_lambda"] == 1.0 and (info["initial_threshold"], info["final_threshold"]) == (1.0, 1.0)
    assert info["gates"]["kept_fraction"] == pytest.approx(1 - measured, abs=1e-4)  # gate > 0 is what stays non-zero
    assert set(result["metrics"]) == {"finetune", "prune", "recover", "final"}


@pytest.mark.slow
def test_resume_after_a_kill_in_the_prune_stage_ends_identically(cli_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Killed(Exception):
        pass

    def kill(stage: str, step: int) -> None:  # right after the checkpoint at prune step 6, as PRUNEFLOW_TEST_KILL_AT
        if (stage, step) == ("prune", 6):
            raise Killed

    cfg = make_config(ARGS, tmp_path)
    monkeypatch.setattr(pruneflow.trainer, "_fault_injection", kill)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "result.json").exists()
    resumed = run(cfg, tmp_path / "run")
    reference = read_result(cli_run)
    assert resumed["metrics"] == reference["metrics"] and resumed["sparsity"] == reference["sparsity"]
    assert resumed["method_info"] == reference["method_info"]
    a = load_file(str(cli_run / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_ranks_keep_identical_scores(tmp_path: Path) -> None:
    """The scores are not model parameters: the method averages their gradients itself."""
    run_dir = tmp_path / "run"
    out = run_cli_in(
        ["experiment=pf_tiny", "method=l0", "method.score_init=0.0", "method.score_lr=1.0", "method.final_lambda=1.0",
         "trainer.device=cpu", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"],
        tmp_path, tiny_config_dir(tmp_path),
        prefix=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pruneflow.cli"],
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    fingerprints = read_result(run_dir)["provenance"]["distributed"]["fingerprints"]["prune"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1] and "scores" in fingerprints[0]


def _one_layer(scores: list[float], **settings: float) -> tuple[nn.Module, object]:
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(len(scores), 1, bias=False))
    with torch.no_grad():
        model.blocks[0].weight.fill_(1.0)
    pruner = pruneflow.methods.create("l0", steps=4, model=model, include=["blocks.*"], **settings)
    with torch.no_grad():
        pruner.method.score_param.copy_(torch.tensor(scores))
    return model, pruner


def test_training_noise_is_clamped_away_from_zero_and_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draws u of exactly 0 or 1 are clamped to [1e-4, 1 - 1e-4] (their code's clamp):
    a gate of 0.82 (S = 10) and 0.18 (S = -10), not 0 and 1."""
    model, _ = _one_layer([10.0, -10.0])
    model.train()
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.copy_(torch.tensor([[0.0, 1.0]])))
    gate = model.blocks[0].weight.detach()[0].tolist()
    expected = their_gate(torch.tensor([[10.0, -10.0]]), training=True)[0].tolist()  # the same draws
    monkeypatch.undo()
    assert 0.8 < expected[0] < 0.83 and 0.17 < expected[1] < 0.2
    assert gate == pytest.approx(expected, abs=1e-6)


def test_lambda_is_scaled_by_the_final_threshold() -> None:
    """lambda_t = final_lambda * threshold_t / final_threshold: constant thresholds of 2 give final_lambda."""
    _, pruner = _one_layer([0.0, 1.0], final_lambda=10.0, initial_threshold=2.0, final_threshold=2.0)
    shift = 2 / 3 * math.log(0.1 / 1.1)
    assert pruner.method.regu_lambda(0) == 10.0
    assert float(pruner.extra_loss().detach()) == pytest.approx(10.0 * (_sig(0.0 - shift) + _sig(1.0 - shift)) / 2, rel=1e-6)
    _, ramp = _one_layer([0.0, 1.0], final_lambda=10.0, initial_threshold=1.0, final_threshold=4.0)
    assert ramp.method.regu_lambda(0) == 10.0 * 1.0 / 4.0  # step 0: the initial threshold


def test_final_gate_statistics_by_hand() -> None:
    """Gates [0, 0, 0.5, 0.777, 1, 0.223] (as in test_gates_by_hand): 4 of 6 kept, 3 of 6 scaled (0 < gate < 1)."""
    _, pruner = _one_layer([-3.0, -2.5, 0.0, 1.0, 2.5, -1.0])
    pruner.extra_loss()
    pruner.after_optimizer_step(0)  # as if an optimizer step had set the scores
    pruner.end()
    assert pruner.method.summary()["gates"] == {"kept_fraction": round(4 / 6, 6), "scaled_fraction": 0.5}


def test_loaded_scores_show_their_gate_in_the_masks() -> None:
    """A method state loaded in the prune stage sets the mask buffers to its scores' evaluation gate."""
    s = [-3.0, 0.0, 1.0, 2.5]
    _, saved = _one_layer(s)
    _, fresh = _one_layer([2.197] * 4)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.weights.weights[0].mask[0].tolist() == pytest.approx([0.0, 0.5, 1.2 * _sig(1.0) - 0.1, 1.0], abs=1e-6)


def test_a_run_of_a_penalty_method_that_removed_nothing_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Soft movement and L0 have no sparsity target: three steps of soft movement's scores
    from the defaults remove nothing, and the run said nothing about it (the report showed 0.00)."""
    name = "soft_movement"
    stage = [f"stages.{n}.{k}={v}" for n, s in (("finetune", 0), ("prune", 3), ("recover", 0))
             for k, v in (("epochs", "null"), ("steps", s), ("batch_size", 32))]
    r = Run(make_config([*TINY, *stage, f"method={name}"], tmp_path), tmp_path / "run")
    r.prepare()
    with caplog.at_level("WARNING", logger="pruneflow"):
        result = r.execute()
    assert result["sparsity"]["measured"] < 0.01
    assert f"method={name} removed {100 * result['sparsity']['measured']:.2f} % of the prunable weights" in caplog.text
    assert "Raise method.final_lambda or lengthen stages.prune" in caplog.text
