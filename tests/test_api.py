"""The Python API and the trainer callbacks: the same method classes as the CLI, driven
from a plain loop, a ``transformers.Trainer`` and a Lightning ``Trainer``."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pruneflow
from pruneflow.errors import UserError
from pruneflow.methods import get_method_class

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def plain_loop(method: str, steps: int = 10, **settings) -> tuple[nn.Module, pruneflow.api.Pruner]:  # noqa: ANN003
    torch.manual_seed(0)
    model = Tiny()
    pruner = pruneflow.methods.create(method, steps=steps, model=model, **settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for g in pruner.param_groups():
        opt.add_param_group(g)
    for step in range(steps + 5):
        x = torch.randn(16, 16)
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        extra = pruner.extra_loss()
        (loss if extra is None else loss + extra).backward()
        opt.step()
        pruner.after_optimizer_step(step)
        if step == steps - 1:
            model = pruner.end()
        opt.zero_grad()
    return pruner.remove(), pruner


@pytest.mark.parametrize("method", ["seven", "platon", "movement", "magnitude", "random"])
def test_plain_loop_reaches_the_sparsity_counted_from_the_weights(method):
    model, pruner = plain_loop(method, sparsity=0.75, **({"deltaT": 2} if method == "platon" else {}))
    assert type(pruner.method) is get_method_class(method)  # the CLI's implementation, not a copy
    weights = [model.blocks[0].weight, model.blocks[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    report = pruneflow.sparsity_report(model)
    assert report["prunable"]["zeros"] == zeros and report["prunable"]["total"] == total
    if method == "platon":  # PLATON prunes biases too (its own denominator)
        assert pruner.sparsity == pytest.approx(0.75, abs=1e-3)
    else:
        assert zeros / total == pytest.approx(0.75, abs=1e-3)
    assert set(report["per_layer"]) == {"blocks.0.weight", "blocks.2.weight"}
    assert report["overall"]["total"] == sum(p.numel() for p in model.parameters())
    # the masks stayed frozen for the 5 steps after end(): the zeros are those at the end of pruning
    assert not any("parametrizations" in k for k in model.state_dict())


def test_soft_movement_and_admm_add_their_loss_terms():
    model, pruner = plain_loop("admm", steps=8, iterations=2)
    assert pruneflow.sparsity_report(model)["prunable"]["sparsity"] == pytest.approx(0.5)
    with pytest.raises(UserError, match="sparsity"):
        pruneflow.methods.create("soft_movement", sparsity=0.5)


def test_spp_searches_at_its_search_lr():
    """SPP's masks train at search_lr (default 1e-3, the authors'); run(lr=...) sets the same
    rate; methods without a search loop of their own refuse an lr."""
    import timm

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))

    def vit() -> nn.Module:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=32, depth=1,
                                 num_heads=2, num_classes=3, in_chans=1)

    def batches():  # noqa: ANN202
        while True:
            yield {"pixel_values": x, "labels": y}

    def loss_fn(m: nn.Module, b: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b["pixel_values"]), b["labels"])

    assert pruneflow.methods.create("spp", sparsity=0.3, steps=3, model=vit(), batches=batches, loss_fn=loss_fn).method.lr == 1e-3
    pruner = pruneflow.methods.create("spp", sparsity=0.3, steps=3, model=vit(), batches=batches, loss_fn=loss_fn, search_lr=0.05)
    assert pruner.method.lr == 0.05
    assert pruner.run(lr=0.01) and pruner.method.search_settings()["lr"] == 0.01
    with pytest.raises(UserError, match="no learning rate"):
        pruneflow.methods.create("magnitude", sparsity=0.5, steps=2, model=Tiny()).run(lr=0.1)


def test_own_loops_take_the_readme_batches_form_past_one_pass():
    """batches=lambda: iter(loader) (the README's form) with steps longer than one pass of
    the loader: the function is called again for the next pass (it was called once, and
    the search stopped with a bare StopIteration after the first pass)."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    data = [{"x": torch.randn(16), "y": torch.tensor(i % 3)} for i in range(12)]
    loader = DataLoader(data, batch_size=4)  # 3 batches a pass
    calls = []

    def batches():  # noqa: ANN202
        calls.append(1)
        return iter(loader)

    model = Tiny()
    pruner = pruneflow.methods.create("grasp", sparsity=0.5, steps=7, model=model, include=["blocks.*"], batches=batches,
                                      loss_fn=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]))
    assert pruner.run() and len(calls) == 3  # 7 batches: passes of 3, 3 and 1
    assert pruneflow.sparsity_report(pruner.remove())["prunable"]["sparsity"] == pytest.approx(0.5, abs=1e-2)
    empty = pruneflow.methods.create("grasp", sparsity=0.5, steps=2, model=Tiny(), include=["blocks.*"], batches=lambda: iter([]),
                                     loss_fn=lambda m, b: m(b).sum())
    with pytest.raises(UserError, match="no batches"):
        empty.run()
    with pytest.raises(UserError, match=r"batches=DataLoader object: pass a function .* batches=lambda: iter\(loader\)"):
        pruneflow.methods.create("grasp", sparsity=0.5, steps=2, model=Tiny(), include=["blocks.*"], batches=loader,
                                 loss_fn=lambda m, b: m(b).sum())


