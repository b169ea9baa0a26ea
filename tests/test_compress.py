"""Physical compression of paired dimensions: compressed outputs equal the masked model's."""

import copy
import json

import pytest
import timm
import torch
from transformers import BertConfig, BertForSequenceClassification

from pruneflow import load_model
from pruneflow.compress import (
    MASK_SITES,
    CompressedBertSelfAttention,
    CompressedTimmAttention,
    PairedMasks,
    compress,
    find_blocks,
    head_rows,
    pad_heads,
    structure_info,
    uniform_keep,
)
from pruneflow.export import save_model
from pruneflow.models import ModelBundle

FRACTION = {"qk": 0.3, "vo": 0.7, "ffn": 0.5}  # unequal q/k and v head sizes on purpose


def tiny_bert(impl: str) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, attn_implementation=impl)
    return BertForSequenceClassification(cfg).eval()


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4, num_classes=10, in_chans=1).eval()


def random_keep(masks: PairedMasks, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = []
    for e in masks:
        n = e.param.numel()
        k = torch.zeros(n, dtype=torch.bool)
        k[torch.randperm(n, generator=g)[: max(1, int(FRACTION[e.kind] * n))]] = True
        keep.append(k)
    return keep


def mask_then_compress(model, share_heads: bool, forward, sites: str = "outputs"):  # noqa: ANN001, ANN201
    """Outputs of the masked model and of the compressed model (same keep vectors)."""
    masks = PairedMasks(model, share_heads=share_heads, sites=sites)
    keep = random_keep(masks)
    masks.attach()
    masks.set([k.float() for k in keep])
    with torch.no_grad():
        masked = forward(model)
    layers = masks.kept_layers(keep)
    masks.detach()
    compress(model, layers)
    with torch.no_grad():
        compressed = forward(model)
    return masked, compressed, layers


@pytest.mark.parametrize("sites", MASK_SITES)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("share_heads", [True, False])
def test_bert_compressed_equals_masked(impl, share_heads, sites):
    model = tiny_bert(impl)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    att[0, 5:] = 0  # padding: the attention mask path is exercised too
    dense_params = sum(p.numel() for p in model.parameters())

    def fwd(m):  # noqa: ANN001, ANN202
        out = m(input_ids=ids, attention_mask=att, output_hidden_states=True)
        return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])

    masked, compressed, layers = mask_then_compress(model, share_heads, fwd, sites)
    torch.testing.assert_close(compressed, masked, atol=1e-5, rtol=1e-5)
    sa = model.bert.encoder.layer[0].attention.self
    assert isinstance(sa, CompressedBertSelfAttention)
    assert sa.scaling == pytest.approx(8**-0.5)  # the original head size's scale
    kq = max(map(len, layers["bert.encoder.layer.0"]["qk"]))
    kv = max(map(len, layers["bert.encoder.layer.0"]["vo"]))
    assert kq != kv
    assert tuple(sa.query.weight.shape) == (4 * kq, 32) and tuple(sa.key.weight.shape) == (4 * kq, 32)
    assert tuple(sa.value.weight.shape) == (4 * kv, 32)
    assert tuple(model.bert.encoder.layer[0].attention.output.dense.weight.shape) == (32, 4 * kv)
    assert tuple(model.bert.encoder.layer[0].intermediate.dense.weight.shape) == (32, 32)
    assert sum(p.numel() for p in model.parameters()) < dense_params


@pytest.mark.parametrize("sites", MASK_SITES)
@pytest.mark.parametrize("share_heads", [True, False])
def test_vit_compressed_equals_masked(share_heads, sites):
    model = tiny_vit()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    masked, compressed, layers = mask_then_compress(model, share_heads, lambda m: m(x), sites)
    torch.testing.assert_close(compressed, masked, atol=1e-5, rtol=1e-5)
    attn = model.blocks[0].attn
    assert isinstance(attn, CompressedTimmAttention)
    assert attn.scale == pytest.approx(8**-0.5)
    kq, kv = attn.qk_dim, attn.v_dim
    assert attn.qkv.weight.shape[0] == 4 * (2 * kq + kv) and attn.proj.weight.shape[1] == 4 * kv
    assert model.blocks[0].mlp.fc1.weight.shape[0] == len(layers["blocks.0"]["ffn"]) == 64


