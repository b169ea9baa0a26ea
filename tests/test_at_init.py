"""SNIP, GraSP and FORCE (the baselines of SEVEN's pre-pruning figures) against
computations written here from each paper's formula, and against transcriptions of
their authors' code (namhoonlee/snip-public, alecwangcq/GraSP, naver/force), on a
small network."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
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


SEED = 7  # the prune stage's seed (GraSP's head re-initialization draws from it)


def attach(name: str, model: nn.Module, sparsity: float, steps: int, kind: str = "cubic", **cfg):  # noqa: ANN003, ANN201
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"]))
    method = get_method_class(name)(OmegaConf.create({"name": name, **cfg}), sparsity)
    method.validate(model, weights)
    batches = data(steps)

    def stream():  # noqa: ANN202
        yield from batches

    bundle = type("B", (), {"model": model})()
    method.setup(PruneContext(model=model, weights=weights, schedule=Schedule(kind, sparsity, steps), sparsity=sparsity,
                              total_steps=steps, device=torch.device("cpu"), task=Task(), batches=stream,
                              extra={"bundle": bundle, "stage": SimpleNamespace(seed=SEED)}))
    return method, weights, batches


def score_loop(model: nn.Module, method, batches) -> list[torch.Tensor]:  # noqa: ANN001
    """The trainer's prune stage without weight updates: forward, backward, the method, zero_grad."""
    masks = []
    for step, b in enumerate(batches):
        if method.has_scoring_loss():  # as the trainer's prune stage
            method.scoring_loss(method.ctx.task, method.ctx.extra["bundle"], b).backward()
        else:
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
    method, weights, batches = attach("grasp", model, 0.5, 2, temperature=3.0, reinit_head=False)
    method.run_prune_stage(method.ctx)
    assert torch.equal(model.head.weight, ref.head.weight.float())
    # Wang et al.: S = -theta * H g with g the gradient of the loss on logits / T; H g by
    # central finite differences of the gradient along g (float64), an independent route.
    params = [lin.weight for lin in linears(ref)] + [ref.head.weight]  # g and H over every Linear, as their code

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
    expected = torch.cat([(p.detach() * h).reshape(-1) for p, h in zip(params[:2], hg[:2], strict=True)])  # = -S of the pruned
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


# ----------------------------------------------------------------------------------------
# Transcriptions of the authors' code: their steps, their selection (method.selection=authors)


