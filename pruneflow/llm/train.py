"""Training a causal LM on text: tiny_llama's short pre-training when it is built, and
the optional recovery after pruning (``recovery=full`` or ``recovery=lora``).

The text is the task's training split, tokenized once and cut into non-overlapping
windows (as the ``transformers`` ``run_clm`` example groups texts), drawn in a seeded
order. AdamW, a linear decay after ``warmup_steps``, gradient clipping.

``recovery=full`` trains every weight with the pruned ones held at exactly zero (their
gradients are zeroed before the step, the weights after it). ``recovery=lora`` trains
LoRA adapters (``peft``) on the prunable Linears while the sparse weights stay frozen;
the adapters are kept separate (a merged adapter would fill the zeros): evaluation runs
with them, ``model/`` holds the sparse weights and ``adapter/`` the adapters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pruneflow.utils import progress

log = logging.getLogger("pruneflow")


def text_windows(tokenizer: Any, rows: Iterable[str], seqlen: int) -> torch.Tensor:  # noqa: ANN401
    """The rows joined with "\\n\\n", tokenized once, cut into (n, seqlen) windows."""
    ids = tokenizer("\n\n".join(r for r in rows if r.strip()), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen)


def train_causal_lm(model: nn.Module, windows: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
                    device: torch.device, warmup_steps: int = 0, max_grad_norm: float = 1.0, weight_decay: float = 0.0,
                    keep_zero: list[nn.Parameter] | None = None, desc: str = "train") -> list[float]:
    """``steps`` AdamW steps of next-token loss on random batches of ``windows``; the
    parameters in ``keep_zero`` keep their zeros. Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup_steps if s < warmup_steps else max(0.0, (steps - s) / max(1, steps - warmup_steps)))
    masks = [(p, p != 0) for p in (keep_zero or [])]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=g)
    pos = 0
    losses = []
    model.train()
    for _ in progress(range(steps), desc=desc):
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(windows.shape[0], generator=g), 0
        batch = windows[order[pos:pos + batch_size]].to(device)
        pos += batch_size
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{desc}: the loss is {float(loss.detach())} at step {len(losses)}; lower the learning rate.")
        loss.backward()
        for p, m in masks:
            if p.grad is not None:
                p.grad.mul_(m)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in masks:
                p.mul_(m)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
