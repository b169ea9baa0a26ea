"""ADMM N:M pattern pruning and SR-STE: the mathematics on small matrices (values
computed by hand), the user errors, and end-to-end runs recounted from model/."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from pruneflow.errors import UserError
from pruneflow.masking import MaskedWeights, PrunableWeight
from pruneflow.methods.admm import (
    ADMM,
    NMMask,
    admm_penalty,
    admm_u_step,
    admm_z_step,
    block_nonzeros,
    exclusion_patterns,
    nm_mask,
    nm_project,
    parse_pattern,
    srste_weight,
)
from pruneflow.methods.base import PruneContext
from pruneflow.runner import Run, run
from pruneflow.schedules import Schedule

from conftest import FAST, make_config

ROOT = Path(__file__).resolve().parent.parent

# The conftest's short stages, with ADMM's own phases kept as short (512 training images -> 16 steps per epoch).
ADMM_FAST = [
    *FAST,
    "method=admm",
    "stages.finetune.steps=20",
    "stages.recover.steps=10",
    "method.iterations=2",
]


def make_cfg(tmp_path: Path, *overrides: str):  # noqa: ANN201
    return make_config([*ADMM_FAST, *overrides], tmp_path)


def method_on(weight: torch.Tensor, **cfg) -> tuple[ADMM, nn.Linear]:  # noqa: ANN003
    """An ADMM method set up on a single Linear layer holding ``weight``."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    conf = OmegaConf.create({"pattern": "2:4", "rho": 0.1, "rho_growth": 1.3, "iterations": 3, **cfg})
    method = ADMM(conf, ADMM.resolve_sparsity(conf, None))
    # 3 iterations of 2 steps (+ 2 SR-STE steps, a quarter of 8)
    method.plan_stages({"finetune": 0, "prune": 8 if cfg.get("sr_ste") else 6, "recover": 0}, steps_per_epoch=2, task_name="digits")
    weights = MaskedWeights([PrunableWeight(name="weight", module_name="", module=lin)])
    ctx = PruneContext(model=lin, weights=weights, schedule=Schedule("oneshot", 0.5, 6), sparsity=0.5, total_steps=6, device=torch.device("cpu"))
    method.setup(ctx)
    return method, lin


