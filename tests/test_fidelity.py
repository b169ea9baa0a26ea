"""Each method against its authors' update rule, step by step.

For every method the real runner (``pruneflow.runner.Run``: trainer, continuous
optimizer, stages) trains a small model (the tiny ViT on digits, dropout off)
while a reference loop written here, independently and in plain PyTorch from the
authors' code as docs/fidelity.md describes it, trains a copy of the same model
on the same batches. The masks are compared after every step, the weights at the
end. The reference loops share nothing with pruneflow but the model, the data
order (``EpochBatches``) and the task's loss.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.runner import Run
from pruneflow.trainer import EpochBatches

from conftest import make_config

BASE = [
    "task.max_train_samples=256", "task.max_eval_samples=64", "logger=none", "speed.enabled=false",
    "save_model=false", "cache=false", "model.kwargs.drop_path_rate=0.0", "model.kwargs.proj_drop_rate=0.0",
    "trainer.continuous=true", "trainer.torch_threads=1", "stages.eval_batch_size=64",
]


def stages(finetune: int, prune: int, recover: int, lr: float = 1e-3, bs: int = 32) -> list[str]:
    return [
        f"stages.{name}.{key}={value}"
        for name, steps in (("finetune", finetune), ("prune", prune), ("recover", recover))
        for key, value in (("epochs", "null"), ("steps", steps), ("lr", lr), ("batch_size", bs))
    ]


def prepared(tmp_path: Path, *overrides: str) -> Run:
    run = Run(make_config([*BASE, *overrides], tmp_path), tmp_path / "run")
    run.prepare()
    return run


def record_masks(run: Run) -> list[torch.Tensor]:
    """pruneflow's mask after each prune-stage step (after the method's update)."""
    masks: list[torch.Tensor] = []
    method = run.method
    hook = method.after_optimizer_step

    def wrapped(step: int, grads_finite: bool = True) -> None:
        hook(step, grads_finite)
        masks.append(method.mask_flat.detach().clone())

    method.after_optimizer_step = wrapped
    return masks


def stream(run: Run) -> EpochBatches:
    """The batches of the run's (continuous) training, in order."""
    spec = run.plan.stages["finetune"]
    return EpochBatches(run.task.train_set, spec.batch_size, spec.seed, run.task.collate)


def prunable(model: nn.Module, biases: bool = False) -> list[tuple[str, nn.Linear, str]]:
    """The reference's own prunable set: the Linear layers of the encoder blocks."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks."):
            out.append((name, mod, "weight"))
            if biases:
                out.append((name, mod, "bias"))
    return out


def masked_forward(module: nn.Linear, mask_of: Callable[[], torch.Tensor]) -> None:
    """The authors' masked Linear: ``F.linear(x, W * mask, b)`` in every forward."""
    module.forward = lambda x: F.linear(x, module.weight * mask_of(), module.bias)  # type: ignore[method-assign]


def loss_of(run: Run, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])


def final_weights(run: Run) -> dict[str, torch.Tensor]:
    run.weights.bake()
    return run.bundle.model.state_dict()


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> None:
    for n in names:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6), n


# ----------------------------------------------------------------------------- SEVEN
def seven_reference(model: nn.Module, run: Run, t_i: int, iter_num: int, total: int, sparsity: float, lr: float) -> list[torch.Tensor]:
    """xiaojinying/SEVEN (train.py, utils.py, strategies/pruner.py): AdamW at a constant
    lr, no clipping, the pruner after optimizer.step() at global steps t_i ...
    t_i + iter_num - 2, bias corrections with i + 1, S of pruned weights set to 0,
    one global top-k threshold with k = int(r * n), scores >= threshold kept."""
    a1, a2 = 0.8, 0.9
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    layers = prunable(model)
    masks = [torch.ones_like(mod.weight) for _, mod, _ in layers]
    for i, (_, mod, _) in enumerate(layers):
        masked_forward(mod, lambda i=i: masks[i])
    S = m = v = None
    data = stream(run)
    history = []
    keep = 1 - sparsity
    for step in range(total):
        opt.zero_grad()
        loss_of(run, model, next(data)).backward()
        opt.step()
        if t_i <= step <= t_i + iter_num - 2:
            i = step - t_i
            if i == 0:
                S = [torch.zeros_like(mod.weight) for _, mod, _ in layers]
                m = [torch.zeros_like(mod.weight) for _, mod, _ in layers]
                v = [torch.zeros_like(mod.weight) for _, mod, _ in layers]
                masks[:] = [torch.ones_like(mod.weight) for _, mod, _ in layers]
            for j, (_, mod, _) in enumerate(layers):
                g = mod.weight.grad.abs()
                m[j] = a1 * m[j] + (1 - a1) * g
                v[j] = a2 * v[j] + (1 - a2) * g * g
                m_hat = m[j] / (1 - a1 ** (i + 1))
                v_hat = torch.sqrt(v[j] / (1 - a2 ** (i + 1))) + 1e-9
                S[j] = S[j] + (mod.weight.data * g * m_hat / v_hat).abs()
                S[j][masks[j] == 0] = 0
            r = keep + (1 - keep) * (1 - (i + 1) / iter_num) ** 3
            flat = torch.cat([s.reshape(-1) for s in S])
            threshold = torch.topk(flat, int(r * flat.numel())).values.min()
            for j, (_, mod, _) in enumerate(layers):
                masks[j] = (S[j] >= threshold).float()
                mod.weight.data.mul_(masks[j])
            history.append(torch.cat([mk.reshape(-1) for mk in masks]))
    for j, (_, mod, _) in enumerate(layers):
        mod.weight.data.mul_(masks[j])
    return history


