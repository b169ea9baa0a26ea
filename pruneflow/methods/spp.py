"""SPP — Solution Path Pruning (Ding et al., ICLR 2025, "Adaptive Pruning of
Pretrained Transformer via Differential Inclusions").

Mask parameters M (init 1) sit on the paired dimensions of every block
(query–key inner dims, value–output inner dims, FFN neurons; see
``pruneflow.compress``). With the weights W frozen, a linearized Bregman
(differential inclusion) iteration traces the regularisation solution path::

    M <- M - lr * grad_M [ L(W, M) + ||M - Γ||² / (2 nu) ]   (Adam or SGD)
    Z <- Z + z_lr * (M - Γ)          (z_lr = lr / nu as in DessiLBI, or `auto`, the default)
    Γ <- kappa * max(Z - lambda, 0)

Entries of Γ leave zero one after another. By default (``method.rank=support_time``,
theirs) an entry is ranked by the number of support checks (every
``method.check_every`` batches of each epoch, and at the last step) it spent in the support of Γ; ``rank=entry`` ranks by
the step it first entered. A target sparsity keeps the best-ranked entries (global
ranking across layers, q-k and v-o together and FFN apart; ties broken by Z, then M),
and the model is then **physically compressed**.

One search serves every sparsity: its result (the entry order) is cached under
``<cache_dir>/spp/<key>`` keyed by the finetuned model's key plus the search
settings, so ``-m sparsity=0.3,0.5,0.7`` searches once.

Deviations from the authors' code (which DESIGN.md §3 lists as defects): the
coupling term is part of the loss, so it acts on M; the ratio is the run's
``sparsity`` (``method.ratio=entries`` is theirs: the lowest ``method.entry_fraction``,
0.25, of each pool's entries by support count removed, ties at the threshold kept, so
the sparsity follows from the search). The Z step: DessiLBI's ``lr / nu`` (``method.z_lr=null``) is
1e-5 with the search's lr = 1e-3 and nu = 100, so nothing would enter the support in
a search shorter than ~300,000 steps (the authors' code uses Adam's bias-corrected
step size times kappa = 1, ``method.z_lr=adam``, over ``--epochs`` = 300 ImageNet
epochs). The default ``z_lr=auto`` (= 2 lambda / steps)
lets an entry whose mask stays at 1 enter halfway through the search, so the
path unfolds whatever the search length; any number sets it directly.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from pruneflow import distributed
from pruneflow.cache import StageCache
from pruneflow.compress import (
    ATTENTION_SCALES,
    MASK_SITES,
    TYPES,
    PairedBlock,
    PairedMasks,
    compress,
    find_blocks,
    structure_info,
)
from pruneflow.errors import RunStopped, TrainingDiverged, UserError, check_bool, invalid
from pruneflow.masking import MaskedWeights
from pruneflow.methods.base import PruneContext, PruningMethod
from pruneflow.stop import STOP
from pruneflow.stop import name as stop_name
from pruneflow.utils import atomic_write_json, progress

log = logging.getLogger("pruneflow")

OPTIMIZERS = ("adam", "sgd")
NOT_ENTERED = -1


# ----------------------------------------------------------------------------- the mathematics (pure)
def shrink(z: torch.Tensor, lam: float) -> torch.Tensor:
    """One-sided soft threshold ``max(z - lam, 0)`` (the authors' code; masks are >= 0)."""
    return (z - lam).clamp_min(0)


def lbi_update(m: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, z_lr: float, kappa: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearized Bregman step on (Z, Γ) after M's gradient step: returns the new (Z, Γ)."""
    z = z + z_lr * (m - gamma)
    return z, kappa * shrink(z, lam)


def record_entries(entry_step: torch.Tensor, gamma: torch.Tensor, step: int) -> torch.Tensor:
    """Mark entries that are in the support of Γ for the first time at ``step``."""
    return torch.where((entry_step == NOT_ENTERED) & (gamma > 0), torch.full_like(entry_step, step), entry_step)


def rank_entries(entry_step: torch.Tensor, z: torch.Tensor, m: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """Indices from the most to the least important entry. ``support`` given (the
    authors' ranking): most checks spent in the support of Γ first; then (or without
    it) earliest entry step first, entries that never entered last; ties broken by
    larger Z, then larger M."""
    step = entry_step.double().masked_fill(entry_step == NOT_ENTERED, math.inf)
    order = torch.argsort(-m.double(), stable=True)
    order = order[torch.argsort(-z.double()[order], stable=True)]
    order = order[torch.argsort(step[order], stable=True)]
    if support is not None:
        order = order[torch.argsort(-support.double()[order], stable=True)]
    return order


def global_keep(priority: Sequence[torch.Tensor], costs: Sequence[int], remove_weights: float) -> list[torch.Tensor]:
    """Boolean keep vectors for the masks of one dimension type.

    ``priority[i]`` holds a global rank for every entry of mask i (0 = most
    important, comparable across masks). Entries are removed from the globally
    worst upwards while the removed weight stays nearest to ``remove_weights``
    (entry j of mask i costs ``costs[i]`` weights); each mask keeps >= 1 entry.
    """
    keep = [torch.ones(p.numel(), dtype=torch.bool) for p in priority]
    flat = torch.cat([p.reshape(-1).double() for p in priority])
    owner = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(priority)])
    pos = torch.cat([torch.arange(p.numel()) for p in priority])
    left = [p.numel() for p in priority]
    removed = 0.0
    for j in torch.argsort(flat, descending=True, stable=True).tolist():
        i = int(owner[j])
        c = costs[i]
        if removed + c / 2 > remove_weights:
            break
        if left[i] <= 1:
            continue
        keep[i][pos[j]] = False
        left[i] -= 1
        removed += c
    return keep


def authors_pool_keep(supports: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """The authors' ``set_alpha_sparsity`` on one pool: their entries' support counts
    sorted ascending, the threshold the count at the position whose cumulative number of
    entries is nearest ``fraction`` of the pool (the first such position), every entry
    ``>=`` it kept. Entries count alike whatever weights they remove, and ties at the
    threshold are all kept, so fewer than ``fraction`` may go (none, when more than that
    share never entered the support)."""
    flat = torch.cat([t.reshape(-1) for t in supports])
    ordered = torch.sort(flat).values
    # their arithmetic: a cumulative count (int64) against sum * fraction (a float32 tensor)
    position = torch.argmin(torch.abs(torch.arange(1, flat.numel() + 1) - torch.tensor(flat.numel()) * fraction))
    threshold = ordered[position]
    return [t >= threshold for t in supports]


def global_priority(entry_steps: Sequence[torch.Tensor], zs: Sequence[torch.Tensor], ms: Sequence[torch.Tensor],
                    supports: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Global rank (0 = best) of every entry across several masks, by :func:`rank_entries`."""
    sizes = [e.numel() for e in entry_steps]
    cat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    order = rank_entries(cat(entry_steps), cat(zs), cat(ms), cat(supports) if supports is not None else None)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return list(torch.split(rank, sizes))


# How mask entries are pooled for the global ranking: the authors rank attention entries
# (q-k and v-o together) in one pool and FFN neurons in another.
GROUPINGS = {"attention_mlp": (("qk", "vo"), ("ffn",)), "per_type": (("qk",), ("vo",), ("ffn",))}
RANKS = ("support_time", "entry")
RATIOS = ("weights", "entries")
AUTHORS_ENTRY_FRACTION = 0.25  # set_alpha_sparsity(model, sparsity=0.25) in their deit_retrain.py
SEARCH_LR = 1e-3  # the masks' learning rate in the authors' search (--lr in deit_search.sh; --lr-search is unused)
SEARCH_LR_SCHEDULES = ("constant", "cosine_epochs")


def search_lr_at(epoch: int, epochs: int, lr: float, min_lr: float) -> float:
    """The masks' learning rate in search epoch ``epoch`` (0-based) of ``epochs`` under the
    authors' schedule: timm's cosine stepped after each epoch, as DeiT's loops step it
    (epochs 0 and 1 both at ``lr``)."""
    from pruneflow.trainer import timm_epoch_cosine

    return timm_epoch_cosine(epoch, epochs, lr, min_lr)


# ----------------------------------------------------------------------------- the method
class SPP(PruningMethod):
    name = "spp"
    default_sparsity = 0.5
    updates_weights = False  # the search trains only the masks (W frozen)
    keeps_architecture = False  # finalize() builds smaller layers

    def __init__(self, cfg: DictConfig, sparsity: float) -> None:
        super().__init__(cfg, sparsity)
        self.optimizer = str(cfg.get("optimizer", "adam"))
        if self.optimizer not in OPTIMIZERS:
            raise invalid("method.optimizer", self.optimizer, OPTIMIZERS)
        for key, default in (("kappa", None), ("nu", None), ("adam_eps", None), ("search_lr", SEARCH_LR)):
            v = cfg.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise invalid(f"method.{key}", v, "a positive number")
        lam = cfg.get("lambda")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise invalid("method.lambda", lam, "a number >= 0 (the soft threshold of Z)")
        z_lr = cfg.get("z_lr")
        if z_lr not in (None, "auto", "adam") and (isinstance(z_lr, bool) or not isinstance(z_lr, (int, float)) or z_lr <= 0):
            raise invalid("method.z_lr", z_lr, "a positive number, auto (2 * lambda / search steps), adam (the authors: "
                          "Adam's bias-corrected step size) or null (lr / nu)")
        if z_lr == "adam" and self.optimizer != "adam":
            raise invalid("method.z_lr", z_lr, "auto, null or a number with method.optimizer=sgd", "z_lr=adam follows Adam's step size.")
        self.rank = str(cfg.get("rank", "support_time"))
        if self.rank not in RANKS:
            raise invalid("method.rank", self.rank, RANKS, "support_time: checks spent in the support (the authors); entry: first entry step.")
        self.grouping = str(cfg.get("grouping", "attention_mlp"))
        if self.grouping not in GROUPINGS:
            raise invalid("method.grouping", self.grouping, list(GROUPINGS), "attention_mlp ranks q-k and v-o entries in one pool (the authors).")
        self.ratio = str(cfg.get("ratio", "weights"))
        if self.ratio not in RATIOS:
            raise invalid("method.ratio", cfg.get("ratio"), RATIOS, "weights: remove the run's sparsity of the prunable "
                          "weights; entries: the authors' rule, method.entry_fraction of each pool's entries.")
        fraction = cfg.get("entry_fraction", AUTHORS_ENTRY_FRACTION)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise invalid("method.entry_fraction", fraction, "a number in (0, 1) (their deit_retrain.py: 0.25)")
        self.entry_fraction = float(fraction)
        if self.ratio == "entries" and self.rank != "support_time":
            raise invalid("method.rank", self.rank, "support_time with method.ratio=entries",
                          "The authors' rule thresholds the support counts (their step_record).")
        every = cfg.get("check_every", 10)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise invalid("method.check_every", every, "an integer >= 1 (steps between support checks)")
        self.check_every = int(every)
        self.mask_sites = str(cfg.get("mask_sites", "authors"))
        if self.mask_sites not in MASK_SITES:
            raise invalid("method.mask_sites", self.mask_sites, MASK_SITES, "authors: q and k rows, v, fc1 rows (before the activation).")
        self.kappa, self.nu, self.lam = float(cfg.kappa), float(cfg.nu), float(lam)
        self.adam_eps = float(cfg.get("adam_eps", 1e-4))
        # The masks' learning rate is the method's, not the prune stage's: W stays frozen, and a
        # stage recipe's rate is one for fine-tuning weights (2e-5 for BERT), not masks in [0, 1].
        self.lr = float(cfg.get("search_lr", SEARCH_LR))
        self.z_lr_setting = z_lr
        self.lr_schedule = str(cfg.get("search_lr_schedule", "constant"))
        if self.lr_schedule not in SEARCH_LR_SCHEDULES:
            raise invalid("method.search_lr_schedule", cfg.get("search_lr_schedule"), SEARCH_LR_SCHEDULES,
                          "cosine_epochs: the authors' timm cosine from method.search_lr to method.search_min_lr over the "
                          "search's epochs, stepped after each epoch.")
        min_lr = cfg.get("search_min_lr", 1e-5)
        if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not 0 <= min_lr <= self.lr:
            raise invalid("method.search_min_lr", min_lr, f"a number in [0, method.search_lr = {self.lr:g}] (their --min-lr: 1e-5)")
        self.min_lr = float(min_lr)
        self.share_heads = check_bool(cfg.get("share_heads", True), "method.share_heads")
        self.attention_scale = str(cfg.get("attention_scale", "original"))
        if self.attention_scale not in ATTENTION_SCALES:
            raise invalid("method.attention_scale", cfg.get("attention_scale"), ATTENTION_SCALES,
                          "original: the compressed model computes what the masked one did; kept: 1/sqrt(kept q-k dims per "
                          "head), the authors' compressed model.")
        if self.attention_scale == "kept" and not self.share_heads:
            raise invalid("method.attention_scale", "kept", "original with method.share_heads=false",
                          "Heads keep different numbers of q-k dims then, so there is no one kept size per head (the "
                          "authors' masks are shared by all heads).")
        self.removed_entries: dict[str, int] = {}  # ratio=entries: entries removed per pool
        self.compressed = False
        self.search: dict[str, dict[str, torch.Tensor]] | None = None  # mask key -> entry_step, z, m
        self.path: list[dict[str, Any]] = []
        self.search_reused: bool | None = None
        self.search_dir: str | None = None
        self.layers: dict[str, dict[str, Any]] | None = None
        self.prunable: set[str] = set()
        self.prunable_total = 0

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def resolve_sparsity(cls, cfg: DictConfig, requested: float | None) -> float | None:
        if str(cfg.get("ratio", "weights")) != "entries":
            return super().resolve_sparsity(cfg, requested)
        if requested is not None:
            raise UserError(
                f"sparsity={requested} cannot be set with method=spp method.ratio=entries: that is the authors' rule, "
                f"which removes method.entry_fraction (now {cfg.get('entry_fraction', AUTHORS_ENTRY_FRACTION)}) of each "
                "pool's entries by their time in the support, so the sparsity follows from the search. Set sparsity=null, "
                "or leave method.ratio=weights to compress to a sparsity."
            )
        return None

    def schedule_target(self) -> float:
        # SPP has no sparsity schedule (schedule.* is refused); with ratio=entries there is no target either
        return self.sparsity if self.sparsity is not None else 0.0

    def unused_settings(self, cfg: DictConfig) -> list[tuple[str, str]]:
        return [*([("method.entry_fraction", "method.ratio=weights compresses to the run's sparsity; "
                    "method.ratio=entries uses method.entry_fraction")] if self.ratio == "weights" else []),
                ("schedule", "method=spp has no sparsity schedule: one search ranks every mask entry and the model is "
                             "compressed to `sparsity` afterwards"),
                *([("method.search_min_lr", "method.search_lr_schedule=constant keeps method.search_lr")]
                  if self.lr_schedule == "constant" else []),
                ("stages.prune.lr", "method=spp's search keeps the weights frozen and trains its masks at method.search_lr "
                                    "(the authors' 1e-3); set that instead"),
                *([("method.adam_eps", "method.optimizer=sgd has no epsilon")] if self.optimizer == "sgd" else []),
                *([("method.check_every", "method.rank=entry ranks by the first entry step, not by support checks")]
                  if self.ratio == "weights" and self.rank == "entry" else [])]

    def _allowed(self, pb: PairedBlock, kind: str) -> bool:
        """A dimension type is searched where all weights it owns are prunable."""
        return all(f"{n}.weight" in self.prunable for n in pb.linear_names(kind))

    def validate(self, model: nn.Module, weights: MaskedWeights) -> None:
        self.prunable = {w.name for w in weights}
        self.prunable_total = weights.numel
        blocks = find_blocks(model)
        if not blocks:
            raise UserError(
                f"method=spp found no supported Transformer blocks in {type(model).__name__}: it compresses timm "
                "ViT/DeiT blocks (attn.qkv/attn.proj/mlp.fc1/mlp.fc2) and BERT-family encoder layers "
                "(attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense)."
            )
        masks = PairedMasks(model, share_heads=self.share_heads, allowed=self._allowed)
        covered = sum(e.cost() * e.param.numel() for e in masks)
        most = sum(e.cost() * (e.param.numel() - 1) for e in masks)  # each mask keeps >= 1 entry
        if self.sparsity is not None and self.sparsity * self.prunable_total > most:
            raise invalid(
                "sparsity", self.sparsity, f"at most {most / max(self.prunable_total, 1):.3f} for method=spp here",
                f"SPP removes whole paired dimensions, which cover {covered} of the {self.prunable_total} prunable weights "
                "(method.include/exclude), and keeps at least one dimension of each type per block.",
            )

    def z_lr(self, steps: int, lr: float | None = None, taken: int = 1, beta1: float = 0.9) -> float:
        """Step of Z in a search of ``steps`` steps, at the masks' current rate ``lr``
        (default ``search_lr``) after ``taken`` optimizer steps. ``auto``: an entry whose
        mask stays at 1 enters the support halfway through the search, so the path unfolds
        within a search of any length. ``adam`` (theirs): Adam's bias-corrected step size;
        null: DessiLBI's lr / nu. Both follow the rate's schedule."""
        rate = self.lr if lr is None else lr
        if self.z_lr_setting == "auto":
            return 2 * self.lam / max(steps, 1) if self.lam > 0 else rate / self.nu
        if self.z_lr_setting is None:
            return rate / self.nu
        if self.z_lr_setting == "adam":
            return rate / (1 - beta1 ** max(taken, 1))
        return float(self.z_lr_setting)

    def search_settings(self) -> dict[str, Any]:
        keys = ("optimizer", "adam_eps", "z_lr", "kappa", "lambda", "nu", "share_heads", "mask_sites", "check_every", "include", "exclude")
        c = OmegaConf.to_container(self.cfg, resolve=True)
        out = {**{k: c.get(k) for k in keys}, "lr": self.lr}
        if self.lr_schedule != "constant":  # a constant search keeps the cache keys it had
            out["lr_schedule"] = {"name": self.lr_schedule, "min_lr": self.min_lr}
        return out

    # -- the search -----------------------------------------------------------------------------
    def run_prune_stage(self, ctx: PruneContext) -> bool:
        spec = ctx.extra.get("stage")
        key = {
            "finetuned": ctx.cache_key,
            "search": self.search_settings(),
            "steps": ctx.total_steps,
            "batch_size": getattr(spec, "batch_size", None),
            "seed": getattr(spec, "seed", None),
            "version": 3,  # 2: support counts stored; 3: checks restart every epoch, plus the last step
        }

        def compute_from(found: tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]], cache_dir: Path | None) -> dict[str, Any]:
            self.search, self.path = found
            if cache_dir is not None:
                flat = {f"{k}/{name}": t.contiguous() for k, d in self.search.items() for name, t in d.items()}
                save_file(flat, str(cache_dir / "search.safetensors"))
                atomic_write_json(cache_dir / "path.json", self.path)
            return {"steps": ctx.total_steps, "entries": sum(d["m"].numel() for d in self.search.values())}

        def compute(cache_dir: Path | None) -> dict[str, Any]:
            return compute_from(self.run_search(ctx), cache_dir)

        if ctx.cache_dir is None:
            compute(None)
            self.search_reused = False
        else:
            cache = StageCache(ctx.cache_dir, "spp", key)
            self.search_dir = str(cache.dir)
            if distributed.is_distributed():  # every rank searches (collectives); rank 0 stores
                self.search_reused = distributed.broadcast_object(cache.exists())
                if not self.search_reused:
                    found = self.run_search(ctx)
                    self.search, self.path = found
                    if distributed.is_main():
                        cache.get_or_compute(lambda d: compute_from(found, d))
                    distributed.barrier()
            else:  # a damaged entry is moved aside and searched again
                self.search_reused = cache.reuse(compute, self.load_search)
            if self.search_reused and distributed.is_distributed():
                self.load_search(cache.dir)
        if ctx.run_dir is not None and distributed.is_main():
            atomic_write_json(Path(ctx.run_dir) / "spp_path.json", {"reused": self.search_reused, "cache": self.search_dir, "path": self.path})
        return True

    def load_search(self, cache_dir: Path) -> None:
        """A cached search (StageCache logged the reuse)."""
        flat = load_file(str(cache_dir / "search.safetensors"))
        path = json.loads((cache_dir / "path.json").read_text())
        search: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in flat.items():
            k, field = name.rsplit("/", 1)
            search.setdefault(k, {})[field] = t
        self.search, self.path = search, path

    def run_search(self, ctx: PruneContext) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
        from pruneflow.trainer import _fault_injection, _fault_signal, grads_finite

        model = ctx.model
        masks = PairedMasks(model, share_heads=self.share_heads, allowed=self._allowed, sites=self.mask_sites)
        trainable = {p: p.requires_grad for p in model.parameters()}
        for p in trainable:
            p.requires_grad_(False)  # W frozen during the search
        params = masks.params()
        opt = torch.optim.Adam(params, lr=self.lr, eps=self.adam_eps) if self.optimizer == "adam" else torch.optim.SGD(params, lr=self.lr)
        z = [torch.zeros_like(p) for p in params]
        gamma = [torch.zeros_like(p) for p in params]
        entry = [torch.full(p.shape, NOT_ENTERED, dtype=torch.long, device=p.device) for p in params]
        support = [torch.zeros(p.shape, dtype=torch.long, device=p.device) for p in params]
        beta1 = opt.param_groups[0].get("betas", (0.9, 0.999))[0]
        costs = [e.cost() for e in masks]
        kinds = [e.kind for e in masks]
        path: list[dict[str, Any]] = []
        per_epoch, epochs = self._search_epochs(ctx)
        trainer = ctx.extra.get("trainer")
        save = ctx.extra.get("checkpoint")  # the run's checkpoint writer (none through the Python API)
        every = int(trainer.cfg.get("checkpoint_every", 0) or 0) if trainer is not None and save is not None else 0
        start, taken = 0, 0  # taken: optimizer steps taken (Adam's bias correction counts these)
        resume = ctx.extra.get("resume")  # a checkpoint of this search: a stopped or killed run goes on from it
        if resume is not None:
            start, taken, path = int(resume["step"]), int(resume["taken"]), list(resume["path"])
            with torch.no_grad():
                for mine, saved in ((params, resume["m"]), (z, resume["z"]), (gamma, resume["gamma"]),
                                    (entry, resume["entry"]), (support, resume["support"])):
                    for t, v in zip(mine, saved, strict=True):
                        t.copy_(v)
            opt.load_state_dict(resume["optimizer"])
            log.info("SPP search: resuming at step %d of %d from the run's checkpoint.", start, ctx.total_steps)
        data = ctx.batches(start) if start else ctx.batches()  # the API's batches() take no start (no checkpoints there)
        # trainer.precision=fp16: the search's own gradient scaler (small mask gradients would
        # flush to zero in fp16); a step it skips for inf/NaN gradients is skipped whole, Z and
        # Γ included (their optimizer updates them in its step()). Their search runs in fp32.
        scaler = torch.amp.GradScaler(ctx.device.type) if getattr(trainer, "scaler", None) is not None else None
        if resume is not None and scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])

        def checkpoint(done: int) -> None:
            """The search's state after ``done`` steps, in the run's checkpoint (stage prune,
            not complete). The weights are saved unmasked: W is frozen, the masks are state."""
            state = {"step": done, "taken": taken, "path": path, "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     **{name: [t.detach().clone() for t in ts] for name, ts in
                        (("m", params), ("z", z), ("gamma", gamma), ("entry", entry), ("support", support))}}
            save(done, {"method_loop": state}, masks.unmasked_state_dict())

        model.train()
        masks.attach()
        try:
            bar = progress(range(start, ctx.total_steps), desc="spp search", initial=start, total=ctx.total_steps, leave=False,
                           disable=not distributed.is_main())
            for step in bar:
                batch = distributed.shard(next(data))  # torchrun: this rank's share of the batch
                # their engine.py checks at batch i % interval == 0 of each epoch (i restarts every
                # epoch) and at the last step
                checked = (step % per_epoch) % self.check_every == 0 or step == ctx.total_steps - 1
                lr = self.lr
                if self.lr_schedule == "cosine_epochs":
                    lr = search_lr_at(step // per_epoch, epochs, self.lr, self.min_lr)
                    for group in opt.param_groups:
                        group["lr"] = lr
                loss = ctx.loss_fn(model, batch)
                coupling = sum(((m - g) ** 2).sum() for m, g in zip(params, gamma, strict=True)) / (2 * self.nu)
                total = loss + coupling
                (scaler.scale(total) if scaler is not None else total).backward()
                distributed.average_gradients(params)  # identical masks, Z and Γ on every rank
                value = distributed.mean_scalar(float(loss.detach()), ctx.device)
                if not math.isfinite(value):
                    raise TrainingDiverged(f"The loss became {value} at step {step} of the SPP search. Lower method.search_lr (now {self.lr:g}).")
                if scaler is not None:
                    scaler.unscale_(opt)
                    finite = grads_finite(scaler, opt)
                    scaler.step(opt)
                    scaler.update()
                else:
                    finite = True
                    opt.step()
                opt.zero_grad(set_to_none=True)
                taken += finite
                step_lr = self.z_lr(ctx.total_steps, lr, taken, beta1)
                with torch.no_grad():
                    for i, m in enumerate(params):
                        if finite:
                            z[i], gamma[i] = lbi_update(m, z[i], gamma[i], step_lr, self.kappa, self.lam)
                        entry[i] = record_entries(entry[i], gamma[i], step)
                        if checked:  # their step_record: checks spent in the support
                            support[i] += (gamma[i] != 0).long()
                point = self._path_point(step + 1, entry, gamma, costs, kinds, value)
                point["lr"] = lr
                path.append(point)
                bar.set_postfix(loss=f"{value:.4f}", support=f"{point['support']:.3f}", refresh=False)
                if every > 0 and (step + 1) % every == 0 and step + 1 < ctx.total_steps:
                    checkpoint(step + 1)
                    _fault_injection("spp", step + 1)
                _fault_signal("spp", step + 1)
                signum = STOP.requested()
                if signum is not None:  # a scheduler's SIGTERM: stop now, not at the search's end (it was 26 s later)
                    bar.close()
                    if save is not None:
                        checkpoint(step + 1)
                    raise RunStopped(
                        f"Stopped by {stop_name(signum)} at step {step + 1} of {ctx.total_steps} of the SPP search; "
                        + ("a checkpoint was saved. Run the same command again to resume from it." if save is not None else
                           "run it again to search from the start."), signum)
            bar.close()
        finally:
            masks.detach()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
        result = {e.key: {"entry_step": entry[i].cpu(), "z": z[i].cpu(), "m": params[i].detach().cpu(), "support": support[i].cpu()}
                  for i, e in enumerate(masks)}
        entered = sum(int((x != NOT_ENTERED).sum()) for x in entry)
        log.info("SPP search: %d steps, %d of %d mask entries entered the support", ctx.total_steps, entered, sum(x.numel() for x in entry))
        return result, path

    def _search_epochs(self, ctx: PruneContext) -> tuple[int, int]:
        """(batches per epoch, epochs) of the search: the epochs of the authors' schedule."""
        from pruneflow.trainer import batches_per_epoch

        spec, trainer = ctx.extra.get("stage"), ctx.extra.get("trainer")
        if spec is None or ctx.task is None or ctx.task.train_set is None:
            return max(ctx.total_steps, 1), 1
        per_epoch = batches_per_epoch(len(ctx.task.train_set), int(spec.batch_size), bool(getattr(trainer, "drop_last", True)))
        return per_epoch, max(1, math.ceil(ctx.total_steps / per_epoch))

    def _path_point(self, step: int, entry: list[torch.Tensor], gamma: list[torch.Tensor], costs: list[int], kinds: list[str], loss: float) -> dict[str, Any]:
        """Where the path is: share of entries that have entered, the sparsity of the model
        keeping only those, and the current support of Γ, per type."""
        kept_w = self.prunable_total - sum(c * x.numel() for c, x in zip(costs, entry, strict=True))
        kept_w += sum(c * int((x != NOT_ENTERED).sum()) for c, x in zip(costs, entry, strict=True))
        point: dict[str, Any] = {"step": step, "loss": round(loss, 6), "sparsity": round(1 - kept_w / max(self.prunable_total, 1), 6)}
        n_all = sum(x.numel() for x in entry)
        point["support"] = round(sum(int((g > 0).sum()) for g in gamma) / max(n_all, 1), 6)
        # entries that entered earlier but are outside the support now (the path is not monotone there)
        point["exited"] = sum(int(((x != NOT_ENTERED) & (g <= 0)).sum()) for x, g in zip(entry, gamma, strict=True))
        for kind in TYPES:
            xs = [x for x, k in zip(entry, kinds, strict=True) if k == kind]
            if xs:
                point[f"entered_{kind}"] = round(sum(int((x != NOT_ENTERED).sum()) for x in xs) / sum(x.numel() for x in xs), 6)
        return point

    # -- choosing a ratio and compressing ----------------------------------------------------------------
    def pools(self, masks: PairedMasks) -> Iterator[tuple[tuple[str, ...], list[int], list[dict[str, torch.Tensor]], list[torch.Tensor]]]:
        """Per pool of ``method.grouping`` with entries here: its kinds, the indices of its
        masks, their search records and their support counts (0 where none were kept)."""
        assert self.search is not None
        for pool in GROUPINGS[self.grouping]:
            idx = [i for i, e in enumerate(masks.entries) if e.kind in pool]
            if idx:
                data = [self.search[masks.entries[i].key] for i in idx]
                yield pool, idx, data, [d.get("support", torch.zeros_like(d["entry_step"])) for d in data]

    def keep_vectors(self, masks: PairedMasks) -> list[torch.Tensor]:
        """Kept entries for the run's sparsity: the same fraction of weights removed from
        each pool (``method.grouping``: the authors' attention and FFN pools, or one per
        type), globally ranked across layers within a pool."""
        assert self.search is not None
        if self.ratio == "entries":
            return self.authors_keep_vectors(masks)
        covered = sum(e.cost() * e.param.numel() for e in masks)
        frac = self.sparsity * self.prunable_total / max(covered, 1)  # removed fraction of SPP-covered weights
        keep: list[torch.Tensor | None] = [None] * len(masks)
        for _, idx, s, supports in self.pools(masks):
            if self.rank != "support_time":
                supports = None
            prio = global_priority([d["entry_step"] for d in s], [d["z"] for d in s], [d["m"] for d in s], supports)
            costs = [masks.entries[i].cost() for i in idx]
            total = sum(c * p.numel() for c, p in zip(costs, prio, strict=True))
            for i, k in zip(idx, global_keep(prio, costs, frac * total), strict=True):
                keep[i] = k
        return keep  # type: ignore[return-value]

    def authors_keep_vectors(self, masks: PairedMasks) -> list[torch.Tensor]:
        """``method.ratio=entries``: their threshold per pool (:func:`authors_pool_keep`).
        A mask left with no entry (theirs would build an empty layer) keeps its
        best-ranked one."""
        assert self.search is not None
        keep: list[torch.Tensor | None] = [None] * len(masks)
        self.removed_entries = {}
        for pool, idx, data, supports in self.pools(masks):
            kept = authors_pool_keep(supports, self.entry_fraction)
            name, total = "+".join(pool), sum(t.numel() for t in supports)
            self.removed_entries[name] = removed = total - sum(int(k.sum()) for k in kept)
            if removed < self.entry_fraction * total / 2:
                flat = torch.cat([t.reshape(-1) for t in supports])
                threshold = flat[torch.cat([k.reshape(-1) for k in kept])].min()
                log.warning(
                    "SPP method.ratio=entries removed %d of the %d %s entries (asked: %s): %d entries share the threshold's "
                    "support count %g (0: never in the support), and the authors' rule keeps every entry that ties with it.",
                    removed, total, name, self.entry_fraction, int((flat == threshold).sum()), float(threshold))
            for i, d, sup, k in zip(idx, data, supports, kept, strict=True):
                k = k.reshape(-1).clone()
                if not bool(k.any()):
                    best = int(rank_entries(d["entry_step"].reshape(-1), d["z"].reshape(-1), d["m"].reshape(-1), sup.reshape(-1))[0])
                    k[best] = True
                    log.warning("SPP method.ratio=entries: %s has no entry at or above the threshold; its best-ranked one is kept.",
                                masks.entries[i].key)
                keep[i] = k
        return keep  # type: ignore[return-value]

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.search is None or self.compressed:
            return model
        if not self.prunable:  # resumed run: validate() ran on this method object, but be safe
            self.prunable = {w.name for w in self.ctx.weights} if self.ctx is not None else set()
        masks = PairedMasks(model, share_heads=self.share_heads, allowed=self._allowed)
        self.layers = masks.kept_layers(self.keep_vectors(masks))
        compress(model, self.layers, self.attention_scale)
        self.compressed = True
        log.info("SPP: compressed (%s); %d parameters", f"sparsity {self.sparsity:.3f}" if self.sparsity is not None else
                 f"the authors' rule: {self.entry_fraction} of each pool's entries", sum(p.numel() for p in model.parameters()))
        return model

    # -- reporting and export --------------------------------------------------------------------------------
    def sparsity_report(self, model: nn.Module, original_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
        """Structurally removed weights against the original shapes of the prunable weights."""
        state = model.state_dict()
        per_layer, removed, total = {}, 0, 0
        for name, shape in original_shapes.items():
            n = math.prod(shape)
            r = n - state[name].numel()
            per_layer[name] = round(r / n, 6)
            removed += r
            total += n
        return {"measured": round(removed / max(total, 1), 6), "per_layer": per_layer}

    def export_config(self) -> dict[str, Any] | None:
        if not self.compressed or self.layers is None:
            return None
        scale = {"attention_scale": self.attention_scale} if self.attention_scale != "original" else {}
        return structure_info(self.layers, method="spp", sparsity=self.sparsity, share_heads=self.share_heads, **scale)

    def summary(self) -> dict[str, Any]:
        if self.search is None:
            return {}
        info: dict[str, Any] = {
            "search_reused": self.search_reused,
            "search_cache": self.search_dir,
            "search_steps": len(self.path),
            "search_lr": self.lr,
            **({"search_lr_schedule": self.lr_schedule, "search_min_lr": self.min_lr} if self.lr_schedule != "constant" else {}),
            "path_file": "spp_path.json",
            "entered_at_end": {k: v for k, v in (self.path[-1] if self.path else {}).items() if k.startswith("entered_")},
            "path_sparsity_at_end": self.path[-1]["sparsity"] if self.path else None,
            **({"ratio": "entries", "entry_fraction": self.entry_fraction, "removed_entries": dict(self.removed_entries)}
               if self.ratio == "entries" else {}),
        }
        if self.layers is not None:
            info["kept"] = {
                p: {"qk": max(map(len, k["qk"])), "vo": max(map(len, k["vo"])), "ffn": len(k["ffn"])} for p, k in self.layers.items()
            }
        return info

    # -- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.search is None:
            return {}
        return {"search": self.search, "path": self.path, "search_reused": self.search_reused, "search_dir": self.search_dir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("search") is not None:
            # on the CPU, as the search left them (a checkpoint loads onto the run's device)
            self.search = {k: {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in v.items()} for k, v in state["search"].items()}
            self.path = list(state.get("path", []))
            self.search_reused = state.get("search_reused")
            self.search_dir = state.get("search_dir")