def test_uniform_half_removes_half_of_the_prunable_weights():
    model = tiny_bert("sdpa")

    def prunable(m):  # noqa: ANN001, ANN202
        return sum(lin.weight.numel() for pb in find_blocks(m) for lin in (pb.attn.query, pb.attn.key, pb.attn.value, pb.proj, pb.fc1, pb.fc2))

    before = prunable(model)
    compress(model, uniform_keep(model, 0.5))
    assert prunable(model) * 2 == before


def test_index_helpers_by_hand():
    keep = torch.tensor([[0, 2], [1, 3]])
    assert head_rows(keep, head_dim=4, offset=10).tolist() == [10, 12, 15, 17]
    idx, pad = pad_heads([[3, 1], [2]], head_dim=4)
    assert idx.tolist() == [[1, 3], [2, 0]] and pad.tolist() == [[False, False], [False, True]]


class _Exported:
    """Stands in for the method when saving: only ``export_config`` is used."""

    def __init__(self, layers):  # noqa: ANN001
        self.layers = layers

    def export_config(self):  # noqa: ANN201
        return structure_info(self.layers, method="spp")


def test_hf_compressed_model_saves_and_reloads(tmp_path):
    model = tiny_bert("sdpa")
    ids = torch.randint(0, 100, (2, 7))
    layers = uniform_keep(model, 0.5)
    layers["bert.encoder.layer.1"]["vo"] = [[0, 5, 6]] * 4  # a different v size in one layer
    compress(model, layers)
    save_model(ModelBundle(model=model, family="hf", name="bert"), tmp_path / "m", _Exported(layers))
    assert json.loads((tmp_path / "m" / "pruneflow.json").read_text())["compressed"] is True
    loaded = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_timm_compressed_model_saves_and_reloads(tmp_path):
    model = tiny_vit()
    reference = copy.deepcopy(model)
    layers = uniform_keep(model, 0.25)
    compress(model, layers)
    arch = {"architecture": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10, "in_chans": 1}}
    save_model(ModelBundle(model=model, family="timm", name="vit", arch=arch), tmp_path / "m", _Exported(layers))
    loaded = load_model(tmp_path / "m").eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        assert not torch.allclose(loaded(x), reference(x))  # it really is the compressed model


