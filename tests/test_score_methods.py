"""SEVEN, PLATON and movement scores against hand computations; no regrowth;
the SEVEN presets; masks frozen after the prune stage. (tests/test_fidelity.py runs
each method side by side with an independent transcription of its authors' loop.)"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from sweep_helpers import compose
from torch import nn

import pruneflow.methods
from pruneflow.errors import UserError
from pruneflow.masking import MaskedWeights, select_prunable
from pruneflow.methods import METHODS, PruneContext, get_method_class
from pruneflow.methods.platon import platon_scores, platon_window_step_
from pruneflow.methods.score_based import ScoreMask
from pruneflow.methods.seven import PRESETS, seven_update_
from pruneflow.schedules import Schedule

W = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
G0 = torch.tensor([[0.1, -0.2], [0.0, 0.4]])
G1 = torch.tensor([[0.3, 0.2], [0.5, -0.4]])


def _zeros(n: int = 3) -> list[torch.Tensor]:
    return [torch.zeros(2, 2) for _ in range(n)]


# --- the scores, by hand ----------------------------------------------------------------
def test_seven_score_by_hand() -> None:
    S, m, v = _zeros()
    ones = torch.ones(2, 2)
    seven_update_(S, m, v, W, G0, ones, k=0, alpha_1=0.8, alpha_2=0.9)
    # k=0: m^ = 0.2|g|/0.2 = |g|, v^ = sqrt(0.1 g^2/0.1) + 1e-9 = |g| + 1e-9, so S = |W g| (0 where g = 0)
    assert torch.allclose(S, torch.tensor([[0.1, 0.4], [0.0, 1.2]]), atol=1e-6)
    seven_update_(S, m, v, W, G1, ones, k=1, alpha_1=0.8, alpha_2=0.9)
    # k=1, entry (0,0): m = 0.8*0.02 + 0.2*0.3 = 0.076, v = 0.9*0.001 + 0.1*0.09 = 0.0099,
    # m^ = 0.076/0.36 = 0.211111, v^ = sqrt(0.0099/0.19) = 0.228266, S += 1*0.3*0.924846 = 0.277454
    # (1,0): m = 0.1, v = 0.025 -> m^ = 0.277778, v^ = 0.362738, S = 0 + 0.5*0.5*0.765772 = 0.191443
    # (0,1), (1,1): steady |g| (0.2, 0.4) -> m^/v^ = 1, S = 2*0.2*2 = 0.8 and 3*0.4*2 = 2.4
    assert torch.allclose(S, torch.tensor([[0.377454, 0.8], [0.191443, 2.4]]), atol=1e-5)
    assert torch.allclose(m, torch.tensor([[0.076, 0.072], [0.1, 0.144]]), atol=1e-7)
    assert torch.allclose(v, torch.tensor([[0.0099, 0.0076], [0.025, 0.0304]]), atol=1e-7)


def test_seven_signed_penalises_sign_flips() -> None:
    S, m, v = _zeros()
    ones = torch.ones(2, 2)
    seven_update_(S, m, v, W, G0, ones, k=0, signed=True)
    seven_update_(S, m, v, W, G1, ones, k=1, signed=True)
    # (0,1): G = -0.2 then +0.2: m = 0.8*(-0.04) + 0.2*0.2 = 0.008, |m^| = 0.022222, v^ = 0.2,
    # S = 0.4 + 2*0.2*0.111111 = 0.444444 (unsigned: 0.8). (1,1): 0.4 then -0.4 -> 1.2 + 1.2/9 = 1.333333
    assert torch.allclose(S, torch.tensor([[0.377454, 0.444444], [0.191443, 1.333333]]), atol=1e-5)


def test_seven_pruned_entries_never_score() -> None:
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    S, m, v = _zeros()
    seven_update_(S, m, v, W, G0 * mask, mask, k=0)
    seven_update_(S, m, v, W, G1 * mask, mask, k=1)
    assert S[0, 0] == 0  # as published: S[mask == 0] = 0
    assert torch.allclose(S.view(-1)[1:], torch.tensor([0.8, 0.191443, 2.4]), atol=1e-5)
    S2, m2, v2 = _zeros()  # the method's setting: -inf cannot tie with a kept zero score
    seven_update_(S2, m2, v2, W, G0 * mask, mask, k=0, pruned_score=float("-inf"))
    seven_update_(S2, m2, v2, W, G1 * mask, mask, k=1, pruned_score=float("-inf"))
    assert S2[0, 0] == float("-inf") and torch.equal(S2.view(-1)[1:], S.view(-1)[1:])


def test_platon_window_by_hand() -> None:
    ipt, ibar, u = _zeros()
    # deltaT = 2, steps g = 1, 2, 3: g = 1 (l = 1) averages with the initial 0; g = 2 (l = 0)
    # folds the window into Ibar and U (with the new Ibar) and starts a new window.
    platon_window_step_(ipt, ibar, u, W, G0, 1, 0.85, 0.95)  # I0 = [.1 .4; 0 1.2]
    assert torch.allclose(ipt, torch.tensor([[0.05, 0.2], [0.0, 0.6]]))
    assert not ibar.any() and not u.any()
    platon_window_step_(ipt, ibar, u, W, G1, 0, 0.85, 0.95)  # I1 = [.3 .4; .25 1.2]
    # Ibar = .15 * window mean; U = .05 * |mean - Ibar| = .05 * .85 * mean
    assert torch.allclose(ibar, torch.tensor([[0.0075, 0.03], [0.0, 0.09]]), atol=1e-7)
    assert torch.allclose(u, torch.tensor([[0.002125, 0.0085], [0.0, 0.0255]]), atol=1e-7)
    assert torch.allclose(ipt, torch.tensor([[0.3, 0.4], [0.25, 1.2]]))
    platon_window_step_(ipt, ibar, u, W, G0, 1, 0.85, 0.95)
    assert torch.allclose(ipt, torch.tensor([[0.2, 0.4], [0.125, 1.2]]))
    assert torch.allclose(platon_scores(ibar, u), ibar * u)


def test_movement_straight_through_gradients() -> None:
    """Sanh et al.'s estimator: the weights get g * mask, the scores g * W."""
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    scores = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pm = ScoreMask(mask)
    pm.bind(lambda: scores)
    x = torch.tensor([[1.0, 2.0]])
    out = (x @ pm(weight).t()).sum()  # d out / d W' = x for every row
    out.backward()
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert torch.equal(weight.grad, g * mask)
    assert torch.equal(scores.grad, g * weight.detach())


