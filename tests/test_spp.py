"""SPP: the path mathematics by hand, the search on small models, one search for every sparsity."""

import json
import math

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from pruneflow.compress import PairedMasks
from pruneflow.errors import UserError
from pruneflow.masking import MaskedWeights, select_prunable
from pruneflow.methods.base import PruneContext
from pruneflow.methods.spp import (
    NOT_ENTERED,
    SPP,
    global_keep,
    global_priority,
    lbi_update,
    rank_entries,
    record_entries,
    search_lr_at,
    shrink,
)
from pruneflow.runner import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, run

SPP_CFG = {"name": "spp", "optimizer": "adam", "adam_eps": 1e-4, "kappa": 1.0, "lambda": 3.0, "nu": 100.0, "z_lr": "auto", "share_heads": True, "include": None, "exclude": None}


# ----------------------------------------------------------------------------- the mathematics by hand
def test_shrink_is_the_one_sided_soft_threshold():
    z = torch.tensor([-5.0, 0.0, 2.5, 3.0, 3.5, 10.0])
    assert shrink(z, 3.0).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 7.0]


def test_lbi_update_by_hand():
    m = torch.tensor([1.0, 0.5, 2.0])
    z = torch.tensor([2.9, 0.0, 4.0])
    gamma = torch.tensor([0.0, 0.0, 2.0])
    z_new, g_new = lbi_update(m, z, gamma, z_lr=0.5, kappa=2.0, lam=3.0)
    # z + 0.5 * (m - gamma) = [3.4, 0.25, 4.0]; gamma = 2 * max(z - 3, 0)
    torch.testing.assert_close(z_new, torch.tensor([3.4, 0.25, 4.0]))
    torch.testing.assert_close(g_new, torch.tensor([0.8, 0.0, 2.0]))


def test_record_entries_keeps_the_first_entry_step():
    e = torch.full((4,), NOT_ENTERED)
    e = record_entries(e, torch.tensor([0.0, 1.0, 0.0, 2.0]), step=3)
    e = record_entries(e, torch.tensor([0.5, 1.0, 0.0, 0.0]), step=7)  # entry 3 left: keeps step 3
    assert e.tolist() == [7, 3, NOT_ENTERED, 3]


def test_rank_entries_by_hand():
    step = torch.tensor([5, NOT_ENTERED, 2, 5, NOT_ENTERED, 2])
    z = torch.tensor([4.0, 1.0, 3.5, 4.5, 2.0, 3.5])
    m = torch.tensor([1.0, 0.1, 0.2, 1.0, 0.3, 0.9])
    # step 2 first (tie in z -> larger m first: 5 then 2), then step 5 (larger z: 3 then 0),
    # then never-entered by z (4 then 1)
    assert rank_entries(step, z, m).tolist() == [5, 2, 3, 0, 4, 1]


def test_rank_by_support_time_by_hand():
    """The authors' ranking: most checks spent in the support first (an entry that entered
    early but left ranks below one that stayed); ties by entry step, Z, M."""
    step = torch.tensor([2, 5, 5, NOT_ENTERED])
    support = torch.tensor([3, 7, 7, 0])
    z = torch.tensor([4.0, 3.8, 3.9, 1.0])
    m = torch.ones(4)
    assert rank_entries(step, z, m, support).tolist() == [2, 1, 0, 3]
    assert rank_entries(step, z, m).tolist() == [0, 2, 1, 3]  # by first entry


def test_global_keep_removes_the_globally_worst_and_keeps_one_per_mask():
    # Two masks of one type; global priority 0 = best.
    prio = [torch.tensor([0, 3, 5]), torch.tensor([4, 1, 2])]
    keep = global_keep(prio, costs=[10, 10], remove_weights=30)
    assert [k.tolist() for k in keep] == [[True, False, False], [False, True, True]]
    keep = global_keep(prio, costs=[10, 10], remove_weights=60)  # asks for all but: one per mask stays
    assert [int(k.sum()) for k in keep] == [1, 1] and keep[0][0] and keep[1][1]
    # global priority across masks follows rank_entries
    p = global_priority([torch.tensor([3, NOT_ENTERED]), torch.tensor([1])], [torch.zeros(2), torch.zeros(1)], [torch.ones(2), torch.ones(1)])
    assert [t.tolist() for t in p] == [[1, 2], [0]]


def test_global_keep_stops_nearest_the_requested_weights_and_skips_exhausted_masks():
    prio = [torch.tensor([0, 3, 5]), torch.tensor([4, 1, 2])]
    # 26 weights at 10 each: removing a third entry lands at 30, nearer than 20
    assert [k.tolist() for k in global_keep(prio, costs=[10, 10], remove_weights=26)] == [[True, False, False], [False, True, True]]
    # mask 1 holds the three worst entries: its last one stays, and removal goes on in mask 0
    prio = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    assert [k.tolist() for k in global_keep(prio, costs=[10, 10], remove_weights=40)] == [[True, False, False], [True, False, False]]