def test_seven_matches_the_authors_loop(tmp_path: Path) -> None:
    t_i, iter_num, recover, lr = 4, 8, 3, 2e-3
    run = prepared(
        tmp_path, "method=seven", "sparsity=0.7", "method.selection=authors", "method.stop_early=true",
        "trainer.lr_scheduler=constant", "trainer.weight_decay=0.0", "trainer.max_grad_norm=0", *stages(t_i, iter_num, recover, lr),
    )
    reference = copy.deepcopy(run.bundle.model)
    ours = record_masks(run)
    run.execute()
    theirs = seven_reference(reference, run, t_i, iter_num, t_i + iter_num + recover, 0.7, lr)
    assert len(theirs) == iter_num - 1  # their window: k = 0 ... iter_num - 2
    for k, mask in enumerate(theirs):
        assert torch.equal(ours[k], mask), f"mask differs at pruning step {k}"
    assert torch.equal(ours[-1], theirs[-1])  # the last step (k = iter_num - 1) prunes nothing
    names = [f"{n}.{a}" for n, _, a in prunable(reference)]
    close(final_weights(run), reference.state_dict(), [*names, "head.weight"])


# ----------------------------------------------------------------------------- PLATON
def platon_reference(model: nn.Module, run: Run, total: int, t_init: int, t_final: int, delta_t: int, lr: float,
                     every: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """QingruZhang/PLATON (GLUE/train.py, GLUE/mt_dnn/prune_model.py): after the clipped
    optimizer step g (from 1) the window mean of |W*G| and, at window ends, Ibar and U
    (U with the new Ibar); at mask steps kthvalue(Ibar*U, int(n*(1-r))) and every
    weight or bias scoring below it is zeroed in place. No mask in the forward."""
    b1, b2 = 0.85, 0.95
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    params = [getattr(mod, attr) for _, mod, attr in prunable(model, biases=True)]
    ipt = [torch.zeros_like(p) for p in params]
    ibar = [torch.zeros_like(p) for p in params]
    unc = [torch.zeros_like(p) for p in params]
    data = stream(run)
    history = []
    current = torch.ones(sum(p.numel() for p in params))
    for step in range(total):
        if history:
            current = history[-1][1]
        every.append(current)  # the mask in force before this step's update
        loss_of(run, model, next(data)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        g = step + 1
        opt.step()
        local = g % delta_t
        for j, p in enumerate(params):
            if local == 0:
                ibar[j] = b1 * ibar[j] + (1 - b1) * ipt[j]
                unc[j] = b2 * unc[j] + (1 - b2) * (ipt[j] - ibar[j]).abs()
                ipt[j] = (p * p.grad).abs().detach()
            else:
                ipt[j] = (ipt[j] * local + (p * p.grad).abs().detach()) / (local + 1)
        opt.zero_grad()
        if g <= t_init:
            continue
        final_threshold = 0.4  # their --final_threshold for sparsity 0.6 (the kept fraction as written)
        if g > total - t_final:
            r = final_threshold
        elif g % delta_t == 0:  # schedule_threshold_comb, initial_threshold 1
            mul_coeff = 1 - (g - t_init) / (total - (t_final + t_init))
            r = final_threshold + (1 - final_threshold) * (mul_coeff**3)
        else:
            continue
        scores = [a * b for a, b in zip(ibar, unc, strict=True)]
        flat = torch.cat([s.reshape(-1) for s in scores])
        threshold = torch.kthvalue(flat, int(flat.numel() * (1 - r))).values
        for p, s in zip(params, scores, strict=True):
            p.data.masked_fill_(s < threshold, 0.0)
        history.append((step, (flat >= threshold).float()))
    return history


def test_platon_matches_the_authors_loop(tmp_path: Path) -> None:
    # T - t_final = 19 is not a window end: a final phase starting one step early (g >= 19)
    # would add a mask step at step 18
    total, t_init, t_final, delta_t, lr = 24, 4, 5, 3, 2e-3
    run = prepared(
        tmp_path, "method=platon", "sparsity=0.6", "method.selection=authors", f"method.deltaT={delta_t}",
        f"schedule.initial_warmup={t_init}", f"schedule.final_warmup={t_final}",
        "trainer.lr_scheduler=constant", "trainer.weight_decay=0.0", "trainer.max_grad_norm=1.0", *stages(0, total, 0, lr),
    )
    reference = copy.deepcopy(run.bundle.model)
    ours = record_masks(run)
    run.execute()
    before: list[torch.Tensor] = []
    theirs = platon_reference(reference, run, total, t_init, t_final, delta_t, lr, before)
    mask_steps = [k for k, _ in theirs]
    assert mask_steps == [5, 8, 11, 14, 17, 19, 20, 21, 22, 23]  # window ends, then every step of the final phase
    for k, mask in theirs:
        assert torch.equal(ours[k], mask), f"mask differs at step {k}"
    for k in range(1, total):  # and between mask steps: no extra mask update
        assert torch.equal(ours[k - 1], before[k]), f"mask differs after step {k - 1}"
    names = [f"{n}.{a}" for n, _, a in prunable(reference, biases=True)]
    assert len(run.weights) == len(names) == 32  # weights and biases of the 16 block Linears
    close(final_weights(run), reference.state_dict(), names)


# ----------------------------------------------------------------------------- movement pruning
class _TopK(torch.autograd.Function):
    """emmental's TopKBinarizer: the top int(threshold * n) scores -> 1; identity backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:  # noqa: ANN001
        out = torch.zeros_like(scores)
        idx = scores.flatten().sort(descending=True).indices
        out.view(-1)[idx[: int(threshold * scores.numel())]] = 1.0
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


class _Thresholded(torch.autograd.Function):
    """emmental's ThresholdBinarizer with its 0.5 % floor (sigmoid=True: soft movement;
    False: raw scores, their --pruning_method threshold); identity backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float, sigmoid: bool) -> torch.Tensor:  # noqa: ANN001
        n = scores.numel()
        floor = int(0.005 * n) + 1
        mask = ((torch.sigmoid(scores) if sigmoid else scores) > threshold).float()
        if mask.sum() < floor:
            k = torch.kthvalue(scores.view(-1), max(n - floor, 1)).values
            mask = (scores > k).float()
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None, None