# --- methods on a small model -------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def make(name: str, sparsity: float = 0.75, steps: int = 8, model: nn.Module | None = None, **cfg):  # noqa: ANN003, ANN201
    torch.manual_seed(0)
    model = model or Tiny()
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"], biases=bool(cfg.get("biases", False))))
    method = get_method_class(name)(OmegaConf.create({"name": name, **cfg}), sparsity)
    method.validate(model, weights)
    schedule = Schedule("cubic", sparsity, steps)
    method.setup(PruneContext(model=model, weights=weights, schedule=schedule, sparsity=sparsity, total_steps=steps, device=torch.device("cpu")))
    return model, weights, method


def train_steps(model: nn.Module, method, steps: int, start: int = 0, lr: float = 0.05) -> list[torch.Tensor]:  # noqa: ANN001
    """The trainer's hook order with SGD (scores after the step, then the mask);
    returns the masks after each step."""
    opt = torch.optim.SGD([*model.parameters(), *(p for g in method.param_groups() for p in g["params"])], lr=lr)
    masks = []
    for step in range(start, start + steps):
        x = torch.randn(8, 16)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,)))
        loss.backward()
        method.after_backward(step)
        opt.step()
        method.after_optimizer_step(step)
        opt.zero_grad(set_to_none=True)
        masks.append(method.mask_flat.clone())
    return masks


def reference_scores(name: str, history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], delta_t: int = 1) -> torch.Tensor:
    """The published update rules, written out again from the (W after the step, G,
    mask before the update) each step saw: an independent check of the method's
    plumbing (which W, which G, the step counter of the bias corrections, no regrowth)."""
    S = torch.zeros_like(history[0][0], dtype=torch.float64)
    m, v, ibar, u, window = (torch.zeros_like(S) for _ in range(5))
    for k, (w, g, mask) in enumerate(history):
        w, g, mask = w.double(), g.double(), mask.double()
        if name == "seven":
            a1, a2 = 0.8, 0.9
            m = a1 * m + (1 - a1) * g.abs()
            v = a2 * v + (1 - a2) * g**2
            m_hat = m / (1 - a1 ** (k + 1))
            v_hat = torch.sqrt(v / (1 - a2 ** (k + 1))) + 1e-9
            S = (S + (w * g.abs() * m_hat / v_hat).abs()) * mask  # S[mask == 0] = 0
        else:  # platon, global step k + 1
            b1, b2 = 0.85, 0.95
            local = (k + 1) % delta_t
            if local == 0:
                ibar = b1 * ibar + (1 - b1) * window
                u = b2 * u + (1 - b2) * (window - ibar).abs()
                window = (w * g).abs()
            else:
                window = (window * local + (w * g).abs()) / (local + 1)
            S = ibar * u
    return S


@pytest.mark.parametrize("name", ["seven", "platon"])
def test_scores_in_training_follow_the_published_rule(name: str) -> None:
    model, weights, method = make(name, sparsity=0.75, steps=6, **({"deltaT": 2} if name == "platon" else {}))
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hook = method.after_optimizer_step

    def record(step: int, grads_finite: bool = True) -> None:  # what the step's weights and gradient are, before the method reads them
        flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts]).clone()  # noqa: E731
        history.append((flat(w.param for w in weights), flat(w.param.grad for w in weights), method.mask_flat.clone()))
        hook(step, grads_finite)

    method.after_optimizer_step = record
    train_steps(model, method, 6)
    expected = reference_scores(name, history, delta_t=2)
    got = (method.state["ibar"].double() * method.state["unc"].double()) if name == "platon" else method.state["scores"].double()
    kept = history[-1][2] == 1  # the mask the last score update saw
    assert torch.allclose(got[kept], expected[kept], rtol=1e-4, atol=1e-9)
    assert expected[kept].abs().max() > 0  # the check compares real scores
    if name == "seven":  # no regrowth: every pruned weight ranks below every kept one
        assert bool((got[~kept] == float("-inf")).all()) and int((~kept).sum()) > 0


def test_registered() -> None:
    assert {"seven", "seven_pre", "platon", "movement", "soft_movement", "magnitude", "random"} <= set(METHODS)


@pytest.mark.parametrize("name", ["seven", "magnitude", "random"])
def test_no_regrowth_and_exact_counts(name: str) -> None:
    model, weights, method = make(name, sparsity=0.75, steps=8)
    masks = train_steps(model, method, 8)
    for k, m in enumerate(masks):
        assert int(m.sum()) == weights.numel - round(method.ctx.schedule.sparsity(k) * weights.numel)
        if k:  # every weight pruned earlier is still pruned
            assert not bool(((masks[k - 1] == 0) & (m == 1)).any())
    # Pruned weights stay exactly zero in the effective weights, however large `original` grows.
    with torch.no_grad():
        for w in weights:
            w.param.add_(100.0)
    train_steps(model, method, 1, start=8)
    assert int(torch.cat([w.mask.reshape(-1) for w in weights]).sum()) == int(masks[-1].sum())
    for w in weights:
        assert torch.equal(w.module.weight == 0, w.mask == 0)


