import torch
from torch import nn
from torch.nn.utils import parametrize

from pruneflow.masking import (
    MaskedWeights,
    select_prunable,
    strip_parametrization_names,
)
from pruneflow.runner import DEFAULT_EXCLUDE, DEFAULT_INCLUDE


def test_masked_weights_stay_zero_under_adamw_weight_decay_and_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    weights = MaskedWeights(select_prunable(model, ["*"], []))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    # A few dense steps give AdamW non-zero momentum for every weight...
    weights.attach()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    masks = [(torch.rand_like(w.param) > 0.5).float() for w in weights]
    weights.set_masks(masks)
    # ...which must not revive pruned weights.
    for _ in range(10):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for w, m in zip(weights, masks, strict=True):
        eff = w.module.weight  # the parametrized (effective) weight
        assert torch.all(eff[m == 0] == 0)
        assert torch.count_nonzero(eff[m == 1]) == int(m.sum())
    weights.bake()
    for w, m in zip(weights, masks, strict=True):
        assert isinstance(w.module.weight, nn.Parameter)
        assert torch.all(w.module.weight[m == 0] == 0)


def test_default_patterns_pick_encoder_linears_of_timm_vit():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              embed_dim=64, depth=2, num_heads=2, num_classes=10)
    names = [w.name for w in select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)]
    assert names == [f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_default_patterns_pick_encoder_linears_of_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(cfg)
    names = [w.name for w in select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)]
    assert len(names) == 12  # Q, K, V, attn-out, FFN in, FFN out per layer
    assert not any("pooler" in n or "classifier" in n or "embeddings" in n for n in names)


def test_strip_parametrization_names_applies_masks():
    lin = nn.Linear(3, 2)
    weights = MaskedWeights(select_prunable(nn.Sequential(lin), ["*"], []))
    weights.attach()
    weights.set_masks([torch.tensor([[1.0, 0, 1], [0, 1, 0]])])
    sd = strip_parametrization_names(nn.Sequential(lin).state_dict())
    assert set(sd) == {"0.weight", "0.bias"}
    assert int(torch.count_nonzero(sd["0.weight"])) <= 3


def _one_linear(weight):  # noqa: ANN001, ANN202
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin, MaskedWeights(select_prunable(nn.Sequential(lin), ["*"], []))


def test_set_masks_zeroes_the_pruned_trainable_weights():
    """The trainable ``original`` is zeroed where the mask is 0, so a weight regrown later
    (mask 0 -> 1) starts from 0, not from its value before it was pruned."""
    lin, weights = _one_linear(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    weights.attach()
    weights.set_masks([torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])])
    assert weights.weights[0].param.tolist() == [[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 7.0, 8.0]]
    weights.set_masks([torch.ones(2, 4)])  # everything regrown
    assert lin.weight.tolist() == [[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 7.0, 8.0]]


def test_strip_parametrization_names_multiplies_original_by_the_mask():
    """The plain state dict holds ``original * mask`` even where ``original`` is not zero
    under the mask (masks given to ``attach``, or fractional gates such as L0's)."""
    lin = nn.Linear(3, 2)
    weights = MaskedWeights(select_prunable(nn.Sequential(lin), ["*"], []))
    weights.attach(masks=[torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])])
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 6.0]]))
    sd = strip_parametrization_names(nn.Sequential(lin).state_dict())
    assert sd["0.weight"].tolist() == [[1.0, 0.0, 2.0], [0.0, 5.0, 0.0]]
    assert torch.equal(sd["0.bias"], lin.bias)


def test_attach_starts_from_given_masks_and_skips_masked_weights():
    """``attach(masks=...)`` copies the given masks (in the weight's dtype); a weight
    that already has a mask keeps it when attach runs again."""
    lin, weights = _one_linear(torch.ones(1, 4))
    lin.double()
    given = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    weights.attach(masks=[given])
    mask = weights.weights[0].mask
    assert mask.dtype == torch.float64 and mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    given.zero_()  # a copy: the caller's tensor is not the buffer
    assert weights.num_kept() == 2
    weights.attach(masks=[torch.tensor([[0.0, 0.0, 1.0, 1.0]])])  # already masked: left as it is
    assert len(lin.parametrizations.weight) == 1
    assert lin.weight.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_bake_without_keeping_masks_leaves_the_original_weights():
    lin, weights = _one_linear(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    weights.attach(masks=[torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])])
    assert lin.weight.tolist() == [[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]]
    weights.bake(keep_masked=False)
    assert not parametrize.is_parametrized(lin)
    assert lin.weight.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_sparsity_counts_the_kept_mask_entries_by_hand():
    _, weights = _one_linear(torch.ones(2, 4))
    weights.attach(masks=[torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])])
    assert weights.num_kept() == 3 and weights.sparsity() == 1 - 3 / 8