# ----------------------------------------------------------------------------- pure functions
def test_nm_mask_by_hand():
    w = torch.tensor([[3.0, -3.5, 2.0, 0.5, 4.0, 1.0, -1.5, 0.2]])
    assert nm_mask(w, 2, 4).tolist() == [[1, 1, 0, 0, 1, 0, 1, 0]]
    assert nm_mask(w, 1, 4).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]
    assert nm_mask(w, 4, 8).tolist() == [[1, 1, 1, 0, 1, 0, 0, 0]]  # 3 of the 4 kept in the first half
    assert nm_project(w, 2, 4).tolist() == [[3.0, -3.5, 0.0, 0.0, 4.0, 0.0, -1.5, 0.0]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (2, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_block(n, m):
    w = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(0))
    z = nm_project(w, n, m)
    assert (block_nonzeros(z, m) == n).all()
    blocks, mask = w.abs().reshape(-1, m), nm_mask(w, n, m).reshape(-1, m).bool()
    kept_min = blocks.masked_fill(~mask, float("inf")).min(1).values
    dropped_max = blocks.masked_fill(mask, float("-inf")).max(1).values
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="not a multiple"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_admm_z_and_u_steps_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    u = torch.tensor([[0.5, 0.25, -1.0, -1.0]])
    z = admm_z_step(w, u, 2, 4)  # W + U = [1.5, -1.75, -0.5, 2]: keep -1.75 and 2
    assert z.tolist() == [[0.0, -1.75, 0.0, 2.0]]
    assert admm_u_step(u, w, z).tolist() == [[1.5, 0.0, -0.5, 0.0]]  # U + W - Z
    wp = w.clone().requires_grad_()
    penalty = admm_penalty(wp, z, u, rho=0.2)  # W - Z + U = [1.5, 0, -0.5, 0]
    assert penalty.item() == pytest.approx(0.1 * (2.25 + 0.25))
    penalty.backward()
    torch.testing.assert_close(wp.grad, torch.tensor([[0.3, 0.0, -0.1, 0.0]]))  # rho (W - Z + U)


def test_admm_iterations_update_duals_and_rho_as_the_equations_say():
    method, lin = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert method.steps_per_iteration == 2 and method.admm_steps == 6
    assert method.z[0].tolist() == [[0.0, -2.0, 0.0, 3.0]] and method.u[0].tolist() == [[0.0] * 4]
    method.after_optimizer_step(0)  # not an iteration boundary
    assert method.iteration == 0 and method.rho == pytest.approx(0.1)
    method.after_optimizer_step(1)  # boundary: Z = Proj(W + 0), U = W - Z
    assert method.z[0].tolist() == [[0.0, -2.0, 0.0, 3.0]]
    assert method.u[0].tolist() == [[1.0, 0.0, 0.5, 0.0]]
    assert method.iteration == 1 and method.rho == pytest.approx(0.13)

    with torch.no_grad():  # as if the W-step had moved W
        lin.parametrizations.weight.original.copy_(torch.tensor([[0.5, -1.25, -1.5, 2.0]]))
    method.after_optimizer_step(3)  # W + U = [1.5, -1.25, -1.0, 2]: keep 1.5 and 2
    assert method.z[0].tolist() == [[1.5, 0.0, 0.0, 2.0]]
    assert method.u[0].tolist() == [[0.0, -1.25, -1.0, 0.0]]  # U + W - Z
    assert method.rho == pytest.approx(0.169)

    loss = method.extra_loss()  # W - Z + U = [-1, -2.5, -2.5, 0]
    assert loss.item() == pytest.approx(0.169 / 2 * 13.5)
    loss.backward()
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, torch.tensor([[-0.169, -0.4225, -0.4225, 0.0]]))

    method.after_optimizer_step(5)
    assert method.phase == "done" and method.extra_loss() is None
    assert method.rho == pytest.approx(0.169)  # the rho of the last W-step
    method.end_prune_stage()  # hard mask Proj_S(W), frozen
    assert lin.parametrizations.weight[0].mask.tolist() == [[0, 0, 1, 1]]
    assert lin.weight.tolist() == [[0.0, 0.0, -1.5, 2.0]]


def test_srste_gradient_by_hand():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5]], requires_grad=True)
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = srste_weight(w, 2, 4, 0.1)
    assert out.tolist() == [[0.0, -3.0, 2.0, 0.0]]
    (out * c).sum().backward()
    # straight through (c, also where masked) + lambda_w (1 - mask) W
    torch.testing.assert_close(w.grad, torch.tensor([[1.0 + 0.1 * 1.0, 2.0, 3.0, 4.0 + 0.1 * 0.5]]))


def test_srste_parametrization_recomputes_the_mask_in_every_forward():
    method, lin = method_on(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), iterations=0, sr_ste=True, lambda_w=0.1)
    assert method.phase == "sr_ste" and isinstance(lin.parametrizations.weight[0], NMMask)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = lin(x)  # y = x . (W * mask) = -6 + 6
    assert y.item() == pytest.approx(0.0)
    y.sum().backward()
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, torch.tensor([[1.1, 2.0, 3.0, 4.05]]))
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.tensor([[5.0, -3.0, 2.0, 0.5]]))
    assert lin.weight.tolist() == [[5.0, -3.0, 0.0, 0.0]]  # new mask from the new W

    # The decay is added inside backward, so it is divided by the accumulation steps like the loss.
    method.ctx.extra["trainer"] = type("T", (), {"grad_accum": 2, "scaler": None})()
    method._set_decay()
    assert lin.parametrizations.weight[0].lambda_w == pytest.approx(0.05)

    method.end_prune_stage()
    assert not lin.parametrizations.weight[0].dynamic
    with torch.no_grad():  # frozen: a change of W no longer changes the mask
        lin.parametrizations.weight.original.copy_(torch.tensor([[1.0, 9.0, 2.0, 9.0]]))
    assert lin.weight.tolist() == [[1.0, 9.0, 0.0, 0.0]]


