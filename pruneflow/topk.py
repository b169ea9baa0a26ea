"""Mask selection: exact top-k over one or many score tensors, without a full sort.

A global threshold over the ~85M prunable weights of BERT-base is needed at every
pruning step; ``torch.kthvalue`` or a sort over all of them costs seconds on a
CPU. Instead (the classic sample-then-select):

1. bracket the k-th largest score between two quantiles of a fixed random sample
   of the scores, a few standard deviations of the sample quantile apart;
2. one pass over all scores counts those above the bracket and marks those in it;
3. the exact k-th largest is found among the few scores inside the bracket.

A bracket that misses (rare) is widened until it is the whole range, so the
result is always exact. Ties at the threshold are broken by position (earlier
entries kept) so that a mask holds exactly ``n_keep`` ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pruneflow.fused import Kernel

#: below this many scores a direct kthvalue is cheaper than sampling
DIRECT_MAX = 1 << 18
SAMPLE_SIZE = 1 << 17
MIN_SAMPLE = 1 << 13


@torch.no_grad()
def kept_count(total: int, sparsity: float) -> int:
    """Number of weights kept at ``sparsity`` (rounded to the nearest weight)."""
    return total - int(round(sparsity * total))


# --- kernels (pure elementwise functions; compiled by TopK(compiled=True)) ------------
def _band_blocks(xb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the scores viewed as (blocks, BLOCK): #(x > hi) and, per block,
    how many scores lie in [lo, hi] (so only those blocks are read again)."""
    inband = ((xb >= lo) & (xb <= hi)).to(torch.float32)
    return torch.count_nonzero(xb > hi), inband.sum(1)


def _write_gt(x: torch.Tensor, thr: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x > thr)


def _write_ge(x: torch.Tensor, thr: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x >= thr)


BLOCK = 16


class TopK:
    """Exact top-k masks written into existing (flat) mask tensors.

    ``compiled`` fuses each pass over the scores with ``torch.compile``. The
    random sample is fixed per size (seeded), so masks are deterministic and equal
    on every process. Memory: no score-sized temporaries (the band pass writes one
    float per block of 16 scores).
    """

    def __init__(self, compiled: bool = False, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.band = Kernel(_band_blocks, compiled)
        self.write_gt = Kernel(_write_gt, compiled)
        self.write_ge = Kernel(_write_ge, compiled)
        self.sample_size = sample_size
        self.seed = seed
        self._samples: dict[tuple[int, str], torch.Tensor] = {}

    def _sample_index(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, str(device))
        if key not in self._samples:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
            # A per-matrix top-k (method.scope=local) selects in many ~0.6M-score tensors every
            # step: there two quantiles of a 131k sample cost more than the pass itself, so the
            # sample shrinks with n (1/64 of it, at least 8k); the bracket widens in proportion.
            size = min(self.sample_size, max(MIN_SAMPLE, n >> 6))
            idx = torch.randint(0, n, (size,), generator=g).sort().values
            self._samples[key] = idx.to(device)
        return self._samples[key]

    @torch.no_grad()
    def mask_(self, scores: torch.Tensor, n_keep: int, out: torch.Tensor) -> None:
        """Write into ``out`` (same numel as ``scores``, any float dtype) a 0/1 mask
        keeping exactly the ``n_keep`` largest scores."""
        x = scores.reshape(-1)
        flat_out = out.view(-1)
        n = x.numel()
        if n_keep >= n:
            flat_out.fill_(1)
            return
        if n_keep <= 0:
            flat_out.zero_()
            return
        if n <= DIRECT_MAX:
            thr = torch.kthvalue(x, n - n_keep + 1).values
            above = x > thr
            need = n_keep - int(torch.count_nonzero(above))
            ties = torch.nonzero(x == thr).squeeze(1)
            flat_out.copy_(above)
            flat_out[ties[:need]] = 1
            return
        vals, pos_fn, need = self._bracket(x, n_keep)
        thr = torch.kthvalue(vals, vals.numel() - need + 1).values  # need-th largest in the band
        need_ties = need - int(torch.count_nonzero(vals > thr))
        is_tie = vals == thr
        if need_ties == int(torch.count_nonzero(is_tie)):
            self.write_ge(x, thr, flat_out)
        else:  # keep the first `need_ties` positions holding the threshold value
            self.write_gt(x, thr, flat_out)
            flat_out[pos_fn(is_tie)[:need_ties]] = 1

    def _bracket(self, x: torch.Tensor, n_keep: int):  # noqa: ANN202
        """The scores inside a bracket [lo, hi] that holds the n_keep-th largest, a
        function giving the positions of a subset of them, and how many are kept."""
        n = x.numel()
        n_main = n - n % BLOCK
        xb, tail = x[:n_main].view(-1, BLOCK), x[n_main:]
        sample = x[self._sample_index(n, x.device)]
        m = sample.numel()

        def largest(i: int) -> torch.Tensor:  # the i-th largest sample value (0-based); no full sort
            return torch.kthvalue(sample, m - i).values

        pos = n_keep / n * m
        # 2.5 standard deviations of the sample quantile on either side: a bracket misses
        # about 1 time in 80 (costing one more pass); a wider one makes every step slower.
        margin = 2.5 * math.sqrt(m * (n_keep / n) * (1 - n_keep / n)) + 8
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        # -inf marks pruned weights of no-regrowth methods (most of the scores at high
        # sparsity): the bracket excludes them unless the last, whole-range attempt needs them.
        lowest = torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        for attempt in range(4):
            i_hi, i_lo = math.floor(pos - margin), math.ceil(pos + margin)
            last = attempt == 3  # the whole range: cannot miss
            hi = largest(i_hi) if i_hi >= 0 and not last else inf
            lo = (torch.maximum(largest(i_lo), lowest) if i_lo < m else lowest) if not last else -inf
            n_above, per_block = self.band(xb, lo, hi)
            tail_in = (tail >= lo) & (tail <= hi)
            need = n_keep - int(n_above) - int(torch.count_nonzero(tail > hi))
            n_band = int(per_block.sum()) + int(torch.count_nonzero(tail_in))
            if 1 <= need <= n_band:
                break
            margin *= 8
        else:
            raise RuntimeError("top-k selection failed: the scores contain NaN")
        blocks = torch.nonzero(per_block).squeeze(1)
        rows = torch.index_select(xb, 0, blocks)
        in_rows = ((rows >= lo) & (rows <= hi)).view(-1)
        sel = torch.nonzero(in_rows).squeeze(1)
        vals = torch.cat([rows.view(-1)[sel], tail[tail_in]])

        def positions(subset: torch.Tensor) -> torch.Tensor:
            """Ascending positions in x of the band scores selected by ``subset``."""
            p_main = blocks[sel // BLOCK] * BLOCK + sel % BLOCK
            p_tail = torch.nonzero(tail_in).squeeze(1) + n_main
            return torch.cat([p_main, p_tail])[subset]

        return vals, positions, need


_EAGER = TopK(compiled=False)


@torch.no_grad()
def topk_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """0/1 mask (dtype of ``scores``) keeping exactly ``n_keep`` largest entries.

    Ties at the threshold are broken by position so the count is exact.
    """
    mask = torch.empty_like(scores, dtype=scores.dtype if scores.is_floating_point() else torch.float32)
    _EAGER.mask_(scores.float() if not scores.is_floating_point() else scores, n_keep, mask)
    return mask


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