def test_detaching_masks_restores_weights_and_parameter_order():
    model = tiny_vit()
    names = [n for n, _ in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = PairedMasks(model)
    masks.attach()
    masks.set([torch.zeros_like(e.param) for e in masks])
    masks.detach()
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["hf", "timm"])
@pytest.mark.parametrize("sites", ["authors", "outputs"])
def test_the_unmasked_state_dict_is_the_plain_models_without_detaching(family, sites):
    """SPP's search checkpoints its weights while the masks stay attached: the state dict a
    plain model loads, the masks' entries left out, and no module gets a new class (a
    compiled model would recompile after every checkpoint)."""
    model = tiny_bert("eager") if family == "hf" else tiny_vit()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    masks = PairedMasks(model, sites=sites)
    masks.attach()
    masks.set([torch.rand_like(e.param) for e in masks])
    classes = {name: type(m) for name, m in model.named_modules()}
    assert any("parametrizations." in k for k in model.state_dict())  # it is the masked model's state dict that is mapped
    got = masks.unmasked_state_dict()
    assert got.keys() == plain.keys()
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    fresh = tiny_bert("eager") if family == "hf" else tiny_vit()
    fresh.load_state_dict(got)  # strict: every key of a plain model, none more


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_authors_mask_sites_scale_q_and_k_and_fc1(family):
    """SPP's code multiplies q and k by the same q-k mask (q·k scales by its square) and
    fc1's output by the FFN mask, before the activation: a uniform 0.5 mask equals
    scaling those weights by 0.5."""
    model = tiny_bert("eager") if family == "hf" else tiny_vit()
    ref = copy.deepcopy(model)
    masks = PairedMasks(model, sites="authors")
    masks.attach()
    masks.set([torch.full_like(e.param, 0.5) if e.kind in ("qk", "ffn") else torch.ones_like(e.param) for e in masks])
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(("query", "key", "intermediate.dense", "mlp.fc1")):
                mod.weight.mul_(0.5)
                mod.bias.mul_(0.5)
            if name.endswith("attn.qkv"):
                rows = mod.weight.shape[0] * 2 // 3  # q and k rows
                mod.weight[:rows].mul_(0.5)
                mod.bias[:rows].mul_(0.5)
    if family == "hf":
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
        out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
    else:
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_compressed_equals_masked_with_nonzero_biases(family):
    """Heads of unequal sizes are padded: a padded q dim must be zero in the q bias too
    (the models above start with zero biases, which would hide it)."""
    model = tiny_bert("sdpa") if family == "hf" else tiny_vit()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g))
    if family == "hf":
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
        masked, compressed, _ = mask_then_compress(model, False, lambda m: m(input_ids=ids).logits)
    else:
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        masked, compressed, _ = mask_then_compress(model, False, lambda m: m(x))
    torch.testing.assert_close(compressed, masked, atol=1e-5, rtol=1e-5)