def sanh_threshold(step: int, total: int, t_init: int, t_final: int, initial: float, final: float) -> float:
    """schedule_threshold of masked_run_glue.py (step = global_step from 0)."""
    if step <= t_init:
        return initial
    if step > total - t_final:
        return final
    c = 1 - (step - t_init) / (total - t_init - t_final)
    return final + (initial - final) * c**3


def sanh_reference(model: nn.Module, run: Run, kind: str, total: int, t_init: int, t_final: int, warmup: int, lr: float, score_lr: float,
                   final: float, final_lambda: float = 0.0, score_log: list[torch.Tensor] | None = None,
                   every: int = 25, first_step: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """masked_run_glue.py with emmental's MaskedLinear (topK / sigmoied_threshold /
    magnitude): the threshold of step t before the forward, AdamW with the scores at
    their own lr (no decay), one linear warm-up/decay schedule for every group,
    clipping at 1.0 over all parameters, l1 penalty for soft movement.
    ``global_topk``: their --global_topk with --pruning_method threshold (a raw-score
    threshold over all matrices, recomputed when global_step % ``every`` == 0, held in
    between, -100 while the schedule keeps everything). ``first_step``: their
    global_step at the first step (masked_run_squad.py: 1). Returns the mask after every
    step and the final model's mask (their evaluate(): global top-k recomputes its threshold)."""
    layers = prunable(model)
    scores = [torch.zeros_like(mod.weight, requires_grad=True) for _, mod, _ in layers] if kind != "magnitude" else []
    state: dict[str, Any] = {"threshold": 1.0, "mem": None}

    def raw_threshold(global_step: int) -> float:
        """The training loop's global-top-k block for this global_step."""
        thr = sanh_threshold(global_step, total, t_init, t_final, 1.0, final)
        if thr == 1.0:
            return -1e2
        if state["mem"] is None or global_step % every == 0:
            concat = torch.cat([sc.detach().view(-1) for sc in scores])
            n = concat.numel()
            state["mem"] = concat.kthvalue(max(n - (int(n * thr) + 1), 1)).values.item()
        return state["mem"]

    for j, (_, mod, _) in enumerate(layers):
        if kind == "topK":
            mod.forward = lambda x, j=j, mod=mod: F.linear(x, mod.weight * _TopK.apply(scores[j], state["threshold"]), mod.bias)
        elif kind in ("sigmoied_threshold", "global_topk"):
            sig = kind == "sigmoied_threshold"
            mod.forward = lambda x, j=j, mod=mod, sig=sig: F.linear(
                x, mod.weight * _Thresholded.apply(scores[j], state["threshold"], sig), mod.bias)
        else:  # MagnitudeBinarizer: top int(threshold * n) of |W| in each forward, no gradient through the mask

            def magnitude(x: torch.Tensor, mod: nn.Linear = mod) -> torch.Tensor:
                w = mod.weight
                mask = torch.zeros_like(w)
                idx = w.detach().abs().flatten().sort(descending=True).indices
                mask.view(-1)[idx[: int(state["threshold"] * w.numel())]] = 1.0
                return F.linear(x, w * mask, mod.bias)

            mod.forward = magnitude
    groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": 0.0}]
    if scores:
        groups.append({"params": scores, "lr": score_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup)))
    initial = 0.0 if kind == "sigmoied_threshold" else 1.0
    data = stream(run)
    history = []
    if kind == "global_topk":
        state["threshold"] = raw_threshold(first_step)
    for step in range(total):
        thr = sanh_threshold(step + first_step, total, t_init, t_final, initial, final)
        if kind != "global_topk":
            state["threshold"] = thr
        loss = loss_of(run, model, next(data))
        if final_lambda:
            lam = final_lambda * thr / final
            loss = loss + lam * torch.stack([torch.sigmoid(s).mean() for s in scores]).mean()
        loss.backward()
        nn.utils.clip_grad_norm_([*model.parameters(), *scores], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        # the mask the next forward computes
        nxt = sanh_threshold(step + 1 + first_step, total, t_init, t_final, initial, final)
        with torch.no_grad():
            if kind == "topK":
                masks = [_TopK.apply(s, nxt) for s in scores]
            elif kind == "sigmoied_threshold":
                masks = [_Thresholded.apply(s, nxt, True) for s in scores]
            elif kind == "global_topk":  # computed once per global_step: the next forward uses it
                state["threshold"] = raw_threshold(step + 1 + first_step)
                masks = [_Thresholded.apply(s, state["threshold"], False) for s in scores]
            else:
                masks = []
                for _, mod, _ in layers:
                    mk = torch.zeros_like(mod.weight)
                    mk.view(-1)[mod.weight.abs().flatten().sort(descending=True).indices[: int(nxt * mod.weight.numel())]] = 1.0
                    masks.append(mk)
        history.append(torch.cat([mk.reshape(-1) for mk in masks]))
        if score_log is not None and scores:
            score_log.append(torch.cat([sc.detach().reshape(-1) for sc in scores]))
    final_mask = history[-1]
    if kind == "global_topk":  # evaluate(): threshold_mem dropped and recomputed from the final scores at final_threshold
        with torch.no_grad():
            concat = torch.cat([sc.detach().view(-1) for sc in scores])
            n = concat.numel()
            thr = concat.kthvalue(max(n - (int(n * final) + 1), 1)).values.item()
            final_mask = torch.cat([_Thresholded.apply(sc, thr, False).reshape(-1) for sc in scores])
    with torch.no_grad():  # the final model: the weights times the final mask
        for (_, mod, _), mk in zip(layers, torch.split(final_mask, [mod.weight.numel() for _, mod, _ in layers]), strict=True):
            mod.weight.mul_(mk.view_as(mod.weight))
    return history, final_mask


MOVEMENT = ["method=movement", "sparsity=0.75", "method.selection=authors"]
# name: (their pruning_method, our overrides, final threshold, final lambda, score lr, {reference options})
SANH: dict[str, tuple[str, list[str], float, float, float, dict[str, int]]] = {
    "movement": ("topK", [*MOVEMENT, "method.scope=local"], 0.25, 0.0, 5e-2, {}),
    "soft_movement": ("sigmoied_threshold", ["method=soft_movement", "method.final_threshold=0.3", "method.final_lambda=50.0"], 0.3, 50.0, 0.5, {}),
    "magnitude": ("magnitude", ["method=magnitude", "sparsity=0.75", "method.selection=authors", "method.scope=local", "method.regrowth=true"], 0.25, 0.0, 0.0, {}),
    # --global_topk --global_topk_frequency_compute 4: thresholds held over steps, recomputed at 4, 8, ...
    "movement_global_topk": ("global_topk", [*MOVEMENT, "method.scope=global", "method.threshold_every=4"], 0.25, 0.0, 5e-2, {"every": 4}),
    # masked_run_squad.py: global_step from 1, the threshold one step ahead (and the global recomputations)
    "movement_squad_counter": ("topK", [*MOVEMENT, "method.scope=local", "schedule.step_offset=1"], 0.25, 0.0, 5e-2, {"first_step": 1}),
    # recomputed at 6, 12, 18: the last two steps hold a stale threshold, which evaluate() recomputes
    "movement_global_topk_stale": ("global_topk", [*MOVEMENT, "method.scope=global", "method.threshold_every=6"], 0.25, 0.0, 5e-2, {"every": 6}),
    "movement_global_topk_squad": ("global_topk", [*MOVEMENT, "method.scope=global", "method.threshold_every=3", "schedule.step_offset=1"],
                                   0.25, 0.0, 5e-2, {"every": 3, "first_step": 1}),
}


@pytest.mark.parametrize("name", list(SANH))
def test_sanh_methods_match_the_authors_loop(tmp_path: Path, name: str) -> None:
    kind, overrides, final, final_lambda, score_lr, options = SANH[name]
    total, t_init, t_final, warmup, lr = 20, 3, 4, 5, 2e-3
    extra = [f"method.score_lr={score_lr}"] if name != "magnitude" else []
    run = prepared(
        tmp_path, *overrides, *extra, f"schedule.initial_warmup={t_init}", f"schedule.final_warmup={t_final}",
        "trainer.lr_scheduler=linear", f"trainer.warmup_steps={warmup}", "trainer.weight_decay=0.0", "trainer.max_grad_norm=1.0",
        *stages(0, total, 0, lr),
    )
    reference = copy.deepcopy(run.bundle.model)
    ours = record_masks(run)
    our_scores: list[torch.Tensor] = []
    if name != "magnitude":  # the trainable scores after every step (the penalty acts on the masks only through them)
        recorded = run.method.after_optimizer_step

        def with_scores(step: int, grads_finite: bool = True) -> None:
            recorded(step, grads_finite)
            our_scores.append(run.method.state["scores"].detach().clone())

        run.method.after_optimizer_step = with_scores
    run.execute()
    their_scores: list[torch.Tensor] = []
    theirs, their_final = sanh_reference(reference, run, kind, total, t_init, t_final, warmup, lr, score_lr, final, final_lambda,
                                         their_scores, **options)
    if name == "movement_global_topk_stale":  # the case tells the evaluated model's threshold from the held one
        assert not torch.equal(their_final, theirs[-1])
    assert len(ours) == len(theirs) == total
    assert len(our_scores) == len(their_scores) == (0 if name == "magnitude" else total)
    for k in range(total):
        near_tie_swaps(ours[k], theirs[k], our_scores[k] if our_scores else None, f"mask after step {k}")
    for k, (a, b) in enumerate(zip(our_scores, their_scores, strict=True)):
        # fused Adam against the per-tensor reference: float noise, ~1e-6 of the largest score
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())), msg=f"scores differ after step {k}")
    assert 0 < float(theirs[-1].mean()) < 1
    swapped = near_tie_swaps(run.method.mask_flat, their_final, our_scores[-1] if our_scores else None, "the final model's mask")
    names = [f"{n}.weight" for n, _, _ in prunable(reference)]
    ours_final, theirs_final = final_weights(run), reference.state_dict()
    for n, part in zip(names, torch.split(swapped, [theirs_final[n].numel() for n in names]), strict=True):
        ours_final[n] = ours_final[n].masked_fill(part.view_as(ours_final[n]), 0.0)  # a swapped pair: one side zero
        theirs_final[n] = theirs_final[n].masked_fill(part.view_as(theirs_final[n]), 0.0)
    close(ours_final, theirs_final, [*names, "head.weight"])


