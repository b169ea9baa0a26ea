"""GraSP (Wang, Zhang & Grosse, ICLR 2020): Gradient Signal Preservation.

Scores every weight by ``S = -W * (H g)``, with g the gradient of the loss and H its
Hessian, and removes the weights of *largest* S (those whose removal least reduces
the gradient flow). As the authors' code: the loss is computed on logits divided
by a temperature (``method.temperature``, their 200); a first pass sums g over the
scoring batches (no graph), a second pass takes z = g(x)^T stop_grad(g) per batch
and back-propagates it, which accumulates ``H g``. The (pre)trained model is not
updated (as ``seven_pre``); the stage's steps are the scoring batches of each pass.
Attention runs through the math kernel here: the fused ones have no second derivative.

As the authors' code (``alecwangcq/GraSP``, ``pruner/GraSP_ImageNet.py``): the last
``nn.Linear`` of the model (the classifier) is re-initialized with Xavier normal for
the scoring passes (``method.reinit_head``; their CIFAR script re-initializes every
Linear, which in their CNNs is the classifier alone) and restored afterwards; the
train-mode forward (a freshly built network in both scripts; ``GraSP.py``'s ``.eval()``
is commented out); ``method.selection=authors``
removes the scores above the ``int(n * s)``-th largest of ``-W * Hg`` (the one at it
stays), as their ``topk(...)[-1]`` with ``<=``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pruneflow.errors import UserError, check_bool, invalid
from pruneflow.methods.base import PruneContext
from pruneflow.methods.score_based import ScoreBasedMethod, keep_from_kth_smallest_

log = logging.getLogger("pruneflow")


def tempered_loss(task: Any, bundle: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:  # noqa: ANN401
    """The task loss on logits / T (classification and question answering; regression: T = 1)."""
    loss, logits = task.loss_and_logits(bundle, batch)
    if task.problem == "single_label_classification":
        return F.cross_entropy(logits[0] / temperature, batch["labels"])
    if task.problem == "question_answering":
        n = logits[0].shape[-1]
        s = F.cross_entropy(logits[0] / temperature, batch["start_positions"].clamp(0, n), ignore_index=n)
        e = F.cross_entropy(logits[1] / temperature, batch["end_positions"].clamp(0, n), ignore_index=n)
        return (s + e) / 2
    return loss


def authors_threshold_index(n: int, sparsity: float) -> int:
    """``int(n * s)`` with s through their float round trip (``main_prune_*.py``:
    ``ratio = 1 - (1 - target) ** (1 / num_iterations)``, one iteration; ``GraSP()``:
    ``keep_ratio = 1 - ratio``, ``int(n * (1 - keep_ratio))``): at BERT-base's 85M one
    less than ``int(n * 0.1)`` at s = 0.1 and 0.2."""
    ratio = 1 - (1 - sparsity) ** (1.0 / 1)
    keep_ratio = 1 - ratio
    return int(n * (1 - keep_ratio))


class GraSP(ScoreBasedMethod):
    name = "grasp"
    updates_weights = False

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        t = cfg.get("temperature", 200.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise invalid("method.temperature", t, "a positive number (the authors use 200)")
        self.temperature = float(t)
        self.reinit_head = check_bool(cfg.get("reinit_head", True), "method.reinit_head")
        per_class = cfg.get("samples_per_class")
        if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
            raise invalid("method.samples_per_class", per_class,
                          "null (the prune stage's batches, their ImageNet script) or an integer >= 1 (that many examples of "
                          "every class per scoring step, their CIFAR scripts: 10 for CIFAR-10)")
        self.samples_per_class: int | None = per_class

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        out = [("schedule", "method=grasp prunes once, after its two scoring passes")]
        if self.samples_per_class is not None:
            out.append(("stages.prune.batch_size", f"method.samples_per_class={self.samples_per_class} draws each scoring "
                                                   "step's examples by class"))
        return out

    def check_task(self, task: Any) -> None:  # noqa: ANN401
        if self.samples_per_class is not None and task.problem != "single_label_classification":
            raise invalid("method.samples_per_class", self.samples_per_class, f"null with a {task.problem.replace('_', ' ')} task",
                          "A class-balanced draw needs class labels.")
        if self.samples_per_class is not None and getattr(task, "train_set", None) is not None:
            balanced_halves(task, self.samples_per_class, 0)  # enough examples of every class, before any training

    def selection_scores(self) -> torch.Tensor:
        return self.state["scores"]

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """Theirs: remove ``-score`` above its k-th largest, i.e. keep every score >= its
        k-th smallest (k: :func:`authors_threshold_index`)."""
        keep_from_kth_smallest_(scores, authors_threshold_index(scores.numel(), sparsity), out)

    def run_prune_stage(self, ctx: PruneContext) -> bool:
        bundle, task = ctx.extra.get("bundle"), ctx.task
        if bundle is None and (ctx.batches is None or ctx.loss_fn is None):  # pruneflow.methods.create without data
            raise UserError(
                "method=grasp scores the model on batches of your data: pass batches= (a function returning an iterator "
                "of batches) and loss_fn= (model, batch) -> loss to pruneflow.methods.create or attach, then call "
                "pruner.run(). The loss is taken on logits / method.temperature: the output of the model's last "
                "nn.Linear is divided by it during the scoring passes."
            )
        if bundle is None and self.samples_per_class is not None:
            raise invalid("method.samples_per_class", self.samples_per_class, "null from your own code",
                          "The class-balanced draw reads a pruneflow task's training set; pass balanced batches= instead.")
        params = [w.param for w in ctx.weights]
        model = ctx.model
        model.train()
        # H g over their weights: every Linear and Conv2d weight of the model (the head and
        # pooler too), whether pruned or not, plus any other tensor in the pruned set (no
        # GraSP setting adds one; a caller's own set through the API may)
        everything = linear_and_conv_weights(model)
        known = {id(p) for p in everything}
        everything += [p for p in params if id(p) not in known]
        grad_was = [p.requires_grad for p in everything]

        def batches():  # noqa: ANN202 - the same batches for both passes
            data = ctx.batches()
            return [next(data) for _ in range(ctx.total_steps)]

        stage = ctx.extra.get("stage")
        if self.samples_per_class is None:
            chosen = batches()
        else:
            trainer = ctx.extra["trainer"]
            chosen = [trainer.to_device(half) for step in range(ctx.total_steps)
                      for half in balanced_halves(task, self.samples_per_class, getattr(stage, "seed", 0) * 100_003 + step)]
        head = reinit_last_linear(model, getattr(stage, "seed", None)) if self.reinit_head else None
        try:
            for p in everything:
                p.requires_grad_(True)
            if bundle is not None:
                self._score(lambda b: tempered_loss(task, bundle, b, self.temperature), params, everything, chosen)
            else:
                with logits_divided(model, self.temperature):
                    self._score(lambda b: ctx.loss_fn(model, b), params, everything, chosen)
        finally:
            for p, was in zip(everything, grad_was, strict=True):
                p.requires_grad_(was)
            if head is not None:
                with torch.no_grad():
                    head[0].copy_(head[1])
        model.zero_grad(set_to_none=True)
        self.update_masks(self.sparsity)
        return True

    def _score(self, loss: Callable[[Any], torch.Tensor], params: list[torch.Tensor], everything: list[torch.Tensor],
               chosen: list[Any]) -> None:
        """``self.state["scores"] = W * Hg`` of the prunable ``params``, with g and H over
        ``everything``, summed over the scoring batches (two passes)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            g_sum = [torch.zeros_like(p) for p in everything]
            for batch in chosen:
                grads = torch.autograd.grad(loss(batch), everything, allow_unused=True)
                for acc, g in zip(g_sum, grads, strict=True):
                    if g is not None:
                        acc.add_(g)
            hg = [torch.zeros_like(p) for p in everything]
            for batch in chosen:
                grads = torch.autograd.grad(loss(batch), everything, create_graph=True, allow_unused=True)
                z = sum((g * s).sum() for g, s in zip(grads, g_sum, strict=True) if g is not None)
                second = torch.autograd.grad(z, everything, allow_unused=True)
                for acc, h in zip(hg, second, strict=True):
                    if h is not None:
                        acc.add_(h.detach())
        hg_of = {id(p): h for p, h in zip(everything, hg, strict=True)}
        with torch.no_grad():
            for i, p in enumerate(params):
                h = hg_of[id(p)]
                # GraSP removes the largest -W*Hg: keep the largest W*Hg (a re-initialized
                # head, if prunable, is scored by its new weights, as theirs)
                torch.mul(p.detach(), h, out=self.view("scores", i))


