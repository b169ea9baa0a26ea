"""Exact top-k: the mask holds exactly n_keep ones, the largest scores, ties by position."""

from __future__ import annotations

import pytest
import torch

from pruneflow.topk import (
    DIRECT_MAX,
    TopK,
    global_topk_masks,
    kept_count,
    local_topk_masks,
    topk_mask,
)


def reference_mask(x: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Stable sort: largest first, equal values in position order."""
    order = torch.sort(-x.reshape(-1), stable=True).indices
    m = torch.zeros(x.numel())
    m[order[:n_keep]] = 1
    return m.view_as(x)


@pytest.mark.parametrize("n_keep", [0, 1, 7, 50, 99, 100])
def test_small_with_ties(n_keep: int) -> None:
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 2.0] * 10)
    m = topk_mask(x, n_keep)
    assert int(m.sum()) == n_keep
    assert torch.equal(m, reference_mask(x, n_keep))


@pytest.mark.parametrize("kind", ["uniform", "ties", "neg_inf", "constant"])
# n_blocks (n // 16) even: the counting pass runs as rows; odd (the last): as one (blocks, 16) view
@pytest.mark.parametrize("n, frac", [(DIRECT_MAX * 2 + 13, 0.3), (DIRECT_MAX + 5, 0.97), (DIRECT_MAX * 3, 0.01), (DIRECT_MAX * 2 + 53, 0.5)])
def test_large_sampled_path_is_exact(kind: str, n: int, frac: float) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g)
    if kind == "ties":  # few distinct values: the threshold value is shared by many entries
        x = torch.randint(0, 5, (n,), generator=g).float()
    elif kind == "neg_inf":  # pruned entries of a no-regrowth method
        x[torch.rand(n, generator=g) < 0.5] = float("-inf")
    elif kind == "constant":
        x = torch.full((n,), 0.25)
    n_keep = int(frac * n)
    out = torch.empty(n)
    TopK().mask_(x, n_keep, out)
    assert int(out.sum()) == n_keep
    assert torch.equal(out, reference_mask(x, n_keep))


@pytest.mark.parametrize("extra", [-3, 0, 2])
def test_threshold_next_to_pruned_entries(extra: int) -> None:
    """At the target sparsity the kept count is (about) the number of finite scores."""
    n = DIRECT_MAX * 2
    x = torch.rand(n, generator=torch.Generator().manual_seed(1))
    x[torch.randperm(n, generator=torch.Generator().manual_seed(2))[: int(0.7 * n)]] = float("-inf")
    n_keep = int(torch.isfinite(x).sum()) + extra
    out = torch.empty(n)
    TopK().mask_(x, n_keep, out)
    assert torch.equal(out, reference_mask(x, n_keep))


def test_global_and_local_over_several_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(4, 6, generator=g), torch.rand(10, generator=g) * 2, torch.zeros(3, 3)]
    masks = global_topk_masks(scores, 20)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert sum(int(m.sum()) for m in masks) == 20
    flat = torch.cat([s.reshape(-1) for s in scores])
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), reference_mask(flat, 20))
    local = local_topk_masks(scores, 0.5)
    assert [int(m.sum()) for m in local] == [kept_count(s.numel(), 0.5) for s in scores] == [12, 5, 5]


def test_topk_exact_count_with_ties() -> None:
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 5.0, 0.0])
    m = topk_mask(scores, 3)
    assert int(m.sum()) == 3
    assert m[0] == 1 and m[4] == 1 and m[5] == 0  # the two clear winners kept, the minimum dropped


def test_global_topk_spans_tensors() -> None:
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    b = torch.tensor([0.95, 0.05, 0.5])
    ma, mb = global_topk_masks([a, b], 3)
    assert ma.tolist() == [[0, 1], [1, 0]] and mb.tolist() == [1, 0, 0]


def test_local_topk_per_tensor() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(10, 10), torch.rand(4, 25)]
    masks = local_topk_masks(scores, 0.7)
    assert [int(m.sum()) for m in masks] == [30, 30]


def test_kept_count_rounds_to_nearest_weight() -> None:
    assert kept_count(1000, 0.7) == 300
    assert kept_count(10, 0.33) == 7


def test_repeated_selection_starts_from_the_last_threshold() -> None:
    """A method's scores drift a little each step and n_keep follows a schedule (0.5 %
    of the weights per step here): the selection reuses the last threshold (no
    sample) and stays exact; when the scores jump, the guess misses and the sampled
    bracket takes over, still exact."""
    n = DIRECT_MAX * 4 + 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g)
    out = torch.empty(n)
    tk = TopK(remember=True)
    sampled = []
    real = tk._sampled_band
    tk._sampled_band = lambda *a: sampled.append(1) or real(*a)  # type: ignore[method-assign]
    for step, frac in enumerate([0.9, 0.895, 0.89, 0.89, 0.885, 0.88, 0.88]):
        n_keep = int(frac * n)
        tk.mask_(x, n_keep, out)
        assert torch.equal(out, reference_mask(x, n_keep)), step
        x.add_(torch.randn(n, generator=g), alpha=1e-3)
    assert len(sampled) == 1  # only the first selection sampled
    x.copy_(torch.rand(n, generator=g) * 100)  # far from the last threshold
    tk.mask_(x, n // 3, out)
    assert torch.equal(out, reference_mask(x, n // 3))
    assert len(sampled) == 2
    # After a miss the next selection samples without guessing; the one after guesses again.
    for expect in (3, 3):
        x.add_(torch.randn(n, generator=g), alpha=1e-3)
        tk.mask_(x, n // 3, out)
        assert torch.equal(out, reference_mask(x, n // 3))
        assert len(sampled) == expect




def test_steadily_drifting_scores_keep_a_narrow_guess() -> None:
    """SEVEN's scores: a sum that grows every step by far more than the band around the
    last threshold, with every pruned entry at -inf (no regrowth), and n_keep falling on
    the schedule. The first sampled bracket's lower end lands among the -inf entries;
    its density comes from its lowest finite score, and the threshold's drift is
    extrapolated, so most selections need no sample. Each mask exact."""
    n = DIRECT_MAX * 4 + 3
    g = torch.Generator().manual_seed(5)
    rate = torch.rand(n, generator=g) ** 2
    scores = torch.zeros(n)
    out = torch.ones(n)
    tk = TopK(remember=True)
    sampled = []
    real = tk._sampled_band
    tk._sampled_band = lambda *a: sampled.append(1) or real(*a)  # type: ignore[method-assign]
    for step in range(12):
        scores.add_(rate * torch.rand(n, generator=g))
        scores.masked_fill_(out == 0, float("-inf"))
        n_keep = int((0.5 - 0.002 * step) * n)
        tk.mask_(scores, n_keep, out)
        assert torch.equal(out, reference_mask(scores, n_keep)), step
    assert len(sampled) <= 4  # here 3 to learn the drift and 1 miss; extrapolating no drift, all 12 sampled
def _segments(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, n))
        start += n
    return out


def test_segments_share_their_passes_and_select_as_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``masks_`` (per-matrix selection, ``scope=local``): each segment keeps exactly its
    own n_keep largest, as ``mask_`` on it alone, and both remember the same guesses,
    through drift, a jump (a missed guess), keep-all, a segment too small to sample,
    pruned (-inf) entries and ties at the threshold. Segments with a guess share one
    band pass and one write pass (counted), the rest go one by one (counted)."""
    # 2^19, 2^20 and 3 * 2^18 sample; 2^15 is small enough for a direct kthvalue.
    sizes = [1 << 19, 1 << 20, 3 << 18, 1 << 15, 1 << 19]
    segs = _segments(sizes)
    total = sum(sizes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(total, generator=g)
    s4 = slice(segs[4][0], segs[4][0] + sizes[4])
    x[s4] = torch.round(x[s4] * 8) / 8  # few distinct values: the threshold is tied
    x[segs[1][0] : segs[1][0] + 5000] = float("-inf")
    shared, one_by_one = TopK(remember=True), TopK(remember=True)
    calls = {"band_rows": 0, "partial_ties": 0}
    band_rows, select, nextafter = shared.band_rows, shared._select, torch.nextafter
    monkeypatch.setattr(shared, "band_rows", lambda *a: calls.__setitem__("band_rows", calls["band_rows"] + 1) or band_rows(*a))
    alone: list[set[int]] = []  # per step, the starts of the segments selected one by one

    def spy_select(xs: torch.Tensor, *a: object) -> None:
        alone[-1].add((xs.data_ptr() - x.data_ptr()) // x.element_size())
        select(xs, *a)

    monkeypatch.setattr(shared, "_select", spy_select)
    monkeypatch.setattr(torch, "nextafter", lambda *a: calls.__setitem__("partial_ties", calls["partial_ties"] + 1) or nextafter(*a))
    out_shared, out_one = torch.empty(total), torch.empty(total)
    for step in range(10):
        keep = [kept_count(n, 0.3 + 0.01 * step) for n in sizes]
        if step == 5:
            x[segs[2][0] : segs[2][0] + sizes[2]] *= 50  # far from its last threshold: a miss
        if step == 7:
            keep[1] = sizes[1]
        alone.append(set())
        shared.masks_(x, segs, keep, out_shared)
        for (start, n), k in zip(segs, keep, strict=True):
            one_by_one.mask_(x[start : start + n], k, out_one[start : start + n])
            assert torch.equal(out_shared[start : start + n], reference_mask(x[start : start + n], k)), (step, start)
        assert torch.equal(out_shared, out_one), step
        assert shared._tensors == one_by_one._tensors, step
        x[: segs[4][0]] += torch.randn(segs[4][0], generator=g) * 1e-3
    starts = [start for start, _ in segs]
    assert alone[0] == {starts[0], starts[1], starts[2], starts[4]}  # no guesses yet (the small one is direct)
    # Then the drifting segments share the passes, but for the jump (a missed guess, then
    # one sampled selection); the tied one (guesses dropped: no score density to learn
    # from) samples on its own.
    assert all(alone[step] <= {starts[4]} for step in (1, 2, 3, 4, 7))
    assert all(starts[0] not in a for a in alone[1:])
    assert starts[2] in alone[5] and starts[2] in alone[6]
    assert calls["band_rows"] >= 8 and calls["partial_ties"] >= 1


def test_segments_that_cannot_share_rows_go_one_by_one() -> None:
    """Segments with a gap between them (or sizes without a common row) select one by one."""
    x = torch.randn(3 << 19, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(3 << 19)
    segs = [(0, 1 << 19), ((1 << 19) + 16, (1 << 19) - 16)]  # a gap of 16
    tk = TopK(remember=True)
    for _ in range(2):
        tk.masks_(x, segs, [1000, 2000], out)
    assert torch.equal(out[: 1 << 19], reference_mask(x[: 1 << 19], 1000))
    assert torch.equal(out[(1 << 19) + 16 : 1 << 20], reference_mask(x[(1 << 19) + 16 : 1 << 20], 2000))
    assert not out[1 << 19 : (1 << 19) + 16].any() and not out[1 << 20 :].any()


def test_kept_count_rounds_a_fraction_of_a_weight_up() -> None:
    """0.29 of 10 weights is 2.9 pruned: 3 pruned (nearest), 7 kept; truncation would keep 8."""
    assert kept_count(10, 0.29) == 7
    assert kept_count(1000, 0.2996) == 700  # 299.6 pruned -> 300
    assert [int(m.sum()) for m in local_topk_masks([torch.rand(10), torch.rand(1000)], 0.29)] == [7, 710]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_topk_mask_has_the_dtype_of_the_scores(dtype: torch.dtype) -> None:
    """A float mask comes back in the scores' dtype (integer scores: float32)."""
    scores = torch.tensor([4, 1, 3, 0, 2, 5]).to(dtype)
    m = topk_mask(scores, 3)
    assert m.dtype == (dtype if dtype.is_floating_point else torch.float32)
    assert m.tolist() == [1, 0, 1, 0, 0, 1]


def test_segments_with_a_gap_do_not_share_rows_even_with_a_common_row_length() -> None:
    """Both segments are multiples of a long row (2^19), but a gap of 2^14 lies between
    them: they do not tile one range, so each is selected on its own (also once each
    has a remembered guess), and the gap is left untouched."""
    a, gap = 1 << 19, 1 << 14
    segs = [(0, a), (a + gap, a)]
    x = torch.randn(2 * a + gap, generator=torch.Generator().manual_seed(4))
    out = torch.full((2 * a + gap,), 7.0)
    tk = TopK(remember=True)
    for step in range(3):  # the first selection samples, the next ones start from a guess
        keep = [1000 + 10 * step, 3000 - 10 * step]
        tk.masks_(x, segs, keep, out)
        assert torch.equal(out[:a], reference_mask(x[:a], keep[0])), step
        assert torch.equal(out[a + gap :], reference_mask(x[a + gap :], keep[1])), step
        assert torch.all(out[a : a + gap] == 7.0)
        x += torch.randn(2 * a + gap, generator=torch.Generator().manual_seed(step)) * 1e-3


@pytest.mark.parametrize("remember", [False, True])
def test_kth_largest_is_kthvalue_of_the_mirrored_rank(remember: bool) -> None:
    """kth_largest(x, k) == torch.kthvalue(x, n - k + 1) exactly: continuous scores,
    integer scores with many ties, a small tensor (direct path), and repeated calls on
    scores that move (the remembered bracket) including one that jumps far."""
    topk = TopK(remember=remember)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 20, generator=g)
    ties = torch.randint(0, 50, (1 << 19,), generator=g).float()
    small = torch.randn(1000, generator=g)
    for t in (x, ties, small):
        n = t.numel()
        for k in (1, 7, n // 10, n // 2, n - 3, n):
            assert topk.kth_largest(t, k) == float(torch.kthvalue(t, n - k + 1).values), (n, k)
    for shift in (1e-3, 2e-3, 5.0):
        x.add_(torch.randn(x.numel(), generator=g) * shift)
        k = x.numel() // 4
        assert topk.kth_largest(x, k) == float(torch.kthvalue(x, x.numel() - k + 1).values)
    with pytest.raises(ValueError):
        topk.kth_largest(small, 0)