def near_tie_swaps(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor | None, what: str) -> torch.Tensor:
    """Where two masks differ (a bool vector): nowhere, or only between entries whose scores
    are equal to float noise, with as many kept. Our scores come from fused AdamW, the
    reference's from the per-tensor loop (~1e-6 of the largest score apart): which of
    two such near-equal scores a threshold keeps depends on the CPU's rounding."""
    differ = ours != theirs
    if not differ.any():
        return differ
    assert scores is not None, f"{what} differs in {int(differ.sum())} entries"
    assert int(ours.sum()) == int(theirs.sum()), f"{what}: {int(ours.sum())} kept against {int(theirs.sum())}"
    s = scores.reshape(-1)[differ]
    tol = 1e-5 * max(1.0, float(scores.abs().max()))
    assert float(s.max() - s.min()) <= tol, f"{what} differs in {int(differ.sum())} entries, scores {float(s.min())} ... {float(s.max())}"
    return differ


def their_init_mask(shape: tuple[int, int], mask_init: str, mask_scale: float) -> torch.Tensor:
    """emmental's MaskedLinear.init_mask for one layer's mask_scores."""
    scores = torch.empty(shape)
    if mask_init == "constant":
        nn.init.constant_(scores, val=mask_scale)
    elif mask_init == "uniform":
        nn.init.uniform_(scores, a=-mask_scale, b=mask_scale)
    elif mask_init == "kaiming":
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
    return scores