def test_state_dict_round_trip_restores_duals_and_phase():
    method, lin = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]), sr_ste=True)
    method.after_optimizer_step(1)
    state = method.state_dict()
    other, _ = method_on(torch.tensor([[9.0, 9.0, 9.0, 9.0]]), sr_ste=True)
    other.load_state_dict(state)
    assert other.iteration == 1 and other.rho == pytest.approx(0.13)
    assert torch.equal(other.z[0], method.z[0]) and torch.equal(other.u[0], method.u[0])
    for step in (3, 5):
        method.after_optimizer_step(step)
    assert method.phase == "sr_ste" and lin.parametrizations.weight[0].dynamic
    other.load_state_dict(method.state_dict())
    assert other.phase == "sr_ste" and other.ctx.weights.weights[0].parametrization.dynamic


def test_semi_structured_export_says_why_it_is_unavailable(monkeypatch):
    """The decisions before any CUDA work (the CUDA path itself needs a GPU)."""
    method, lin = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    bundle = type("B", (), {"model": lin})()
    method.end_prune_stage()
    cuda = torch.device("cuda")

    def reason(device: torch.device) -> str:
        info = method.export_info(bundle, device)["semi_structured"]
        assert info["available"] is False
        return info["reason"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reason(torch.device("cpu")) == "no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reason(torch.device("cpu")).startswith("the run's device is cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert reason(cuda).startswith("compute capability 7.5")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "shape" in reason(cuda)  # a 1x4 weight: not multiples of 64
    method.cfg.export = {"dtype": "fp32"}
    assert reason(cuda).startswith("dtype fp32")
    method.cfg.export = {"semi_structured": False}
    assert reason(cuda).startswith("disabled")

    method, lin = method_on(torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]]), pattern="4:8")
    bundle.model = lin
    method.end_prune_stage()  # 4 non-zeros in the first block of 4
    assert reason(cuda).startswith("pattern 4:8 is not 2:4")


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "abc", "2:", "2:4:8", 124, 2.4])
def test_bad_patterns_are_user_errors(bad):
    with pytest.raises(UserError, match="method.pattern"):
        parse_pattern(bad)
    with pytest.raises(UserError, match="method.pattern"):
        ADMM.resolve_sparsity(OmegaConf.create({"pattern": bad}), None)


def test_sparsity_follows_from_the_pattern():
    assert ADMM.resolve_sparsity(OmegaConf.create({"pattern": "2:4"}), None) == 0.5
    assert ADMM.resolve_sparsity(OmegaConf.create({"pattern": "1:4"}), None) == 0.75
    assert ADMM.resolve_sparsity(OmegaConf.create({"pattern": "4:8"}), 0.5) == 0.5
    with pytest.raises(UserError) as e:
        ADMM.resolve_sparsity(OmegaConf.create({"pattern": "2:4"}), 0.7)
    assert "sparsity=0.7" in str(e.value) and "method.pattern=2:4" in str(e.value) and "\n" not in str(e.value)


def test_nothing_to_do_is_a_user_error():
    with pytest.raises(UserError, match="method.iterations"):
        ADMM(OmegaConf.create({"pattern": "2:4", "iterations": 0, "sr_ste": False}), 0.5)
    with pytest.raises(UserError, match="method.rho"):
        ADMM(OmegaConf.create({"pattern": "2:4", "rho": -1}), 0.5)


