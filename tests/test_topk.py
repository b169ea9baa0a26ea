import torch

from pruneflow.topk import global_topk_masks, kept_count, local_topk_masks, topk_mask


def test_topk_exact_count_with_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 5.0, 0.0])
    m = topk_mask(scores, 3)
    assert int(m.sum()) == 3
    assert m[0] == 1 and m[4] == 1 and m[5] == 0  # the two clear winners kept, the minimum dropped


def test_global_topk_spans_tensors():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    b = torch.tensor([0.95, 0.05, 0.5])
    ma, mb = global_topk_masks([a, b], 3)
    assert ma.tolist() == [[0, 1], [1, 0]] and mb.tolist() == [1, 0, 0]


def test_local_topk_per_tensor():
    torch.manual_seed(0)
    scores = [torch.rand(10, 10), torch.rand(4, 25)]
    masks = local_topk_masks(scores, 0.7)
    assert [int(m.sum()) for m in masks] == [30, 30]


def test_kept_count_rounds_to_nearest_weight():
    assert kept_count(1000, 0.7) == 300
    assert kept_count(10, 0.33) == 7