@pytest.mark.parametrize("name", ["movement", "soft_movement", "l0"])
@pytest.mark.parametrize("mode", ["constant", "uniform", "kaiming"])
def test_score_init_modes_are_their_mask_init(name: str, mode: str) -> None:
    """method.score_init_mode: their --mask_init, layer by layer in module order from
    torch's global generator (as their MaskedLinear layers at construction)."""
    import pruneflow

    model = nn.Module()
    model.blocks = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    settings: dict[str, Any] = {"score_init_mode": mode}
    if mode != "kaiming":
        settings["score_init"] = 0.5
    if name == "movement":
        settings["sparsity"] = 0.5
    torch.manual_seed(11)
    pruner = pruneflow.methods.create(name, steps=4, model=model, include=["blocks.*"], **settings)
    torch.manual_seed(11)
    theirs = [their_init_mask(shape, mode, 0.5) for shape in ((4, 6), (3, 4))]
    ours = [p.detach() for p in pruner.method.score_params]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert mode == "constant" or float(ours[0].std()) > 0
    if mode == "kaiming":
        from omegaconf import OmegaConf

        from pruneflow.errors import UserError
        from pruneflow.methods.movement import check_score_init_shapes

        # a vector has no fan-in (these methods offer no method.biases: the guard is for a set that holds one)
        with pytest.raises(UserError, match="kaiming_uniform_ needs a matrix's fan-in"):
            check_score_init_shapes("kaiming", [torch.zeros(4)])
        unused = dict(pruner.method.unused_settings(OmegaConf.create({})))
        assert "method.score_init" in unused


@pytest.mark.parametrize("name", ["movement", "magnitude"])
def test_sanh_top_k_counts_with_their_schedule_thresholds_rounding(name: str) -> None:
    """Their top-k keeps int(threshold * n), threshold = final + (1 - final) * c^3 with
    final = 0.1 as written: at step 1174 of a 3,000-step run (warm-ups 300 and 600) a
    768 x 768 matrix keeps 164,351 weights (0.27866... * n = 164351.99999999994), where
    the algebraically equal 1 - 0.9 * (1 - c^3) gives 164,352."""
    import pruneflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 768, bias=False))
    extra = {"regrowth": True} if name == "magnitude" else {}
    pruner = pruneflow.methods.create(name, sparsity=0.9, steps=3000, model=model, include=["*"], scope="local",
                                      selection="authors", initial_warmup=300, final_warmup=600, **extra)
    method = pruner.method
    if name == "movement":
        method.state["scores"].copy_(torch.randn(768 * 768))
    step = 1174
    c = 1 - (step + 1 - 300) / (3000 - 300 - 600)  # their mul_coeff at global_step step + 1
    theirs = int((0.1 + (1 - 0.1) * c**3) * 768 * 768)
    assert theirs == 164351 and int((1 - 0.9 * (1 - c**3)) * 768 * 768 + 1e-9) == 164352
    method.update_masks(method.ctx.schedule.sparsity(step), step)
    assert int(method.mask_flat.sum()) == theirs