def test_platon_regrows_from_zero() -> None:
    model, weights, method = make("platon", sparsity=0.5, steps=4, deltaT=1, biases=False)
    train_steps(model, method, 1)
    pruned = method.mask_view(0) == 0
    assert bool((weights.weights[0].param[pruned] == 0).all())  # zeroed in place, no parametrization
    assert weights.weights[0].parametrization is None
    # Make the pruned entries the most important ones: the next selection brings them back.
    with torch.no_grad():
        method.view("ibar", 0)[pruned] = 1e3
        method.view("unc", 0)[pruned] = 1e3
    method.update_masks(0.5)
    assert bool((method.mask_view(0)[pruned] == 1).all())


def test_platon_pruned_weights_train_between_mask_updates() -> None:
    """Their code masks gradients nowhere: a pruned (zeroed) weight moves again at the
    next optimizer step and is zeroed again only at the next mask update."""
    model, weights, method = make("platon", sparsity=0.5, steps=20, deltaT=4, biases=False)
    masks = train_steps(model, method, 4)  # g = 4: the first mask update
    pruned = masks[-1][: weights.weights[0].numel()].view(weights.weights[0].shape) == 0
    assert bool((weights.weights[0].param[pruned] == 0).all())
    train_steps(model, method, 1, start=4)
    assert bool((weights.weights[0].param[pruned] != 0).any())


def test_platon_strict_masks_keep_pruned_weights_at_zero_between_mask_updates() -> None:
    """``method.strict_masks=true``: the mask acts in every forward (a parametrization), so
    the weights the model computes with stay zero between PLATON's mask updates."""
    model, weights, method = make("platon", sparsity=0.5, steps=20, deltaT=4, biases=False, strict_masks=True)
    assert weights.weights[0].parametrization is not None
    masks = train_steps(model, method, 4)  # g = 4: the first mask update
    pruned = masks[-1][: weights.weights[0].numel()].view(weights.weights[0].shape) == 0
    assert bool(pruned.any())
    train_steps(model, method, 1, start=4)
    assert bool((weights.weights[0].module.weight[pruned] == 0).all())


def test_end_prune_stage_lands_on_the_target_when_the_stage_was_cut_short() -> None:
    """A prune stage that stops before the ramp's end (a resumed run with another length)
    still ends at the target: 1,024 weights at 75 % keep 256."""
    model, weights, method = make("seven", sparsity=0.75, steps=8)
    train_steps(model, method, 3)
    assert int(method.mask_flat.sum()) > 256
    method.end_prune_stage()
    assert weights.numel == 1024 and int(method.mask_flat.sum()) == method.kept_target() == 256


def test_soft_movement_keeps_its_floor_per_matrix() -> None:
    """Their binarizer keeps at least ``int(0.005 n) + 1`` weights of a matrix: 3 of 512
    when sigmoid(S) is below the threshold everywhere, the 3 largest scores."""
    model, weights, method = make("soft_movement", sparsity=None, steps=8)
    scores = method.state["scores"]
    torch.manual_seed(1)
    scores.copy_(-10 + 0.01 * torch.randn_like(scores))  # sigmoid ~ 4.5e-5: below any threshold
    method.update_masks(0.05)
    for start, n, _ in method.slices:
        kept = method.mask_flat[start : start + n]
        assert n == 512 and int(kept.sum()) == int(0.005 * n) + 1 == 3
        assert torch.equal(kept.nonzero().squeeze(1).sort().values, scores[start : start + n].topk(3).indices.sort().values)


def test_random_masks_follow_the_seed() -> None:
    """Random scores come from the global RNG, which the runner seeds with the run's seed:
    the same seed gives the same mask, another seed another."""
    masks = []
    for seed in (0, 0, 1):
        _, _, method = make("random", sparsity=0.5, steps=1)
        torch.manual_seed(seed)
        method.init_state()
        method.update_masks(0.5)
        masks.append(method.mask_flat.clone())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert int(masks[0].sum()) == 512


def test_deltat_sets_the_mask_interval() -> None:
    model, weights, method = make("platon", sparsity=0.5, steps=20, deltaT=5)
    masks = train_steps(model, method, 6)
    assert int(masks[3].sum()) == weights.numel  # no update before step 4 (g = 5)
    assert int(masks[4].sum()) < weights.numel


def test_masks_frozen_after_prune_stage() -> None:
    model, weights, method = make("seven", sparsity=0.75, steps=4)
    train_steps(model, method, 4)
    method.end_prune_stage()
    before = method.mask_flat.clone()
    train_steps(model, method, 4)  # the recover stage: the trainer still calls the hooks
    assert torch.equal(method.mask_flat, before)
    assert int(before.sum()) == weights.numel - round(0.75 * weights.numel)


def test_local_scope_per_layer_counts() -> None:
    model, weights, method = make("seven", sparsity=0.75, steps=3, scope="local")
    train_steps(model, method, 3)
    assert [int(w.mask.sum()) for w in weights] == [128, 128]


def test_state_round_trip() -> None:
    model, _, method = make("seven", sparsity=0.5, steps=6)
    train_steps(model, method, 3)
    state = method.state_dict()
    model2, _, method2 = make("seven", sparsity=0.5, steps=6, model=Tiny())
    method2.load_state_dict(state)
    assert method2.k == 3 and all(torch.equal(method2.state[k], method.state[k]) for k in method.state)


