"""Mask selection: exact top-k over one or many score tensors, without a full sort.

A global threshold over the ~85M prunable weights of BERT-base is needed at every
pruning step; ``torch.kthvalue`` or a sort over all of them costs seconds on a
CPU. Instead (the classic sample-then-select):

1. bracket the k-th largest score between two quantiles of a fixed random sample
   of the scores, a few standard deviations of the sample quantile apart;
2. one pass over all scores counts those above the bracket and marks those in it;
3. the exact k-th largest is found among the few scores inside the bracket.

Selections repeated on the same tensor (a method's scores, every step) start
from the last threshold instead of a sample: the scores move little between two
steps, or drift steadily (a running sum), so a narrow bracket around it (shifted by
the change of ``n_keep`` and by the last drift) holds the new k-th largest and skips
the sample's quantiles; on a miss the sampled
bracket is used. Per-matrix selections (``masks_``) share the counting pass and the
pass writing the mask across the matrices whose last threshold is known. A bracket
that misses (rare) is widened until it is the whole
range, so the result is always exact and does not depend on the guess. Ties at the threshold are broken by position (earlier
entries kept) so that a mask holds exactly ``n_keep`` ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def _band_rows(x3: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_band_blocks`` for many tensors at once: scores viewed as (rows, blocks, BLOCK)
    with one bracket per row. Returns #(x > hi) per row and the in-band count per block.
    Both come from one sum per block, (x >= lo) + 31 (x > hi) = in-band + 32 above (at
    most 528, exact in float32): one reduction, so one loop over the scores (two
    reductions took two loops)."""
    v = ((x3 >= lo).to(torch.float32) + (x3 > hi).to(torch.float32) * 31).sum(2)
    above = torch.floor(v * (1 / 32))
    return above.sum(1, dtype=torch.float64), v - 32 * above


def _write_ge_rows(x2: torch.Tensor, thr: torch.Tensor, out2: torch.Tensor) -> None:
    out2.copy_(x2 >= thr)


def _write_gt(x: torch.Tensor, thr: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x > thr)


def _write_ge(x: torch.Tensor, thr: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x >= thr)


BLOCK = 16
#: blocks per row when one tensor's counting pass runs as rows (``_band_rows``)
ROW_BLOCKS = 1 << 16