def test_movement_global_threshold_keeps_their_floor_per_matrix_and_holds_between_recomputations() -> None:
    """--global_topk with ThresholdBinarizer: a matrix whose scores all fall below the global
    threshold keeps its int(0.005 n) + 1 highest scores; between recomputations the raw
    threshold stays, so the kept count follows the scores, not the schedule."""
    import pruneflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 60))  # 2000 and 3000 weights
    pruner = pruneflow.methods.create("movement", sparsity=0.5, steps=10, model=model, include=["*"], scope="global",
                                      selection="authors", threshold_every=5, schedule="oneshot")
    method = pruner.method
    scores = method.state["scores"]
    scores[:2000] = torch.randn(2000) - 10.0  # every score of the first matrix below every one of the second
    scores[2000:] = torch.randn(3000)
    method.update_masks(0.5, step=3)  # their global_step 4: no threshold held yet, so computed now
    mask = method.mask_flat
    n = 5000
    kth = n - (int(n * 0.5) + 1)
    held = torch.kthvalue(scores, kth).values
    assert method.threshold_mem == float(held)
    first = scores[:2000]
    floor = int(0.005 * 2000) + 1  # 11
    expected_first = first > torch.kthvalue(first, 2000 - floor).values
    assert int(mask[:2000].sum()) == floor and torch.equal(mask[:2000].bool(), expected_first)
    assert torch.equal(mask[2000:].bool(), scores[2000:] > held)
    assert int(mask[2000:].sum()) == n - kth == int(n * 0.5) + 1  # their count: one more than int(n * keep), all in the second
    scores[2000:] += 0.5  # the scores move; the held threshold does not (global_step 6 is not a recomputation)
    method.update_masks(0.5, step=5)
    assert method.threshold_mem == float(held) and torch.equal(mask[2000:].bool(), scores[2000:] > held)
    assert int(mask[2000:].sum()) > 2501
    method.update_masks(0.5, step=9)  # global_step 10: recomputed
    assert method.threshold_mem == float(torch.kthvalue(scores, kth).values) != float(held)
    method.update_masks(0.0, step=0)  # the kept fraction 1 (their warm-up): threshold -100, the floor unused
    assert bool(mask.all())