def test_settings_are_checked_with_the_allowed_keys():
    with pytest.raises(UserError, match="Did you mean alpha_1"):
        pruneflow.methods.create("seven", sparsity=0.5, steps=10, alpha1=0.8)
    with pytest.raises(UserError, match="method.alpha_1"):
        pruneflow.methods.create("seven", sparsity=0.5, steps=10, alpha_1=2.0)
    with pytest.raises(UserError, match="Did you mean seven"):
        pruneflow.methods.create("sevn", sparsity=0.5)
    with pytest.raises(UserError, match="sparsity"):
        pruneflow.methods.create("seven", sparsity=1.5)
    # nan passed movement's "score_lr >= 0" and the schedule's warm-up checks
    with pytest.raises(UserError, match=r"Invalid value for 'method.score_lr': nan. Allowed: a finite number"):
        pruneflow.methods.create("movement", sparsity=0.5, steps=10, score_lr=float("nan"))
    with pytest.raises(UserError, match=r"Invalid value for 'initial_warmup': inf"):
        pruneflow.methods.create("magnitude", sparsity=0.5, steps=10, initial_warmup=float("inf"))


# ----------------------------------------------------------------------------- transformers.Trainer
def tiny_bert_and_data(n: int = 64):  # noqa: ANN201
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    from pruneflow.models.text import train_wordpiece_tokenizer

    words = ["good", "bad", "film", "plot", "very", "not", "story", "actor"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 8, (6,), generator=g)) for _ in range(n)]
    tok = train_wordpiece_tokenizer(texts, vocab_size=60)
    labels = [int("good" in t) for t in texts]
    enc = tok(texts, padding="max_length", max_length=12, truncation=True)
    ds = Dataset.from_dict({**enc, "labels": labels})
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    return model, ds


