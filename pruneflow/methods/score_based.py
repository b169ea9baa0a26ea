"""Shared machinery for methods that rank weights by a score and keep the top ones.

A subclass says how its score evolves (``update_scores``, called after every
backward pass when ``uses_gradients``) and what the score used for selection is
(``selection_scores``); this class turns scores into masks at the schedule's
update steps: globally or per layer (``method.scope``), per weight or per
attention head / FFN neuron (``method.granularity``), with or without regrowth.

Layout, for speed at BERT-base scale (85M prunable weights, masks updated every
step): every per-weight state (scores, EMAs) lives in one flat buffer per state,
and the masks of all prunable weights are views into one flat mask buffer, so
that a global top-k is a single pass over one tensor (``pruneflow.topk``) and
no step allocates a score-sized temporary. Per-weight views of the flat buffers
(``self.view(name, i)``) have the weight's shape.

No regrowth: a pruned weight's selection score is ``-inf`` (the score update
writes it from the current mask), so it is never chosen again and ties with
genuinely zero scores cannot revive it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

import torch
from torch import nn

from pruneflow.errors import UserError, check_bool, invalid
from pruneflow.fused import MODES, Kernel, want_compile
from pruneflow.masking import Mask, MaskedWeights
from pruneflow.methods.base import PruneContext, PruningMethod
from pruneflow.methods.oneshot import check_nm_layer, parse_pattern, pattern_sparsity, prune_nm
from pruneflow.topk import TopK, kept_count, topk_mask

log = logging.getLogger("pruneflow")

SCOPES = ("global", "local")
GRANULARITIES = ("unstructured", "head", "neuron")
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- structured units
@dataclass
class UnitSlice:
    """How one weight matrix splits into units (heads or neurons) along one axis.

    Along ``axis`` (0: output rows, 1: input columns) the matrix has
    ``repeat * n_units * unit_size`` entries: ``repeat`` fused blocks (timm's
    ``attn.qkv`` stacks q, k, v: 3), each of ``n_units`` units of ``unit_size``.
    """

    weight_index: int
    axis: int
    repeat: int
    n_units: int
    unit_size: int

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        rows, cols = t.shape
        if self.axis == 0:
            return t.view(self.repeat, self.n_units, self.unit_size, cols)
        return t.view(rows, self.repeat, self.n_units, self.unit_size)

    def unit_sums(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sums of a weight-shaped tensor: shape (n_units,)."""
        return self._grouped(t).sum(dim=(0, 2, 3) if self.axis == 0 else (0, 1, 3))

    def expand_(self, unit_mask: torch.Tensor, out: torch.Tensor) -> None:
        """Write a per-unit 0/1 vector into the weight-shaped ``out``."""
        g = self._grouped(out)
        shape = (1, -1, 1, 1) if self.axis == 0 else (1, 1, -1, 1)
        g.copy_(unit_mask.view(shape).expand_as(g))


@dataclass
class UnitGroup:
    """The units of one block: its attention heads or its FFN neurons."""

    name: str
    n_units: int
    offset: int = 0  # index of the first unit in the model-wide unit vector
    members: dict[str, UnitSlice] = field(default_factory=dict)


# (regex over module names, role, axis, fused repeat). The group is the named prefix.
HEAD_RULES = [
    (re.compile(r"^(?P<g>.+\.attn)\.qkv$"), "qkv", 0, 3),  # timm ViT/DeiT/Swin: rows [q; k; v]
    (re.compile(r"^(?P<g>.+\.attn)\.proj$"), "out", 1, 1),
    (re.compile(r"^(?P<g>.+\.attention)\.self\.query$"), "q", 0, 1),  # transformers BERT family
    (re.compile(r"^(?P<g>.+\.attention)\.self\.key$"), "k", 0, 1),
    (re.compile(r"^(?P<g>.+\.attention)\.self\.value$"), "v", 0, 1),
    (re.compile(r"^(?P<g>.+\.attention)\.output\.dense$"), "out", 1, 1),
]
HEAD_MEMBERS = ({"qkv", "out"}, {"q", "k", "v", "out"})
NEURON_RULES = [
    (re.compile(r"^(?P<g>.+)\.mlp\.fc1$"), "in", 0, 1),  # timm
    (re.compile(r"^(?P<g>.+)\.mlp\.fc2$"), "out", 1, 1),
    (re.compile(r"^(?P<g>.+)\.intermediate\.dense$"), "in", 0, 1),  # transformers
    (re.compile(r"^(?P<g>.+(?<!\.attention))\.output\.dense$"), "out", 1, 1),
]
NEURON_MEMBERS = ({"in", "out"},)


