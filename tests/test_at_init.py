"""SNIP, GraSP and FORCE (the baselines of SEVEN's pre-pruning figures) against
computations written here from each paper's formula, on a small network."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from pruneflow.masking import MaskedWeights, select_prunable
from pruneflow.methods import PruneContext, get_method_class
from pruneflow.schedules import Schedule
from pruneflow.topk import kept_count, topk_mask


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def data(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(16, 8, generator=g)
        out.append({"x": x, "labels": (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()})
    return out


class Task:
    problem = "single_label_classification"

    def loss_and_logits(self, bundle, batch):  # noqa: ANN001, ANN201
        logits = bundle.model(batch["x"])
        return F.cross_entropy(logits, batch["labels"]), [logits]


def attach(name: str, model: nn.Module, sparsity: float, steps: int, kind: str = "cubic", **cfg):  # noqa: ANN003, ANN201
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"]))
    method = get_method_class(name)(OmegaConf.create({"name": name, **cfg}), sparsity)
    method.validate(model, weights)
    batches = data(steps)

    def stream():  # noqa: ANN202
        yield from batches

    bundle = type("B", (), {"model": model})()
    method.setup(PruneContext(model=model, weights=weights, schedule=Schedule(kind, sparsity, steps), sparsity=sparsity,
                              total_steps=steps, device=torch.device("cpu"), task=Task(), batches=stream, extra={"bundle": bundle}))
    return method, weights, batches


def score_loop(model: nn.Module, method, batches) -> list[torch.Tensor]:  # noqa: ANN001
    """The trainer's prune stage without weight updates: forward, backward, the method, zero_grad."""
    masks = []
    for step, b in enumerate(batches):
        F.cross_entropy(model(b["x"]), b["labels"]).backward()
        method.after_backward(step)
        method.after_optimizer_step(step)
        model.zero_grad(set_to_none=True)
        masks.append(method.mask_flat.clone())
    return masks


def linears(model: nn.Module) -> list[nn.Linear]:
    return [model.blocks[0], model.blocks[2]]


def test_snip_scores_weight_times_gradient_once():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    method, weights, batches = attach("snip", model, 0.6, 3)
    before = [lin.weight.detach().clone() for lin in linears(ref)]
    masks = score_loop(model, method, batches)
    # Lee et al.: s = |w * dL/dw| of the dense network, the gradient summed over the batches
    for b in batches:
        F.cross_entropy(ref(b["x"]), b["labels"]).backward()
    s = torch.cat([(lin.weight * lin.weight.grad).abs().reshape(-1) for lin in linears(ref)])
    n = s.numel()
    assert all(int(m.sum()) == n for m in masks[:-1])  # nothing pruned before the last batch
    assert torch.equal(masks[-1], topk_mask(s, kept_count(n, 0.6)))
    assert all(torch.equal(lin.weight.detach(), w0) for lin, w0 in zip(linears(ref), before, strict=True))


def test_grasp_scores_weight_times_hessian_gradient():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model).double()
    method, weights, batches = attach("grasp", model, 0.5, 2, temperature=3.0)
    method.run_prune_stage(method.ctx)
    # Wang et al.: S = -theta * H g with g the gradient of the loss on logits / T; H g by
    # central finite differences of the gradient along g (float64), an independent route.
    params = [lin.weight for lin in linears(ref)]

    def grad_at(shift: float, direction: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
        total = sum(F.cross_entropy(ref(b["x"].double()) / 3.0, b["labels"]) for b in batches)
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        return grads

    g = [t.detach() for t in grad_at(0.0, [torch.zeros_like(p) for p in params])]
    eps = 1e-4
    plus, minus = grad_at(eps, g), grad_at(-eps, g)
    hg = [(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)]
    expected = torch.cat([(p.detach() * h).reshape(-1) for p, h in zip(params, hg, strict=True)])  # = -S
    got = method.state["scores"].double()
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7 * float(expected.abs().max()))
    kept = method.mask_flat.bool()
    assert int(kept.sum()) == kept_count(kept.numel(), 0.5)
    assert float(got[kept].min()) >= float(got[~kept].max())  # the largest S = -W*Hg are the ones removed


def test_force_iterates_snip_on_the_pruned_network_with_regrowth():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    steps = 5
    method, weights, batches = attach("force", model, 0.8, steps, kind="exponential")
    masks = score_loop(model, method, batches)
    # de Jorge et al.: at each step the gradient of the loss with respect to the masked
    # weights w * m of the current network, scores |w * g| for every weight, the mask to
    # the step's level (exponential decay of the kept fraction)
    layers = linears(ref)
    mask = [torch.ones_like(lin.weight) for lin in layers]
    schedule = Schedule("exponential", 0.8, steps)
    came_back = False
    for step, b in enumerate(batches):
        eff = [(lin.weight.detach() * m).requires_grad_() for lin, m in zip(layers, mask, strict=True)]
        h = torch.tanh(F.linear(b["x"], eff[0], layers[0].bias))
        h = torch.tanh(F.linear(h, eff[1], layers[1].bias))
        loss = F.cross_entropy(ref.head(h), b["labels"])
        grads = torch.autograd.grad(loss, eff)
        scores = torch.cat([(lin.weight.detach() * g).abs().reshape(-1) for lin, g in zip(layers, grads, strict=True)])
        new = topk_mask(scores, kept_count(scores.numel(), schedule.sparsity(step)))
        old = torch.cat([m.reshape(-1) for m in mask])
        came_back |= bool(((old == 0) & (new == 1)).any())
        assert torch.equal(masks[step], new), step
        mask = [t.view_as(lin.weight) for t, lin in zip(torch.split(new, [lin.weight.numel() for lin in layers]), layers, strict=True)]
    assert int(masks[-1].sum()) == kept_count(masks[-1].numel(), 0.8)
    assert came_back  # a weight pruned earlier returned: FORCE, not iterative SNIP