@pytest.mark.parametrize("method", ["seven", "movement"])
def test_transformers_trainer_callback(tmp_path, method):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pruneflow.integrations import PruningCallback

    model, ds = tiny_bert_and_data()
    callback = PruningCallback(method, sparsity=0.6, start=4, steps=12)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    stale = []

    class ScoreGrads(TrainerCallback):
        """The Trainer zeroes the model's gradients only; movement's scores are not the
        model's, and before, their gradients added up over every step of the run."""

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if callback.pruner.model is not None:
                stale.extend(state.global_step for p in getattr(callback.pruner.method, "score_params", []) if p.grad is not None)

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback, ScoreGrads()])
    trainer.train()
    assert stale == []
    report = pruneflow.sparsity_report(trainer.model)  # plain weights after training (masks removed)
    assert report["prunable"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len(report["per_layer"]) == 12  # q, k, v, attention output, FFN in/out x 2 layers
    logged = [h["pruning/sparsity"] for h in trainer.state.log_history if "pruning/sparsity" in h]
    assert logged and logged[-1] == pytest.approx(0.6, abs=1e-3) and logged == sorted(logged)
    if method == "movement":  # the scores joined the Trainer's optimizer and its LR schedule
        groups = trainer.optimizer.param_groups
        assert len(trainer.lr_scheduler.base_lrs) == len(groups) and trainer.lr_scheduler.base_lrs[-1] == pytest.approx(1e-2)
        assert groups[-1]["params"] == callback.pruner.method.score_params  # one trained Parameter per layer


def test_callback_refuses_what_it_cannot_run():
    from pruneflow.integrations import PruningCallback

    for method in ("admm", "soft_movement", "l0"):
        with pytest.raises(UserError, match="extra_loss"):
            PruningCallback(method)
    for method in ("seven_pre", "snip", "grasp", "force"):
        with pytest.raises(UserError, match="without weight updates"):
            PruningCallback(method)
    callback = PruningCallback("seven", sparsity=0.5, start=10, steps=20)
    with pytest.raises(UserError, match="does not fit"):
        callback.window.plan(25)


def test_callback_window_floats_are_fractions_and_ints_are_steps():
    from pruneflow.integrations import _steps

    assert (_steps(1.0, 16, "steps"), _steps(0.5, 16, "steps"), _steps(1, 16, "steps"), _steps(0.0, 16, "start")) == (16, 8, 1, 0)
    for bad in (2.5, 1.5, -1, "half", True):  # before: 2.5 was 2 steps, 1.0 one step
        with pytest.raises(UserError, match=r"a float in \[0, 1\], a fraction"):
            _steps(bad, 16, "steps")


@pytest.mark.parametrize("method", ["seven", "platon", "movement", "magnitude", "random"])
def test_a_trainer_run_resumes_inside_the_pruning_window_exactly(tmp_path, method):
    """The checkpoint holds the pruned layers under parametrization names that a new model
    lacks, so transformers loads none of those weights and only warns. Before, such a resume
    was refused (and earlier still it went on from untrained weights and ended at sparsity 0);
    now the callback attaches the masks and loads them with the method's state, and the
    resumed run ends with the uninterrupted run's weights."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pruneflow.integrations import (
        STATE_FILE,
        PruningCallback,
        checkpoint_tensors,
        plain_weights,
    )

    class StopAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            control.should_training_stop = True

    def trainer(out: str, save_steps: int = 6) -> Trainer:
        model, ds = tiny_bert_and_data(32)
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=16, per_device_train_batch_size=4, learning_rate=1e-3,
                                 report_to=[], save_strategy="steps", save_steps=save_steps, use_cpu=True, disable_tqdm=True, seed=0)
        return Trainer(model=model, args=args, train_dataset=ds, callbacks=[PruningCallback(method, sparsity=0.6, start=4, steps=8)])

    whole = trainer("whole")
    whole.train()
    stopped = trainer("stopped")
    stopped.add_callback(StopAtSave())
    stopped.train()
    assert stopped.state.global_step == 6 and (tmp_path / "stopped" / "checkpoint-6" / STATE_FILE).is_file()
    # the checkpoint as the plain pruned model of step 6, loaded strictly into a freshly built one
    fresh, _ = tiny_bert_and_data(32)
    fresh.load_state_dict(plain_weights(tmp_path / "stopped" / "checkpoint-6"))
    raw = checkpoint_tensors(tmp_path / "stopped" / "checkpoint-6")
    for key, value in fresh.state_dict().items():
        base = key.removesuffix(".weight")
        if f"{base}.parametrizations.weight.original" in raw:  # W * mask, as the masked model computes it
            assert torch.equal(value, raw[f"{base}.parametrizations.weight.original"] * raw[f"{base}.parametrizations.weight.0.mask"])
        else:
            assert torch.equal(value, raw[key])
    resumed = trainer("stopped")
    resumed.train(resume_from_checkpoint=True)
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])][:3]
    assert pruneflow.sparsity_report(resumed.model)["prunable"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_a_trainer_resume_without_the_pruning_state_is_refused(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pruneflow.integrations import STATE_FILE, PruningCallback

    class StopAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            control.should_training_stop = True

    def trainer(save_steps: int, start: int = 4, out: str | None = None) -> Trainer:
        model, ds = tiny_bert_and_data(32)
        args = TrainingArguments(output_dir=str(tmp_path / (out or f"out{save_steps}")), max_steps=16, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=save_steps, use_cpu=True,
                                 disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=ds, callbacks=[PruningCallback("seven", sparsity=0.6, start=start, steps=8)])

    first = trainer(6)
    first.add_callback(StopAtSave())
    first.train()
    # another window than the one the checkpoint was saved in
    with pytest.raises(UserError, match=r"Resuming at step 6, inside or after the pruning window \(start=3, steps=8\).*another run"):
        trainer(6, start=3).train(resume_from_checkpoint=True)
    # a checkpoint outside output_dir: the callback finds its state where transformers writes checkpoints
    shutil.copytree(tmp_path / "out6" / "checkpoint-6", tmp_path / "moved" / "checkpoint-6")
    with pytest.raises(UserError, match=r"there is none in .*other/checkpoint-6 .*set output_dir to the folder that holds"):
        trainer(6, out="other").train(resume_from_checkpoint=str(tmp_path / "moved" / "checkpoint-6"))
    moved = trainer(6, out="moved")
    moved.train(resume_from_checkpoint=str(tmp_path / "moved" / "checkpoint-6"))
    assert pruneflow.sparsity_report(moved.model)["prunable"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    # a checkpoint saved without it (an older pruneflow, or a copied folder)
    (tmp_path / "out6" / "checkpoint-6" / STATE_FILE).unlink()
    with pytest.raises(UserError, match=r"Resuming at step 6, inside or after the pruning window \(start=4, steps=8\).*there is none"):
        trainer(6).train(resume_from_checkpoint=True)
    # a checkpoint from before the window needs none: it resumes and prunes
    early = trainer(4)
    early.add_callback(StopAtSave())
    early.train()
    assert not (tmp_path / "out4" / "checkpoint-4" / STATE_FILE).exists()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert pruneflow.sparsity_report(resumed.model)["prunable"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_the_best_model_of_a_trainer_is_one_at_the_final_sparsity(tmp_path):
    """load_best_model_at_end picked the best evaluation of the whole run; here (the loss,
    greater_is_better=True) a dense one from before the window, whose pruned layers
    transformers cannot load into the masked model: the model at the end had that
    checkpoint's embeddings and head over the last step's pruned layers."""
    from transformers import Trainer, TrainingArguments

    from pruneflow.integrations import PruningCallback, checkpoint_tensors
    from pruneflow.masking import strip_parametrization_names

    model, ds = tiny_bert_and_data(32)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=True, use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,
                      callbacks=[PruningCallback("seven", sparsity=0.6, start=4, steps=8)])
    trainer.train()
    assert trainer.state.best_global_step >= 12  # the window ends at step 12 (before: 2)
    best = strip_parametrization_names(checkpoint_tensors(tmp_path / f"checkpoint-{trainer.state.best_global_step}"))
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], best[k]) for k in best if k in final)
    assert pruneflow.sparsity_report(trainer.model)["prunable"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_a_single_pattern_string_is_one_pattern():
    """Before: list("blocks.0") split the string into characters, and '*'-free ones such as
    'b' matched nothing while a '*' matched every Linear."""
    torch.manual_seed(0)
    model = Tiny()
    pruner = pruneflow.methods.create("magnitude", sparsity=0.5, steps=1, model=model, include="blocks.*")
    assert [w.name for w in pruner.weights] == ["blocks.0.weight", "blocks.2.weight"]
    report = pruneflow.sparsity_report(model, include="blocks.0")
    assert list(report["per_layer"]) == ["blocks.0.weight"]
    with pytest.raises(UserError, match="Invalid value for 'include': 3"):
        pruneflow.sparsity_report(model, include=3)


def test_sparsity_report_counts_compressed_weights_against_their_original_shapes():
    """SPP's compressed model: before, the API reported 0.0 while result.json said 0.5."""
    import timm

    from pruneflow.compress import compress, uniform_keep

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3, embed_dim=32,
                            depth=2, num_heads=2)
    dense = pruneflow.sparsity_report(vit)
    compress(vit, uniform_keep(vit, 0.5))
    report = pruneflow.sparsity_report(vit)
    assert report["prunable"]["sparsity"] == pytest.approx(0.5) and report["prunable"]["total"] == dense["prunable"]["total"]
    assert report["overall"]["total"] == dense["overall"]["total"]
    remaining = list(vit.parameters())
    removed = dense["overall"]["total"] - sum(p.numel() for p in remaining)
    assert report["overall"]["zeros"] == removed + sum(int((p == 0).sum()) for p in remaining)
    reloaded = copy.deepcopy(vit)  # the original shapes travel with the layers
    assert pruneflow.sparsity_report(reloaded)["prunable"] == report["prunable"]


