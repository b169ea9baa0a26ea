"""Mask selection: exact top-k over one or many score tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept at ``sparsity`` (rounded to the nearest weight)."""
    return total - int(round(sparsity * total))


@torch.no_grad()
def topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """0/1 mask (dtype of ``scores``) keeping exactly ``n_keep`` largest entries.

    Ties at the threshold are broken by position so the count is exact.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    if n_keep >= n:
        mask.fill_(1)
    elif n_keep > 0:
        # kthvalue on the negated scores: the n_keep-th largest value.
        thresh = torch.kthvalue(flat.float().cpu(), n - n_keep + 1).values.to(flat.device)
        above = flat > thresh
        n_above = int(above.sum())
        mask[above] = 1
        if n_above < n_keep:
            ties = torch.nonzero(flat == thresh).flatten()[: n_keep - n_above]
            mask[ties] = 1
    return mask.view_as(scores)


@torch.no_grad()
def global_topk_masks(scores: Sequence[torch.Tensor], n_keep: int) -> list[torch.Tensor]:
    """Exact global top-k across tensors of different shapes."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    mask = topk_mask(flat, n_keep)
    out, start = [], 0
    for s in scores:
        out.append(mask[start : start + s.numel()].view_as(s))
        start += s.numel()
    return out


@torch.no_grad()
def local_topk_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Each tensor keeps its own top ``1 - sparsity`` fraction."""
    return [topk_mask(s, kept_count(s.numel(), sparsity)) for s in scores]