class TopK:
    """Exact top-k masks written into existing (flat) mask tensors.

    ``compiled`` fuses each pass over the scores with ``torch.compile``. The
    random sample is fixed per size (seeded), so masks are deterministic and equal
    on every process. Memory: no score-sized temporaries (the band pass writes one
    float per block of 16 scores). ``remember``: start each selection in a tensor
    from the last one in it (for a method's persistent score buffers; temporaries
    would only fill the table with addresses that do not come back).
    """

    def __init__(self, compiled: bool = False, sample_size: int = SAMPLE_SIZE, seed: int = 0, remember: bool = False) -> None:
        self.band = Kernel(_band_blocks, compiled)
        self.write_gt = Kernel(_write_gt, compiled)
        self.write_ge = Kernel(_write_ge, compiled)
        self.band_rows = Kernel(_band_rows, compiled)
        self.write_rows = Kernel(_write_ge_rows, compiled)
        self.sample_size = sample_size
        self.seed = seed
        self._samples: dict[tuple[int, str], torch.Tensor] = {}
        self.remember = remember
        self._tensors: dict[tuple, _Tensor] = {}  # per scored tensor (address, size, device)
        # masks_'s row layout per (segments, device): the same every step of a run
        self._tiles: dict[tuple, tuple[int, torch.Tensor] | None] = {}

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
        if self._trivial(x, n_keep, flat_out):
            return
        state = self._state(x)
        self._select(x, n_keep, flat_out, state, state.next_guess() if state is not None else None)

    @torch.no_grad()
    def kth_largest(self, scores: torch.Tensor, k: int) -> float:
        """The exact ``k``-th largest score (1-based; ties counted, as ``torch.kthvalue``
        of the ``n - k + 1``-th smallest), by the same bracket as ``mask_`` (a pass or
        two instead of kthvalue's seconds over tens of millions of scores)."""
        x = scores.reshape(-1)
        n = x.numel()
        if not 1 <= k <= n:
            raise ValueError(f"k={k} outside 1..{n}")
        if n <= DIRECT_MAX:
            return float(torch.kthvalue(x, n - k + 1).values)
        state = self._state(x)
        return float(self._exact_threshold(x, k, state, state.next_guess() if state is not None else None)[0])

    def _trivial(self, x: torch.Tensor, n_keep: int, flat_out: torch.Tensor) -> bool:
        """Keep all, keep none, or a tensor small enough for a direct kthvalue: done here."""
        n = x.numel()
        if n_keep >= n:
            flat_out.fill_(1)
        elif n_keep <= 0:
            flat_out.zero_()
        elif n <= DIRECT_MAX:
            thr, is_tie, need_ties, all_ties = _threshold(x, n_keep)
            flat_out.copy_(x >= thr if all_ties else x > thr)
            if not all_ties:
                flat_out[torch.nonzero(is_tie).squeeze(1)[:need_ties]] = 1
        else:
            return False
        return True

    def _state(self, x: torch.Tensor) -> _Tensor | None:
        if not self.remember:
            return None
        return self._tensors.setdefault((x.data_ptr(), x.numel(), str(x.device)), _Tensor())

    def _exact_threshold(self, x: torch.Tensor, n_keep: int, state: _Tensor | None, guess: _Guess | None):  # noqa: ANN202
        """The n_keep-th largest of ``x`` (and ``_threshold``'s tie facts, and the band's
        position function), from a bracket; the tensor's guess is updated."""
        vals, pos_fn, need, band = self._bracket(x, n_keep, guess)
        if guess is not None:
            state.count(hit=band[3] is not None)
        thr, is_tie, need_ties, all_ties = _threshold(vals, need)
        if state is not None:
            state.guess = _next_guess(state.guess, float(thr), n_keep, *band)
        return thr, is_tie, need_ties, all_ties, pos_fn

    def _select(self, x: torch.Tensor, n_keep: int, flat_out: torch.Tensor, state: _Tensor | None, guess: _Guess | None) -> None:
        thr, is_tie, need_ties, all_ties, pos_fn = self._exact_threshold(x, n_keep, state, guess)
        if all_ties:
            self.write_ge(x, thr, flat_out)
        else:  # keep the first `need_ties` positions holding the threshold value
            self.write_gt(x, thr, flat_out)
            flat_out[pos_fn(is_tie)[:need_ties]] = 1

    @torch.no_grad()
    def masks_(self, scores: torch.Tensor, segments: Sequence[tuple[int, int]], n_keeps: Sequence[int], out: torch.Tensor) -> None:
        """Per-segment top-k (``method.scope=local``): ``out[start:start+n]`` keeps the
        ``n_keeps[i]`` largest of ``scores[start:start+n]`` for each ``(start, n)`` in
        ``segments``. The same masks (and remembered guesses) as ``mask_`` on each segment.

        With ``remember``, segments that tile one range, all multiples of a common row
        length, share their passes: every segment with a guess is bracketed in one band
        pass and written in one write pass over the whole range, instead of a dozen small
        ops per segment (BERT-base's 72 matrices with 2 threads: 42-49 ms per step shared,
        53-72 ms one by one). The others (no guess, a missed guess, small or trivial segments) are then selected
        one by one, as ``mask_`` does."""
        x_all, out_all = scores.reshape(-1), out.view(-1)
        rows = None
        if self.remember and len(segments) > 1:
            key = (tuple(segments), str(scores.device))
            if key not in self._tiles:
                tiles = _tiled_rows(segments)
                self._tiles[key] = None if tiles is None else (tiles[0], tiles[1].to(scores.device))
            rows = self._tiles[key]
        if rows is None:
            for (start, n), k in zip(segments, n_keeps, strict=True):
                self.mask_(x_all[start : start + n], k, out_all[start : start + n])
            return
        row_len, row_seg = rows
        s0, end = segments[0][0], segments[-1][0] + segments[-1][1]
        x, flat_out = x_all[s0:end], out_all[s0:end]
        lowest = float(torch.finfo(x.dtype).min)
        states, guesses, brackets = [], [], []
        for (start, n), k in zip(segments, n_keeps, strict=True):
            xs = x_all[start : start + n]
            big = 0 < k < n and n > DIRECT_MAX
            state = self._state(xs) if big else None
            guess = state.next_guess() if state is not None else None
            states.append(state)
            guesses.append(guess)
            # A segment without a guess gets an empty bracket above everything: nothing
            # in its band, nothing written as kept (it is selected on its own below).
            brackets.append(_guessed_bracket(guess, k, lowest) if guess is not None else (math.inf, math.inf, None))
        todo = [i for i, gs in enumerate(guesses) if gs is None]
        if len(todo) < len(segments):
            lo = torch.tensor([b[0] for b in brackets], dtype=x.dtype, device=x.device)
            hi = torch.tensor([b[1] for b in brackets], dtype=x.dtype, device=x.device)
            lo_l, hi_l = lo.tolist(), hi.tolist()
            seg_of_row = row_seg
            x3 = x.view(-1, row_len // BLOCK, BLOCK)
            above_rows, per_block = self.band_rows(x3, lo[seg_of_row].view(-1, 1, 1), hi[seg_of_row].view(-1, 1, 1))
            n_seg = len(segments)
            above = torch.zeros(n_seg, dtype=torch.float64, device=x.device).index_add_(0, seg_of_row, above_rows)
            in_band = torch.zeros(n_seg, dtype=torch.float64, device=x.device).index_add_(0, seg_of_row, per_block.sum(1, dtype=torch.float64))
            above_l, in_band_l = [int(a) for a in above.tolist()], [int(b) for b in in_band.tolist()]
            blocks = torch.nonzero(per_block.view(-1)).squeeze(1)
            rows_x = torch.index_select(x.view(-1, BLOCK), 0, blocks)
            seg_of_block = seg_of_row[blocks // (row_len // BLOCK)]
            in_rows = ((rows_x >= lo[seg_of_block].unsqueeze(1)) & (rows_x <= hi[seg_of_block].unsqueeze(1))).view(-1)
            sel = torch.nonzero(in_rows).squeeze(1)
            vals = rows_x.view(-1)[sel]
            positions = blocks[sel // BLOCK] * BLOCK + sel % BLOCK  # ascending, so grouped by segment
            thr_seg = [math.inf] * n_seg
            ties: list[torch.Tensor] = []
            offset = 0
            for i, k in enumerate(n_keeps):
                count, offset = in_band_l[i], offset + in_band_l[i]
                if guesses[i] is None:
                    continue
                need = k - above_l[i]
                if not 1 <= need <= count:  # missed: this segment samples on its own below
                    states[i].count(hit=False)
                    todo.append(i)
                    continue
                states[i].count(hit=True)
                v = vals[offset - count : offset]
                thr, is_tie, need_ties, all_ties = _threshold(v, need)
                t = float(thr)
                if all_ties:
                    thr_seg[i] = t
                elif t < math.inf:  # x >= the next float above thr is x > thr; then the first ties
                    thr_seg[i] = float(torch.nextafter(thr, thr.new_tensor(math.inf)))
                    ties.append(positions[offset - count : offset][is_tie][:need_ties])
                else:  # +inf scores tied at the threshold: on its own below
                    todo.append(i)
                    continue
                low, high = lo_l[i], hi_l[i]  # as float32 held them
                low = low if low > lowest else float(v.min())  # clamped: the band starts at its lowest score
                states[i].guess = _next_guess(states[i].guess, t, k, low, high, count, brackets[i][2])
            thr_rows = torch.tensor(thr_seg, dtype=x.dtype, device=x.device)[seg_of_row].view(-1, 1)
            self.write_rows(x.view(-1, row_len), thr_rows, flat_out.view(-1, row_len))
            for pos in ties:
                flat_out[pos] = 1
        for i in sorted(todo):
            (start, n), k = segments[i], n_keeps[i]
            xs, os = x_all[start : start + n], out_all[start : start + n]
            if not self._trivial(xs, k, os):
                self._select(xs, k, os, states[i], None)

    def _band(self, xb: torch.Tensor, tail: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_keep: int):  # noqa: ANN202
        """One pass: how many of the n_keep largest lie inside [lo, hi] (``need``),
        how many scores it holds, and where (per block of BLOCK scores, and in the tail)."""
        n_blocks = xb.shape[0]
        row = min(n_blocks & -n_blocks, ROW_BLOCKS)  # the largest power of two dividing it, capped
        if row >= ROW_BLOCKS // 64:  # as rows: one reduction per block, vectorised (see _band_rows)
            above_rows, per_block = self.band_rows(xb.view(-1, row, BLOCK), lo, hi)
            n_above, per_block = above_rows.sum(), per_block.view(-1)
        else:
            n_above, per_block = self.band(xb, lo, hi)
        tail_in = (tail >= lo) & (tail <= hi)
        need = n_keep - int(n_above) - int(torch.count_nonzero(tail > hi))
        n_band = int(per_block.sum(dtype=torch.float64)) + int(torch.count_nonzero(tail_in))
        return need, n_band, per_block, tail_in

    def _bracket(self, x: torch.Tensor, n_keep: int, guess: _Guess | None):  # noqa: ANN202
        """The scores inside a bracket [lo, hi] that holds the n_keep-th largest, a
        function giving the positions of a subset of them, how many are kept, and the
        band (lo, hi, its size, the guessed threshold or None) for the next guess.

        With a guess from the last selection in this tensor (the scores of a method
        move little from one step to the next) the bracket is around it, narrow, and
        needs no sample; if it misses, the sampled bracket below is used."""
        n = x.numel()
        n_main = n - n % BLOCK
        xb, tail = x[:n_main].view(-1, BLOCK), x[n_main:]
        lowest = torch.tensor(torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        predicted = None
        if guess is not None:
            low, high, predicted = _guessed_bracket(guess, n_keep, float(lowest))
            lo = torch.tensor(low, dtype=x.dtype, device=x.device)
            hi = torch.tensor(high, dtype=x.dtype, device=x.device)
            need, n_band, per_block, tail_in = self._band(xb, tail, lo, hi, n_keep)
            if not 1 <= need <= n_band:
                predicted = None
        if predicted is None:
            lo, hi, need, n_band, per_block, tail_in = self._sampled_band(x, xb, tail, n_keep, lowest)
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

        # A bracket clamped at the lowest float (the rest are -inf: pruned entries of a method
        # without regrowth) starts, for the density, at its lowest score.
        low = float(lo) if float(lo) > float(lowest) or vals.numel() == 0 else float(vals.min())
        return vals, positions, need, (low, float(hi), n_band, predicted)

    def _sampled_band(self, x: torch.Tensor, xb: torch.Tensor, tail: torch.Tensor, n_keep: int, lowest: torch.Tensor):  # noqa: ANN202
        """The bracket from two quantiles of the fixed sample, widened until it holds
        the n_keep-th largest score."""
        n = x.numel()
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
        for attempt in range(4):
            i_hi, i_lo = math.floor(pos - margin), math.ceil(pos + margin)
            last = attempt == 3  # the whole range: cannot miss
            hi = largest(i_hi) if i_hi >= 0 and not last else inf
            lo = (torch.maximum(largest(i_lo), lowest) if i_lo < m else lowest) if not last else -inf
            need, n_band, per_block, tail_in = self._band(xb, tail, lo, hi, n_keep)
            if 1 <= need <= n_band:
                return lo, hi, need, n_band, per_block, tail_in
            margin *= 8
        raise RuntimeError("top-k selection failed: the scores contain NaN")


def _threshold(vals: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """The ``need``-th largest of ``vals``, which of ``vals`` equal it, how many of those
    are kept (ties at the threshold: the first by position), and whether that is all of
    them (then ``>= threshold`` is the mask). The one tie rule of every selection here."""
    thr = torch.kthvalue(vals, vals.numel() - need + 1).values
    is_tie = vals == thr
    need_ties = need - int(torch.count_nonzero(vals > thr))
    return thr, is_tie, need_ties, need_ties == int(torch.count_nonzero(is_tie))


#: shortest row for ``TopK.masks_``'s shared passes (shorter: too many rows to be worth it)
MIN_ROW = 1 << 14


def _tiled_rows(segments: Sequence[tuple[int, int]]) -> tuple[int, torch.Tensor] | None:
    """If the segments tile one range and share a row length (their gcd, a multiple of
    BLOCK and at least MIN_ROW): that length and the segment of each row; else None."""
    row = 0
    for (start, n), (nxt, _) in zip(segments, list(segments[1:]) + [(segments[-1][0] + segments[-1][1], 0)], strict=True):
        if start + n != nxt:
            return None
        row = math.gcd(row, n)
    if row % BLOCK or row < MIN_ROW:
        return None
    return row, torch.repeat_interleave(torch.arange(len(segments)), torch.tensor([n // row for _, n in segments]))


def _guessed_bracket(guess: _Guess, n_keep: int, lowest: float) -> tuple[float, float, float]:
    """The bracket around the last threshold, shifted by the change of n_keep and by the
    last selection's drift: (lo, hi, predicted)."""
    predicted = guess.thr - (n_keep - guess.n_keep) / guess.density + guess.trend
    return max(predicted - guess.half, lowest), predicted + guess.half, predicted


@dataclass
class _Guess:
    """The last selection in one tensor: its threshold and kept count, the score
    density around it (scores per unit of score), the next bracket's half-width and
    the most scores a guessed bracket may hold."""

    thr: float
    n_keep: int
    density: float
    half: float
    cap: int  # scores in the last sampled bracket
    # How far the threshold moved at the last selection beyond what the change of n_keep
    # explains. Scores that accumulate (SEVEN's sum) or whose averages are still rising
    # (PLATON's) drift steadily: extrapolating the drift keeps a narrow bracket on them.
    trend: float = 0.0
    usable: bool = True  # False: its band would hold more scores than sampling reads


@dataclass
class _Tensor:
    """What ``TopK(remember=True)`` keeps per scored tensor. A tensor whose guesses
    keep missing (scores that move a lot between steps) samples for 1, 2, 4, ... 64
    selections before guessing again."""

    guess: _Guess | None = None
    misses: int = 0  # guesses missed in a row
    skip: int = 0  # selections left to sample without guessing

    def next_guess(self) -> _Guess | None:
        if self.skip:
            self.skip -= 1
            return None
        return self.guess if self.guess is not None and self.guess.usable else None

    def count(self, hit: bool) -> None:
        self.misses = 0 if hit else self.misses + 1
        self.skip = 0 if hit else 2 ** min(self.misses - 1, 6)


def _next_guess(old: _Guess | None, thr: float, n_keep: int, lo: float, hi: float, n_band: int, predicted: float | None) -> _Guess | None:
    """This selection's threshold as the next one's guess in the same tensor (None:
    sample next time).

    The band's score density turns a change of ``n_keep`` into a shift of the guess,
    and the drift of this selection (its threshold against the last one's, shifted
    so) is assumed to repeat. The half-width is 4x this step's miss of the guess (the
    sampled bracket's half width after a sampled step), shrinking by at most half per
    step, and wide enough to hold about 64 scores. A guess whose band would hold more
    scores than the last sampled bracket did is kept only for its threshold (the next
    drift), not offered: sampling is cheaper then."""
    width = hi - lo
    if not (math.isfinite(thr) and math.isfinite(width) and width > 0 and n_band > 0):
        return None  # ties everywhere or an unbounded band
    density = n_band / width
    trend = 0.0
    if old is not None:
        trend = thr - (old.thr - (n_keep - old.n_keep) / old.density)
        if not math.isfinite(trend):
            trend = 0.0
    if predicted is None:  # a sampled bracket: its size caps the guesses' bands
        half, cap = width / 2, n_band
    else:
        half, cap = max(4 * abs(thr - predicted), 0.5 * old.half), old.cap
    half = max(half, 32 / density)
    return _Guess(thr, n_keep, density, half, cap, trend, usable=predicted is None or 2 * half * density <= cap)


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