# ----------------------------------------------------------------------------- continuous training
def test_continuous_run_follows_one_lr_schedule_and_keeps_adam_state(tmp_path: Path) -> None:
    from transformers import get_linear_schedule_with_warmup

    steps = (6, 5, 4)
    run = prepared(tmp_path, "method=magnitude", "sparsity=0.5", "trainer.lr_scheduler=linear", "trainer.warmup_steps=3", *stages(*steps, lr=1e-3))
    opt = run.optim.optimizer
    seen: list[float] = []
    exp_avg_at: dict[int, torch.Tensor] = {}
    probe = run.trainer.base_params[0][1]
    step_fn = opt.step

    def step(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(opt.param_groups[0]["lr"])
        if len(seen) in (steps[0] + 1, steps[0] + steps[1] + 1):  # the first step of the prune and recover stages
            exp_avg_at[len(seen)] = opt.state[probe]["exp_avg"].clone()
        return step_fn(*a, **k)

    opt.step = step
    run.execute()
    total = sum(steps)
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_linear_schedule_with_warmup(dummy, 3, total)
    expected = []
    for _ in range(total):
        expected.append(dummy.param_groups[0]["lr"])
        dummy.step()
        sched.step()
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert seen[-1] > 0 and expected[0] == 0  # one warm-up, one decay to the end of recovery
    # Adam's moments carry over the stage boundaries: the state is not fresh there.
    assert all(float(t.abs().sum()) > 0 for t in exp_avg_at.values()) and len(exp_avg_at) == 2
    assert int(opt.state[probe]["step"]) == total


def test_continuous_finetune_cache_resumes_the_same_training(tmp_path: Path) -> None:
    """A continuous run that reuses the cached finetune stage (weights and optimizer)
    ends exactly where one without the cache ends."""
    args = ["method=seven", "sparsity=0.5", "trainer.lr_scheduler=linear", *stages(5, 4, 3)]
    plain = prepared(tmp_path / "a", *args)
    plain.execute()
    cache = ["cache=true", f"cache_dir={tmp_path / 'cache'}"]
    first = prepared(tmp_path / "b", *args, *cache)
    first.execute()
    second = prepared(tmp_path / "c", *args, *cache)
    second.execute()
    assert (tmp_path / "cache" / "finetune").is_dir()
    a, c = final_weights(plain), final_weights(second)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_fp16_overflow_never_reaches_the_scores(tmp_path: Path) -> None:
    """A step whose fp16 gradients overflow is skipped by the gradient scaler; no method
    may score it (SEVEN's S and PLATON's averages would stay inf/NaN for good)."""
    for method in ("seven", "platon"):
        run = prepared(tmp_path / method, f"method={method}", "sparsity=0.5", *stages(0, 6, 0))
        # fp16 autocast and the gradient scaler, here on the CPU (the CLI allows fp16 on CUDA only)
        run.trainer.autocast_dtype = torch.float16
        run.trainer.scaler = torch.amp.GradScaler("cpu")
        def poison(grad: torch.Tensor, calls: dict[str, int] = {"n": 0}) -> torch.Tensor:  # noqa: B006 - a per-loop counter
            calls["n"] += 1
            return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

        run.trainer.base_params[0][1].register_hook(poison)
        run.execute()
        for name, t in run.method.state.items():  # -inf marks SEVEN's pruned scores; no NaN, no +inf
            assert not bool(torch.isnan(t).any()) and not bool((t == float("inf")).any()), (method, name)
        kept = run.method.mask_flat == 1
        assert bool(torch.isfinite(run.method.selection_scores()[kept]).all()), method
        assert run.trainer.scaler.get_scale() < 2.0**16  # the overflow was seen and the step skipped
        assert run.method.k == 5, method  # 6 steps, the overflowing one not scored
        assert run.optim.step == 5, method  # nor counted by the LR schedule


def test_spp_search_under_fp16_scales_its_loss_and_skips_an_overflow_step_whole(tmp_path: Path) -> None:
    """SPP's search under fp16 autocast runs its own gradient scaler: a step with inf
    gradients leaves the masks, Z and Γ untouched (else they turn NaN for good)."""
    run = prepared(tmp_path, "method=spp", "sparsity=0.5", *(o for o in stages(0, 6, 0) if not o.startswith("stages.prune.lr")))
    run.trainer.autocast_dtype = torch.float16
    run.trainer.scaler = torch.amp.GradScaler("cpu")
    calls = {"n": 0}

    def poison(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> None:  # noqa: ANN401
        if module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.register_hook(lambda g: torch.full_like(g, float("inf")))

    run.bundle.model.head.register_forward_hook(poison)
    run.execute()
    assert calls["n"] == 6
    search = run.method.search
    assert search
    for key, fields in search.items():
        for name in ("z", "m"):
            assert bool(torch.isfinite(fields[name]).all()), (key, name)
    assert len(run.method.path) == 6


def test_authors_counts_round_down(tmp_path: Path) -> None:
    """SEVEN's authors keep int(r * n) (plus ties); the default keeps n - round(s n)."""
    run = prepared(tmp_path, "method=seven", "sparsity=0.7", "method.selection=authors", *stages(2, 3, 0))
    run.execute()
    n = run.weights.numel
    assert int(run.method.mask_flat.sum()) == math.floor(0.3 * n + 1e-9)


# ----------------------------------------------------------------------------- SPP
def _their_deit_search_forward(model: nn.Module, images: torch.Tensor, alphas: list[nn.Parameter]) -> torch.Tensor:
    """A timm ViT's forward with deit/mock.py's search masks, written out here (not through
    pruneflow's mask sites): per block, q and k times alpha[:head_dim], v times
    alpha[head_dim:], fc1's output times the MLP's alpha before the GELU. Only the parts
    of timm's block the test model uses (no layer scale, drop path, q/k norm or gate)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for i, blk in enumerate(model.blocks):
        at, mlp = blk.attn, blk.mlp
        assert all(isinstance(m, nn.Identity) for m in (blk.ls1, blk.ls2, blk.drop_path1, blk.drop_path2, at.q_norm, at.k_norm, at.norm, mlp.norm))
        assert getattr(at, "gate", None) is None and isinstance(mlp.act, nn.GELU)
        a_attn, a_mlp = alphas[2 * i], alphas[2 * i + 1]
        h = blk.norm1(x)
        batch, tokens, _ = h.shape
        qkv = F.linear(h, at.qkv.weight, at.qkv.bias).reshape(batch, tokens, 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        hd = q.shape[-1]
        q, k, v = q * a_attn[..., :hd], k * a_attn[..., :hd], v * a_attn[..., hd:]
        attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(batch, tokens, -1), at.proj.weight, at.proj.bias)
        h = F.linear(blk.norm2(x), mlp.fc1.weight, mlp.fc1.bias) * a_mlp
        x = x + F.linear(F.gelu(h), mlp.fc2.weight, mlp.fc2.bias)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("steps", [1, 11, 30])  # the first step and support check; the second check; a search where entries entered
def test_spp_search_matches_the_authors_optimizer(steps: int) -> None:
    """adamw_spp.py's update (Adam on the masks, eps 1e-4, Z += lr_t/(1-b1^t) * (M - Γ),
    Γ = relu(relu(1 - λ/|Z|) Z)) and deit/engine.py's step_record (+1 where Γ != 0 every
    `interval` batches of an epoch and at the last step), transcribed here over deit/mock.py's search forward written out
    by hand (so a wrong mask site fails too), against pruneflow's search with the coupling
    term made inert (their code adds it after backward()): M, Z and the record after 1, 11
    and 30 steps."""
    import timm
    from omegaconf import OmegaConf

    from pruneflow.masking import MaskedWeights, select_prunable
    from pruneflow.methods.base import PruneContext
    from pruneflow.methods.spp import SPP
    from pruneflow.runner import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
    from pruneflow.trainer import StageSpec

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4, num_classes=4, in_chans=1)
    reference = copy.deepcopy(model)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    lr, lam = 0.05, 0.5

    def batches():  # noqa: ANN202
        g = torch.Generator().manual_seed(1)
        while True:
            i = torch.randperm(64, generator=g)[:16]
            yield {"pixel_values": x[i], "labels": y[i]}

    def loss_fn(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(b["pixel_values"]), b["labels"])

    weights = MaskedWeights(select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
    ctx = PruneContext(model=model, weights=weights, schedule=None, sparsity=0.5, total_steps=steps, device=torch.device("cpu"),
                       batches=batches, loss_fn=loss_fn, extra={"stage": StageSpec("prune", steps, lr, 16, 0)})
    cfg = {"name": "spp", "search_lr": lr, "optimizer": "adam", "adam_eps": 1e-4, "kappa": 1.0, "lambda": lam, "nu": 1e30, "z_lr": "adam",
           "rank": "support_time", "check_every": 10, "grouping": "attention_mlp", "mask_sites": "authors", "share_heads": True,
           "include": None, "exclude": None}
    method = SPP(OmegaConf.create(cfg), 0.5)
    method.validate(model, weights)
    method.setup(ctx)
    method.run_prune_stage(ctx)

    # their loop: deit/mock.py's search forward written out over the same (frozen) weights,
    # one alpha per block for attention (2 * head_dim: q and k times the first half, v times
    # the second, shared by the heads) and one for the MLP (fc1's output, before GELU)
    for p in reference.parameters():
        p.requires_grad_(False)
    head_dim = reference.blocks[0].attn.head_dim
    hidden = reference.blocks[0].mlp.fc1.out_features
    alphas = []
    for _ in reference.blocks:
        alphas += [nn.Parameter(torch.ones(1, 1, 1, 2 * head_dim)), nn.Parameter(torch.ones(1, 1, hidden))]
    opt = torch.optim.Adam(alphas, lr=lr, betas=(0.9, 0.999), eps=1e-4, weight_decay=0)
    z = [torch.zeros_like(a) for a in alphas]
    gamma = [torch.zeros_like(a) for a in alphas]
    record = [torch.zeros_like(a) for a in alphas]
    data = batches()
    for t in range(steps):
        b = next(data)
        F.cross_entropy(_their_deit_search_forward(reference, b["pixel_values"], alphas), b["labels"]).backward()
        opt.step()
        opt.zero_grad()
        step_size = lr / (1 - 0.9 ** (t + 1))
        with torch.no_grad():
            for i, a in enumerate(alphas):
                z[i] += step_size * 1.0 * (a - gamma[i])
                gamma[i] = torch.relu(torch.relu(1 - lam / z[i].abs()) * z[i])
                if t % 10 == 0 or t == steps - 1:  # engine.py: i % interval == 0 (one epoch here), or the last step
                    record[i] += (gamma[i] != 0).float()
    assert sorted(method.search) == sorted(f"blocks.{i}.{kind}" for i in range(len(reference.blocks)) for kind in ("qk", "vo", "ffn"))
    for i in range(len(reference.blocks)):
        attn, mlp = 2 * i, 2 * i + 1
        theirs = {"qk": (attn, slice(0, head_dim)), "vo": (attn, slice(head_dim, 2 * head_dim)), "ffn": (mlp, slice(None))}
        for kind, (j, cut) in theirs.items():
            ours = method.search[f"blocks.{i}.{kind}"]
            for field, their_field in (("m", alphas), ("z", z)):
                torch.testing.assert_close(ours[field], their_field[j].detach().reshape(-1)[cut], rtol=1e-5, atol=1e-6, msg=f"blocks.{i}.{kind} {field}")
            assert torch.equal(ours["support"].float(), record[j].reshape(-1)[cut]), (i, kind)
    if steps == 30:
        assert sum(int(r.sum()) for r in record) > 0  # entries did enter the support


# ----------------------------------------------------------------------------- zeroed masks
@pytest.mark.parametrize("method, frequency", [("seven", 1), ("magnitude", 1), ("random", 1), ("seven", 2)])
def test_zeroed_masks_train_exactly_as_the_parametrization(tmp_path: Path, method: str, frequency: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's fast masks (gradients of pruned weights zeroed before clipping, pruned
    weights zeroed after every optimizer step) give the same masks and the same model as
    ``W * mask`` in every forward, under AdamW with weight decay and clipping. With a mask
    step every other step, the steps between zero the pruned weights themselves (Adam's
    moments would move them)."""
    from pruneflow.methods.score_based import ScoreBasedMethod

    args = [f"method={method}", "sparsity=0.6", "trainer.weight_decay=0.05", "trainer.max_grad_norm=0.5", *stages(3, 8, 3, 3e-3),
            f"schedule.frequency={frequency}"]
    runs: dict[str, tuple[list[torch.Tensor], dict[str, torch.Tensor]]] = {}
    for mode in ("zero", "parametrize"):
        if mode == "parametrize":
            monkeypatch.setattr(ScoreBasedMethod, "use_zeroed_masks", lambda self: False)
        run = prepared(tmp_path / mode, *args)
        masks = record_masks(run)
        zero_after_step: list[bool] = []
        hook = run.method.after_optimizer_step

        def check(step: int, grads_finite: bool = True, hook=hook, run=run, log=zero_after_step) -> None:  # noqa: ANN001
            hook(step, grads_finite)
            m = run.method
            log.append(all(bool((w.param[m.mask_view(i) == 0] == 0).all()) for i, w in enumerate(m.ctx.weights)))

        run.method.after_optimizer_step = check
        run.execute()
        assert run.method.mask_mode == mode
        if mode == "zero":
            assert all(zero_after_step), "a pruned weight was non-zero after an optimizer step"
        runs[mode] = (masks, final_weights(run))
    (zm, zw), (pm, pw) = runs["zero"], runs["parametrize"]
    assert len(zm) == len(pm) == 8
    for k, (a, b) in enumerate(zip(zm, pm, strict=True)):
        assert torch.equal(a, b), f"mask differs after prune step {k}"
    for name in pw:
        assert torch.allclose(zw[name], pw[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("method", ["seven", "magnitude", "random"])
def test_zeroed_masks_zero_the_weights_once_per_mask_step(tmp_path: Path, method: str) -> None:
    """Methods whose scores never read a pruned weight leave the zeroing after the
    optimizer step to the mask update at mask steps (one pass over the weights, not
    two); other steps zero them directly. Either way they are zero afterwards (the
    test above)."""
    run = prepared(tmp_path, f"method={method}", "sparsity=0.6", "schedule.frequency=2", *stages(3, 8, 3, 3e-3))
    m = run.method
    calls: list[tuple[int, bool]] = []  # (step, whether it is a mask step) of each direct zeroing
    current = {"step": -1}
    zero, hook = m._zero_pruned, m.after_optimizer_step

    def counted(grads: bool) -> None:
        if not grads:
            calls.append((current["step"], m.is_mask_step(current["step"])))
        zero(grads)

    def check(step: int, grads_finite: bool = True) -> None:
        current["step"] = step
        hook(step, grads_finite)

    m._zero_pruned, m.after_optimizer_step = counted, check
    run.execute()
    assert m.mask_mode == "zero" and type(m).pruned_weights_unread
    assert calls, "no step zeroed the weights directly"
    assert all(not mask_step for _, mask_step in calls), "a mask step zeroed the weights before the mask update"
    assert len(calls) == 8 - sum(m.is_mask_step(s) for s in range(8)) > 0, calls  # every other step