def test_own_loops_without_data_and_a_model_name_are_one_paragraph():
    """Before: TypeError ('NoneType' object is not callable) and AttributeError."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3, embed_dim=32,
                            depth=1, num_heads=2)
    for method in ("spp", "grasp"):
        pruner = pruneflow.methods.create(method, sparsity=0.5, steps=2, model=vit)
        with pytest.raises(UserError, match=f"run\\(\\): method={method}'s own loop reads your data: pass batches="):
            pruner.run()
        pruner.remove()
    with pytest.raises(UserError, match="Invalid value for 'model': a str"):
        pruneflow.methods.create("magnitude", sparsity=0.5, steps=2, model="vit")


def tiny_lightning_module(L, seed: int | None = None):  # noqa: ANN001, ANN201
    """``Tiny`` as a LightningModule (AdamW, lr 1e-2); ``seed``: drawn from it at construction."""

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if seed is not None:
                torch.manual_seed(seed)
            self.net = Tiny()

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return Module


def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning")

    from pruneflow.integrations.lightning import PruningCallback

    Module = tiny_lightning_module(L)
    torch.manual_seed(0)
    x = torch.randn(128, 16)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    module = Module()
    callback = PruningCallback("seven", sparsity=0.5, start=2, steps=8, include=["net.blocks.*"])
    trainer = L.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.callbacks.append(callback)
    trainer.fit(module, data)
    report = pruneflow.sparsity_report(module, include=["net.blocks.*"])
    assert report["prunable"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert module.strict_loading  # loosened while a checkpoint might load (none here), then put back


@pytest.mark.parametrize("method", ["seven", "movement"])
def test_a_lightning_run_resumes_inside_the_pruning_window_exactly(tmp_path, method):
    """Lightning loads the weights strictly before callbacks see the checkpoint, and the
    masked layers are saved under parametrization names a new module lacks: before, such a
    resume ended in Lightning's missing/unexpected-keys error."""
    L = pytest.importorskip("lightning")

    from lightning.pytorch.callbacks import ModelCheckpoint

    from pruneflow.integrations import plain_weights
    from pruneflow.integrations.lightning import PruningCallback

    Module = tiny_lightning_module(L, seed=0)

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
            trainer.should_stop = trainer.global_step == 6

    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)  # 6 steps an epoch

    def fit(out: str, *extra: L.Callback, ckpt_path: str | None = None) -> Module:
        module = Module()
        saver = ModelCheckpoint(dirpath=str(tmp_path / out), every_n_train_steps=6, save_top_k=-1)
        trainer = L.Trainer(max_steps=16, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path), callbacks=[PruningCallback(method, sparsity=0.5, start=2, steps=8,
                                                                                       include=["net.blocks.*"]), saver, *extra])
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module

    whole = fit("whole")
    fit("stopped", StopAt())
    (checkpoint,) = (tmp_path / "stopped").glob("*step=6.ckpt")
    resumed = fit("resumed", ckpt_path=str(checkpoint))
    expected, got = whole.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), [k for k in expected if not torch.equal(expected[k], got[k])]
    assert pruneflow.sparsity_report(resumed, include=["net.blocks.*"])["prunable"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert resumed.strict_loading  # put back after the checkpoint loaded
    fresh = Module()  # the step-6 checkpoint as a plain module (Lightning's own strict load refuses its names)
    fresh.load_state_dict(plain_weights(checkpoint))
    assert fresh.net.blocks[0].weight.count_nonzero() < fresh.net.blocks[0].weight.numel()
    # the callback loads loosely to restore the masked layers; any other mismatch is still refused, as strict loading does
    broken = torch.load(checkpoint, weights_only=False)
    broken["state_dict"]["net.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(UserError, match=r"does not fit the model: missing \[\], unexpected \['net.extra'\]"):
        fit("broken", ckpt_path=str(tmp_path / "broken.ckpt"))
    # masked layers without the method's state (an older pruneflow's checkpoint): refused, not resumed from half a state
    del broken["state_dict"]["net.extra"]
    broken["callbacks"] = {k: v for k, v in broken["callbacks"].items() if "PruningCallback" not in k}
    torch.save(broken, tmp_path / "stateless.ckpt")
    with pytest.raises(UserError, match=r"Resuming at step 6, inside or after the pruning window \(start=2, steps=8\).*this checkpoint has none"):
        fit("stateless", ckpt_path=str(tmp_path / "stateless.ckpt"))


@pytest.mark.slow
def test_example_script_prunes(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "prune_plain_pytorch.py"), "magnitude", "0.6"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "magnitude: sparsity 0.6000" in out.stdout


def test_snip_in_a_train_mode_loop_is_told_its_authors_score_in_eval_mode(caplog):
    def score(eval_mode: bool | None, model_eval: bool) -> int:
        caplog.clear()
        model = Tiny().train(not model_eval)
        settings = {} if eval_mode is None else {"eval_mode": eval_mode}
        pruner = pruneflow.methods.create("snip", sparsity=0.5, steps=2, model=model, include=["blocks.*"], **settings)
        for step in range(2):
            x = torch.randn(8, 16)
            nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
            pruner.after_optimizer_step(step)
            model.zero_grad()
        return sum("eval mode" in r.getMessage() for r in caplog.records)

    assert score(None, model_eval=False) == 1  # once, not per step
    assert score(None, model_eval=True) == 0
    assert score(False, model_eval=False) == 0


def test_a_scoring_loss_is_refused_where_the_loop_is_yours():
    with pytest.raises(UserError, match="scoring_loss"):
        pruneflow.methods.create("force", sparsity=0.5, steps=2, model=Tiny(), include=["blocks.*"], scoring_loss="target_logit")


def test_run_and_an_early_end_say_when_nothing_was_scored(caplog):
    """run() on a method without its own loop did nothing and returned False; end() before
    any step chose a mask from scores that saw no data, both without a word."""
    with pytest.raises(UserError, match="no prune loop of its own"):
        pruneflow.methods.create("snip", sparsity=0.5, steps=5, model=Tiny(), include=["blocks.*"]).run()
    caplog.set_level("WARNING", logger="pruneflow")
    early = Tiny()
    before = {k: v.clone() for k, v in early.state_dict().items()}
    with pytest.raises(UserError, match=r"pruner.end\(\) before any pruning step: method=seven"):
        pruneflow.methods.create("seven", sparsity=0.5, steps=100, model=early, include=["blocks.*"]).end()
    pruner = pruneflow.methods.create("seven", sparsity=0.5, steps=100, model=early, include=["blocks.*"])
    pruner.remove()  # masks dropped, nothing pruned
    assert sum("before any pruning step" in r.getMessage() for r in caplog.records) == 1
    assert all(torch.equal(v, early.state_dict()[k]) for k, v in before.items())
    gated = Tiny().train()  # L0: removing its gates unapplied (folding a sampled gate in scaled or zeroed weights)
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    pruneflow.methods.create("l0", steps=10, model=gated, include=["blocks.*"]).remove()
    assert all(torch.equal(v, gated.state_dict()[k]) for k, v in before.items())
    caplog.clear()
    model = Tiny()
    pruneflow.methods.create("magnitude", sparsity=0.5, steps=1, model=model, include=["blocks.*"]).end()  # one shot: fine
    assert not caplog.records and pruneflow.sparsity_report(model)["prunable"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    _, pruner = plain_loop("seven", sparsity=0.5)  # steps, then end(): no warning
    assert not caplog.records and pruner.steps_seen > 0


def test_hooks_before_attach_and_steps_without_gradients_are_refused():
    """A pruner created without a model: its hooks raised AttributeError, param_groups()
    returned [] (movement's scores never reached the optimizer). A step with no gradients
    (zero_grad() before the hook, or no backward()) left SEVEN's scores at 0 and pruned
    70 % of the weights by position, without a word."""
    for call in (lambda p: p.after_optimizer_step(0), lambda p: p.param_groups(), lambda p: p.end(), lambda p: p.after_backward(0)):
        with pytest.raises(UserError, match=r"before pruner.attach\(model\)"):
            call(pruneflow.methods.create("movement", sparsity=0.7, steps=10))
    for method in ("seven", "movement"):
        model = Tiny()
        pruner = pruneflow.methods.create(method, sparsity=0.7, steps=3, model=model, include=["blocks.*"])
        opt = torch.optim.SGD([*model.parameters(), *(p for g in pruner.param_groups() for p in g["params"])], lr=0.1)
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()  # before the hook: the gradients are gone
        with pytest.raises(UserError, match=rf"method={method} scores from gradients, but none of its \d+ tensors"):
            pruner.after_optimizer_step(0)
        assert int(pruner.method.mask_flat.sum()) == pruner.method.mask_flat.numel()  # nothing pruned


def test_a_half_registered_method_says_what_is_missing(tmp_path, monkeypatch):
    """Adding a method: its yaml without its METHODS line listed the methods without a
    word about it; a misspelt class in the line was a raw AttributeError; a line without
    its yaml a bare FileNotFoundError."""
    import pruneflow.methods as registry

    monkeypatch.setattr(registry, "CONF_DIR", tmp_path)
    (tmp_path / "taylor.yaml").write_text("name: taylor\n")
    with pytest.raises(UserError, match="conf/method/taylor.yaml exists, but 'taylor' is not in the METHODS dict"):
        registry.get_method_class("taylor")
    monkeypatch.setitem(registry.METHODS, "taylor", "pruneflow.methods.magnitude:Taylr")
    with pytest.raises(UserError, match=r"names pruneflow.methods.magnitude:Taylr, but pruneflow.methods.magnitude has no 'Taylr' \(its classes: .*Magnitude"):
        registry.get_method_class("taylor")
    with pytest.raises(UserError, match=r"method=taylor is in METHODS but has no config: create conf/method/taylor.yaml"):
        pruneflow.methods.create("taylor", sparsity=0.5)