def test_invalid_settings_are_user_errors() -> None:
    for cfg in ({"scope": "layer"}, {"granularity": "block"}, {"alpha_1": 1.5}, {"preset": "imagenet"}, {"compile": "maybe"},
                {"signed": "yes"}, {"lengthen_to_fit": 1}):
        with pytest.raises(UserError):
            get_method_class("seven")(OmegaConf.create({"name": "seven", **cfg}), 0.5)
    for cfg in ({"beta1": 1.0}, {"beta2": -0.1}, {"beta1": "high"}, {"beta2": True}, {"deltaT": 0}, {"strict_masks": "no"}, {"selection": "best"}):
        with pytest.raises(UserError, match=f"method.{next(iter(cfg))}"):
            get_method_class("platon")(OmegaConf.create({"name": "platon", **cfg}), 0.5)


# --- the authors' presets ------------------------------------------------------------------------
STEPS = {"finetune": 11, "prune": 22, "recover": 33}


def seven(preset: str | None, total_epochs: float = 10, **cfg):  # noqa: ANN003, ANN201
    return get_method_class("seven")(OmegaConf.create({"name": "seven", "preset": preset, "total_epochs": total_epochs, **cfg}), 0.7)


def test_presets_set_stage_lengths(caplog: pytest.LogCaptureFixture) -> None:
    # SST-2: 67,349 examples / 32 = 2,104 steps per epoch; t_i 1000, iter_num 4000, recover = the rest of 10 epochs
    assert seven("auto").plan_stages(STEPS, 2104, "glue/sst2") == {"finetune": 1000, "prune": 4000, "recover": 21040 - 5000}
    assert seven("auto").plan_stages(STEPS, 114, "glue/mrpc") == {"finetune": 300, "prune": 600, "recover": 1140 - 900}
    assert seven("auto").plan_stages(STEPS, 12271, "glue/mnli")["prune"] == 16600
    assert seven("qnli").plan_stages(STEPS, 10000, "digits") == {"finetune": 2000, "prune": 12000, "recover": 86000}
    assert not caplog.records
    with caplog.at_level("INFO", logger="pruneflow"):
        assert seven("auto").plan_stages(STEPS, 44, "digits") == STEPS  # not a GLUE task: the stages config
    assert "method.preset=auto: task=digits has no preset" in caplog.text  # said, not silent
    assert seven(None).plan_stages(STEPS, 2104, "glue/sst2") == STEPS