def test_exclusion_patterns_cover_exactly_the_bad_layers():
    prunable = [f"blocks.{i}.{k}" for i in range(2) for k in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    assert exclusion_patterns(["blocks.0.attn.qkv", "blocks.1.attn.qkv"], prunable) == ["blocks.*.attn.qkv"]
    assert exclusion_patterns(["blocks.1.mlp.fc2"], prunable) == ["blocks.1.mlp.fc2"]


def test_bad_widths_are_a_user_error_before_training(tmp_path):
    # 2:128: the input width 64 of qkv, proj and fc1 is not a multiple of 128; fc2's 256 is.
    r = Run(make_cfg(tmp_path, "method.pattern=2:128"), tmp_path / "run")
    with pytest.raises(UserError) as e:
        r.prepare()
    msg = str(e.value)
    assert "blocks.0.attn.qkv (input width 64)" in msg and "method.exclude=" in msg
    suggested = msg.split("'method.exclude=")[1].split("'")[0]
    assert suggested == "[*pooler*,*classifier*,*qa_outputs*,head,head.*,*.head,blocks.*.attn.qkv,blocks.*.attn.proj,blocks.*.mlp.fc1]"
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Following the advice works: only the fc2 layers are pruned.
    r = Run(make_cfg(tmp_path, "method.pattern=2:128", f"method.exclude={suggested}"), tmp_path / "run")
    r.prepare()
    assert [w.name for w in r.weights] == [f"blocks.{i}.mlp.fc2.weight" for i in range(4)]
    assert r.sparsity == pytest.approx(1 - 2 / 128)


# (ADMM's command-line mistakes are in tests/test_reliability.py's table of bad inputs.)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize(
    ("pattern", "extra"),
    [("2:4", []), ("2:4", ["method.sr_ste=true"]), ("4:8", ["method.sr_ste=true", "method.iterations=0"])],
    ids=["admm", "admm+sr_ste", "sr_ste_only_4:8"],
)
def test_end_to_end_every_block_obeys_the_pattern(tmp_path, pattern, extra):
    n, m = (int(v) for v in pattern.split(":"))
    run_dir = tmp_path / "run"
    run(make_cfg(tmp_path, f"method.pattern={pattern}", *extra), run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    assert set(result["metrics"]) == {"finetune", "prune", "recover", "final"}
    iterations = 0 if "method.iterations=0" in extra else 2
    assert result["method_info"]["pattern"] == pattern and len(result["method_info"]["primal_residuals"]) == iterations

    # Recounted from the saved file, block by block, in every pruned layer.
    state = load_file(str(run_dir / "model" / "model.safetensors"))
    names = list(result["sparsity"]["per_layer"])
    assert len(names) == 16
    zeros = total = 0
    for name in names:
        counts = block_nonzeros(state[name], m)
        assert int(counts.max()) <= n, name
        zeros += int(state[name].numel() - state[name].count_nonzero())
        total += state[name].numel()
    assert zeros / total == pytest.approx(1 - n / m, abs=1e-4)
    assert result["sparsity"]["target"] == 1 - n / m
    assert result["sparsity"]["measured"] == pytest.approx(zeros / total, abs=1e-6)
    assert state["head.weight"].count_nonzero() == state["head.weight"].numel()  # the head stays dense
    assert result["export"]["semi_structured"] == {"available": False, "reason": "no CUDA device"}


def test_the_prune_stage_length_is_split_between_the_iterations():
    """stages.prune sets the ADMM phase's length (no separate epochs knob to ignore it)."""
    def plan(prune: int, **cfg):  # noqa: ANN003, ANN202
        conf = OmegaConf.create({"pattern": "2:4", "iterations": 3, **cfg})
        m = ADMM(conf, 0.5)
        m.plan_stages({"finetune": 0, "prune": prune, "recover": 0}, steps_per_epoch=4, task_name="digits")
        return m.steps_per_iteration, m.admm_steps, m.sr_ste_steps

    assert plan(10) == (3, 10, 0)  # the remainder goes to the last W-step
    assert plan(12, sr_ste=True) == (3, 9, 3)  # a quarter for SR-STE, the rest split
    assert plan(7, iterations=0, sr_ste=True) == (1, 0, 7)
    with pytest.raises(UserError, match="stages.prune"):
        plan(2)


def test_primal_residuals_by_hand():
    """||W - Z|| / ||W|| after each Z-step, as in test_admm_iterations_update_duals_and_rho_as_the_equations_say."""
    method, lin = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    method.after_optimizer_step(1)  # Z = [0, -2, 0, 3]: W - Z = [1, 0, 0.5, 0], ||W||^2 = 14.25
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.tensor([[0.5, -1.25, -1.5, 2.0]]))
    method.after_optimizer_step(3)  # Z = [1.5, 0, 0, 2]: W - Z = [-1, -1.25, -1.5, 0], ||W||^2 = 8.0625
    expected = [math.sqrt(1.25 / 14.25), math.sqrt(4.8125 / 8.0625)]
    assert method.residuals == pytest.approx(expected, abs=1e-6)
    assert method.summary()["primal_residuals"] == method.residuals
    zero, _ = method_on(torch.zeros(1, 4))  # an all-zero layer: W = Z = 0, residual 0
    zero.after_optimizer_step(1)
    assert zero.residuals == [0.0]


