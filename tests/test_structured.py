"""method.granularity=head|neuron: whole attention heads / FFN neurons are removed,
checked from the final weights of a timm ViT and a transformers BERT."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize
from transformers import BertConfig, BertForSequenceClassification

from pruneflow.errors import UserError
from pruneflow.masking import MaskedWeights, select_prunable
from pruneflow.methods import PruneContext, get_method_class
from pruneflow.runner import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from pruneflow.schedules import Schedule

HEADS, DIM, FFN, LAYERS = 4, 32, 64, 2


def vit() -> tuple[nn.Module, callable]:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=DIM,
                              depth=LAYERS, num_heads=HEADS, mlp_ratio=FFN / DIM, num_classes=3, in_chans=1)
    return model, lambda: model(torch.randn(4, 1, 8, 8))


def bert() -> tuple[nn.Module, callable]:
    cfg = BertConfig(vocab_size=50, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, num_labels=3)
    model = BertForSequenceClassification(cfg)
    return model, lambda: model(input_ids=torch.randint(0, 50, (4, 6))).logits


def prune(build, method_name: str, granularity: str, sparsity: float, scope: str = "global", steps: int = 4):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model, forward = build()
    weights = MaskedWeights(select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
    method = get_method_class(method_name)(OmegaConf.create({"name": method_name, "granularity": granularity, "scope": scope}), sparsity)
    method.validate(model, weights)
    method.setup(PruneContext(model=model, weights=weights, schedule=Schedule("cubic", sparsity, steps), sparsity=sparsity,
                              total_steps=steps, device=torch.device("cpu")))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        forward().pow(2).mean().backward()
        method.after_backward(step)
        opt.step()
        method.after_optimizer_step(step)  # before zero_grad: SEVEN reads this step's gradients (it scored none before)
        opt.zero_grad(set_to_none=True)
    method.end_prune_stage()
    names = [w.name for w in weights]
    weights.bake()
    return model, names


def head_parts(model: nn.Module, layer: int) -> list[tuple[torch.Tensor, int]]:
    """(matrix, axis) of every part of the layer's attention that a head owns, as (parts, HEADS, ...)."""
    d = DIM // HEADS
    if hasattr(model, "blocks"):
        attn = model.blocks[layer].attn
        return [(attn.qkv.weight.view(3, HEADS, d, DIM).transpose(0, 1).reshape(HEADS, -1), 0),
                (attn.proj.weight.view(DIM, HEADS, d).transpose(0, 1).reshape(HEADS, -1), 0)]
    a = model.bert.encoder.layer[layer].attention
    rows = [lin.weight.view(HEADS, -1) for lin in (a.self.query, a.self.key, a.self.value)]
    return [*[(r, 0) for r in rows], (a.output.dense.weight.view(DIM, HEADS, d).transpose(0, 1).reshape(HEADS, -1), 0)]


def neuron_parts(model: nn.Module, layer: int) -> list[torch.Tensor]:
    if hasattr(model, "blocks"):
        mlp = model.blocks[layer].mlp
        return [mlp.fc1.weight, mlp.fc2.weight.t()]
    layer_ = model.bert.encoder.layer[layer]
    return [layer_.intermediate.dense.weight, layer_.output.dense.weight.t()]


@pytest.mark.parametrize("build", [vit, bert], ids=["timm_vit", "hf_bert"])
@pytest.mark.parametrize("method_name", ["seven", "magnitude"])
def test_heads_removed_whole(build, method_name: str) -> None:  # noqa: ANN001
    model, names = prune(build, method_name, "head", sparsity=0.5)
    assert all("attn" in n or "attention" in n for n in names)  # the prunable set: what heads own
    removed = 0
    for layer in range(LAYERS):
        dead = None
        for part, _ in head_parts(model, layer):
            zero_rows = (part == 0).all(dim=1)
            assert bool(((part == 0).any(dim=1) == zero_rows).all())  # a head is all zero or has no zero
            dead = zero_rows if dead is None else dead
            assert torch.equal(zero_rows, dead)  # the same heads in Q, K, V and the output projection
        removed += int(dead.sum())
        for p in neuron_parts(model, layer):  # FFN untouched
            assert int((p == 0).sum()) == 0
    assert removed == HEADS * LAYERS // 2


@pytest.mark.parametrize("build", [vit, bert], ids=["timm_vit", "hf_bert"])
def test_neurons_removed_whole(build) -> None:  # noqa: ANN001
    model, names = prune(build, "seven", "neuron", sparsity=0.75)
    assert len(names) == 2 * LAYERS
    removed = 0
    for layer in range(LAYERS):
        fc_in, fc_out_t = neuron_parts(model, layer)
        dead = (fc_in == 0).all(dim=1)
        assert torch.equal(dead, (fc_out_t == 0).all(dim=1))
        assert bool(((fc_in == 0).any(dim=1) == dead).all())
        removed += int(dead.sum())
        for part, _ in head_parts(model, layer):
            assert int((part == 0).sum()) == 0
    assert removed == round(0.75 * FFN * LAYERS)


def test_local_scope_prunes_each_layer_alike() -> None:
    model, _ = prune(vit, "seven", "neuron", sparsity=0.5, scope="local")
    assert [int((model.blocks[i].mlp.fc1.weight == 0).all(dim=1).sum()) for i in range(LAYERS)] == [FFN // 2] * LAYERS


def test_incomplete_head_is_an_error() -> None:
    model, _ = vit()
    weights = MaskedWeights(select_prunable(model, ["blocks.*.attn.qkv"], []))
    method = get_method_class("seven")(OmegaConf.create({"name": "seven", "granularity": "head"}), 0.5)
    with pytest.raises(UserError, match="granularity=head"):
        method.validate(model, weights)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