class DropNet(Net):
    """Net with dropout, so that the scoring mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 8), nn.Tanh())


def test_snip_with_biases_ranks_weights_and_biases_as_their_prunable_set():
    """method.biases=true (their variables w* and b*): |theta * dL/dtheta| of the pruned
    layers' weights and biases in one global ranking. The key was documented but not in
    snip.yaml, so the command line refused it."""
    from pathlib import Path

    assert "biases" in OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "method" / "snip.yaml")
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    weights = MaskedWeights(select_prunable(model, ["blocks.*"], ["head"], biases=True))
    assert [w.name for w in weights] == ["blocks.0.weight", "blocks.0.bias", "blocks.2.weight", "blocks.2.bias"]
    method = get_method_class("snip")(OmegaConf.create({"name": "snip", "biases": True}), 0.6)
    method.validate(model, weights)
    batches = data(1)
    bundle = type("B", (), {"model": model})()
    method.setup(PruneContext(model=model, weights=weights, schedule=Schedule("cubic", 0.6, 1), sparsity=0.6, total_steps=1,
                              device=torch.device("cpu"), task=Task(), batches=lambda: iter(batches),
                              extra={"bundle": bundle, "stage": SimpleNamespace(seed=SEED)}))
    score_loop(model, method, batches)
    F.cross_entropy(ref(batches[0]["x"]), batches[0]["labels"]).backward()
    params = dict(ref.named_parameters())
    s = torch.cat([(params[w.name] * params[w.name].grad).abs().reshape(-1) for w in weights])
    assert torch.equal(method.mask_flat, topk_mask(s, kept_count(s.numel(), 0.6)))
    parts = method.mask_flat.split([params[w.name].numel() for w in weights])
    biases = torch.cat([m for w, m in zip(weights, parts, strict=True) if w.attr == "bias"])
    assert 0 < int((biases == 0).sum()) < biases.numel()  # biases are ranked with the weights, some pruned


def test_snip_selection_authors_is_their_get_sparse_mask():
    """snip/model.py: mask c = 1, grads of the loss with respect to c (= W * dL/dW), |.|
    normalized by the sum, tf.nn.top_k of int(round(n * (1 - s))) kept; one batch with
    is_train=False (the model in eval mode, method.eval_mode)."""
    torch.manual_seed(0)
    model = DropNet()
    ref = copy.deepcopy(model)
    method, weights, batches = attach("snip", model, 0.55, 1, selection="authors")
    assert method.prune_in_eval_mode
    model.eval()  # the trainer's prune stage under method.eval_mode=true (tested in test_snip_scores_in_eval_mode)
    score_loop(model, method, batches)

    ref.eval()
    layers = [ref.blocks[0], ref.blocks[3]]
    c = [torch.ones_like(lin.weight, requires_grad=True) for lin in layers]
    h = torch.tanh(F.linear(batches[0]["x"], layers[0].weight * c[0], layers[0].bias))
    h = torch.tanh(F.linear(ref.blocks[2](h), layers[1].weight * c[1], layers[1].bias))
    loss = F.cross_entropy(ref.head(h), batches[0]["labels"])
    cs = torch.cat([g.abs().reshape(-1) for g in torch.autograd.grad(loss, c)])
    cs = cs / cs.sum()
    kappa = int(round(cs.numel() * (1.0 - 0.55)))
    expected = torch.zeros_like(cs)
    expected[torch.topk(cs, kappa, sorted=True).indices] = 1
    assert torch.equal(method.mask_flat, expected)
    assert int(method.mask_flat.sum()) == kappa
    # where their count differs from the exact one: n odd, n * s ending in .5 (Python 3's round)
    out = torch.empty(5)
    method.authors_mask_(torch.arange(5.0), 0.5, out)
    assert out.tolist() == [0, 0, 0, 1, 1]  # round(2.5) = 2 kept; exact keeps 5 - round(2.5) = 3


def test_snip_scores_in_eval_mode(config, tmp_path, monkeypatch):
    """The runner's prune stage runs SNIP's forwards with the model in eval mode, unless
    method.eval_mode=false; the other stages train in train mode."""
    from pruneflow.methods.snip import Snip
    from pruneflow.runner import run

    seen: list[bool] = []
    original = Snip.update_scores

    def spy(self, step):  # noqa: ANN001, ANN202
        seen.append(self.ctx.model.training)
        return original(self, step)

    monkeypatch.setattr(Snip, "update_scores", spy)
    fast = ["stages.finetune.steps=2", "stages.prune.steps=3", "stages.recover.steps=2", "task.max_train_samples=64"]
    run(config("method=snip", *fast), tmp_path / "a")
    assert seen == [False, False, False]
    seen.clear()
    run(config("method=snip", "method.eval_mode=false", *fast), tmp_path / "b")
    assert seen == [True, True, True]


def test_scoring_stages_read_raw_gradients(config, tmp_path, monkeypatch):
    """A prune stage without weight updates (SNIP's 3 scoring batches) scores the raw
    gradients, as the authors' tf.gradients: trainer.max_grad_norm clips only steps that
    update weights (it clipped each batch's gradient before SNIP summed them)."""
    from pruneflow.methods.snip import Snip
    from pruneflow.runner import run

    norms: list[float] = []
    original = Snip.update_scores

    def spy(self, step):  # noqa: ANN001, ANN202
        grads = [g for g in self.grads() if g is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, step)

    monkeypatch.setattr(Snip, "update_scores", spy)
    run(config("method=snip", "stages.finetune.steps=2", "stages.prune.steps=3", "stages.recover.steps=0",
               "task.max_train_samples=64", "trainer.max_grad_norm=1e-3"), tmp_path / "a")
    assert len(norms) == 3 and min(norms) > 1e-2  # the prunable weights' gradients alone: not clipped to 1e-3


def grasp_authors(net: nn.Module, ratio: float, chunks: list[dict[str, torch.Tensor]], pruned: list[nn.Linear], seed: int,
                  T: float = 200.0) -> torch.Tensor:
    """pruner/GraSP_ImageNet.py, GraSP(): a copy, its last Linear re-initialized (Xavier
    normal), g summed over the chunks with the loss on logits / T, then per chunk
    z = sum(g * grad_f) back-propagated (H g into .grad), scores -theta * Hg normalized by
    |sum| + eps, the int(n * ratio)-th largest the threshold, scores <= it kept. Their
    weights are every Linear; the ranking here is over the layers pruneflow prunes."""
    net = copy.deepcopy(net)
    net.zero_grad()
    lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
    fresh = torch.empty_like(lin[-1].weight)
    nn.init.xavier_normal_(fresh, generator=torch.Generator().manual_seed(seed))  # their global RNG; ours its own
    with torch.no_grad():
        lin[-1].weight.copy_(fresh)
    weights = [m.weight for m in lin]
    grad_w = None
    for b in chunks:
        loss = F.cross_entropy(net(b["x"]) / T, b["labels"])
        grad_w_p = torch.autograd.grad(loss, weights, create_graph=False)
        grad_w = list(grad_w_p) if grad_w is None else [a + g for a, g in zip(grad_w, grad_w_p, strict=True)]
    for b in chunks:
        loss = F.cross_entropy(net(b["x"]) / T, b["labels"])
        grad_f = torch.autograd.grad(loss, weights, create_graph=True)
        z = 0
        for count in range(len(weights)):
            z += (grad_w[count] * grad_f[count]).sum()
        z.backward()
    index = [lin.index(m) for m in [dict(net.named_modules())[n] for n in pruned]]
    grads = [-lin[i].weight.data * lin[i].weight.grad for i in index]
    all_scores = torch.cat([torch.flatten(x) for x in grads])
    norm_factor = torch.abs(torch.sum(all_scores)) + 1e-10
    all_scores.div_(norm_factor)
    keep_ratio = 1 - (1 - (1 - ratio) ** (1.0 / 1))  # main_prune_*.py's ratio for one iteration, then GraSP()'s keep_ratio
    num_params_to_rm = int(len(all_scores) * (1 - keep_ratio))
    threshold, _ = torch.topk(all_scores, num_params_to_rm, sorted=True)
    return (all_scores <= threshold[-1]).float()


@pytest.mark.parametrize("reinit_head", [True, False])
def test_grasp_selection_authors_is_their_grasp(reinit_head):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    method, weights, batches = attach("grasp", model, 0.6, 3, selection="authors", reinit_head=reinit_head)
    head_before = model.head.weight.detach().clone()
    method.run_prune_stage(method.ctx)
    assert torch.equal(model.head.weight, head_before)  # re-initialized for the scoring only
    expected = grasp_authors(ref, 0.6, batches, ["blocks.0", "blocks.2"], SEED)
    if not reinit_head:
        assert not torch.equal(method.mask_flat, expected)  # the head's initialization matters
        return
    assert torch.equal(method.mask_flat, expected)
    assert int(expected.sum()) == expected.numel() - int(expected.numel() * 0.6) + 1  # their <= keeps the threshold's entry


def force_authors(ori_net: nn.Module, chunks: list[dict[str, torch.Tensor]], pruning_factor: float, num_steps: int,
                  pruned: list[str], loss_fn=F.nll_loss) -> list[torch.Tensor]:  # noqa: ANN001
    """pruning/pruning_algos.py, iterative_pruning(prune_method=3, mode='exp', num_batches=1):
    the dense weights kept; each step a copy of the network with the current mask's
    weights set to 0 (no gradient hooks), saliency |w_dense * grad| of F.nll_loss of the
    network's output (raw logits: their models have no log-softmax) on a new batch, and
    get_mask(saliency, perc): every score >= the int(n * perc)-th largest kept. Their
    prunable layers are every Linear; here the ones pruneflow prunes."""
    layers = lambda net: [dict(net.named_modules())[n] for n in pruned]  # noqa: E731
    original_weights = [m.weight.detach() for m in layers(ori_net)]
    pruning_steps = [np.exp(0 - ((x + 1) * (0 - np.log(pruning_factor)) / num_steps)) for x in range(num_steps)]
    net, mask, masks = copy.deepcopy(ori_net), None, []
    for perc, b in zip(pruning_steps, chunks, strict=True):
        net.zero_grad()
        loss_fn(net(b["x"]), b["labels"]).backward()
        saliency = [torch.abs(w * m.weight.grad) for w, m in zip(original_weights, layers(net), strict=True)]
        all_scores = torch.cat([torch.flatten(x) for x in saliency])
        num_params_to_keep = int(len(all_scores) * perc)
        threshold, _ = torch.topk(all_scores, num_params_to_keep, sorted=True)
        mask = [(m >= threshold[-1]).float() for m in saliency]
        net = copy.deepcopy(ori_net)
        for m, k in zip(layers(net), mask, strict=True):
            m.weight.data[k == 0.0] = 0.0
        masks.append(torch.cat([k.reshape(-1) for k in mask]))
    return masks


@pytest.mark.parametrize(("scoring_loss", "theirs"), [("target_logit", F.nll_loss), ("task", F.cross_entropy)])
def test_force_selection_authors_is_their_iterative_pruning(scoring_loss, theirs):
    """scoring_loss=target_logit: their code as it is; task: their code with the paper's
    cross-entropy in place of its F.nll_loss of raw logits (the only change)."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    steps = 6
    method, weights, batches = attach("force", model, 0.9, steps, kind="exponential", selection="authors", scoring_loss=scoring_loss)
    masks = score_loop(model, method, batches)
    expected = force_authors(ref, batches, 0.1, steps, ["blocks.0", "blocks.2"], theirs)
    other = force_authors(ref, batches, 0.1, steps, ["blocks.0", "blocks.2"], F.cross_entropy if theirs is F.nll_loss else F.nll_loss)
    assert any(not torch.equal(a, b) for a, b in zip(masks, other, strict=True))  # the loss matters
    n = expected[0].numel()
    for step, (got, want) in enumerate(zip(masks, expected, strict=True)):
        assert torch.equal(got, want), step
        assert int(want.sum()) == int(n * 0.1 ** ((step + 1) / steps))  # no ties here: their count exactly
    assert math.isclose(float(masks[-1].mean()), int(n * 0.1) / n)


def grasp_fetch_data_authors(dataloader, num_classes: int, samples_per_class: int):  # noqa: ANN001, ANN201
    """pruner/GraSP.py, GraSP_fetch_data(), as written (one example at a time, a class is
    marked once a further example of it arrives after it is full)."""
    datas = [[] for _ in range(num_classes)]
    labels = [[] for _ in range(num_classes)]
    mark = {}
    dataloader_iter = iter(dataloader)
    while True:
        inputs, targets = next(dataloader_iter)
        for idx in range(inputs.shape[0]):
            x, y = inputs[idx : idx + 1], targets[idx : idx + 1]
            category = y.item()
            if len(datas[category]) == samples_per_class:
                mark[category] = True
                continue
            datas[category].append(x)
            labels[category].append(y)
        if len(mark) == num_classes:
            break
    return torch.cat([torch.cat(_, 0) for _ in datas]), torch.cat([torch.cat(_) for _ in labels]).view(-1)


def test_grasp_samples_per_class_is_their_fetch_data():
    from pruneflow.methods.grasp import balanced_halves

    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(90, 8, generator=g), torch.randint(0, 3, (90,), generator=g)
    task = SimpleNamespace(train_set=[{"x": x, "labels": int(y)} for x, y in zip(xs, ys, strict=True)], num_labels=3,
                           collate=lambda rows: {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows])})
    first, second = balanced_halves(task, 4, seed=11)
    order = torch.randperm(90, generator=torch.Generator().manual_seed(11))  # the same shuffle, as their loader's batches of 5
    loader = [(xs[order[i : i + 5]], ys[order[i : i + 5]]) for i in range(0, 90, 5)]
    X, y = grasp_fetch_data_authors(loader, 3, 4)
    N = X.shape[0]
    assert N == 12
    assert torch.equal(first["x"], X[: N // 2]) and torch.equal(first["labels"], y[: N // 2])
    assert torch.equal(second["x"], X[N // 2 :]) and torch.equal(second["labels"], y[N // 2 :])


def test_grasp_samples_per_class_scores_class_ordered_halves(config, tmp_path, monkeypatch):
    """In a run, each of stages.prune.steps draws gives two halves of samples_per_class
    examples of every class, ordered by class; both passes read the same halves."""
    from pruneflow.methods import grasp
    from pruneflow.runner import run

    seen: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    original = grasp.tempered_loss

    def spy(task, bundle, batch, temperature):  # noqa: ANN001, ANN202
        seen.append(batch["labels"].tolist())
        pixels.append(batch["pixel_values"].detach().clone())
        return original(task, bundle, batch, temperature)

    monkeypatch.setattr(grasp, "tempered_loss", spy)
    fast = ["stages.finetune.steps=2", "stages.prune.steps=2", "stages.recover.steps=2", "task.max_train_samples=200"]
    run(config("method=grasp", "method.samples_per_class=3", *fast), tmp_path / "a")
    assert len(seen) == 8  # 2 draws x 2 halves x 2 passes
    assert seen[:4] == seen[4:]
    for draw in (seen[0] + seen[1], seen[2] + seen[3]):
        assert draw == sorted(draw) and draw == [c for c in range(10) for _ in range(3)]
    assert torch.equal(pixels[0], pixels[4]) and not torch.equal(pixels[0], pixels[2])  # a new draw per step


def test_grasp_from_your_own_code_scores_as_in_a_run():
    """pruneflow.methods.create("grasp", batches=, loss_fn=) + run(): the caller's loss on
    logits / T (the last Linear's output divided) gives the runner's scores and mask."""
    import pruneflow
    from pruneflow.errors import UserError

    torch.manual_seed(0)
    model = Net()
    mine = copy.deepcopy(model)
    method, weights, batches = attach("grasp", model, 0.5, 3, temperature=3.0)
    method.run_prune_stage(method.ctx)

    torch.manual_seed(SEED)  # the head's re-initialization draws from the process seed here
    pruner = pruneflow.methods.create("grasp", sparsity=0.5, steps=3, model=mine, include=["blocks.*"], exclude=["head"],
                                      temperature=3.0, batches=lambda: iter(batches),
                                      loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["labels"]))
    pruner.run()
    assert torch.allclose(pruner.method.state["scores"], method.state["scores"], rtol=1e-5, atol=1e-9)
    assert torch.equal(pruner.method.mask_flat, method.mask_flat)
    assert torch.equal(mine(batches[0]["x"]), model(batches[0]["x"]))  # no hook left behind, the head restored

    bare = pruneflow.methods.create("grasp", sparsity=0.5, steps=3, model=copy.deepcopy(mine), include=["blocks.*"])
    with pytest.raises(UserError, match="batches="):
        bare.run()


def test_force_scoring_loss_replaces_the_loss_of_the_prune_stage_only(config, tmp_path, monkeypatch):
    from pruneflow.methods.force import Force
    from pruneflow.runner import run

    calls: list[bool] = []
    original = Force.scoring_loss

    def spy(self, task, bundle, batch):  # noqa: ANN001, ANN202
        calls.append(torch.is_grad_enabled())
        return original(self, task, bundle, batch)

    monkeypatch.setattr(Force, "scoring_loss", spy)
    fast = ["stages.finetune.steps=2", "stages.prune.steps=3", "stages.recover.steps=2", "task.max_train_samples=64"]
    run(config("method=force", "method.scoring_loss=target_logit", "trainer.gradient_accumulation_steps=2", *fast[:3],
               "task.max_train_samples=256"), tmp_path / "a")
    assert calls == [True] * 6  # 3 prune steps x 2 micro-batches; finetune and recover keep the task loss


def test_force_and_grasp_authors_counts_at_bert_base_size():
    """Their counts at BERT-base's 85,524,480 prunable weights, every step of a 100-step
    FORCE run and GraSP's one shot, for s = 0.1 ... 0.9 (the figure's sparsities): FORCE's
    levels from the written pruning_factor (1 - 0.8 as a float kept one weight fewer at the
    last step), GraSP's float round trip (one less than int(n * s) at 0.1 and 0.2)."""
    from pruneflow.methods.force import authors_kept_count
    from pruneflow.methods.grasp import authors_threshold_index

    n = 85_524_480
    for s, pruning_factor in zip([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], strict=True):
        schedule = Schedule("exponential", s, 100)
        theirs = [int(n * np.exp(0 - ((x + 1) * (0 - np.log(pruning_factor)) / 100))) for x in range(100)]  # iterative_pruning, mode='exp'
        assert [authors_kept_count(n, schedule, k, s) for k in range(100)] == theirs, s
        ratio = 1 - (1 - s) ** (1.0 / 1)  # main_prune_*.py, num_iterations 1; then GraSP()'s keep_ratio
        keep_ratio = 1 - ratio
        assert authors_threshold_index(n, s) == int(n * (1 - keep_ratio)), s
    assert authors_threshold_index(n, 0.1) == 8_552_447 != int(n * 0.1 + 1e-9)  # the rule before: one more
    assert authors_kept_count(n, Schedule("exponential", 0.8, 100), 99, 0.8) == 17_104_896 != int(n * (1 - 0.8) + 1e-9)


def test_grasp_scores_the_network_in_train_mode():
    """Their scoring forwards run in train mode (a freshly built network; GraSP.py's
    ``.eval()`` is commented out): dropout is on in both passes, even when the model was
    left in eval mode before pruning."""
    import pruneflow

    torch.manual_seed(0)
    model = DropNet().eval()
    batches = data(2)
    modes: list[bool] = []

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        modes.append(m.training)
        return F.cross_entropy(m(b["x"]), b["labels"])

    pruner = pruneflow.methods.create("grasp", sparsity=0.5, steps=2, model=model, include=["blocks.*"], exclude=["head"],
                                      batches=lambda: iter(batches), loss_fn=loss_fn)
    pruner.run()
    assert modes == [True] * 4  # 2 batches x 2 passes


def test_force_authors_levels_start_after_the_warmup_and_hold_at_the_target():
    """Their level of ramp step x = step - schedule.initial_warmup; the steps of
    schedule.final_warmup (mask updates at the target) keep their last level, not one
    decayed past the target."""
    from pruneflow.methods.force import authors_kept_count

    n = 1000
    schedule = Schedule("exponential", 0.8, 10, initial_warmup=2, final_warmup=3)  # ramp: steps 2..6
    theirs = [int(n * np.exp(0 - ((x + 1) * (0 - np.log(0.2)) / 5))) for x in range(5)]  # iterative_pruning over 5 steps
    assert theirs == [724, 525, 380, 275, 200]
    assert [authors_kept_count(n, schedule, k, 0.8) for k in range(2, 7)] == theirs
    assert [authors_kept_count(n, schedule, k, 0.8) for k in range(7, 10)] == [200, 200, 200]


def test_force_authors_selection_on_another_schedule_keeps_the_scheduled_fraction():
    """selection=authors off the exponential schedule: every score >= the
    int(n * (1 - s))-th largest kept, s the schedule's level at the step (cubic here)."""
    torch.manual_seed(0)
    model = Net()
    steps = 4
    method, weights, batches = attach("force", model, 0.8, steps, kind="cubic", selection="authors")
    masks = score_loop(model, method, batches)
    schedule = Schedule("cubic", 0.8, steps)
    n = masks[0].numel()
    want = [int(math.floor((1 - schedule.sparsity(k)) * n + 1e-9)) for k in range(steps)]
    assert want == [137, 76, 54, 51]
    assert [int(m.sum()) for m in masks] == want
