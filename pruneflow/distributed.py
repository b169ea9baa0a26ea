"""Multi-GPU (or multi-process CPU) training through ``torchrun`` and ``torch.distributed``.

``torchrun --nproc_per_node N -m pruneflow.cli ...`` starts N copies of the same run.
Every rank builds the same model and sees the same global batches (the order is
seeded); each takes an equal shard of every batch, gradients are averaged across
ranks right after backward (before the method's ``after_backward`` hook), so every
rank holds identical gradients, weights, scores, thresholds and masks — the
global batch and the result are those of a single process with the same
``batch_size``. Evaluation and methods' own loops (scoring, search) run
replicated on every rank. Only rank 0 writes files (checkpoints, caches,
result.json, model, predictions) and logs to W&B.

Without torchrun (no ``WORLD_SIZE`` in the environment) every function here is a
no-op, so single-process runs are unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pruneflow.errors import UserError

log = logging.getLogger("pruneflow")

# Gradients are all-reduced in flat buckets of about this many bytes (as DDP does).
BUCKET_BYTES = 25 * 2**20


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); idempotent."""
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    if not is_main():  # one copy of the log is enough
        logging.getLogger("pruneflow").setLevel(logging.WARNING)
    log.info("torch.distributed: %d processes, backend %s", world_size(), backend)


def info() -> dict[str, Any] | None:
    if not is_distributed():
        return None
    return {"world_size": world_size(), "backend": dist.get_backend()}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shared_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory for every rank. With the default ``outputs/<day>/<time>``
    rank 0 claims a folder no other command has (``config._fresh_dir``) and the others
    follow it here: their log moves there too, and a folder Hydra made for them alone is
    removed once empty."""
    from pruneflow.config import OTHER_RANK_DIRS

    chosen = Path(broadcast_object(str(run_dir)))
    if chosen == run_dir:
        return chosen
    _move_file_logs(run_dir, chosen)
    own = run_dir.absolute()
    base = next((Path(b) for b in OTHER_RANK_DIRS if own == Path(b) or Path(b) in own.parents), None)
    if base is None:
        log.warning(
            "Rank %d: using rank 0's run directory %s instead of %s; pass the same hydra.run.dir (or hydra.sweep.dir) "
            "to every rank.", rank(), chosen, run_dir,
        )
    elif not OTHER_RANK_DIRS[str(base)]:
        _remove_empty_dirs(own, base)
    return chosen


def _move_file_logs(old_dir: Path, new_dir: Path) -> None:
    """Point the root logger's file handlers that write into ``old_dir`` (Hydra's
    ``<job>.log``) at the same file name in ``new_dir``; an old log left empty is deleted."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler) or Path(handler.baseFilename).parent != old_dir.absolute():
            continue
        moved = logging.FileHandler(new_dir / Path(handler.baseFilename).name, mode="a", encoding=handler.encoding)
        moved.setFormatter(handler.formatter)
        moved.setLevel(handler.level)
        for f in handler.filters:
            moved.addFilter(f)
        root.addHandler(moved)
        root.removeHandler(handler)
        handler.close()
        old = Path(handler.baseFilename)
        if old.exists() and old.stat().st_size == 0:
            old.unlink()


def _remove_empty_dirs(path: Path, top: Path) -> None:
    """``path`` and its parents up to ``top``, each only if empty."""
    for d in [path, *path.parents]:
        try:
            d.rmdir()
        except OSError:
            return
        if d == top:
            return


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical initial weights)."""
    if not is_distributed():
        return
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            dist.broadcast(t, src=0)


def check_batch_size(batch_size: int, stage: str) -> None:
    n = world_size()
    if n > 1 and batch_size % n != 0:
        raise UserError(
            f"Invalid value for 'stages.{stage}.batch_size': {batch_size}. With {n} processes each takes an "
            f"equal share of every batch; allowed: a multiple of {n}."
        )


def shard(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of a global batch (every rank gets the same number)."""
    n = world_size()
    if n == 1:
        return batch
    r = rank()
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            per = v.shape[0] // n
            out[k] = v[r * per : (r + 1) * per]
        else:
            out[k] = v
    return out


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (bucketed all-reduce)."""
    if not is_distributed():
        return
    n = world_size()
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        if len(bucket) == 1:
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            bucket[0].div_(n)
        else:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(n)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket.clear()

    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            flush()
            size = 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()


def mean_scalar(value: float, device: torch.device) -> float:
    """The mean of a per-rank number (e.g. the loss), identical on every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world_size()


def tensors_hash(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_identical(what: str, fingerprints: dict[str, str]) -> list[dict[str, str]]:
    """Gather every rank's fingerprints; raise if any rank differs from rank 0."""
    all_fp = gather_objects(fingerprints)
    bad = [i for i, fp in enumerate(all_fp) if fp != all_fp[0]]
    if bad:
        raise RuntimeError(f"torch.distributed: ranks {bad} disagree with rank 0 on {what}: {all_fp}")
    return all_fp
