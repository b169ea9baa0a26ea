"""ADMM semi-structured N:M pattern pruning (Wang 2024, arXiv 2407.08334), with SR-STE.

N:M pattern: in every block of M consecutive weights along the input dimension
(the last dimension of a Linear weight, as NVIDIA's 2:4 and SR-STE), at most N
are non-zero. Pruning solves ``min f(W) s.t. W in S`` (S the N:M-sparse set) by
ADMM, one iteration being::

    W-step:  steps of the optimizer on f(W) + (rho/2)||W - Z + U||^2  (the prune stage / iterations)
    Z-step:  Z = Proj_S(W + U)          # keep the N largest |.| of each block of M
    U-step:  U = U + W - Z
    rho     *= rho_growth                # geometric growth (ADMM-NN's x1.3)

The W-step is the project's ordinary training loop with the penalty as the
method's ``extra_loss()``; the Z/U updates run at iteration boundaries. After
the iterations the hard mask ``Proj_S(W)`` is frozen (mask parametrization) and
the recover stage fine-tunes with it.

SR-STE (Zhou et al., ICLR 2021; ``method.sr_ste=true``): the N:M mask is
recomputed from the dense W in every forward; the backward passes the gradient
of the sparse weight straight through to the dense W and adds
``lambda_w * (1 - mask) * W``. It runs alone (``method.iterations=0``) or for
the last ``sr_ste_fraction`` of the prune stage after the ADMM iterations; its
last mask is frozen likewise. The prune stage's length is ``stages.prune`` (epochs or
steps), split evenly between the ADMM iterations (and the SR-STE phase).

The mathematics are pure tensor functions (``nm_mask``, ``nm_project``,
``admm_z_step``, ``admm_u_step``, ``admm_penalty``, ``srste_weight``); the class
``ADMM`` is the plumbing. ``to_semi_structured`` converts a saved 2:4 model to
``torch.sparse`` semi-structured weights (CUDA, fp16/bf16, compute capability 8.0+).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pruneflow.errors import UserError, invalid
from pruneflow.masking import Mask, MaskedWeights
from pruneflow.methods.base import PruneContext, PruningMethod

log = logging.getLogger("pruneflow")

PATTERN_HELP = "'N:M' with integers 0 < N < M, e.g. 2:4 (the default), 1:4, 4:8, 2:8"
# admm: W-steps with the penalty; sr_ste: dynamic masks; done: iterations over, mask not yet
# frozen (end_prune_stage freezes it); frozen: the hard mask is fixed (recover stage).
PHASES = ("admm", "sr_ste", "done", "frozen")


# ----------------------------------------------------------------------------- the pattern
@dataclass(frozen=True)
class Pattern:
    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(value: Any) -> Pattern:
    """``"2:4"`` -> Pattern(2, 4); anything else is a UserError naming ``method.pattern``."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
        raise invalid(
            "method.pattern", value, PATTERN_HELP,
            "In a YAML file write the pattern quoted (pattern: \"2:4\"): unquoted, YAML reads 2:4 as the base-60 number 124.",
        )
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value)) if isinstance(value, str) else None
    if match is None:
        raise invalid("method.pattern", value, PATTERN_HELP)
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise invalid("method.pattern", value, PATTERN_HELP, f"N={n} and M={m} do not satisfy 0 < N < M.")
    return Pattern(n, m)


# ----------------------------------------------------------------------------- pure functions
def _blocks(w: torch.Tensor, m: int) -> torch.Tensor:
    """View of ``w`` as rows of M consecutive weights along the last (input) dimension."""
    if w.shape[-1] % m:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of M={m}")
    return w.reshape(-1, m)


@torch.no_grad()
def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 mask (dtype of ``w``) keeping the N largest ``|w|`` in each block of M."""
    blocks = _blocks(w.detach(), m)
    keep = blocks.abs().topk(n, dim=1).indices
    mask = torch.zeros_like(blocks).scatter_(1, keep, 1.0)
    return mask.reshape(w.shape)


def nm_project(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Proj_S(w): the nearest N:M-sparse matrix (Frobenius norm) — zero all but the N
    largest magnitudes of each block."""
    return w * nm_mask(w, n, m)


