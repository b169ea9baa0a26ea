"""Gradient-scored pruning of causal LMs: ``seven_pre``, ``snip`` and ``force`` on
``task=lm/...``.

These methods score weights from loss gradients without updating them (the setting of
SEVEN's pre-pruning figure), so unlike Wanda or SparseGPT they cannot go block by block:
every scoring step is a forward and backward pass of the whole model on a batch of
calibration windows (``calibration.batch_size`` windows, next-token loss), after which
the method's hooks run exactly as in the encoder trainer (``after_backward``, then
``after_optimizer_step`` with no optimizer step in between) and the mask follows the
schedule over the ``ceil(nsamples / batch_size)`` steps. Pruned weights are zeroed in
place; the model is left with plain (unparametrized) sparse weights.

Memory: gradients of the prunable weights plus the method's float32 state (SEVEN: score,
first and second moment, 12 bytes per prunable weight) on the device, so this fits models
of up to about 1-2B parameters on one 80 GB GPU, not a 7B one; ``model.offload`` does
not apply. Non-prunable parameters (embeddings, norms, head) get no gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from pruneflow.masking import MaskedWeights, PrunableWeight
from pruneflow.methods.base import PruneContext
from pruneflow.methods.score_based import ScoreBasedMethod
from pruneflow.schedules import Schedule

log = logging.getLogger("pruneflow")

#: methods that prune a causal LM from gradients without weight updates
GRADIENT_METHODS = ("seven_pre", "snip", "force")


def lm_method_class(name: str, why: str = "The methods that prune a causal LM from calibration data.") -> tuple[type, bool]:
    """The class that prunes a causal LM with method ``name`` (its one-shot form, or the
    method itself for the gradient-scored ones) and whether it scores from gradients."""
    from pruneflow.errors import invalid
    from pruneflow.methods import ONE_SHOT_METHODS, get_method_class, get_one_shot_class

    allowed = sorted([*ONE_SHOT_METHODS, *GRADIENT_METHODS])
    if name not in allowed:
        raise invalid("method", name, allowed, why)
    gradient = name in GRADIENT_METHODS
    return (get_method_class(name) if gradient else get_one_shot_class(name)), gradient


def prunable_weights(linears: dict[str, nn.Linear]) -> MaskedWeights:
    """The weights of the named Linears (their full module names), in order."""
    return MaskedWeights([PrunableWeight(name=f"{n}.weight", module_name=n, module=lin) for n, lin in linears.items()])


def scoring_batches(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Calibration windows (nsamples, seqlen) in consecutive batches; the last may be short."""
    return [samples[i : i + batch_size] for i in range(0, samples.shape[0], batch_size)]


def n_steps(nsamples: int, batch_size: int) -> int:
    return math.ceil(nsamples / batch_size)


def prune_blocks_with_gradients(pruner, method: ScoreBasedMethod, samples: torch.Tensor, batch_size: int,  # noqa: ANN001
                                schedule: Schedule, device: torch.device,
                                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """The prunable Linears of a :class:`~pruneflow.llm.blocks.BlockPruner`'s blocks, scored
    on ``samples`` in batches of ``batch_size`` and pruned (the CLI's and the API's path)."""
    weights = prunable_weights(pruner.named_linears())
    method.validate(pruner.model, weights)
    return score_and_prune(pruner.model, method, weights, scoring_batches(samples, batch_size), schedule, device, on_step)


def score_and_prune(
    model: nn.Module,
    method: ScoreBasedMethod,
    weights: MaskedWeights,
    batches: list[torch.Tensor],
    schedule: Schedule,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run the method's scoring steps on ``batches`` and leave the pruned weights zero in
    ``model``. Returns the loss of each step (of the model as pruned at that step)."""
    method.use_zeroed_masks()  # the hooks run in the trainer's order below
    method.setup(PruneContext(model=model, weights=weights, schedule=schedule, sparsity=method.sparsity,
                              total_steps=len(batches), device=device))
    prunable = {id(w.param) for w in weights}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout (OPT has 0.1): the scores of one calibration set are reproducible
    losses: list[float] = []
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in prunable)
        for step, ids in enumerate(tqdm(batches, desc=f"score ({method.name})", leave=False)):
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            finite = bool(torch.isfinite(loss)) and all(
                w.param.grad is None or bool(torch.isfinite(w.param.grad).all()) for w in weights)
            method.after_backward(step, finite)
            method.after_optimizer_step(step, finite)  # no optimizer step: the weights stay as they are
            model.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
        method.end_prune_stage()
        weights.bake()  # plain weights with the zeros; no parametrization left
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    return losses