def test_the_last_iteration_ends_with_the_prune_stage_on_an_uneven_split(caplog: pytest.LogCaptureFixture):
    """7 steps for 3 iterations: 2 steps each and the remainder in the last W-step, so the
    last Z/U update comes after step 6, not after step 5. The log says so (its "7 steps =
    3 ADMM iterations x 2 steps" did not add up)."""
    method, _ = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    with caplog.at_level(logging.INFO, logger="pruneflow"):
        method.plan_stages({"finetune": 0, "prune": 7, "recover": 0}, steps_per_epoch=2, task_name="digits")
    assert "prune stage of 7 steps = 3 ADMM iterations x 2 steps + 1 in the last one" in caplog.text
    assert (method.steps_per_iteration, method.admm_steps) == (2, 7)
    iterations = []
    for step in range(7):
        method.after_optimizer_step(step)
        iterations.append(method.iteration)
    assert iterations == [0, 1, 1, 2, 2, 2, 3] and method.phase == "done"


def test_the_split_reserves_sr_ste_steps_and_allows_one_step_per_iteration():
    def plan(prune: int, **cfg):  # noqa: ANN003, ANN202
        m = ADMM(OmegaConf.create({"pattern": "2:4", "iterations": 3, **cfg}), 0.5)
        m.plan_stages({"finetune": 0, "prune": prune, "recover": 0}, steps_per_epoch=4, task_name="digits")
        return m.steps_per_iteration, m.admm_steps, m.sr_ste_steps

    # 0.01 of 9 steps rounds to 0: still 1 reserved for SR-STE, so the 8 left give 2 per
    # iteration and SR-STE gets the rest (3)
    assert plan(9, sr_ste=True, sr_ste_fraction=0.01) == (2, 6, 3)
    assert plan(3) == (1, 3, 0)  # one step per iteration is enough


def test_srste_decay_follows_the_fp16_loss_scale():
    """Under a GradScaler (scale S) and accumulation (A steps) the decay added in backward
    is lambda_w * S / A, so that the unscaled, accumulated gradient holds lambda_w (1 - mask) W;
    it follows the scale when the scaler changes it."""
    method, lin = method_on(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), iterations=0, sr_ste=True, lambda_w=0.1)

    class Scaler:
        scale = 1024.0

        def get_scale(self) -> float:
            return self.scale

    scaler = Scaler()
    method.ctx.extra["trainer"] = type("T", (), {"grad_accum": 4, "scaler": scaler})()
    method._set_decay()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (lin(x).sum() * 1024.0 / 4).backward()  # the loss as the trainer scales it
    grad = lin.parametrizations.weight.original.grad * 4 / 1024.0
    torch.testing.assert_close(grad, torch.tensor([[1.1, 2.0, 3.0, 4.05]]))  # as in test_srste_parametrization_...
    scaler.scale = 512.0  # the scaler backed off after an overflow
    method.after_optimizer_step(0)
    assert lin.parametrizations.weight[0].lambda_w == pytest.approx(0.1 * 512.0 / 4)


def test_rho_growth_of_one_keeps_rho_constant():
    method, _ = method_on(torch.tensor([[1.0, -2.0, 0.5, 3.0]]), rho_growth=1)
    for step in range(6):
        method.after_optimizer_step(step)
    assert method.iteration == 3 and method.rho == 0.1
    with pytest.raises(UserError, match="method.rho_growth"):
        ADMM(OmegaConf.create({"pattern": "2:4", "rho_growth": 0.9}), 0.5)


def test_code_defaults_are_the_packaged_config():
    """An ADMM built from a partial config (as the tests here do) uses conf/method/admm.yaml's values."""
    conf = OmegaConf.load(ROOT / "conf" / "method" / "admm.yaml")
    m = ADMM(OmegaConf.create({}), 0.5)
    assert (str(m.pattern), m.rho0, m.rho_growth, m.iterations, m.sr_ste, m.sr_ste_fraction, m.lambda_w) == (
        conf.pattern, conf.rho, conf.rho_growth, conf.iterations, conf.sr_ste, conf.sr_ste_fraction, conf.lambda_w)