def admm_z_step(w: torch.Tensor, u: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Z = Proj_S(W + U)."""
    return nm_project(w + u, n, m)


def admm_u_step(u: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """U = U + W - Z (scaled dual variable)."""
    return u + w - z


def admm_penalty(w: torch.Tensor, z: torch.Tensor, u: torch.Tensor, rho: float) -> torch.Tensor:
    """The W-step's augmented-Lagrangian term (rho/2) ||W - Z + U||^2 (differentiable in W)."""
    return 0.5 * rho * (w - z + u).pow(2).sum()


@torch.no_grad()
def block_nonzeros(w: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in each block of M consecutive weights along the last dimension."""
    return (_blocks(w, m) != 0).sum(dim=1)


class _SRSTE(torch.autograd.Function):
    """Forward ``W * nm_mask(W)``; backward ``g + lambda_w * (1 - mask) * W``: the
    gradient of the sparse weight goes straight through to the dense W, and pruned
    weights decay towards zero (sparse-refined straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, n: int, m: int, lambda_w: float) -> torch.Tensor:  # noqa: ANN001
        mask = nm_mask(w, n, m)
        ctx.save_for_backward(w, mask)
        ctx.lambda_w = lambda_w
        return w * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        w, mask = ctx.saved_tensors
        return grad + ctx.lambda_w * (1 - mask) * w, None, None, None


def srste_weight(w: torch.Tensor, n: int, m: int, lambda_w: float) -> torch.Tensor:
    """The SR-STE sparse weight of a dense ``w`` (custom gradient, see ``_SRSTE``)."""
    return _SRSTE.apply(w, n, m, lambda_w)


# ----------------------------------------------------------------------------- parametrization
class NMMask(Mask):
    """The project's mask parametrization, plus an SR-STE mode in which the N:M mask
    is recomputed from the dense weight in every forward. Frozen (``dynamic=False``)
    it is exactly ``Mask``, with the same state-dict keys, so checkpoints and
    ``MaskedWeights.bake`` treat it alike."""

    def __init__(self, mask: torch.Tensor, n: int, m: int) -> None:
        super().__init__(mask)
        self.n, self.m = n, m
        self.dynamic = False
        self.lambda_w = 0.0  # effective decay, corrected for loss scaling and accumulation

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return srste_weight(weight, self.n, self.m, self.lambda_w)
        return weight * self.mask


def exclusion_patterns(bad: list[str], prunable: list[str]) -> list[str]:
    """Short ``method.exclude`` patterns covering exactly the ``bad`` module names: the
    layer index replaced by ``*`` (``blocks.*.attn.qkv``) where that matches no other
    prunable layer, else the name itself."""
    out: list[str] = []
    for name in bad:
        wild = re.sub(r"(?:(?<=\.)|^)\d+(?=\.)", "*", name)
        pattern = wild if {n for n in prunable if fnmatch.fnmatchcase(n, wild)} <= set(bad) else name
        if pattern not in out:
            out.append(pattern)
    return out


# ----------------------------------------------------------------------------- the method
def _number(cfg: DictConfig, key: str, default: float, ok: Any, allowed: str) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise invalid(f"method.{key}", v, allowed)
    return float(v)


class ADMM(PruningMethod):
    name = "admm"

    def __init__(self, cfg: DictConfig, sparsity: float) -> None:
        super().__init__(cfg, sparsity)
        self.pattern = parse_pattern(cfg.get("pattern", "2:4"))
        self.rho0 = _number(cfg, "rho", 0.03, lambda v: v > 0, "a number > 0 (the initial ADMM penalty)")
        self.rho_growth = _number(cfg, "rho_growth", 1.3, lambda v: v >= 1, "a number >= 1 (rho is multiplied by it after each ADMM iteration)")
        iters = cfg.get("iterations", 6)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise invalid("method.iterations", iters, "an integer >= 0 (0: no ADMM, SR-STE only)")
        self.iterations = int(iters)

        sr = cfg.get("sr_ste", False)
        if not isinstance(sr, bool):
            raise invalid("method.sr_ste", sr, "true, false")
        self.sr_ste = sr
        self.sr_ste_fraction = _number(cfg, "sr_ste_fraction", 0.25, lambda v: 0 < v <= 1, "a number in (0, 1] (the share of the prune stage for SR-STE after the ADMM iterations)")
        self.lambda_w = _number(cfg, "lambda_w", 2e-4, lambda v: v >= 0, "a number >= 0 (SR-STE's decay of pruned weights)")
        export = cfg.get("export") or {}
        if not isinstance(export.get("semi_structured", True), bool):
            raise invalid("method.export.semi_structured", export.get("semi_structured"), "true, false")
        if str(export.get("dtype", "auto")) not in ("auto", "bf16", "fp16"):
            raise invalid("method.export.dtype", export.get("dtype"), "auto, bf16, fp16 (semi-structured kernels need a 16-bit dtype)")
        for key, default in (("batch", 64), ("repeats", 20)):
            v = export.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise invalid(f"method.export.{key}", v, "an integer >= 1")
        if self.iterations == 0 and not self.sr_ste:
            raise UserError(
                "method=admm has nothing to do: method.iterations=0 and method.sr_ste=false. "
                "Set method.iterations to a positive number of ADMM iterations (e.g. 6), or method.sr_ste=true."
            )
        self.steps_per_iteration = 1
        self.admm_steps = 0
        self.sr_ste_steps = 0
        self.z: list[torch.Tensor] = []
        self.u: list[torch.Tensor] = []
        self.rho = self.rho0
        self.iteration = 0
        self.phase = "admm"
        self.residuals: list[float] = []

    # --- configuration -------------------------------------------------------------
    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float:
        pattern = parse_pattern(cfg.get("pattern", "2:4"))
        if requested is not None and not math.isclose(float(requested), pattern.sparsity, abs_tol=1e-9):
            raise UserError(
                f"sparsity={requested} conflicts with method.pattern={pattern}: an N:M pattern keeps N of "
                f"every M weights, so method=admm removes exactly 1 - {pattern.n}/{pattern.m} = "
                f"{pattern.sparsity:g} of the prunable weights. Leave sparsity unset (null), set "
                f"sparsity={pattern.sparsity:g}, or choose the pattern that gives the sparsity you want "
                "(method.pattern=1:4 gives 0.75, 2:4 and 4:8 give 0.5, 2:8 gives 0.75)."
            )
        return pattern.sparsity

    def plan_stages(self, steps: dict[str, int], steps_per_epoch: int, task_name: str) -> dict[str, int]:
        """The prune stage (``stages.prune``) holds the ADMM iterations, evenly split,
        then (``sr_ste=true``) the SR-STE phase: its last ``sr_ste_fraction``, or all of
        it without ADMM iterations."""
        total = int(steps["prune"])
        if self.sr_ste:
            self.sr_ste_steps = total if self.iterations == 0 else max(1, round(self.sr_ste_fraction * total))
        admm = total - self.sr_ste_steps
        if self.iterations > 0 and admm < self.iterations:
            raise UserError(
                f"method=admm runs method.iterations={self.iterations} ADMM iterations in the prune stage, which has "
                f"{total} steps ({admm} after the SR-STE phase): each iteration needs at least one step. Lengthen "
                "stages.prune (epochs or steps) or lower method.iterations."
            )
        self.steps_per_iteration = admm // self.iterations if self.iterations else 1
        self.admm_steps = self.steps_per_iteration * self.iterations
        self.sr_ste_steps = total - self.admm_steps if self.sr_ste else 0
        if not self.sr_ste and self.admm_steps < total:  # the remainder of an uneven split: the last iteration's W-step
            self.admm_steps = total
        extra = self.admm_steps - self.steps_per_iteration * self.iterations
        log.info(
            "method=admm: prune stage of %d steps = %d ADMM iterations x %d steps%s%s",
            total, self.iterations, self.steps_per_iteration, f" + {extra} in the last one" if extra else "",
            f" + {self.sr_ste_steps} SR-STE steps" if self.sr_ste else "",
        )
        return steps

    def unused_settings(self, cfg: DictConfig) -> list[tuple[str, str]]:
        out = [("schedule", f"method=admm has no sparsity schedule: the N:M pattern ({self.pattern}) is reached by "
                            "its ADMM iterations over stages.prune")]
        if not self.sr_ste:
            out += [(f"method.{k}", "SR-STE is off (method.sr_ste=false)") for k in ("sr_ste_fraction", "lambda_w")]
        elif self.iterations == 0:
            out.append(("method.sr_ste_fraction", "with method.iterations=0 SR-STE runs the whole prune stage"))
        if self.iterations == 0:
            out += [(f"method.{k}", "there are no ADMM iterations (method.iterations=0)") for k in ("rho", "rho_growth")]
        if not (cfg.method.get("export") or {}).get("semi_structured", True):
            out += [(f"method.export.{k}", "the semi-structured export is off (method.export.semi_structured=false)")
                    for k in ("dtype", "batch", "repeats")]
        return out

    def validate(self, model: nn.Module, weights: MaskedWeights) -> None:
        bad = [(w.module_name, w.shape[-1]) for w in weights if w.shape[-1] % self.pattern.m]
        if not bad:
            return
        from pruneflow.masking import DEFAULT_EXCLUDE

        exclude = list(self.cfg.get("exclude") or DEFAULT_EXCLUDE)
        suggestion = exclude + exclusion_patterns([name for name, _ in bad], [w.module_name for w in weights])
        listed = ", ".join(f"{name} (input width {width})" for name, width in bad[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        if len(bad) == len(weights):  # excluding them all would leave nothing to prune
            widths = sorted({width for _, width in bad})
            raise invalid("method.pattern", str(self.pattern), f"N:M with an M that divides every prunable layer's input width ({widths})",
                          f"No prunable layer's input width is a multiple of M={self.pattern.m}: {listed}{more}. The "
                          "semi-structured kernels take 2:4.")
        raise UserError(
            f"method.pattern={self.pattern} prunes blocks of {self.pattern.m} consecutive weights along the "
            f"input dimension, so every prunable layer's input width must be a multiple of {self.pattern.m}; "
            f"these are not: {listed}{more}. Exclude them by name pattern (method.exclude replaces the "
            f"default exclusions, so keep those): 'method.exclude=[{','.join(suggestion)}]', "
            f"or choose a method.pattern whose M divides their width."
        )

    # --- prune stage ------------------------------------------------------------------
    def setup(self, ctx: PruneContext) -> None:
        super().setup(ctx)
        n, m = self.pattern.n, self.pattern.m
        ctx.weights.attach(lambda ones: NMMask(ones, n, m))
        with torch.no_grad():
            self.z = [nm_project(w.param.detach(), n, m) for w in ctx.weights]
            self.u = [torch.zeros_like(w.param) for w in ctx.weights]
        self.rho = self.rho0
        self.iteration = 0
        self.residuals = []
        self._enter("admm" if self.iterations > 0 else "sr_ste")

    def _parametrizations(self) -> list[NMMask]:
        return [w.parametrization for w in self.ctx.weights]  # type: ignore[misc]

    def _enter(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown ADMM phase {phase!r}")
        self.phase = phase
        for p in self._parametrizations():
            p.dynamic = phase == "sr_ste"
        if phase == "sr_ste":
            self._set_decay()
        if phase != "admm":
            self.z, self.u = [], []  # no longer needed

    def _set_decay(self) -> None:
        """The decay term is added inside backward, where the loss may be scaled by the
        fp16 GradScaler and divided by the accumulation steps: scale it alike so that
        the optimizer sees exactly ``lambda_w * (1 - mask) * W``."""
        trainer = self.ctx.extra.get("trainer") if self.ctx is not None else None
        factor = 1.0
        if trainer is not None:
            factor /= max(int(getattr(trainer, "grad_accum", 1)), 1)
            scaler = getattr(trainer, "scaler", None)
            if scaler is not None:
                factor *= float(scaler.get_scale())
        for p in self._parametrizations():
            p.lambda_w = self.lambda_w * factor

    def extra_loss(self) -> torch.Tensor | None:
        if self.phase != "admm":
            return None
        return sum(admm_penalty(w.param, z, u, self.rho) for w, z, u in zip(self.ctx.weights, self.z, self.u, strict=True))

    @torch.no_grad()
    def admm_update(self) -> float:
        """Z- and U-steps for every weight; returns the relative primal residual ||W - Z|| / ||W||."""
        n, m = self.pattern.n, self.pattern.m
        diff2, norm2 = 0.0, 0.0
        for i, w in enumerate(self.ctx.weights):
            W = w.param.detach()
            self.z[i] = admm_z_step(W, self.u[i], n, m)
            self.u[i] = admm_u_step(self.u[i], W, self.z[i])
            diff2 += float((W - self.z[i]).pow(2).sum())
            norm2 += float(W.pow(2).sum())
        return math.sqrt(diff2 / max(norm2, 1e-30))

    def after_optimizer_step(self, step: int, grads_finite: bool = True) -> None:
        last = self.iteration == self.iterations - 1
        boundary = (step + 1) == self.admm_steps if last else (step + 1) % self.steps_per_iteration == 0
        if self.phase == "admm" and boundary and self.iteration < self.iterations:
            residual = self.admm_update()
            self.residuals.append(round(residual, 6))
            self.iteration += 1
            log.info("ADMM iteration %d/%d: rho=%.4g, ||W - Z||/||W|| = %.4f", self.iteration, self.iterations, self.rho, residual)
            if self.iteration < self.iterations:
                self.rho *= self.rho_growth
            else:
                self._enter("sr_ste" if self.sr_ste else "done")
        elif self.phase == "sr_ste":
            self._set_decay()  # the fp16 loss scale may have changed

    @torch.no_grad()
    def end_prune_stage(self) -> None:
        """Freeze the hard mask Proj_S(W) for the recover stage (masked weights exactly zero)."""
        n, m = self.pattern.n, self.pattern.m
        masks = [nm_mask(w.param, n, m) for w in self.ctx.weights]
        self._enter("frozen")
        self.ctx.weights.set_masks(masks)
        kept = self.ctx.weights.num_kept()
        log.info("N:M mask %s frozen: %d of %d prunable weights kept (sparsity %.4f)", self.pattern, kept, self.ctx.weights.numel, 1 - kept / max(self.ctx.weights.numel, 1))

    def summary(self) -> dict[str, Any]:
        return {
            "pattern": str(self.pattern),
            "iterations": self.iterations,
            "steps_per_iteration": self.steps_per_iteration,
            "rho": self.rho0,
            "rho_growth": self.rho_growth,
            "rho_final": self.rho,  # the rho of the last W-step
            "primal_residuals": list(self.residuals),
            "sr_ste": self.sr_ste,
            "sr_ste_steps": self.sr_ste_steps,
        }

    # --- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "rho": self.rho,
            "iteration": self.iteration,
            "residuals": list(self.residuals),
            "z": [t.detach().cpu() for t in self.z],
            "u": [t.detach().cpu() for t in self.u],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = self.ctx.device if self.ctx is not None else torch.device("cpu")
        self.rho = float(state["rho"])
        self.iteration = int(state["iteration"])
        self.residuals = list(state.get("residuals", []))
        self._enter(state["phase"])
        if self.phase == "admm":
            self.z = [t.to(device) for t in state["z"]]
            self.u = [t.to(device) for t in state["u"]]

    # --- export ---------------------------------------------------------------------------
    def export_info(self, bundle: Any, device: torch.device) -> dict[str, Any]:
        """result.json["export"]: ``model/`` always holds the dense weights with the zeros
        in place; on a suitable CUDA device a semi-structured copy is built and timed."""
        try:
            info = self._semi_structured(bundle, device)
        except Exception as e:  # noqa: BLE001 - an export problem must not lose the run
            log.warning("Semi-structured export failed: %s", e)
            info = {"available": False, "reason": f"conversion failed: {type(e).__name__}: {e}"}
        return {"semi_structured": info, "pattern": str(self.pattern)}

    def _export_dtype(self) -> torch.dtype | str:
        export = self.cfg.get("export") or {}
        choice = str(export.get("dtype", "auto"))
        if choice == "auto":
            trainer = self.ctx.extra.get("trainer") if self.ctx is not None else None
            return getattr(trainer, "autocast_dtype", None) or torch.bfloat16
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return dtypes.get(choice, choice)

    def _semi_structured(self, bundle: Any, device: torch.device) -> dict[str, Any]:
        export = self.cfg.get("export") or {}
        if not export.get("semi_structured", True):
            return {"available": False, "reason": "disabled (method.export.semi_structured=false)"}
        if not torch.cuda.is_available():
            return {"available": False, "reason": "no CUDA device"}
        if device.type != "cuda":
            return {"available": False, "reason": f"the run's device is {device} (trainer.device=cuda builds it)"}
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 0):
            return {"available": False, "reason": f"compute capability {cap[0]}.{cap[1]}; semi-structured sparse kernels need 8.0 or newer"}
        dtype = self._export_dtype()
        if not isinstance(dtype, torch.dtype):
            return {"available": False, "reason": f"dtype {dtype} (method.export.dtype): semi-structured sparse kernels need fp16 or bf16"}
        model: nn.Module = bundle.model
        names = [w.module_name for w in self.ctx.weights]
        if self.pattern.m % 4:
            return {"available": False, "reason": f"pattern {self.pattern} is not 2:4 (M is not a multiple of 4)"}
        for name in names:
            weight = model.get_submodule(name).weight
            if int(block_nonzeros(weight, 4).max()) > 2:
                return {"available": False, "reason": f"pattern {self.pattern} is not 2:4: {name} has blocks of 4 with more than 2 non-zeros"}
        eligible = [n for n in names if all(d % 64 == 0 for d in model.get_submodule(n).weight.shape)]
        skipped = [n for n in names if n not in eligible]
        if not eligible:
            shape = "x".join(map(str, model.get_submodule(names[0]).weight.shape))
            return {"available": False, "reason": f"shape: no prunable layer has both dimensions multiples of 64 (e.g. {names[0]} is {shape})"}
        task = self.ctx.task if self.ctx is not None else None
        if task is None:
            return {"available": False, "reason": "no evaluation batch to time the models with"}

        batch_size = int(export.get("batch", 64))
        ds = task.eval_sets[task.main_split]
        batch = task.collate([ds[i % len(ds)] for i in range(batch_size)])
        batch = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}

        dense = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        sparse = to_semi_structured(copy.deepcopy(dense), eligible)
        dense_bundle = copy.copy(bundle)
        dense_bundle.model = dense
        sparse_bundle = copy.copy(bundle)
        sparse_bundle.model = sparse

        from pruneflow.speed import time_forward

        with torch.inference_mode():
            diff = (_first_tensor(dense_bundle.forward(batch)).float() - _first_tensor(sparse_bundle.forward(batch)).float()).abs().max()
            times = time_forward(
                {"dense": lambda: dense_bundle.forward(batch), "sparse": lambda: sparse_bundle.forward(batch)},
                repeats=int(export.get("repeats", 20)),
                device=torch.device(device),
            )
        del dense, sparse
        return {
            "available": True,
            "dtype": str(dtype).removeprefix("torch."),
            "batch": batch_size,
            "layers": len(eligible),
            "skipped_layers": skipped,
            "dense_ms": round(times["dense"], 3),
            "sparse_ms": round(times["sparse"], 3),
            "speedup": round(times["dense"] / max(times["sparse"], 1e-9), 3),
            "max_abs_diff": float(diff),
            "how": "pruneflow.methods.admm.to_semi_structured(pruneflow.load_model('model').cuda().half(), layer_names)",
        }


def to_semi_structured(model: nn.Module, layer_names: list[str]) -> nn.Module:
    """Replace the weights of the named Linear layers (2:4-sparse, on CUDA, fp16/bf16,
    both dimensions multiples of 64) by ``torch.sparse`` semi-structured tensors."""
    from torch.sparse import to_sparse_semi_structured

    for name in layer_names:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model


def _first_tensor(out: Any) -> torch.Tensor:
    """Logits of a timm output (a tensor) or a transformers ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]