def test_a_type_with_every_dim_masked_keeps_one_zeroed_dim():
    """All q-k dims pruned (attention becomes uniform): each head keeps one padded, zeroed
    dim, and the compressed model still computes the masked one."""
    idx, pad = pad_heads([[], []], head_dim=4)
    assert idx.tolist() == [[0], [0]] and pad.tolist() == [[True], [True]]
    model = tiny_bert("sdpa")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    masks = PairedMasks(model)
    keep = [torch.zeros_like(e.param, dtype=torch.bool) if e.kind == "qk" else torch.ones_like(e.param, dtype=torch.bool) for e in masks]
    masks.attach()
    masks.set([k.float() for k in keep])
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    layers = masks.kept_layers(keep)
    masks.detach()
    assert layers["bert.encoder.layer.0"]["qk"] == [[]] * 4
    compress(model, layers)
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (4, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_compressing_a_compressed_model_again(family):
    """A second compression of already compressed blocks (unequal q-k and v sizes) equals
    one compression with the combined selection."""
    make = (lambda: tiny_bert("sdpa")) if family == "hf" else tiny_vit
    model, once = make(), make()
    compress(model, uniform_keep(model, 0.5))  # head sizes 8 -> 4 and 4, FFN halved
    second = {p: {"qk": [[0]] * 4, "vo": [[0, 1, 2]] * 4, "ffn": list(range(16))} for p in (pb.prefix for pb in find_blocks(model))}
    compress(model, second)
    compress(once, second)  # the first indices of the first halves: the same dims of the original
    pb = find_blocks(model)[0]
    assert (pb.qk_dim, pb.v_dim, pb.ffn_dim) == (1, 3, 16)
    with torch.no_grad():
        if family == "hf":
            ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(model(input_ids=ids).logits, once(input_ids=ids).logits)
        else:
            x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
            torch.testing.assert_close(model(x), once(x))


def test_timm_compressed_attention_keeps_the_eval_mode():
    """An evaluated model stays in eval mode after compression (no attention dropout)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=2,
                              num_heads=4, num_classes=10, in_chans=1, attn_drop_rate=0.5).eval()
    compress(model, uniform_keep(model, 0.5))
    assert not model.blocks[0].attn.training
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("share_heads", [True, False])
def test_entry_cost_is_the_weights_one_entry_removes(share_heads):
    """``MaskEntry.cost()``: compressing away one entry of a mask removes exactly that
    many weights (counted from the Linear weights); a per-head mask ([H, dim]) loses
    the entry in every head, as one head alone is padded back to the widest."""
    def weights(m):  # noqa: ANN001, ANN202
        return sum(lin.weight.numel() for pb in find_blocks(m) for lin in (pb.attn.query, pb.attn.key, pb.attn.value, pb.proj, pb.fc1, pb.fc2))

    for i, e in enumerate(PairedMasks(tiny_bert("sdpa"), share_heads=share_heads)):
        model = tiny_bert("sdpa")
        masks = PairedMasks(model, share_heads=share_heads)
        keep = [torch.ones_like(m.param, dtype=torch.bool) for m in masks]
        keep[i][..., 0] = False
        before = weights(model)
        compress(model, masks.kept_layers(keep))
        assert before - weights(model) == e.cost() * (e.param.shape[0] if e.param.ndim == 2 else 1), e.key
    assert [e.cost() for e in PairedMasks(tiny_bert("sdpa"))][:3] == [4 * 2 * 32, 4 * (32 + 32), 32 + 32]  # qk, vo, ffn


def test_types_without_a_mask_keep_every_dim():
    model = tiny_bert("sdpa")
    masks = PairedMasks(model, kinds=("qk",))
    keep = [torch.tensor([True, False, True, False, False, False, False, False]) for _ in masks]
    layers = masks.kept_layers(keep)
    assert layers["bert.encoder.layer.1"] == {"qk": [[0, 2]] * 4, "vo": [list(range(8))] * 4, "ffn": list(range(64))}


def test_uniform_keep_keeps_at_least_one_dim():
    layers = uniform_keep(tiny_bert("sdpa"), 0.01)  # 0.01 of 8 per-head dims rounds to 0 (of 64 neurons: to 1)
    assert layers["bert.encoder.layer.0"] == {"qk": [[0]] * 4, "vo": [[0]] * 4, "ffn": [0]}


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_kept_attention_scale_is_the_authors_compressed_model_and_survives_saving(family, tmp_path):
    """attention_scale="kept" (SPP's deit/mock.py: q·k times (kept q-k dims per head)^-0.5):
    the same as the masked model with each attention's scale set to that by hand; saved
    and loaded it stays so; "original" differs from it."""
    model = tiny_bert("eager") if family == "hf" else tiny_vit()
    ref = copy.deepcopy(model)
    layers = uniform_keep(model, 0.25)  # head size 8: 2 q-k dims kept per head
    masks = PairedMasks(ref, sites="outputs")
    kept = {e.key: len(layers[e.block.prefix]["ffn"] if e.kind == "ffn" else layers[e.block.prefix][e.kind][0]) for e in masks}
    keep = [torch.arange(e.param.numel()) < kept[e.key] for e in masks]  # uniform_keep keeps the first dims
    masks.attach()
    masks.set([k.float() for k in keep])
    for name, mod in ref.named_modules():  # the scale by hand: sqrt(2) ** -1 instead of sqrt(8) ** -1
        if family == "timm" and name.endswith(".attn"):
            mod.fused_attn, mod.scale = False, 2 ** -0.5
        if family == "hf" and name.endswith("attention.self"):
            mod.scaling = 2 ** -0.5
    x = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3)) if family == "hf" else torch.randn(3, 1, 8, 8)
    run = (lambda m: m(input_ids=x).logits) if family == "hf" else (lambda m: m(x))
    original = compress(copy.deepcopy(model), layers)
    compress(model, layers, "kept")
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(ref))
        assert not torch.allclose(run(model), run(original))

    class Exported(_Exported):
        def export_config(self):  # noqa: ANN202
            return structure_info(self.layers, method="spp", attention_scale="kept")

    arch = {"architecture": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10, "in_chans": 1}}
    bundle = ModelBundle(model=model, family=family, name=family, arch=arch if family == "timm" else {})
    save_model(bundle, tmp_path / "m", Exported(layers))
    loaded = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(model))