def test_z_step_settings_by_hand():
    """auto: 2 * lambda / steps; null: DessiLBI's lr / nu; a number: itself."""
    cfg = {**SPP_CFG, "lambda": 3.0, "nu": 100.0, "search_lr": 1e-3}
    assert SPP(OmegaConf.create({**cfg, "z_lr": "auto"}), 0.5).z_lr(60) == pytest.approx(0.1)
    assert SPP(OmegaConf.create({**cfg, "z_lr": None}), 0.5).z_lr(60) == pytest.approx(1e-5)
    assert SPP(OmegaConf.create({**cfg, "z_lr": 0.25}), 0.5).z_lr(60) == 0.25


def test_defaults_without_the_key_are_the_authors():
    """A config that leaves a key out (the packaged YAML or a bare one): the authors' mask
    lr 1e-3 and Adam eps 1e-4, support checks every 10 steps (--interval), ranking by
    support time, attention and FFN pools."""
    from pruneflow.api import method_config

    want = {"lr": 1e-3, "adam_eps": 1e-4, "check_every": 10, "rank": "support_time", "grouping": "attention_mlp", "optimizer": "adam"}
    bare = OmegaConf.create({"name": "spp", "kappa": 1.0, "nu": 100.0, "lambda": 3.0, "adam_eps": 1e-4})  # these have no default
    for cfg in (bare, method_config("spp", {})):
        method = SPP(cfg, 0.5)
        assert {k: getattr(method, k) for k in want} == want


def test_path_point_by_hand():
    """Entries 0 and 2 entered (10 weights each of 100 prunable), entry 0 has left the support."""
    method = SPP(OmegaConf.create(SPP_CFG), 0.5)
    method.prunable_total = 100
    point = method._path_point(7, [torch.tensor([3, NOT_ENTERED, 5])], [torch.tensor([0.0, 0.0, 1.0])], [10], ["ffn"], 0.5)
    assert point == {"step": 7, "loss": 0.5, "sparsity": 0.1, "support": round(1 / 3, 6), "exited": 1, "entered_ffn": round(2 / 3, 6)}


def test_state_round_trip_keeps_the_search_and_where_it_came_from():
    state = {"search": {"blocks.0.ffn": {"entry_step": torch.tensor([2, NOT_ENTERED]), "z": torch.ones(2), "m": torch.ones(2), "support": torch.tensor([1, 0])}},
             "path": [{"step": 1}], "search_reused": True, "search_dir": "/cache/spp/abc"}
    method = SPP(OmegaConf.create(SPP_CFG), 0.5)
    method.load_state_dict(state)
    again = method.state_dict()
    assert again["path"] == [{"step": 1}] and again["search_reused"] is True and again["search_dir"] == "/cache/spp/abc"
    assert all(torch.equal(again["search"]["blocks.0.ffn"][k], v) for k, v in state["search"]["blocks.0.ffn"].items())