def balanced_halves(task: Any, per_class: int, seed: int) -> list[dict[str, torch.Tensor]]:  # noqa: ANN401
    """Their ``GraSP_fetch_data``: the first ``per_class`` examples of every class in a
    shuffled pass over the training set, ordered by class, cut into two halves (so the
    halves hold different classes, as theirs)."""
    data = task.train_set
    n_classes = int(task.num_labels)
    picked: list[list[int]] = [[] for _ in range(n_classes)]
    for j in torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist():
        label = int(data[j]["labels"])
        if len(picked[label]) < per_class:
            picked[label].append(j)
            if all(len(p) == per_class for p in picked):
                break
    short = {c: len(p) for c, p in enumerate(picked) if len(p) < per_class}
    if short:
        raise invalid("method.samples_per_class", per_class, f"at most {min(len(p) for p in picked)} here",
                      f"The training set has fewer than {per_class} examples of class(es) "
                      + ", ".join(f"{c} ({k})" for c, k in sorted(short.items())) + ".")
    rows = [data[j] for p in picked for j in p]
    half = len(rows) // 2
    return [task.collate(rows[:half]), task.collate(rows[half:])]


@contextlib.contextmanager
def logits_divided(model: nn.Module, temperature: float) -> Iterator[None]:
    """The output of the model's last ``nn.Linear`` (its logits) divided by ``temperature``
    while in the block: a caller's own loss function then sees logits / T."""
    head = last_linear(model)
    if head is None:
        raise UserError(f"method=grasp divides the logits by method.temperature at the model's last nn.Linear; "
                        f"{type(model).__name__} has none.")
    handle = head.register_forward_hook(lambda _m, _i, out: out / temperature)
    try:
        yield
    finally:
        handle.remove()


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The model's last ``nn.Linear`` in module order: its classifier (BERT's
    ``classifier``, ViT's ``head``, the authors' CNNs' only Linear)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def weight_of(module: nn.Module) -> torch.Tensor:
    """The trainable weight tensor (under a mask parametrization, its original)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def linear_and_conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [weight_of(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def reinit_last_linear(model: nn.Module, seed: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Re-initialize the weight of the model's last ``nn.Linear`` (the classifier of
    BERT, ViT and the authors' CNNs) with Xavier normal, from a generator of its own so
    the run's other random streams are unchanged. Returns (weight, saved copy)."""
    head = last_linear(model)
    if head is None:
        return None
    log.info("GraSP: %s re-initialized (Xavier normal) for the scoring passes, as the authors' code does with the "
             "classifier (method.reinit_head=false keeps it)", next(n for n, m in model.named_modules() if m is head))
    weight = weight_of(head)
    saved = weight.detach().clone()
    gen = torch.Generator(device=weight.device).manual_seed(torch.initial_seed() if seed is None else int(seed))
    with torch.no_grad():
        fresh = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        nn.init.xavier_normal_(fresh, generator=gen)
        weight.copy_(fresh)
    return weight, saved