@pytest.mark.parametrize("task, steps_per_epoch", [("glue/rte", 2490 // 32), ("glue/stsb", 5749 // 32)])
def test_presets_that_cannot_finish_are_errors(task: str, steps_per_epoch: int) -> None:
    with pytest.raises(UserError, match="does not fit") as e:
        seven("auto").plan_stages(STEPS, steps_per_epoch, task)
    assert "total_epochs" in str(e.value)
    t_i, iter_num = {"glue/rte": (200, 1000), "glue/stsb": (500, 2000)}[task]
    enough = math.ceil((t_i + iter_num) / steps_per_epoch)
    assert seven("auto", enough).plan_stages(STEPS, steps_per_epoch, task)["recover"] >= 0


def test_reused_buffer_mask_matches_plain_mask() -> None:
    from pruneflow.masking import Mask
    from pruneflow.methods.score_based import ReusedBufferMask

    torch.manual_seed(0)
    plain, reused = nn.Linear(6, 4), nn.Linear(6, 4)
    reused.load_state_dict(plain.state_dict())
    mask = (torch.rand(4, 6) > 0.5).float()
    MaskedWeights(select_prunable(nn.Sequential(plain), ["*"], [])).attach(lambda m: Mask(mask.clone()))
    MaskedWeights(select_prunable(nn.Sequential(reused), ["*"], [])).attach(lambda m: ReusedBufferMask(mask.clone()))
    for _ in range(3):  # the buffer is reused across steps
        x = torch.randn(5, 6)
        plain(x).pow(2).sum().backward()
        reused(x).pow(2).sum().backward()
        p_orig = plain.parametrizations.weight.original
        r_orig = reused.parametrizations.weight.original
        assert torch.allclose(p_orig.grad, r_orig.grad) and bool((r_orig.grad[mask == 0] == 0).all())
        with torch.no_grad():
            p_orig -= 0.1 * p_orig.grad
            r_orig -= 0.1 * r_orig.grad
        p_orig.grad = r_orig.grad = None
    with torch.no_grad():
        assert torch.equal(plain(x), reused(x))
    assert "parametrizations.weight.0._out" not in reused.state_dict()


def test_lengthen_to_fit_runs_the_whole_window() -> None:
    # RTE: 2,490 / 32 = 77 steps per epoch, 770 in 10 epochs < t_i + iter_num = 1200
    method = seven("auto", lengthen_to_fit=True)
    assert method.plan_stages(STEPS, 77, "glue/rte") == {"finetune": 200, "prune": 1000, "recover": 77}
    assert method.summary() == {"preset": "rte", "t_i": 200, "iter_num": 1000, "recover_steps": 77, "lengthened": True}
    # A window that fits is left as the authors set it.
    assert seven("auto", lengthen_to_fit=True).plan_stages(STEPS, 2104, "glue/sst2")["recover"] == 21040 - 5000


def test_seven_experiment_plans_every_glue_task() -> None:
    """experiment=seven/glue_bert_base covers rte and stsb by lengthening, as its comment says."""
    cfg = compose(["experiment=seven/glue_bert_base"])
    sizes = {"mnli": 392702, "qqp": 363846, "qnli": 104743, "sst2": 67349, "rte": 2490, "mrpc": 3668, "cola": 8551, "stsb": 5749}
    for task, n in sizes.items():
        plan = get_method_class("seven")(cfg.method, 0.7).plan_stages(STEPS, n // 32, f"glue/{task}")
        assert (plan["finetune"], plan["prune"]) == PRESETS[task] and plan["recover"] >= n // 32


def test_readme_example_method_runs() -> None:
    """The README's "Adding a method" example is real code that prunes."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("# pruneflow/methods/taylor.py\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    taylor = namespace["Taylor"]
    torch.manual_seed(0)
    model = Tiny()
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"]))
    method = taylor(OmegaConf.create({"name": "taylor", "scope": "global"}), 0.5)
    method.validate(model, weights)
    method.setup(PruneContext(model=model, weights=weights, schedule=Schedule("cubic", 0.5, 4), sparsity=0.5, total_steps=4, device=torch.device("cpu")))
    masks = train_steps(model, method, 4)
    assert int(masks[-1].sum()) == weights.numel // 2 and float(method.state["scores"].max()) > 0


def test_compiled_kernels_match_eager() -> None:
    """``method.compile`` (auto on CPU from 8M prunable weights, so no other test here
    compiles): the fused score updates and top-k passes give what the eager ones do."""
    from pruneflow.fused import Kernel
    from pruneflow.methods.magnitude import magnitude_scores_
    from pruneflow.methods.seven import seven_step_
    from pruneflow.topk import DIRECT_MAX, TopK

    g = torch.Generator().manual_seed(0)
    state = [torch.rand(5000, generator=g) for _ in range(5)]
    eager, fused = [t.clone() for t in state], [t.clone() for t in state]
    platon = Kernel(platon_window_step_, compiled=True)
    scores_eager, scores_fused = torch.zeros(5000), torch.zeros(5000)
    for local, mask_step in ((0, False), (1, False), (2, True), (0, True)):  # both branches: a window's first step and a running mean
        platon_window_step_(*eager, local, 0.85, 0.95, scores_eager if mask_step else None)
        platon(*fused, local, 0.85, 0.95, scores_fused if mask_step else None)
    assert platon.compiled_fn is not None  # it compiled, and did not fall back to eager
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores_fused, platon_scores(fused[1], fused[2]), rtol=0, atol=0)  # ibar * unc after the update
    torch.testing.assert_close(scores_eager, scores_fused, rtol=1e-6, atol=1e-7)

    S, m, v, W, G = (torch.rand(5000, generator=g) for _ in range(5))
    mask = (torch.rand(5000, generator=g) > 0.3).float()
    eager, fused = [t.clone() for t in (S, m, v)], [t.clone() for t in (S, m, v)]
    seven = Kernel(seven_step_, compiled=True)
    for c1, c2 in ((5.0, 10.0), (2.8, 5.3)):
        seven_step_(*eager, W, G, mask, 0.8, 0.9, c1, c2, False, float("-inf"))
        seven(*fused, W, G, mask, 0.8, 0.9, c1, c2, False, float("-inf"))
    assert seven.compiled_fn is not None
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    W = torch.randn(5000, generator=g)
    out_eager, out_fused = torch.empty(5000), torch.empty(5000)
    magnitude = Kernel(magnitude_scores_, compiled=True)
    magnitude_scores_(out_eager, W, mask)
    magnitude(out_fused, W, mask)
    assert magnitude.compiled_fn is not None
    assert torch.equal(out_eager, out_fused)  # |W| and -inf: no arithmetic to reorder
    assert torch.equal(out_fused[mask == 0], torch.full((int((mask == 0).sum()),), float("-inf")))

    x = torch.randn(DIRECT_MAX * 2 + 7, generator=g)
    x[::5] = float("-inf")  # pruned entries of a no-regrowth method
    out_eager, out_fused = torch.empty_like(x), torch.empty_like(x)
    fused_topk = TopK(compiled=True, remember=True)
    for n_keep in (len(x) // 3, len(x) // 3 - 1000):  # the second starts from the first's threshold
        TopK(compiled=False).mask_(x, n_keep, out_eager)
        fused_topk.mask_(x, n_keep, out_fused)
        assert torch.equal(out_eager, out_fused) and int(out_fused.sum()) == n_keep
    assert fused_topk.band.compiled_fn is not None
    # Per-matrix selection (scope=local): the second call shares its passes across matrices.
    y = torch.randn(1 << 20, generator=g)
    segments, shared = [(0, 1 << 19), (1 << 19, 1 << 19)], TopK(compiled=True, remember=True)
    out_shared, out_eager = torch.empty_like(y), torch.empty_like(y)
    for keep in ([200_000, 300_000], [199_000, 299_500]):
        shared.masks_(y, segments, keep, out_shared)
        for (start, n), k in zip(segments, keep, strict=True):
            TopK(compiled=False).mask_(y[start : start + n], k, out_eager[start : start + n])
        assert torch.equal(out_shared, out_eager)
    assert shared.band_rows.compiled_fn is not None and shared.write_rows.compiled_fn is not None


def test_kept_floor_counts_one_minus_s_as_written() -> None:
    """``int(keep * n)`` with keep = 1 - 0.9 = 0.09999999999999998: 0.9999999999999998 weights
    of 10 and 2.9999999999999996 of 30 count as 1 and 3, as the authors' 0.1 does."""
    from pruneflow.methods.score_based import kept_floor

    assert (1 - 0.9) * 10 < 1 and (1 - 0.9) * 30 < 3
    assert kept_floor(10, 1 - 0.9) == 1 and kept_floor(30, 1 - 0.9) == 3
    assert kept_floor(10, 0.25) == 2 and kept_floor(7, 1.0) == 7 and kept_floor(7, 0.0) == 0


def test_seven_selection_authors_counts_their_remain_ratio():
    """SEVEN's strategies/pruner.py: remain_ratio = keep + (1 - keep) * (1 - (i + 1) / N) ** 3,
    then topk(int(remain_ratio * n)). n = 686, s = 0.5, N = 7, i = 4 is a case where the
    algebraically equal 1 - s_i (with kept_floor's epsilon) counts one more."""
    from types import SimpleNamespace

    method = get_method_class("seven")(OmegaConf.create({"name": "seven", "selection": "authors"}), 0.5)
    schedule = Schedule("cubic", 0.5, 7)
    method.ctx = SimpleNamespace(schedule=schedule)
    keep = 1 - 0.5
    theirs = int((keep + (1 - keep) * ((1 - (4 + 1) / 7) ** 3)) * 686)
    assert theirs == 350
    out = torch.empty(686)
    method.authors_mask_(torch.randn(686, generator=torch.Generator().manual_seed(0)), method.target_sparsity(4), out, step=4)
    assert int(out.sum()) == theirs


def _platon_schedule_threshold_comb(g: int, total: int, iw: int, fw: int, final: float) -> float:
    """PLATON GLUE/train.py schedule_threshold_comb's threshold (the kept ratio r) at step g
    (warmup_steps folded into iw and fw, initial_threshold 1)."""
    if g <= iw:
        return 1.0
    if g > total - fw:
        return final
    mul_coeff = 1 - (g - iw) / (total - (fw + iw))
    return final + (1.0 - final) * (mul_coeff**3)


def test_platon_selection_authors_counts_their_threshold():
    """update_mask_threshold: kthvalue(scores, int(n * (1 - r))) with r from
    schedule_threshold_comb and --final_threshold 0.10. n = 60, T = 20, iw = 2, fw = 3,
    g = 7 is a case where the algebraically equal sparsity 0.9 * (1 - (1 - p) ** 3)
    prunes one more."""
    from types import SimpleNamespace

    from pruneflow.methods.platon import authors_pruned_count

    method = get_method_class("platon")(OmegaConf.create({"name": "platon", "selection": "authors"}), 0.9)
    schedule = Schedule("cubic", 0.9, 20, 2, 3, 1)
    method.ctx = SimpleNamespace(schedule=schedule)
    theirs = int(60 * (1 - _platon_schedule_threshold_comb(7, 20, 2, 3, 0.10)))
    assert theirs == 37 and int(60 * schedule.sparsity(6) + 1e-9) == 38
    scores, out = torch.randn(60, generator=torch.Generator().manual_seed(0)), torch.empty(60)
    method.authors_mask_(scores, method.target_sparsity(6), out, step=6)
    assert torch.equal(out, (scores >= torch.kthvalue(scores, theirs).values).float())  # their mask: is >= threshold
    # Every mask step of the platon/sst2 experiment at BERT-base's 85,017,600 prunable
    # weights and biases (T = 12,630, iw = 1,000, fw = 5,000, deltaT = 10) and of 80 %/85 %.
    for target, final in ((0.9, 0.10), (0.8, 0.20), (0.85, 0.15)):
        sst2 = Schedule("cubic", target, 12_630, 1_000, 5_000, 1)
        for step in range(1_000, 12_630):
            g = step + 1
            if g > 12_630 - 5_000 or g % 10 == 0:
                want = int(85_017_600 * (1 - _platon_schedule_threshold_comb(g, 12_630, 1_000, 5_000, final)))
                assert authors_pruned_count(85_017_600, sst2, step, target) == want, (target, step)


# --- added by the mutation round: behaviour no test above pinned ----------------------------------
def test_seven_presets_are_the_authors() -> None:
    """(t_i, iter_num) per task as xiaojinying/SEVEN's utils.py init_config sets them (dataset_params)."""
    assert PRESETS == {"mnli": (5400, 16600), "qqp": (5400, 16600), "rte": (200, 1000), "qnli": (2000, 12000),
                       "mrpc": (300, 600), "sst2": (1000, 4000), "cola": (500, 1000), "stsb": (500, 2000)}


def test_fractional_total_epochs_round_up_to_whole_steps() -> None:
    # 7.9 epochs of 114 steps = 900.6 steps -> 901: one step left after mrpc's 300 + 600
    assert seven("mrpc", total_epochs=7.9).plan_stages(STEPS, 114, "digits")["recover"] == 1


@pytest.mark.parametrize("name", ["seven", "platon", "movement", "soft_movement"])
def test_defaults_without_the_key_are_the_published_ones(name: str) -> None:
    """A config that leaves a key out (the packaged YAML or a bare one) gets the published
    value: SEVEN's init_config (a1 0.8, a2 0.9, 10 epochs), PLATON's README commands (b1 0.85,
    b2 0.95, deltaT 10), Sanh et al.'s as conf/method/*movement.yaml cite them (score lr 1e-2,
    init 0, threshold 0.1, lambda 400)."""
    from pruneflow.api import method_config

    want = {
        "seven": {"alpha_1": 0.8, "alpha_2": 0.9, "total_epochs": 10},
        "platon": {"beta1": 0.85, "beta2": 0.95, "delta_t": 10},
        "movement": {"score_lr": 1e-2, "score_init": 0.0},
        "soft_movement": {"score_lr": 1e-2, "score_init": 0.0, "final_threshold": 0.1, "final_lambda": 400.0},
    }[name]
    sparsity = None if name == "soft_movement" else 0.5
    for cfg in (OmegaConf.create({"name": name}), method_config(name, {})):
        method = get_method_class(name)(cfg, sparsity)
        assert {k: getattr(method, k) for k in want} == want


def test_seven_bias_corrections_count_score_updates_not_steps() -> None:
    """A step with non-finite gradients (fp16 overflow) updates no score, so the first real
    update is the authors' k = 0, whatever the step number."""
    model, weights, method = make("seven", sparsity=0.75, steps=6)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hook = method.after_optimizer_step

    def record(step: int, grads_finite: bool = True) -> None:
        finite = step != 0  # step 0 overflowed
        if finite:
            flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts]).clone()  # noqa: E731
            history.append((flat(w.param for w in weights), flat(w.param.grad for w in weights), method.mask_flat.clone()))
        hook(step, finite)

    method.after_optimizer_step = record
    train_steps(model, method, 4)
    assert len(history) == 3 and method.k == 3
    expected = reference_scores("seven", history)
    kept = history[-1][2] == 1
    assert torch.allclose(method.state["scores"].double()[kept], expected[kept], rtol=1e-4, atol=1e-9)


def test_seven_stop_early_keeps_the_mask_of_its_last_update() -> None:
    """method.stop_early=true: the authors' window ends at k = iter_num - 2 and nothing
    prunes the rest of the way, not even end_prune_stage (selection=exact included)."""
    model, weights, method = make("seven", sparsity=0.75, steps=8, stop_early=True)
    masks = train_steps(model, method, 8)
    assert torch.equal(masks[-1], masks[-2])  # no mask update at the last step
    last = int(masks[-2].sum())
    assert last > 256  # short of the target: 1,024 weights at 75 % keep 256
    method.end_prune_stage()
    assert int(method.mask_flat.sum()) == last


def test_magnitude_scores_by_hand() -> None:
    """|W| where kept (a large negative weight ranks high), -inf where pruned."""
    from pruneflow.methods.magnitude import magnitude_scores_

    out = torch.empty(4)
    magnitude_scores_(out, torch.tensor([-3.0, 1.0, 0.5, -0.25]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(out, torch.tensor([3.0, 1.0, float("-inf"), 0.25]))


def test_platon_mask_steps_by_hand() -> None:
    """Their mask_ind (g from 1): none while g <= initial_warmup (g = 4 is a window end
    but still warm-up), window ends up to T - final_warmup, then every step."""
    from pruneflow.methods.platon import platon_mask_step

    steps = [g for g in range(1, 21) if platon_mask_step(g, 20, 4, 5, 2)]
    assert steps == [6, 8, 10, 12, 14, 16, 17, 18, 19, 20]


def test_platon_selection_authors_off_the_ramp_counts_the_sparsity_as_written() -> None:
    """Off the cubic ramp (another schedule, or the target itself) selection=authors thresholds
    at kthvalue(scores, int(n * (1 - r))) with r = 0.42 as written: 1 - 0.42 = 0.5800000000000001,
    so k = 58 of 100, where int(100 * 0.58) = int(57.99999999999999) would give 57."""
    from types import SimpleNamespace

    assert int(100 * (1 - 0.42)) == 58 and int(100 * 0.58) == 57
    method = get_method_class("platon")(OmegaConf.create({"name": "platon", "selection": "authors"}), 0.58)
    method.ctx = SimpleNamespace(schedule=Schedule("linear", 0.58, 10))
    scores, out = torch.randn(100, generator=torch.Generator().manual_seed(0)), torch.empty(100)
    method.authors_mask_(scores, 0.58, out, step=None)
    assert torch.equal(out, (scores >= torch.kthvalue(scores, 58).values).float())  # their mask: is >= threshold


def test_platon_strict_masks_zero_the_pruned_weights_themselves() -> None:
    """strict_masks=true still zeroes pruned entries in place at mask updates, as their code
    does: a weight that comes back later restarts from 0, not from its old value."""
    model, weights, method = make("platon", sparsity=0.5, steps=20, deltaT=4, biases=False, strict_masks=True)
    masks = train_steps(model, method, 4)  # g = 4: the first mask update
    pruned = masks[-1][: weights.weights[0].numel()].view(weights.weights[0].shape) == 0
    assert bool(pruned.any()) and bool((weights.weights[0].param.detach()[pruned] == 0).all())


def test_platon_selects_from_every_layers_averages_when_a_layer_had_no_gradient() -> None:
    """A layer without a gradient at a mask step (unused in that forward) is not updated, but
    the selection still ranks it by its Ibar * U, which window ends in the initial warm-up
    (no mask step there) have moved away from the last scores written."""
    torch.manual_seed(0)
    model = Tiny()
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"], biases=False))
    method = get_method_class("platon")(OmegaConf.create({"name": "platon", "deltaT": 2}), 0.5)
    method.validate(model, weights)
    schedule = Schedule("cubic", 0.5, 20, 4, 0, 1)  # warm-up g <= 4: window ends g = 2, 4 fold Ibar and U unmasked
    method.setup(PruneContext(model=model, weights=weights, schedule=schedule, sparsity=0.5, total_steps=20, device=torch.device("cpu")))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(6):  # g = 6: the first mask step
        loss = nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 3, (8,)))
        loss.backward()
        if step == 5:
            weights.weights[1].param.grad = None  # the second layer sat this step out
        opt.step()
        method.after_optimizer_step(step)
        opt.zero_grad(set_to_none=True)
    ranked = method.state["ibar"] * method.state["unc"]
    assert bool(ranked[method.slices[1][0] :].gt(0).any())  # the second layer has real averages
    n_keep = weights.numel - round(schedule.sparsity(5) * weights.numel)
    assert int(method.mask_flat.sum()) == n_keep < weights.numel
    assert torch.equal(method.mask_flat.bool(), ranked >= ranked.topk(n_keep).values.min())


def test_soft_movement_threshold_is_strict() -> None:
    """Their ThresholdBinarizer keeps sigmoid(S) > tau: at tau = 0.5 a score still at its
    init 0 (sigmoid 0.5, e.g. a weight that never got a gradient) is pruned."""
    model, weights, method = make("soft_movement", sparsity=None, steps=8)
    scores = method.state["scores"]
    scores.zero_()
    scores[::2] = 1.0  # sigmoid 0.73: kept
    method.update_masks(0.5)
    assert torch.equal(method.mask_flat, (torch.arange(scores.numel()) % 2 == 0).to(method.mask_flat.dtype))


def test_soft_movement_tau_is_their_schedule_threshold_to_the_bit() -> None:
    """masked_run_squad.py's schedule_threshold (SQuAD recipe: 55,410 steps, warm-ups 5,400
    and 10,800), written out again: tau at their global_step k + 1 is
    final + (initial - final) * c**3 with initial 0, equal to the last bit at every step
    (the schedule's own final * (1 - c**3) is not, on about a quarter of the ramp)."""
    _, _, method = make("soft_movement", sparsity=None, steps=8)
    total, initial_warmup, final_warmup, final = 55410, 5400, 10800, 0.1
    schedule = Schedule("cubic", final, total, initial_warmup, final_warmup)
    method.ctx.schedule = schedule

    def theirs(global_step: int) -> float:
        if global_step <= initial_warmup:
            return 0.0
        if global_step > total - final_warmup:
            return final
        c = 1 - (global_step - initial_warmup) / (total - initial_warmup - final_warmup)
        return final + (0.0 - final) * c**3

    ours = [method.threshold_at(schedule.sparsity(k), k) for k in range(total)]
    assert ours == [theirs(k + 1) for k in range(total)]
    assert sum(schedule.sparsity(k) != theirs(k + 1) for k in range(total)) > 1000  # the case tells the two forms apart


def test_soft_movement_threshold_and_penalty_resume() -> None:
    """tau (the current threshold) is saved with the state: a resumed run's L1 penalty is
    lambda_t * mean(sigmoid(S)) = 400 * 0.2 / 0.1 * 0.5 = 400 at scores 0, not 0."""
    _, _, method = make("soft_movement", sparsity=None, steps=8)
    method.update_masks(0.2)
    _, _, resumed = make("soft_movement", sparsity=None, steps=8)
    resumed.load_state_dict(method.state_dict())
    assert resumed.tau == 0.2 and float(resumed.extra_loss().detach()) == pytest.approx(400.0)


def test_soft_movement_final_threshold_must_be_below_one() -> None:
    # sigmoid(S) < 1 always: a threshold of 1 would prune everything but the floor
    for value in (1.0, 0.0):
        with pytest.raises(UserError, match="method.final_threshold"):
            get_method_class("soft_movement")(OmegaConf.create({"name": "soft_movement", "final_threshold": value}), None)


def test_soft_movement_penalty_stops_with_the_prune_stage() -> None:
    """Once the masks are frozen the scores choose nothing: the recover stage trains the
    task loss alone."""
    _, _, method = make("soft_movement", sparsity=None, steps=8)
    method.update_masks(0.2)
    assert method.extra_loss() is not None
    method.end_prune_stage()
    assert method.extra_loss() is None


def test_movement_scores_start_at_score_init() -> None:
    _, _, method = make("movement", sparsity=0.5, steps=4, score_init=-0.5)
    assert bool((method.state["scores"] == -0.5).all()) and all(bool((p == -0.5).all()) for p in method.score_params)


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_platon_windows_and_mask_steps_count_on_one_step_counter(offset: int) -> None:
    """Their window (global_step % deltaT) and mask_ind read the same global_step: with
    schedule.step_offset both shift, so every mask step on the ramp closes a window."""
    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(4, 3))
    pruner = pruneflow.methods.create("platon", sparsity=0.5, steps=30, model=model, include=["blocks.*"],
                                      initial_warmup=4, final_warmup=5, deltaT=3, step_offset=offset)
    method = pruner.method
    locals_seen: list[int] = []
    kernel = method.step_kernel
    method.step_kernel = lambda *a: (locals_seen.append(a[5]), kernel(*a))[1]
    ramp_mask_steps, window_positions = [], []
    for step in range(30):
        model.blocks(torch.randn(2, 4)).sum().backward()
        pruner.after_backward(step)
        pruner.after_optimizer_step(step)
        model.zero_grad()
        assert len(set(locals_seen)) == 1  # the same window position for the weight and the bias
        window_positions.append(locals_seen[0])
        locals_seen.clear()
        g = step + 1 + offset  # their global_step
        if method.is_mask_step(step) and g <= 30 - 5:
            ramp_mask_steps.append(g)
            assert window_positions[-1] == 0, f"mask step at their step {g} is not a window end"
    assert ramp_mask_steps == [g for g in range(5, 26) if g % 3 == 0]
    assert window_positions == [(s + 1 + offset) % 3 for s in range(30)]


@pytest.mark.parametrize("frequency", [2, 10])
def test_platon_refuses_any_schedule_frequency_but_one(frequency: int) -> None:
    """deltaT sets PLATON's mask cadence; another schedule.frequency would be ignored."""
    method = get_method_class("platon")(OmegaConf.create({"name": "platon"}), 0.5)
    method.check_schedule(Schedule("cubic", 0.5, 20, 0, 0, 1))
    with pytest.raises(UserError, match="schedule.frequency"):
        method.check_schedule(Schedule("cubic", 0.5, 20, 0, 0, frequency))