def _num_heads(model: nn.Module, group: str) -> int:
    for name in (group, f"{group}.self"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(mod, attr, None), int):
                return int(getattr(mod, attr))
    n = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(n, int):
        return n
    raise UserError(f"method.granularity=head: cannot find the number of attention heads of '{group}'.")


def build_units(model: nn.Module, weights: MaskedWeights, granularity: str) -> list[UnitGroup]:
    """Split the prunable weights into heads or neurons, and narrow ``weights`` (in
    place) to the weights those units own: with structured granularity the prunable
    set is the attention Q, K, V, output matrices (heads) or FFN in/out (neurons)."""
    rules, complete = (HEAD_RULES, HEAD_MEMBERS) if granularity == "head" else (NEURON_RULES, NEURON_MEMBERS)
    found: dict[str, dict[str, int]] = {}
    for i, w in enumerate(weights):
        for rx, role, _, _ in rules:
            m = rx.match(w.module_name)
            if m:
                found.setdefault(m.group("g"), {})[role] = i
                break
    groups: list[UnitGroup] = []
    keep: list[int] = []
    offset = 0
    for gname, roles in found.items():
        if set(roles) not in complete:
            need = " or ".join("+".join(sorted(c)) for c in complete)
            raise UserError(
                f"method.granularity={granularity}: block '{gname}' has only {sorted(roles)} among the prunable "
                f"weights; a {granularity} owns {need}. Adjust method.include/method.exclude so that each block's "
                "units are prunable as a whole."
            )
        if granularity == "head":
            n_units = _num_heads(model, gname)
        else:
            n_units = weights.weights[roles["in"]].shape[0]
        group = UnitGroup(name=gname, n_units=n_units, offset=offset)
        for rx, role, axis, repeat in rules:
            if role not in roles or not rx.match(weights.weights[roles[role]].module_name):
                continue
            i = roles[role]
            length = weights.weights[i].shape[axis]
            if length % (repeat * n_units):
                raise UserError(f"method.granularity={granularity}: {weights.weights[i].name} has {length} "
                                f"{'rows' if axis == 0 else 'columns'}, not divisible into {repeat}x{n_units} units.")
            group.members[role] = UnitSlice(i, axis, repeat, n_units, length // (repeat * n_units))
            keep.append(i)
        groups.append(group)
        offset += n_units
    if not groups:
        raise UserError(
            f"method.granularity={granularity}: no {'attention blocks' if granularity == 'head' else 'FFN blocks'} "
            "among the prunable weights (timm blocks.N.attn.qkv/proj and mlp.fc1/fc2, or transformers "
            "attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense)."
        )
    # Renumber members to the narrowed weight list.
    keep = sorted(set(keep))
    new_index = {old: new for new, old in enumerate(keep)}
    dropped = [w.name for i, w in enumerate(weights) if i not in new_index]
    weights.weights[:] = [weights.weights[i] for i in keep]
    for g in groups:
        for s in g.members.values():
            s.weight_index = new_index[s.weight_index]
    if dropped:
        log.info("granularity=%s: %d prunable weights not owned by a %s are left dense (e.g. %s)", granularity, len(dropped), granularity, dropped[0])
    return groups


# ----------------------------------------------------------------------------- masks
class _MaskInto(torch.autograd.Function):
    """``weight * mask`` written into a given buffer; the gradient is ``grad * mask``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        torch.mul(weight, mask, out=out)
        ctx.save_for_backward(mask)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (mask,) = ctx.saved_tensors
        # The incoming gradient of the effective weight is a fresh matmul result that
        # nothing else reads: masking it in place saves a weight-sized allocation per
        # layer per step (page faults at BERT-base scale). Anything else (an expanded
        # or shared gradient) gets a new tensor.
        if grad.is_contiguous() and grad.shape == mask.shape and grad.dtype == mask.dtype and not grad.requires_grad:
            return grad.mul_(mask), None, None
        return grad * mask, None, None


class ReusedBufferMask(Mask):
    """The mask parametrization (``W -> W * mask``) writing the effective weight into
    a buffer kept across steps instead of a fresh tensor: at BERT-base scale a fresh
    340 MB of effective weights per forward costs 0.1-0.2 s of page faults on a CPU.
    The buffer is a plain attribute (not saved). A graph still holding last step's
    effective weight would see it overwritten: autograd's version check raises then."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = self.__dict__.get("_out")
        if out is None or out.shape != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
            out = torch.empty_like(weight, requires_grad=False)
            self.__dict__["_out"] = out
        return _MaskInto.apply(weight, self.mask, out.detach())


class _STEMask(torch.autograd.Function):
    """``W * mask`` written into a reused buffer, whose mask came from trainable scores:
    the gradient reaches the weights masked (``g * mask``) and the scores straight
    through (``g * W``, Sanh et al.'s estimator: the mask's gradient is given to the
    scores unchanged). As ``_MaskInto``: no weight-sized allocation for the forward's
    output nor for the weights' gradient (the incoming one is masked in place)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        torch.mul(weight, mask, out=out)
        ctx.save_for_backward(weight, mask)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        weight, mask = ctx.saved_tensors
        g_scores = grad * weight  # before grad is masked in place
        if grad.is_contiguous() and grad.shape == mask.shape and grad.dtype == mask.dtype and not grad.requires_grad:
            return grad.mul_(mask), g_scores, None, None
        return grad * mask, g_scores, None, None


class ScoreMask(Mask):
    """Mask parametrization for methods with trainable scores (movement pruning): in
    the forward ``W * mask``, with the scores receiving ``g * W`` through the
    straight-through estimator. The scores live in the method (one flat parameter);
    ``bind`` gives this layer its view. Frozen (after the prune stage) it is a plain
    ``Mask`` with the same state-dict keys."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask)
        self.frozen = False

    def bind(self, scores: Any) -> None:  # noqa: ANN401 - a callable returning this layer's score view
        self.__dict__["_scores"] = scores

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scores = self.__dict__.get("_scores")
        if self.frozen or scores is None or not torch.is_grad_enabled():
            return weight * self.mask
        out = self.__dict__.get("_out")
        if out is None or out.shape != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
            out = torch.empty_like(weight, requires_grad=False)
            self.__dict__["_out"] = out
        return _STEMask.apply(weight, scores(), self.mask, out.detach())


class _PassGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, None


class PassMask(Mask):
    """``W * mask`` whose backward hands the weights the gradient of the masked weight
    at every entry, pruned ones included (FORCE scores pruned weights by it to let
    them return). For scoring without weight updates only."""

    frozen = False  # after the prune stage: a plain mask (pruned weights get no gradient)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen or not torch.is_grad_enabled():
            return weight * self.mask
        return _PassGrad.apply(weight, self.mask)


# ----------------------------------------------------------------------------- the method
def mask_scores_(scores: torch.Tensor, mask: torch.Tensor) -> None:
    """Pruned entries score -inf (in place)."""
    scores.masked_fill_(mask == 0, NEG_INF)


def ema_coefficient(cfg, key: str, default: float) -> float:  # noqa: ANN001
    """``method.<key>``, an exponential-moving-average coefficient in [0, 1)."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise invalid(f"method.{key}", value, "a number in [0, 1) (EMA coefficient)")
    return float(value)


def written_keep(sparsity: float) -> float:
    """The kept fraction as one writes it for an authors' script (PLATON's
    ``--final_threshold 0.10``, FORCE's ``--pruning_factor 0.2``) from pruneflow's sparsity:
    1 - 0.9 in decimal, 0.1, not the float 0.09999999999999998."""
    return float(Decimal(1) - Decimal(repr(float(sparsity))))


def kept_floor(total: int, keep: float) -> int:
    """``int(keep * total)``, the authors' count (SEVEN, movement pruning); the tiny
    epsilon absorbs a float error below 1e-9 in ``keep * total`` (keep = 1 - 0.9 counting
    as 0.1 on small layers). Over tens of millions of entries the error of 1 - s can pass
    it: PLATON and FORCE compute their authors' own expressions (:func:`written_keep`)."""
    return max(0, min(total, int(math.floor(keep * total + 1e-9))))


def authors_cubic(initial: float, final: float, progress: float) -> float:
    """The cubic ramp as Sanh et al.'s ``schedule_threshold`` and PLATON's
    ``schedule_threshold_comb`` compute it: ``final + (initial - final) * c ** 3`` with
    ``c = 1 - progress`` (the algebraically equal forms round differently)."""
    return final + (initial - final) * (1.0 - progress) ** 3


def sanh_keep(method: ScoreBasedMethod, sparsity: float, step: int | None) -> float:
    """The kept fraction of Sanh et al.'s ``schedule_threshold`` (movement pruning and its
    magnitude baseline): on the cubic ramp in their order of operations, ``final + (1 -
    final) * c ** 3`` with ``final`` as written on their command line (0.1 for sparsity
    0.9, not the float 1 - 0.9); elsewhere ``1 - sparsity`` as written. Their top-k keeps
    ``int(keep * n)``: the algebraically equal forms can round to one weight apart."""
    if method.on_ramp(sparsity, step, "cubic"):
        final = written_keep(method.sparsity)
        return authors_cubic(1.0, final, method.ctx.schedule.progress(step))
    return written_keep(sparsity)


def sanh_kept_count(method: ScoreBasedMethod, n: int, sparsity: float, step: int | None) -> int:
    """Their ``TopKBinarizer`` / ``MagnitudeBinarizer`` count: ``int(keep * n)``."""
    return max(0, min(n, int(sanh_keep(method, sparsity, step) * n)))


@torch.no_grad()
def keep_from_kth_largest_(scores: torch.Tensor, keep: int, out: torch.Tensor) -> None:
    """Threshold at the ``keep``-th largest score and keep every score >= it (ties at
    the threshold kept too): SEVEN's and FORCE's ``topk(...)[-1]`` rule."""
    if keep <= 0:
        out.zero_()
        return
    threshold = torch.topk(scores.reshape(-1), keep, sorted=False).values.min()
    out.copy_((scores >= threshold).view_as(out))


@torch.no_grad()
def keep_from_kth_smallest_(scores: torch.Tensor, prune: int, out: torch.Tensor) -> None:
    """Threshold at the ``prune``-th smallest score and keep every score >= it (so the
    entry at the threshold stays): PLATON's ``kthvalue`` rule, and GraSP's (which keeps
    ``-score <= `` the ``prune``-th largest of ``-score``)."""
    if prune <= 0:
        out.fill_(1)
        return
    threshold = torch.kthvalue(scores.reshape(-1).float(), prune).values
    out.copy_((scores >= threshold).view_as(out))


SELECTIONS = ("exact", "authors")
MASK_MODES = ("parametrize", "zero", "inplace", "ste", "pass")


class ScoreBasedMethod(PruningMethod):
    uses_gradients: ClassVar[bool] = False
    #: default of ``method.regrowth``: may a pruned weight come back when its score rises again?
    default_regrowth: ClassVar[bool] = False
    #: how masks act on the model during the prune stage:
    #: ``parametrize`` W * mask in every forward (gradients of pruned weights are 0);
    #: ``inplace`` pruned weights are zeroed in place at mask updates only and train
    #: in between (PLATON's code); ``ste`` W * mask with trainable scores (movement);
    #: ``zero`` the fast, equivalent form of ``parametrize`` that pruneflow's trainer
    #: selects (``use_zeroed_masks``).
    mask_mode: ClassVar[str] = "parametrize"
    #: whether ``update_scores`` and ``selection_scores`` (without regrowth) give pruned
    #: entries the same scores whatever their weights hold (SEVEN masks them to -inf,
    #: magnitude too, random ignores weights): then in ``zero`` mode the pruned weights
    #: are zeroed once per mask step, by the mask update, instead of twice
    pruned_weights_unread: ClassVar[bool] = False
    #: flat per-weight state buffers this method keeps (all start at 0 when pruning starts)
    state_names: ClassVar[tuple[str, ...]] = ("scores",)

    def __init__(self, cfg, sparsity: float) -> None:  # noqa: ANN001
        super().__init__(cfg, sparsity)
        self.scope = cfg.get("scope", "global")
        if self.scope == "auto":  # magnitude: one global threshold when training (per layer one shot on LLMs)
            self.scope = "global"
        if self.scope not in SCOPES:
            raise invalid("method.scope", self.scope, (*SCOPES, "auto"), "auto: global while training, per layer one shot on causal LMs.")
        self.granularity = cfg.get("granularity", "unstructured") or "unstructured"
        if self.granularity not in GRANULARITIES:
            raise invalid("method.granularity", self.granularity, GRANULARITIES)
        self.compile_mode = str(cfg.get("compile", "auto")).lower()
        if self.compile_mode not in MODES:
            raise invalid("method.compile", cfg.get("compile"), MODES, "auto compiles the per-step kernels on CPU for large models.")
        self.selection = str(cfg.get("selection", "exact"))
        if self.selection not in SELECTIONS:
            raise invalid("method.selection", self.selection, SELECTIONS,
                          "exact keeps exactly the scheduled number of weights; authors uses the authors' count and tie rule (ties by position where their sort leaves the order open).")
        self.regrowth = check_bool(cfg.get("regrowth", self.default_regrowth), "method.regrowth")
        if self.granularity != "unstructured" and self.selection != "exact":
            raise invalid("method.selection", self.selection, "exact", f"with method.granularity={self.granularity} units are ranked exactly.")
        # N:M (``method.pattern``, where a method's config offers it): the N highest scores
        # of every M consecutive inputs of a row are kept, the projection ADMM and 2:4
        # kernels use; the mask is set once the schedule reaches its target.
        self.pattern = parse_pattern(cfg.get("pattern"))
        if self.pattern is not None and self.granularity != "unstructured":
            raise invalid("method.granularity", self.granularity, "unstructured with method.pattern (N:M groups are of single weights)")
        if self.pattern is not None and self.selection != "exact":
            raise invalid("method.selection", self.selection, "exact with method.pattern (N:M keeps exactly N of every M)")
        self.units: list[UnitGroup] | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.k = 0  # score updates taken, for bias corrections
        self.scores_masked = False  # scores hold -inf at every entry the current mask prunes
        self.frozen = False  # set by end_prune_stage: later hook calls change nothing
        self.mask_mode = type(self).mask_mode
        self.zero_on_update = False  # zero pruned entries of the trainable tensors at every mask update

    @classmethod
    def resolve_sparsity(cls, cfg, requested: float | None) -> float:  # noqa: ANN001
        return pattern_sparsity(cfg, requested, cls.default_sparsity)

    def use_zeroed_masks(self) -> bool:
        """Switch ``parametrize`` to ``zero`` when the caller's loop runs the hooks as
        pruneflow's trainer does (``after_backward`` before clipping and the optimizer
        step, ``after_optimizer_step`` after it). Then no ``W * mask`` is computed in the
        forward pass nor ``grad * mask`` allocated in the backward: the gradients of
        pruned weights are zeroed in place before clipping and the pruned weights after
        every optimizer step. Every forward sees the same weights and every kept weight
        gets the same update as under the parametrization; only the never-read values
        of pruned entries differ (0 here, drifting under Adam's old moments there), so
        methods that can regrow a weight keep the parametrization. Returns whether it
        switched. Call before ``setup``."""
        if self.mask_mode == "parametrize" and not self.regrowth and self.ctx is None:
            self.mask_mode = "zero"
            return True
        return False

    @torch.no_grad()
    def _zero_pruned(self, grads: bool) -> None:
        tensors = [w.param.grad if grads else w.param.data for w in self.ctx.weights]
        pairs = [(t, self.mask_view(i)) for i, t in enumerate(tensors) if t is not None]
        if pairs:
            torch._foreach_mul_([t for t, _ in pairs], [m for _, m in pairs])

    def after_backward(self, step: int, grads_finite: bool = True) -> None:
        if self.mask_mode == "zero" and not self.frozen:
            self._zero_pruned(grads=True)  # as the parametrization's backward (g * mask), before clipping

    # --- to override -----------------------------------------------------------
    def init_state(self) -> None:
        """Called once at setup, after the flat state buffers are zeroed."""

    def update_scores(self, step: int) -> None:
        """Accumulate the score from this step's gradients and the updated weights."""

    def selection_scores(self) -> torch.Tensor:
        """The flat scores to rank; without regrowth pruned entries must be -inf.

        Score updates that already wrote -inf from the current mask set
        ``self.scores_masked`` and save this extra pass."""
        scores = self.state["scores"]
        if not self.regrowth and not self.scores_masked:
            self.mask_scores(scores, self.mask_flat)
        return scores

    def is_mask_step(self, step: int) -> bool:
        """Whether the mask is recomputed after ``step`` (the schedule's, by default)."""
        return self.ctx.schedule.is_update_step(step)

    def target_sparsity(self, step: int) -> float:
        return self.ctx.schedule.sparsity(step)

    def authors_mask_(self, scores: torch.Tensor, sparsity: float, out: torch.Tensor, step: int | None = None) -> None:
        """``method.selection=authors``: the authors' count and tie rule, written into
        ``out`` (``step``: the schedule step the mask is for; None outside the ramp).
        Default: ``int(keep * n)`` weights (movement pruning's top-k)."""
        self.topk.mask_(scores, kept_floor(scores.numel(), 1.0 - sparsity), out)

    # --- layout ------------------------------------------------------------------
    def view(self, name: str, i: int) -> torch.Tensor:
        """Weight-shaped view of state ``name`` for prunable weight ``i``."""
        start, n, shape = self.slices[i]
        return self.state[name][start : start + n].view(shape)

    def mask_view(self, i: int) -> torch.Tensor:
        start, n, shape = self.slices[i]
        return self.mask_flat[start : start + n].view(shape)

    def current_sparsity(self) -> float | None:
        mask = getattr(self, "mask_flat", None)  # also under mask_mode "zero", where no parametrization holds it
        if mask is None:
            return None
        return 1.0 - int(mask.count_nonzero()) / max(mask.numel(), 1)

    def kernel(self, fn) -> Kernel:  # noqa: ANN001
        """``fn`` compiled for this run's size and device when that pays off."""
        return Kernel(fn, self.compiled)

    # --- machinery ---------------------------------------------------------------
    def validate(self, model: nn.Module, weights: MaskedWeights) -> None:
        if self.pattern is not None:
            for w in weights:
                if w.attr != "weight":
                    raise invalid("method.biases", True, "false with method.pattern (N:M groups are weight-matrix inputs)")
                check_nm_layer(self.pattern, w.module_name, w.shape[1])
        if self.granularity != "unstructured":
            if any(w.attr != "weight" for w in weights):
                raise invalid("method.biases", True, f"false with method.granularity={self.granularity}",
                              "Heads and neurons own weight matrices; their biases are not pruned with them.")
            self.units = build_units(model, weights, self.granularity)

    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        weights = ctx.weights
        if self.granularity != "unstructured" and self.units is None:
            self.units = build_units(ctx.model, weights, self.granularity)
        first = weights.weights[0].param
        self.slices, start = [], 0
        for w in weights:
            self.slices.append((start, w.numel(), w.shape))
            start += w.numel()
        total = start
        # One flat mask; each parametrization's buffer becomes a view into it.
        self.mask_flat = torch.ones(total, dtype=first.dtype, device=first.device)
        if self.mask_mode == "parametrize":
            weights.attach(ReusedBufferMask)
        elif self.mask_mode == "ste":
            weights.attach(ScoreMask)
        elif self.mask_mode == "pass":
            weights.attach(PassMask)
        for i, w in enumerate(weights):
            if w.parametrization is not None:
                view = self.mask_view(i)
                view.copy_(w.mask)
                w.parametrization.mask = view
        self.state = {name: torch.zeros(total, dtype=torch.float32, device=first.device) for name in self.state_names}
        self.compiled = want_compile(self.compile_mode, total, first.device)
        if self.compiled:
            log.info("Compiling the per-step pruning kernels with torch.compile (%d prunable weights).", total)
        self.topk = TopK(compiled=self.compiled, remember=True)
        self.mask_scores = self.kernel(mask_scores_)
        self.k = 0
        self.frozen = False
        self.init_state()

    def after_optimizer_step(self, step: int, grads_finite: bool = True) -> None:
        """Scores from this step's gradients and the updated weights (as the authors'
        loops read them, after ``optimizer.step()``), then the mask on the schedule."""
        if self.frozen:
            return
        sources = self.gradient_sources()
        if sources and grads_finite and all(t.grad is None for t in sources):
            raise UserError(
                f"method={self.name} scores from gradients, but none of its {len(sources)} tensors that should have one "
                f"({'the prunable weights' if self.uses_gradients else 'its trainable scores'}) has a gradient at step {step}: "
                "the hook runs after loss.backward() and optimizer.step() and before optimizer.zero_grad() (the scores "
                "would otherwise stay as they were and the mask would be arbitrary). Weights frozen by trainer.freeze "
                "(requires_grad=False) cannot be scored by it."
            )
        mask_step = self.is_mask_step(step)
        # Adam's moments and weight decay moved pruned entries: zero them again. At a mask
        # step the mask update does it (after choosing the new mask), so when the scores
        # never read a pruned weight's value, zeroing before it too is one pass for nothing.
        # (N:M masks wait for the schedule's target without an update, so they zero here.)
        deferred = mask_step and self.pruned_weights_unread and self.pattern is None
        if self.mask_mode == "zero" and not deferred:
            self._zero_pruned(grads=False)
        if self.uses_gradients and grads_finite:
            self.update_scores(step)
            self.k += 1
        if mask_step:
            self.update_masks(self.target_sparsity(step), step)

    def gradient_sources(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` a step of this method reads (none: data-free)."""
        return [w.param for w in self.ctx.weights] if self.uses_gradients else []

    def grads(self) -> list[torch.Tensor | None]:
        """Gradients of the prunable weights: G * mask under the parametrization and in
        ``zero`` mode (G where kept), the raw G in ``inplace`` mode."""
        return [w.param.grad for w in self.ctx.weights]

    def kept_count_now(self) -> int:
        return int(self.mask_flat.count_nonzero())

    def unused_settings(self, cfg) -> list[tuple[str, str]]:  # noqa: ANN001
        if self.pattern is None:
            return []
        return [("method.scope", f"method.pattern={self.pattern[0]}:{self.pattern[1]} keeps the N highest scores of every M weights, "
                                 "so no threshold is shared across or within layers")]

    @torch.no_grad()
    def update_masks(self, sparsity: float, step: int | None = None) -> None:
        if self.pattern is not None and sparsity < self.sparsity - 1e-9:
            return  # N:M has one level: the mask waits for the schedule's target
        scores = self.selection_scores()
        self.scores_masked = False
        if self.pattern is not None:
            for i, (start, n, shape) in enumerate(self.slices):
                keep = ~prune_nm(scores[start : start + n].view(shape), *self.pattern)
                self.mask_view(i).copy_(keep)
        elif self.units is not None:
            self._select_units(scores, sparsity)
        elif self.selection == "authors":
            groups = [(0, scores.numel())] if self.scope == "global" else [(start, n) for start, n, _ in self.slices]
            for start, n in groups:
                self.authors_mask_(scores[start : start + n], sparsity, self.mask_flat[start : start + n], step)
        elif self.scope == "global":
            self.topk.mask_(scores, kept_count(scores.numel(), sparsity), self.mask_flat)
        else:  # per matrix, the matrices' passes shared
            groups = [(start, n) for start, n, _ in self.slices]
            self.topk.masks_(scores, groups, [kept_count(n, sparsity) for _, n in groups], self.mask_flat)
        if self.mask_mode in ("inplace", "zero") or self.zero_on_update:  # PLATON's code zeroes pruned weights in place
            params = [w.param.data for w in self.ctx.weights]
            torch._foreach_mul_(params, [self.mask_view(i) for i in range(len(params))])

    def _select_units(self, scores: torch.Tensor, sparsity: float) -> None:
        groups = self.units
        n_units = sum(g.n_units for g in groups)
        unit_scores = torch.zeros(n_units, dtype=torch.float64, device=scores.device)
        for g in groups:
            for s in g.members.values():
                start, n, shape = self.slices[s.weight_index]
                unit_scores[g.offset : g.offset + g.n_units] += s.unit_sums(scores[start : start + n].view(shape)).double()
        if self.scope == "global":
            unit_mask = topk_mask(unit_scores, kept_count(n_units, sparsity))
        else:
            unit_mask = torch.cat([topk_mask(unit_scores[g.offset : g.offset + g.n_units], kept_count(g.n_units, sparsity)) for g in groups])
        unit_mask = unit_mask.to(self.mask_flat.dtype)
        for g in groups:
            for s in g.members.values():
                s.expand_(unit_mask[g.offset : g.offset + g.n_units], self.mask_view(s.weight_index))

    def kept_target(self) -> int:
        """Weights kept at the target sparsity, as the selection counts them."""
        if self.pattern is not None:
            return sum(n // self.pattern[1] * self.pattern[0] for _, n, _ in self.slices)
        if self.units is None:
            count = (lambda n: kept_floor(n, 1.0 - self.sparsity)) if self.selection == "authors" else (lambda n: kept_count(n, self.sparsity))
            if self.scope == "global":
                return count(self.mask_flat.numel())
            return sum(count(n) for _, n, _ in self.slices)
        per_unit = {g.name: sum(self.slices[s.weight_index][1] // g.n_units for s in g.members.values()) for g in self.units}
        if self.scope == "global":
            total_units = sum(g.n_units for g in self.units)
            sizes = set(per_unit.values())
            if len(sizes) == 1:
                return kept_count(total_units, self.sparsity) * sizes.pop()
            return -1  # units of different sizes: no single expected count
        return sum(kept_count(g.n_units, self.sparsity) * per_unit[g.name] for g in self.units)

    def on_ramp(self, sparsity: float, step: int | None, kind: str) -> bool:
        """Whether a mask update asks for the ``kind`` schedule's own level at ``step``, past
        its initial warm-up: then ``selection=authors`` computes that level with the
        authors' own expression (SEVEN, PLATON, FORCE), which rounds as theirs does."""
        schedule = self.ctx.schedule
        return step is not None and schedule.kind == kind and sparsity == schedule.sparsity(step) and schedule.progress(step) > 0

    def lands_on_target(self) -> bool:
        """Whether the prune stage must end exactly at the target count (the authors'
        tie rules and SEVEN's early stop may leave it a few weights off)."""
        return self.selection == "exact"

    def end_prune_stage(self) -> None:
        """Freeze the masks: from here on they are fixed parametrizations (``inplace``
        methods get one now, so the recover stage keeps pruned weights at zero)."""
        if not self.frozen and self.lands_on_target() and self.kept_count_now() != self.kept_target():
            # The schedule's last ramp step lands on the target; this guards against a
            # stage cut short (e.g. a run resumed with a different length).
            self.update_masks(self.sparsity)
        self.frozen = True
        weights = self.ctx.weights
        if self.mask_mode in ("inplace", "zero") and not weights.attached:
            weights.attach(Mask, masks=[self.mask_view(i) for i in range(len(weights))])
            for i, w in enumerate(weights):  # the mask buffers are views of the flat mask again
                w.parametrization.mask = self.mask_view(i)
        for w in weights:
            if isinstance(w.parametrization, (ScoreMask, PassMask)):
                w.parametrization.frozen = True

    def state_dict(self) -> dict[str, Any]:
        if self.ctx is None:  # before the prune stage
            return {}
        return {"state": {k: v.detach().cpu() for k, v in self.state.items()}, "k": self.k, "frozen": self.frozen,
                "mask": self.mask_flat.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("state", {}).items():
            if name in self.state:
                self.state[name].copy_(saved)
        if "mask" in state:  # inplace masks live here only (no parametrization to hold them)
            self.mask_flat.copy_(state["mask"])
        self.k = int(state.get("k", 0))
        self.frozen = bool(state.get("frozen", False))