# ----------------------------------------------------------------------------- the search on small models
def _context(model: nn.Module, batches, loss_fn, steps: int) -> PruneContext:  # noqa: ANN001
    weights = MaskedWeights(select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
    return PruneContext(model=model, weights=weights, schedule=None, sparsity=0.5, total_steps=steps, device=torch.device("cpu"), batches=batches, loss_fn=loss_fn)


def _vit_problem(steps: int, pretrain: int = 40):  # noqa: ANN202
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4, num_classes=4, in_chans=1)
    x = torch.randn(64, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()  # learnable labels
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(pretrain):  # a briefly trained model: mask gradients mean something (0: tests that need none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def batches():  # noqa: ANN202
        g = torch.Generator().manual_seed(0)
        while True:
            i = torch.randperm(64, generator=g)[:16]
            yield {"pixel_values": x[i], "labels": y[i]}

    def loss_fn(m, b):  # noqa: ANN001, ANN202
        return nn.functional.cross_entropy(m(b["pixel_values"]), b["labels"])

    return model, _context(model, batches, loss_fn, steps)


@pytest.mark.parametrize("rank", ["support_time", "entry"])
def test_the_method_ranks_by_its_rank_setting(rank: str):
    """keep_vectors (what finalize compresses to) follows method.rank: records whose first
    entry order (0 first) and time in the support (the last entry longest) disagree keep
    the late entrants by default (the authors' support time) and the early ones by entry."""
    model, ctx = _vit_problem(steps=1)
    method = SPP(OmegaConf.create({**SPP_CFG, "rank": rank}), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    masks = PairedMasks(model, share_heads=method.share_heads, allowed=method._allowed)
    method.search = {}
    for e in masks.entries:
        n = e.param.numel()
        method.search[e.key] = {"entry_step": torch.arange(n), "support": torch.arange(n), "z": torch.zeros(n), "m": torch.ones(n)}
    keep = method.keep_vectors(masks)
    for e, k in zip(masks.entries, keep, strict=True):
        kept = k.reshape(-1).bool()
        assert 0 < int(kept.sum()) < kept.numel(), e.key
        first, last = bool(kept[0]), bool(kept[-1])
        assert (first, last) == ((False, True) if rank == "support_time" else (True, False)), (e.key, kept.tolist())


def their_set_alpha_sparsity(alpha_attn: list[torch.Tensor], alpha_mlp: list[torch.Tensor], sparsity: float):  # noqa: ANN201
    """deit_retrain.py's set_alpha_sparsity, transcribed: per pool (the attention alphas of
    all layers stacked, then the MLP alphas), sort ascending, threshold at the entry whose
    cumulative count is nearest sum * sparsity, keep value >= threshold."""
    def threshold(alphas: list[torch.Tensor]) -> torch.Tensor:
        alpha = torch.stack(alphas).view(-1)
        sorted_alpha_value, indices = torch.sort(alpha, descending=False)
        compression_weight = torch.ones_like(indices)
        return sorted_alpha_value[torch.argmin(torch.abs(torch.cumsum(compression_weight, 0) - torch.sum(compression_weight) * sparsity))]

    t_attn, t_mlp = threshold(alpha_attn), threshold(alpha_mlp)
    return [a >= t_attn for a in alpha_attn], [a >= t_mlp for a in alpha_mlp]


def _with_supports(method: SPP, masks: PairedMasks, support_of) -> None:  # noqa: ANN001
    method.search = {}
    for e in masks.entries:
        n = e.param.numel()
        method.search[e.key] = {"entry_step": torch.arange(n), "support": support_of(e).float(), "z": torch.zeros(n), "m": torch.ones(n)}


def test_ratio_entries_is_the_authors_set_alpha_sparsity(caplog):
    """method.ratio=entries keeps what their set_alpha_sparsity keeps: their attn.alpha of a
    block is [q-k entries, v-o entries] (shared by the heads), their mlp.alpha its neurons;
    support counts with many ties, the lowest quarter of each pool by count removed."""
    model, ctx = _vit_problem(steps=1, pretrain=0)
    method = SPP(OmegaConf.create({**SPP_CFG, "ratio": "entries"}), None)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    masks = PairedMasks(model, share_heads=True, allowed=method._allowed)
    g = torch.Generator().manual_seed(3)
    blocks = sorted({e.key.rsplit(".", 1)[0] for e in masks.entries})
    # counts with many ties (theirs: integers), then all distinct (the position itself decides)
    for values, fraction, ties in (
        (lambda e: torch.randint(0, 7, (e.param.numel(),), generator=g), 0.25, True),
        (lambda e: torch.rand(e.param.numel(), generator=g), 0.25, False),
        (lambda e: torch.rand(e.param.numel(), generator=g), 0.3, False),  # 0.3 * 32 = 9.6 and 0.3 * 256 = 76.8: rounds up
    ):
        method.entry_fraction = fraction
        _with_supports(method, masks, values)
        keep = dict(zip([e.key for e in masks.entries], method.keep_vectors(masks), strict=True))
        sup = {e.key: method.search[e.key]["support"] for e in masks.entries}
        attn = [torch.cat([sup[f"{b}.qk"], sup[f"{b}.vo"]]) for b in blocks]
        mlp = [sup[f"{b}.ffn"] for b in blocks]
        kept_attn, kept_mlp = their_set_alpha_sparsity(attn, mlp, fraction)
        for b, ka, km in zip(blocks, kept_attn, kept_mlp, strict=True):
            head_dim = sup[f"{b}.qk"].numel()
            assert torch.equal(keep[f"{b}.qk"].reshape(-1), ka[:head_dim]) and torch.equal(keep[f"{b}.vo"].reshape(-1), ka[head_dim:])
            assert torch.equal(keep[f"{b}.ffn"].reshape(-1), km)
        removed = sum(int((~k).sum()) for k in kept_attn + kept_mlp)
        if ties:
            assert 0 < removed < 0.25 * sum(x.numel() for x in attn + mlp)  # ties at the threshold stay
        else:  # distinct: the threshold entry stays, the ones below it go
            assert removed == (round(fraction * 32) - 1) + (round(fraction * 256) - 1)
    method.entry_fraction = 0.25
    # more than a quarter never entered the support: their threshold is 0, nothing is removed
    _with_supports(method, masks, lambda e: (torch.arange(e.param.numel()) % 3 == 0).long() * 5)
    with caplog.at_level("WARNING", logger="pruneflow"):
        assert all(bool(k.all()) for k in method.keep_vectors(masks))
    assert method.removed_entries == {"qk+vo": 0, "ffn": 0}
    assert "removed 0 of the 256 ffn entries" in caplog.text and "share the threshold's support count 0" in caplog.text


def test_ratio_entries_keeps_one_entry_where_their_threshold_empties_a_mask(caplog):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=5, num_heads=4,
                              num_classes=4, in_chans=1)
    ctx = _context(model, None, None, steps=1)
    method = SPP(OmegaConf.create({**SPP_CFG, "ratio": "entries"}), None)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    masks = PairedMasks(model, share_heads=True, allowed=method._allowed)
    # block 0's 128 neurons never in the support, the other four blocks' always: 20 % of the FFN pool at 0, so the
    # quarter point (position 160 of 640) falls among the 5s and their threshold removes every neuron of block 0
    first = masks.entries[0].key.rsplit(".", 1)[0]
    _with_supports(method, masks, lambda e: torch.full((e.param.numel(),), 0 if e.key == f"{first}.ffn" else 5))
    with caplog.at_level("WARNING", logger="pruneflow"):
        keep = dict(zip([e.key for e in masks.entries], method.keep_vectors(masks), strict=True))
    assert int(keep[f"{first}.ffn"].sum()) == 1 and bool(keep[f"{first}.ffn"][0])  # the best-ranked: earliest entry step
    assert "no entry at or above the threshold" in caplog.text


def test_ratio_entries_settings_are_checked():
    with pytest.raises(UserError, match="sparsity=0.5 cannot be set"):
        SPP.resolve_sparsity(OmegaConf.create({**SPP_CFG, "ratio": "entries"}), 0.5)
    assert SPP.resolve_sparsity(OmegaConf.create({**SPP_CFG, "ratio": "entries"}), None) is None
    assert SPP.resolve_sparsity(OmegaConf.create(SPP_CFG), None) == 0.5
    with pytest.raises(UserError, match="method.rank"):
        SPP(OmegaConf.create({**SPP_CFG, "ratio": "entries", "rank": "entry"}), None)
    for bad in (0, 1.0, "x"):
        with pytest.raises(UserError, match="method.entry_fraction"):
            SPP(OmegaConf.create({**SPP_CFG, "ratio": "entries", "entry_fraction": bad}), None)
    with pytest.raises(UserError, match="method.ratio"):
        SPP(OmegaConf.create({**SPP_CFG, "ratio": "flops"}), 0.5)
    unused = dict(SPP(OmegaConf.create(SPP_CFG), 0.5).unused_settings(OmegaConf.create({})))
    assert "method.entry_fraction" in unused


def test_the_run_sparsity_counts_prunable_weights_spp_does_not_search():
    """fc1 prunable but fc2 not: no FFN mask, yet fc1's 8,192 weights count in the run's
    sparsity. 30 % of the 16,384 prunable weights come out of the 8,192 attention weights
    (60 % of those), to within half an entry (256 weights)."""
    model, _ = _vit_problem(steps=1, pretrain=0)
    weights = MaskedWeights(select_prunable(model, ["blocks.*.attn.*", "blocks.*.mlp.fc1"], []))
    ctx = PruneContext(model=model, weights=weights, schedule=None, sparsity=0.3, total_steps=1, device=torch.device("cpu"))
    method = SPP(OmegaConf.create(SPP_CFG), 0.3)
    method.validate(model, weights)
    method.setup(ctx)
    masks = PairedMasks(model, share_heads=True, allowed=method._allowed)
    assert {e.kind for e in masks} == {"qk", "vo"} and weights.numel == 16384
    method.search = {e.key: {"entry_step": torch.arange(e.param.numel()), "support": torch.arange(e.param.numel()),
                             "z": torch.zeros(e.param.numel()), "m": torch.ones(e.param.numel())} for e in masks}
    removed = sum(e.cost() * int((~k).sum()) for e, k in zip(masks, method.keep_vectors(masks), strict=True))
    assert abs(removed - 0.3 * 16384) <= max(e.cost() for e in masks) / 2


def test_the_coupling_term_pulls_the_mask_by_its_gradient():
    """d/dM ||M - Γ||² / (2 nu) = (M - Γ) / nu: a neuron whose fc2 column is zero (no loss
    gradient) takes one SGD step from M = 1, Γ = 0 to 1 - 0.1 * (1 - 0) / 0.5 = 0.8."""
    model, ctx = _vit_problem(steps=1, pretrain=0)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 7] = 0
    method = SPP(OmegaConf.create({**SPP_CFG, "optimizer": "sgd", "search_lr": 0.1, "nu": 0.5, "z_lr": 1e-6}), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    search, _ = method.run_search(ctx)
    torch.testing.assert_close(search["blocks.0.ffn"]["m"][7], torch.tensor(0.8))


def test_a_skipped_fp16_step_moves_nothing_and_is_not_an_adam_step():
    """Under fp16 the search's GradScaler skips a step with inf gradients: M, Z and Γ stay,
    and z_lr=adam's bias correction counts only the steps taken. A 3-step search whose
    second step overflows ends where a 2-step search on the other two batches ends."""
    from types import SimpleNamespace

    cfg = OmegaConf.create({**SPP_CFG, "z_lr": "adam", "lambda": 0.5, "search_lr": 0.05})
    ends = []
    for picks, poisoned in (([0, 1, 2], 1), ([0, 2], None)):
        model, ctx = _vit_problem(steps=len(picks), pretrain=0)
        g = torch.Generator().manual_seed(3)
        data = [{"pixel_values": torch.randn(16, 1, 8, 8, generator=g), "labels": torch.randint(0, 4, (16,), generator=g)} for _ in range(3)]
        ctx.batches = lambda picks=picks, data=data: iter([data[i] for i in picks])
        ctx.extra["trainer"] = SimpleNamespace(scaler=object())  # the run trains under fp16: the search scales its loss
        calls = {"n": 0}

        def poison(module, inputs, out, poisoned=poisoned, calls=calls):  # noqa: ANN001, ANN202
            if calls["n"] == poisoned:
                out.register_hook(lambda grad: torch.full_like(grad, float("inf")))
            calls["n"] += 1

        model.head.register_forward_hook(poison)
        method = SPP(cfg, 0.5)
        method.validate(model, ctx.weights)
        method.setup(ctx)
        ends.append(method.run_search(ctx)[0])
    for key in ends[1]:
        for name in ("m", "z"):
            torch.testing.assert_close(ends[0][key][name], ends[1][key][name], msg=f"{key} {name}")
    assert any(bool((d["z"] != 0).any()) for d in ends[1].values())


def test_search_path_only_grows_and_leaves_the_weights_untouched():
    model, ctx = _vit_problem(steps=60)
    # A neuron whose fc2 column is zero has no effect on the loss: only the coupling
    # term ||M - Γ||² / (2 nu) moves its mask (towards Γ = 0).
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 7] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = SPP(OmegaConf.create(SPP_CFG), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    method.lr = 0.01  # method.search_lr
    search, path = method.run_search(ctx)

    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # W frozen, masks removed
    assert all(p.requires_grad for p in model.parameters())
    assert len(path) == 60
    entered = [sum(p[f"entered_{k}"] for k in ("qk", "vo", "ffn")) for p in path]
    assert entered[0] == 0 and entered[-1] > 0
    assert all(b >= a for a, b in zip(entered, entered[1:], strict=False))  # entries only enter
    assert all(p["exited"] == 0 for p in path)  # none left the support: the support grows
    assert all(b["support"] >= a["support"] for a, b in zip(path, path[1:], strict=False))
    assert all(b["sparsity"] <= a["sparsity"] for a, b in zip(path, path[1:], strict=False))
    ffn0 = search["blocks.0.ffn"]
    # Its loss gradient is exactly 0, so without the coupling term Adam would leave its
    # mask at exactly 1; the coupling pulled it down (Adam, lr 0.01, 60 steps), below
    # the median of its layer's neurons, whose loss gradients resist.
    assert float(ffn0["m"][7]) < 0.6
    assert float(ffn0["m"][7]) < float(ffn0["m"].median())
    steps = torch.cat([d["entry_step"] for d in search.values()])
    assert int((steps != NOT_ENTERED).sum()) == round(path[-1]["support"] * steps.numel())


def test_search_follows_the_authors_settings():
    """lr from method.search_lr (the prune stage's lr is for weights), Adam eps 1e-4, Z stepped by Adam's bias-corrected step size,
    support counted every check_every steps; ranked in the attention and FFN pools."""
    model, ctx = _vit_problem(steps=25)
    from pruneflow.trainer import StageSpec

    ctx.extra["stage"] = StageSpec(name="prune", steps=25, lr=0.05, batch_size=16, seed=0)
    method = SPP(OmegaConf.create({**SPP_CFG, "z_lr": "adam", "lambda": 0.5, "check_every": 5, "search_lr": 0.05}), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    method.run_prune_stage(ctx)
    assert method.lr == 0.05 and method.search_settings()["lr"] == 0.05
    for d in method.search.values():
        entered = d["entry_step"] != NOT_ENTERED
        # counted at steps 0, 5, 10, 15, 20 and the last, 24 (one epoch: no task here): an entry
        # in the support since step e is seen at most at the checks from e on (it may leave again)
        first = d["entry_step"].clamp_min(0)
        most = torch.div(24 - first, 5, rounding_mode="floor") + 1 - (first % 5 != 0).long() + 1
        assert bool((d["support"][~entered] == 0).all()) and bool((d["support"][entered] <= most[entered]).all())
    assert sum(int((d["support"] > 0).sum()) for d in method.search.values()) > 0
    keep = method.keep_vectors(PairedMasks(model, allowed=method._allowed))
    assert len(keep) == 6 and all(k.any() for k in keep)
    # One step: Adam's step size at t = 1 is lr / (1 - 0.9), so Z_1 = 0.5 * M_1 (Γ_0 = 0).
    model, ctx = _vit_problem(steps=1)
    ctx.extra["stage"] = StageSpec(name="prune", steps=1, lr=0.05, batch_size=16, seed=0)
    one = SPP(OmegaConf.create({**SPP_CFG, "z_lr": "adam", "search_lr": 0.05}), 0.5)
    one.validate(model, ctx.weights)
    one.setup(ctx)
    one.run_prune_stage(ctx)
    for d in one.search.values():
        torch.testing.assert_close(d["z"], 0.5 * d["m"])


def test_bert_search_then_compression_reaches_the_target_sparsity():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    ids = torch.randint(0, 50, (32, 6))
    labels = torch.randint(0, 2, (32,))

    def batches():  # noqa: ANN202
        while True:
            yield {"input_ids": ids, "labels": labels}

    def loss_fn(m, b):  # noqa: ANN001, ANN202
        return m(input_ids=b["input_ids"], labels=b["labels"]).loss

    ctx = _context(model, batches, loss_fn, steps=8)
    shapes = {w.name: tuple(w.shape) for w in ctx.weights}
    method = SPP(OmegaConf.create({**SPP_CFG, "share_heads": False}), 0.6)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    assert method.run_prune_stage(ctx) is True  # no cache_dir: searched, not cached
    method.finalize(model)
    assert method.compressed
    report = method.sparsity_report(model, shapes)
    kept = sum(model.state_dict()[n].numel() for n in shapes)
    assert report["measured"] == pytest.approx(1 - kept / sum(torch.Size(s).numel() for s in shapes.values()))
    # per-head masks pad heads to equal sizes, so a little less than the target is removed
    assert 0.45 < report["measured"] <= 0.6 + 1e-3
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    info = method.export_config()
    assert info["compressed"] and set(info["layers"]) == {"bert.encoder.layer.0", "bert.encoder.layer.1"}


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="method.optimizer"):
        SPP(OmegaConf.create({**SPP_CFG, "optimizer": "lion"}), 0.5)
    with pytest.raises(UserError, match="method.nu"):
        SPP(OmegaConf.create({**SPP_CFG, "nu": 0}), 0.5)
    with pytest.raises(UserError, match="method.z_lr"):
        SPP(OmegaConf.create({**SPP_CFG, "z_lr": "fast"}), 0.5)
    model, ctx = _vit_problem(steps=1)
    with pytest.raises(UserError, match="sparsity"):
        SPP(OmegaConf.create(SPP_CFG), 0.99).validate(model, ctx.weights)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_spp_run_compresses_and_one_search_serves_every_sparsity(config, tmp_path, caplog):
    caplog.set_level("INFO", logger="pruneflow")
    r5 = run(config("method=spp", "sparsity=0.5", "speed.enabled=true"), tmp_path / "s5")
    assert any(r.getMessage().startswith("Cached spp") for r in caplog.records)
    params = r5["params"]
    assert params["compressed_total"] is not None and params["compressed_total"] < 0.6 * params["total"]
    assert r5["sparsity"]["measured"] == pytest.approx(0.5, abs=0.01)
    assert r5["method_info"]["search_reused"] is False
    assert r5["method_info"]["search_lr"] == 1e-3  # method.search_lr, the authors' rate
    # the compressed model's forward costs fewer FLOPs: about half of its Linears' at 50 %
    flops = r5["speed"]["final_flops"] / r5["speed"]["dense_flops"]
    assert 0.4 < flops < 0.75, flops

    # Measured sparsity recounted from the saved weights' shapes against the original ones.
    state = load_file(str(tmp_path / "s5" / "model" / "model.safetensors"))
    names = list(r5["sparsity"]["per_layer"])
    assert len(names) == 16
    assert 1 - sum(state[n].numel() for n in names) / params["prunable"] == pytest.approx(r5["sparsity"]["measured"], abs=1e-6)
    assert sum(v.numel() for v in state.values()) == params["compressed_total"]
    path = json.loads((tmp_path / "s5" / "spp_path.json").read_text())
    assert len(path["path"]) == 20 and path["path"][-1]["step"] == 20

    # The compressed model reloads with one call and predicts what the run predicted.
    from pruneflow import load_model
    from pruneflow.tasks.digits import Digits

    model = load_model(tmp_path / "s5" / "model").eval()
    task = Digits(OmegaConf.create({"name": "digits"}))
    task.load()
    x = torch.stack([task.eval_sets["validation"][i]["pixel_values"] for i in range(360)])
    preds = [json.loads(line) for line in (tmp_path / "s5" / "predictions.jsonl").read_text().splitlines()]
    with torch.no_grad():
        assert model(x).argmax(-1).tolist() == [p["prediction"] for p in preds]
    assert_refused_as_a_starting_point(tmp_path / "s5" / "model", "config.json", "model=tiny_vit")

    # Another sparsity reuses the search: nested structures, measured ≈ target.
    caplog.clear()
    r7 = run(config("method=spp", "sparsity=0.7"), tmp_path / "s7")
    assert any(r.getMessage().startswith("Reusing cached spp") for r in caplog.records)
    assert not any(r.getMessage().startswith("Cached spp") for r in caplog.records)  # no second search
    assert r7["method_info"]["search_reused"] is True
    assert r7["method_info"]["search_cache"] == r5["method_info"]["search_cache"]
    assert r7["sparsity"]["measured"] == pytest.approx(0.7, abs=0.01)
    assert r7["params"]["compressed_total"] < params["compressed_total"]
    k5, k7 = (json.loads((tmp_path / d / "model" / "config.json").read_text())["pruneflow"]["layers"] for d in ("s5", "s7"))
    for block in k5:
        assert set(k7[block]["ffn"]) <= set(k5[block]["ffn"])
        assert set(k7[block]["qk"][0]) <= set(k5[block]["qk"][0])

    # The authors' compressed attention scale: the same search and structure, another model,
    # which reloads with its scale and predicts what its run predicted.
    rk = run(config("method=spp", "sparsity=0.7", "method.attention_scale=kept"), tmp_path / "k7")
    assert rk["method_info"]["search_reused"] is True
    saved = json.loads((tmp_path / "k7" / "model" / "config.json").read_text())["pruneflow"]
    assert saved["layers"] == k7 and saved["attention_scale"] == "kept"
    model = load_model(tmp_path / "k7" / "model").eval()
    preds = [json.loads(line) for line in (tmp_path / "k7" / "predictions.jsonl").read_text().splitlines()]
    with torch.no_grad():
        assert model(x).argmax(-1).tolist() == [p["prediction"] for p in preds]
        assert not torch.allclose(model(x), load_model(tmp_path / "s7" / "model").eval()(x))
    with pytest.raises(UserError, match="method.attention_scale"):
        SPP(OmegaConf.create({**SPP_CFG, "attention_scale": "kept", "share_heads": False}), 0.5)


@pytest.mark.slow
def test_spp_run_killed_during_recovery_resumes_to_the_same_result(tmp_path):
    from conftest import SMALL, read_result, run_cli

    args = [*SMALL, "method=spp", "sparsity=0.5"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli([*args, f"hydra.run.dir={ref_dir}", f"cache_dir={tmp_path / 'c1'}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    cmd = [*args, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c2'}"]
    killed = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "recover:3"})
    assert killed.returncode == -9 and not (run_dir / "result.json").exists()
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_result(ref_dir), read_result(run_dir)
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"] and a["params"] == b["params"]
    wa = load_file(str(ref_dir / "model" / "model.safetensors"))
    wb = load_file(str(run_dir / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_spp_compresses_a_bert_model_end_to_end(config, tmp_path):
    from task_data import write_glue
    from transformers import AutoTokenizer

    from pruneflow import load_model
    from pruneflow.models import ModelBundle
    from pruneflow.tasks import build_task

    data = write_glue(tmp_path / "sst2", "sst2", fmt="jsonl")
    cfg = config("model=bert_tiny", "task=glue/sst2", f"task.path={data}", "method=spp", "sparsity=0.5", "stages.finetune.steps=10", "stages.prune.steps=10", "stages.recover.steps=10")
    r = run(cfg, tmp_path / "run")
    assert r["sparsity"]["measured"] == pytest.approx(0.5, abs=0.01)
    assert r["params"]["compressed_total"] < r["params"]["total"] - 0.45 * r["params"]["prunable"]
    assert len(r["sparsity"]["per_layer"]) == 12 and all(k.startswith("bert.encoder.layer.") for k in r["sparsity"]["per_layer"])

    # pruneflow.load_model rebuilds the compressed BERT; evaluated on its own it scores what the run reported.
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "pruneflow.json").read_text())["compressed"] is True
    bundle = ModelBundle(model=load_model(model_dir), family="hf", name="bert_tiny", tokenizer=AutoTokenizer.from_pretrained(model_dir))
    assert sum(p.numel() for p in bundle.model.parameters()) == r["params"]["compressed_total"]
    task = build_task(cfg.task, 0)
    task.load()
    task.prepare(bundle)
    metrics, _ = task.evaluate_all(bundle, 64, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(r["metrics"]["final"]["accuracy"], abs=1e-9)
    assert_refused_as_a_starting_point(model_dir, "pruneflow.json", "model=bert_tiny", "model.pretrained=true", "task=glue/sst2", f"task.path={data}")


def assert_refused_as_a_starting_point(model_dir, meta: str, *overrides: str) -> None:  # noqa: ANN001
    """A compressed model/ as model.path: one paragraph before any work, naming the cause and
    pruneflow.load_model (it was a list of size mismatches, blamed on being offline)."""
    from conftest import run_cli

    out = run_cli([*overrides, f"model.path={model_dir}", "logger=none"], cwd=model_dir.parent)
    said = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in said, said[-2000:]
    assert f"{meta}: pruneflow.compressed is true" in said and "pruneflow.load_model(" in said and "mismatch" not in said


def test_the_search_lr_schedule_is_the_authors_timm_cosine_stepped_after_each_epoch():
    """method.search_lr_schedule=cosine_epochs against timm's own CosineLRScheduler as
    their deit_search.py drives it (create_scheduler: sched cosine, t_initial = --epochs,
    lr_min = --min-lr, no warm-up; ``lr_scheduler.step(epoch)`` after each epoch)."""
    from timm.scheduler import CosineLRScheduler

    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = CosineLRScheduler(opt, t_initial=5, lr_min=1e-5, warmup_t=0, cycle_limit=1)
    theirs = []
    for epoch in range(8):  # 3 epochs past the cosine: their cooldown at --min-lr
        theirs.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    ours = [search_lr_at(e, 5, 1e-3, 1e-5) for e in range(8)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[0] == ours[1] == 1e-3 and ours[-1] == 1e-5


def test_the_search_runs_its_epochs_at_the_scheduled_rate():
    """64 examples in batches of 16: 4 steps per epoch, so a 10-step search has 3 epochs, at
    lr, lr and the cosine's value for t = 1 of 3; the masks move differently than at a
    constant rate."""
    from types import SimpleNamespace

    from pruneflow.trainer import StageSpec

    def search(schedule: str, steps: int = 10) -> SPP:
        model, ctx = _vit_problem(steps=steps)
        ctx.task = SimpleNamespace(train_set=list(range(64)))
        ctx.extra["stage"] = StageSpec(name="prune", steps=steps, lr=0.05, batch_size=16, seed=0)
        method = SPP(OmegaConf.create({**SPP_CFG, "z_lr": "adam", "search_lr": 0.05, "search_lr_schedule": schedule,
                                       "search_min_lr": 0.001}), 0.5)
        method.validate(model, ctx.weights)
        method.setup(ctx)
        method.run_prune_stage(ctx)
        return method

    cos = search("cosine_epochs")
    third = 0.001 + 0.5 * (0.05 - 0.001) * (1 + math.cos(math.pi / 3))
    assert [p["lr"] for p in cos.path] == pytest.approx([0.05] * 8 + [third] * 2)
    const = search("constant")
    assert [p["lr"] for p in const.path] == [0.05] * 10
    assert any(not torch.equal(cos.search[k]["m"], const.search[k]["m"]) for k in cos.search)
    assert cos.search_settings()["lr_schedule"] == {"name": "cosine_epochs", "min_lr": 0.001}
    assert "lr_schedule" not in const.search_settings()  # constant searches keep their cache keys


def test_the_authors_z_step_decays_with_the_scheduled_rate():
    """z_lr=adam: Z += lr_t / (1 - 0.9^t) * (M - Γ) with lr_t the scheduled rate. With Γ held
    at 0 (lambda 1e9), no coupling (nu 1e12) and a rate too small to move M from 1, Z after
    the search is the sum of the steps by hand."""
    from types import SimpleNamespace

    from pruneflow.trainer import StageSpec

    model, ctx = _vit_problem(steps=10, pretrain=0)
    ctx.task = SimpleNamespace(train_set=list(range(64)))
    ctx.extra["stage"] = StageSpec(name="prune", steps=10, lr=0.05, batch_size=16, seed=0)
    method = SPP(OmegaConf.create({**SPP_CFG, "z_lr": "adam", "search_lr": 1e-7, "search_lr_schedule": "cosine_epochs",
                                   "search_min_lr": 0.0, "lambda": 1e9, "nu": 1e12}), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    method.run_prune_stage(ctx)
    lrs = [p["lr"] for p in method.path]
    assert lrs[-1] < lrs[0]
    expect = sum(lr / (1 - 0.9 ** t) for t, lr in enumerate(lrs, start=1))
    for d in method.search.values():
        torch.testing.assert_close(d["z"], torch.full_like(d["z"], expect), rtol=1e-5, atol=0)


def test_support_checks_restart_every_epoch_and_come_at_the_last_step():
    """Their engine.py: a check at batch i of each epoch with i % interval == 0, and one at
    the last step. With lambda 0 every entry is in the support from the first step on, so
    its count is the number of checks: 25 steps of 4 per epoch, check_every 3: steps
    0, 3, 4, 7, 8, ..., 20, 23, 24 (13; every 3rd step of the search would be 9)."""
    from types import SimpleNamespace

    from pruneflow.trainer import StageSpec

    model, ctx = _vit_problem(steps=25)
    ctx.task = SimpleNamespace(train_set=list(range(64)))
    ctx.extra["stage"] = StageSpec(name="prune", steps=25, lr=0.05, batch_size=16, seed=0)
    method = SPP(OmegaConf.create({**SPP_CFG, "z_lr": "adam", "lambda": 0.0, "check_every": 3, "search_lr": 1e-4}), 0.5)
    method.validate(model, ctx.weights)
    method.setup(ctx)
    method.run_prune_stage(ctx)
    theirs = sum(1 for step in range(25) if (step % 4) % 3 == 0 or step == 24)
    assert theirs == 13
    for d in method.search.values():
        always = d["entry_step"] == 0
        assert bool(always.all()) and bool((d["support"][always] == theirs).all())


def test_search_lr_schedule_settings_are_checked():
    for bad in ({"search_lr_schedule": "step"}, {"search_min_lr": 0.1}, {"search_min_lr": -1}):
        with pytest.raises(UserError, match="method.search_"):
            SPP(OmegaConf.create({**SPP_CFG, **bad}), 0.5)
