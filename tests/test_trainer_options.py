"""trainer.compile, trainer.pin_memory and trainer.lr_scheduler: what they change on the
model, the batches and the learning rate."""

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pruneflow.optimizers import HFAdamW, MtDnnAdamax
from pruneflow.trainer import (
    TRANSFORMERS_SCHEDULERS,
    EpochBatches,
    LRSchedule,
    Optim,
    Trainer,
    decay_groups,
)


def _trainer(model: nn.Module, **settings: object) -> Trainer:
    cfg = OmegaConf.create({"precision": "32", "freeze": [], **settings})
    return Trainer(cfg, torch.device("cpu"), SimpleNamespace(model=model), task=None)  # type: ignore[arg-type]


def test_compile_compiles_in_place_and_keeps_parameter_names():
    eager, compiled = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
    _trainer(eager)
    _trainer(compiled, compile=True)
    assert eager._compiled_call_impl is None
    assert compiled._compiled_call_impl is not None  # nn.Module.compile: forward goes through torch.compile
    # checkpoints and safetensors files keep the same keys (no "_orig_mod." prefix)
    assert list(compiled.state_dict()) == list(eager.state_dict()) == ["0.weight", "0.bias"]


def test_pinned_batches_only_on_cuda():
    trainer = _trainer(nn.Linear(2, 2), pin_memory="auto")
    assert trainer.pin_memory is False  # a CPU run: nothing to copy
    batch = trainer.to_device({"x": torch.ones(2)})
    assert torch.equal(batch["x"], torch.ones(2))


def test_batches_follow_one_permutation_per_epoch_drawn_once(monkeypatch):
    """The batch order is randperm(n) seeded by (seed, epoch), batch i its i-th slice, the
    remainder dropped; resuming at any step gives the same batches; and the permutation
    is drawn once per epoch, not per batch (ImageNet: ~13 ms per draw)."""
    n, bs, seed = 23, 5, 7
    data = list(range(n))

    def expected(step: int) -> list[int]:  # the order transcribed independently
        epoch, i = divmod(step, n // bs)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return perm[i * bs : (i + 1) * bs].tolist()

    draws = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(a[0]) or real(*a, **k))
    batches = EpochBatches(data, bs, seed, collate=list)
    got = [next(batches) for _ in range(11)]  # 4 batches per epoch: epochs 0, 1 and part of 2
    assert len(draws) == 3
    monkeypatch.setattr(torch, "randperm", real)
    assert got == [expected(step) for step in range(11)]
    assert all(len(set(b)) == bs for b in got) and sorted(sum(got[:4], [])) != list(range(n))  # 3 of 23 dropped
    resumed = EpochBatches(data, bs, seed, collate=list, start_step=6)
    assert [next(resumed) for _ in range(5)] == got[6:]


def test_drop_last_false_ends_each_epoch_with_the_smaller_batch():
    """trainer.drop_last=false: as a DataLoader without drop_last, every example once per
    epoch, ceil(n / bs) batches, the last one smaller; steps per epoch count it."""
    from pruneflow.trainer import steps_per_epoch

    data, bs, seed = list(range(23)), 5, 3
    batches = EpochBatches(data, bs, seed, collate=list, drop_last=False)
    got = [next(batches) for _ in range(10)]  # 5 batches per epoch: 5, 5, 5, 5, 3
    assert [len(b) for b in got] == [5, 5, 5, 5, 3] * 2
    assert sorted(sum(got[:5], [])) == data and sorted(sum(got[5:], [])) == data and got[:5] != got[5:]
    resumed = EpochBatches(data, bs, seed, collate=list, start_step=4, drop_last=False)
    assert [next(resumed) for _ in range(3)] == got[4:7]
    assert steps_per_epoch(23, 5, drop_last=False) == 5 and steps_per_epoch(23, 5) == 4
    assert steps_per_epoch(23, 5, 2, drop_last=False) == 2  # whole groups of 2: len(dataloader) // 2


def test_mtdnn_batch_order_keeps_the_same_consecutive_batches_every_epoch():
    """trainer.batch_order=mtdnn, as mt-dnn's MultiTaskBatchSampler (PLATON's GLUE code):
    batches of consecutive examples [i, i + bs), their order shuffled once, then walked
    in that order every epoch; with drop_last=false the short batch is among them."""
    data, bs, seed = list(range(23)), 5, 3
    theirs = [list(range(i, min(i + bs, len(data)))) for i in range(0, len(data), bs)]  # before their shuffle
    batches = EpochBatches(data, bs, seed, collate=list, drop_last=False, order="mtdnn")
    got = [next(batches) for _ in range(15)]  # 3 epochs of 5 batches
    assert got[:5] == got[5:10] == got[10:]
    assert sorted(got[:5]) == theirs and got[:5] != theirs  # the same batches, shuffled
    assert sorted(len(b) for b in got[:5]) == [3, 5, 5, 5, 5]
    resumed = EpochBatches(data, bs, seed, collate=list, start_step=7, drop_last=False, order="mtdnn")
    assert [next(resumed) for _ in range(4)] == got[7:11]
    full = EpochBatches(data, bs, seed, collate=list, order="mtdnn")  # drop_last: the short batch left out
    assert sorted(next(full) for _ in range(4)) == theirs[:4]
    other = EpochBatches(data, bs, seed + 1, collate=list, drop_last=False, order="mtdnn")
    assert [next(other) for _ in range(5)] != got[:5]  # the seed decides the order


def test_repeated_aug_batch_order_is_deits_rasampler_in_one_process():
    """trainer.batch_order=repeated_aug, as DeiT's RASampler with one replica: the epoch's
    permutation with each index three times in a row (their repeat_interleave), the
    epoch cut to its usual length; a third of the examples per epoch, another third next."""
    data, bs, seed = list(range(24)), 6, 1
    batches = EpochBatches(data, bs, seed, collate=list, order="repeated_aug")
    plain = EpochBatches(data, bs, seed, collate=list)
    for epoch in range(3):
        got = sum((next(batches) for _ in range(4)), [])
        perm = plain.order(epoch)  # the same seeded permutation as the plain shuffle
        assert got == torch.repeat_interleave(perm, 3).tolist()[:24]
        assert sorted(got.count(i) for i in set(got)) == [3] * 8
    resumed = EpochBatches(data, bs, seed, collate=list, start_step=5, order="repeated_aug")
    again = EpochBatches(data, bs, seed, collate=list, order="repeated_aug")
    assert [next(resumed) for _ in range(3)] == [next(again) for _ in range(8)][5:]


def test_batch_order_is_checked(config):
    from pruneflow.errors import UserError
    from pruneflow.validation import validate_trainer

    validate_trainer(config("trainer.batch_order=mtdnn"), False)
    with pytest.raises(UserError, match=r"trainer.batch_order.*shuffle, mtdnn"):
        validate_trainer(config("trainer.batch_order=mt-dnn"), False)


def test_warmup_ratio_rounds_the_warmup_up():
    """``trainer.warmup_ratio``: ceil(ratio * steps) warm-up steps, as transformers'
    ``TrainingArguments.get_warmup_steps``: 0.1 of 25 steps is 3, not 2."""
    trainer = _trainer(nn.Linear(2, 2), warmup_ratio=0.1)
    assert [trainer.warmup_steps(n) for n in (25, 20, 1, 0)] == [3, 2, 1, 0]
    assert _trainer(nn.Linear(2, 2), warmup_ratio=0.1, warmup_steps=5).warmup_steps(25) == 5


class _Regression:
    """A least-squares task on 16 fixed examples (no dropout, no randomness in the loss)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        self.train_set = list(range(16))

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"i": torch.tensor(indices)}

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def loss(self, bundle, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
        return nn.functional.mse_loss(bundle.model(self.x[batch["i"]]), self.y[batch["i"]])


def _train_sgd(accum: int, batch_size: int, steps: int = 3) -> dict[str, torch.Tensor]:
    from pruneflow.trainer import StageSpec

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    cfg = OmegaConf.create({"precision": "32", "freeze": [], "gradient_accumulation_steps": accum, "optimizer": "sgd",
                            "momentum": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
                            "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 0.0, "log_every": 10})
    trainer = Trainer(cfg, torch.device("cpu"), SimpleNamespace(model=model), task=_Regression())  # type: ignore[arg-type]
    trainer.train(StageSpec("finetune", steps, lr=0.1, batch_size=batch_size, seed=3))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_averages_the_micro_batches():
    """Two micro-batches of 4 per step train as one batch of 8 over the same examples
    (the loss of each is divided by the number of micro-batches): plain SGD, 3 steps."""
    accumulated, whole = _train_sgd(accum=2, batch_size=4), _train_sgd(accum=1, batch_size=8)
    start = _train_sgd(accum=1, batch_size=8, steps=0)
    for name in whole:
        assert not torch.allclose(whole[name], start[name])  # it trained
        assert torch.allclose(accumulated[name], whole[name], rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("name", TRANSFORMERS_SCHEDULERS)
def test_lr_schedules_are_transformers_schedules(name):
    """Each factor equals ``transformers.get_scheduler``'s LambdaLR at every step (and past
    the end), with and without warm-up, for short and long schedules."""
    from transformers import get_scheduler

    for total, warmup in ((1, 0), (7, 0), (7, 3), (100, 10), (1000, 0), (40, 40)):
        ours = LRSchedule(name, total, warmup)
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
        for step in range(total + 3):
            if name == "polynomial" and step == total == warmup:
                continue  # transformers divides by zero there (a step no run takes)
            assert ours.factor(step) == pytest.approx(float(theirs(step)), rel=1e-12, abs=1e-15), (name, total, warmup, step)


def test_compile_without_a_compiler_is_refused_before_any_work(tmp_path):
    """trainer.compile=true where Inductor finds no C++ compiler (CXX points nowhere): one
    paragraph naming the key before data or model load, instead of a compiler traceback
    at the first training step."""
    from conftest import run_cli

    out = run_cli(["method=magnitude", "sparsity=0.5", "trainer.compile=true", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                  cwd=tmp_path, env={"CXX": str(tmp_path / "no-such-g++")})
    assert out.returncode == 2, out.stderr[-2000:]
    msg = " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr
    assert "Invalid value for 'trainer.compile': True" in msg and "no-such-g++" in msg
    assert not (tmp_path / "run" / "result.json").exists()


# --- mt-dnn's Adamax and warmup_linear (PLATON's GLUE code), transcribed from
# module/bert_optim.py and pytorch-pretrained-bert 0.6.0's optimization.py, in their form
def _their_warmup_linear(x: float, warmup: float) -> float:
    if x < warmup:
        return x / warmup
    return 1.0 - x


def _their_adamax_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, t_total: int, warmup: float,
                       betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if len(state) == 0:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_inf"] = torch.zeros_like(p)
    exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    norm_buf = torch.cat([exp_inf.mul_(beta2).unsqueeze(0), grad.abs().add_(eps).unsqueeze_(0)], 0)
    torch.max(norm_buf, 0, keepdim=False, out=(exp_inf, exp_inf.new().long()))
    update = exp_avg / (exp_inf + eps)
    if weight_decay > 0.0:
        update += weight_decay * p
    lr_scheduled = lr * _their_warmup_linear(state["step"] / t_total, warmup)
    p.add_(-(lr_scheduled * update))
    state["step"] += 1


def step_beside(build: Callable[[], Optim], names: dict[str, nn.Parameter], grads: list[dict[str, torch.Tensor]], lr: float,
                their_step: Callable[[str, torch.Tensor], None], theirs: dict[str, torch.Tensor], resume_at: int) -> None:
    """Step the optimizer that ``build`` makes and a transcription (``their_step(name,
    grad)`` updating ``theirs``) on the same gradients, restoring the optimizer from its
    state_dict at ``resume_at``; the weights must agree after every step."""
    optim = build()
    for step, g in enumerate(grads):
        if step == resume_at:  # resume from a checkpoint halfway
            saved = optim.state_dict()
            optim = build()
            optim.load_state_dict(saved)
        optim.set_lr(lr)
        for n, p in names.items():
            p.grad = g[n].clone()
            their_step(n, g[n].clone())
        optim.optimizer.step()
        optim.step += 1
        for n, p in names.items():
            torch.testing.assert_close(p.detach(), theirs[n], rtol=0, atol=1e-7, msg=f"{n} at step {step}")


def test_adamax_mtdnn_and_warmup_linear_mtdnn_step_as_mt_dnn():
    """trainer.optimizer=adamax_mtdnn with trainer.lr_scheduler=warmup_linear_mtdnn moves the
    weights as mt-dnn's Adamax does, step by step: no bias correction, eps twice, decoupled
    weight decay on all but biases and LayerNorm (their no_decay names), the LR jumping from
    the warm-up's peak to 1 - x; and an optimizer restored from its state_dict goes on the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    names = dict(model.named_parameters())
    theirs = {n: p.detach().clone() for n, p in names.items()}
    their_state: dict[str, dict] = {n: {} for n in names}
    decayed = {n for n in names if not any(nd in n for nd in ("bias", "1.weight"))}  # "1." is the LayerNorm
    lr, total, warmup, betas, eps, wd = 1e-2, 12, 0.3, (0.85, 0.95), 0.1, 0.01  # a large eps: its two places show

    def build() -> Optim:
        opt = MtDnnAdamax(decay_groups(list(model.named_parameters()), wd), lr=1.0, betas=betas, eps=eps)
        return Optim(opt, LRSchedule("warmup_linear_mtdnn", total, 0, warmup_ratio=warmup))

    grads = [{n: torch.randn_like(p) for n, p in names.items()} for _ in range(total)]
    step_beside(build, names, grads, lr, lambda n, g: _their_adamax_step(theirs[n], g, their_state[n], lr, total, warmup, betas, eps,
                                                                           wd if n in decayed else 0.0), theirs, resume_at=6)
    # the schedule: 0 at step 0, the warm-up's peak, then the jump to 1 - x
    sched = LRSchedule("warmup_linear_mtdnn", 10, 0, warmup_ratio=0.2)
    assert [sched.factor(s) for s in (0, 1, 2, 3)] == [0.0, pytest.approx(0.5), pytest.approx(0.8), pytest.approx(0.7)]


def _their_hf_adamw_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float],
                         eps: float, weight_decay: float) -> None:
    """transformers.AdamW.step (correct_bias=True), one parameter, as movement pruning's
    scripts used it: eps added to sqrt(v) before the bias correction, weight decay after
    the update."""
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    beta1, beta2 = betas
    state["exp_avg"] = state["exp_avg"] * beta1 + (1.0 - beta1) * grad
    state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad * grad
    denom = state["exp_avg_sq"].sqrt() + eps
    step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    p.add_(-step_size * state["exp_avg"] / denom)
    if weight_decay > 0.0:
        p.add_(-lr * weight_decay * p)


def test_adamw_hf_steps_as_transformers_adamw_and_differs_from_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    names = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in names.items()}
    theirs = {n: p.clone() for n, p in start.items()}
    their_state: dict[str, dict] = {n: {} for n in names}
    decayed = {n for n in names if not any(nd in n for nd in ("bias", "1.weight"))}
    lr, total, betas, eps, wd = 1e-2, 10, (0.9, 0.999), 1e-3, 0.1  # a large eps and decay: their places show

    def build() -> Optim:
        return Optim(HFAdamW(decay_groups(list(model.named_parameters()), wd), lr=1.0, betas=betas, eps=eps), LRSchedule("constant", total, 0))

    grads = [{n: torch.randn_like(p) * 1e-3 for n, p in names.items()} for _ in range(total)]
    step_beside(build, names, grads, lr, lambda n, g: _their_hf_adamw_step(theirs[n], g, their_state[n], lr, betas, eps,
                                                                             wd if n in decayed else 0.0), theirs, resume_at=5)
    # torch's AdamW on the same gradients ends elsewhere (eps after the correction, decay before)
    ref = {n: t.clone().requires_grad_() for n, t in start.items()}
    torch_opt = torch.optim.AdamW([{"params": [ref[n]], "weight_decay": wd if n in decayed else 0.0} for n in names], lr=lr, betas=betas, eps=eps)
    for g in grads:
        for n in names:
            ref[n].grad = g[n].clone()
        torch_opt.step()
    assert max(float((ref[n].detach() - theirs[n]).abs().max()) for n in names) > 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["trainer.warmup_ratio=1"], r"'trainer.warmup_ratio': 1.*\[0, 1\)"),
    (["trainer.adam_beta2=1"], r"'trainer.adam_beta2': 1.*\[0, 1\)"),
    (["trainer.adam_epsilon=0"], r"'trainer.adam_epsilon'.*> 0"),
    (["trainer.log_every=0"], r"'trainer.log_every'.*>= 1"),
    (["trainer.checkpoint_every=-1"], r"'trainer.checkpoint_every'.*>= 0"),
    (["trainer.warmup_steps=-1"], r"'trainer.warmup_steps'.*>= 0"),
    (["trainer.warmup_ratio=0.1", "trainer.warmup_steps=0"], r"Both 'trainer.warmup_ratio' \(0.1\) and 'trainer.warmup_steps' \(0\)"),
    (["trainer.lr_scheduler=warmup_linear_mtdnn", "trainer.warmup_steps=5"], r"'trainer.warmup_steps'.*warmup_linear_mtdnn"),
    (["trainer.lr_scheduler=constant", "trainer.warmup_ratio=0.1"], r"'trainer.lr_scheduler'.*constant_with_warmup"),
    (["trainer.torch_threads=0"], r"'trainer.torch_threads'.*>= 1"),
    (["trainer.eval_every=-1"], r"'trainer.eval_every': -1.*>= 0.*or epoch"),
    (["trainer.eval_every=1.5"], r"'trainer.eval_every': 1.5.*>= 0.*or epoch"),
    (["trainer.eval_every=epochs"], r"'trainer.eval_every': 'epochs'.*or epoch"),
    (["trainer.eval_every=true"], r"'trainer.eval_every': True.*or epoch"),
])
def test_trainer_settings_are_refused_just_past_their_range(config, overrides, message):
    """One clear error naming the key at the first value outside what is allowed."""
    from pruneflow.errors import UserError
    from pruneflow.validation import validate_trainer

    with pytest.raises(UserError, match=message):
        validate_trainer(config(*overrides), False)


def test_trainer_settings_at_the_edge_of_their_range_are_accepted(config):
    from pruneflow.validation import validate_trainer

    validate_trainer(config("trainer.warmup_ratio=0", "trainer.warmup_steps=0", "trainer.adam_beta1=0", "trainer.max_grad_norm=0",
                            "trainer.weight_decay=0", "trainer.checkpoint_every=0", "trainer.log_every=1", "trainer.torch_threads=1",
                            "trainer.eval_every=0"), False)
    validate_trainer(config("trainer.eval_every=1"), False)
    validate_trainer(config("trainer.eval_every=epoch"), False)
    validate_trainer(config("trainer.optimizer=sgd", "trainer.momentum=0.9", "trainer.lr_scheduler=constant"), False)
    validate_trainer(config("trainer.lr_scheduler=warmup_linear_mtdnn", "trainer.warmup_ratio=0.1"), False)


def test_drop_last_false_is_refused_under_torchrun(config, monkeypatch):
    from pruneflow.errors import UserError
    from pruneflow.validation import validate_trainer

    cfg = config("trainer.drop_last=false")
    validate_trainer(cfg, False)  # one process: allowed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="trainer.drop_last"):
        validate_trainer(cfg, False)


def test_measure_speed_times_the_fresh_dense_model_against_the_final_one(monkeypatch):
    """result.json's speed: dense_ms from a fresh dense model of the same architecture,
    final_ms from the run's model (a swap of the two went unnoticed: tests checked > 0)."""
    from pruneflow import speed
    from pruneflow.models import ModelBundle

    ran: list[str] = []

    class Recorder(nn.Module):
        def __init__(self, tag: str, out: int = 2) -> None:
            super().__init__()
            self.tag, self.lin = tag, nn.Linear(2, out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ran.append(self.tag)
            return self.lin(x)

    class Bundle(ModelBundle):
        def fresh_architecture(self) -> nn.Module:
            return Recorder("dense")

    rows = [{"pixel_values": torch.zeros(2)}] * 3
    task = SimpleNamespace(main_split="validation", eval_sets={"validation": rows},
                           collate=lambda rs: {"pixel_values": torch.stack([r["pixel_values"] for r in rs])})

    def timed(fns, repeats, device):  # noqa: ANN001, ANN202 - one call each; a time that says which model ran
        out = {}
        for key, fn in fns.items():
            ran.clear()
            fn()
            out[key] = {"dense": 7.0, "final": 3.0}[ran[0]]
        return out

    monkeypatch.setattr(speed, "time_forward", timed)
    got = speed.measure_speed(OmegaConf.create({"speed": {"batch": 2, "repeats": 1}}), Bundle(Recorder("final", out=1), "timm", "fake"), task,
                              torch.device("cpu"))
    assert (got["dense_ms"], got["final_ms"], got["batch"]) == (7.0, 3.0, 2)
    # FLOPs of the timed batch, a multiply-add counted as 2: 2 examples x 2 inputs x (2 | 1) outputs x 2
    assert (got["dense_flops"], got["final_flops"]) == (16, 8)


def test_optimizer_groups_decay_and_stage_lr_schedule():
    """trainer.weight_decay reaches the matrices only (biases and LayerNorm weights get 0);
    a method's group keeps its own base LR (pf_lr) under the same schedule; a stage of 4
    steps with one warm-up step walks transformers' linear schedule: 0, 1, 2/3, 1/3 of
    the stage's LR, one value per optimizer step."""
    from pruneflow.trainer import StageSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    cfg = {"optimizer": "adamw", "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
           "lr_scheduler": "linear", "warmup_steps": 1, "max_grad_norm": 0.0, "log_every": 1}
    trainer = _trainer(model, **cfg)
    extra = nn.Parameter(torch.zeros(3))
    optim = trainer.build_optim(4, [{"params": [extra], "pf_lr": 0.5, "weight_decay": 0.0}])
    groups = optim.optimizer.param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    assert [(sorted(named.get(id(p), "extra") for p in g["params"]), g["weight_decay"]) for g in groups] == [
        (["0.weight", "2.weight"], 0.1), (["0.bias", "1.bias", "1.weight", "2.bias"], 0.0), (["extra"], 0.0)]
    optim.step = 2
    assert optim.set_lr(0.3) == pytest.approx(0.2)
    assert [g["lr"] for g in groups] == [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.5 * 2 / 3)]

    head = nn.Linear(4, 1)
    trainer = Trainer(OmegaConf.create({"precision": "32", "freeze": [], **cfg}), torch.device("cpu"), SimpleNamespace(model=head),
                      task=_Regression())  # type: ignore[arg-type]
    logged: list[float] = []
    trainer.train(StageSpec("finetune", 4, lr=0.1, batch_size=4, seed=3), on_log=lambda rec: logged.append(rec["finetune/lr"]))
    assert logged == pytest.approx([0.0, 0.1, 0.1 * 2 / 3, 0.1 / 3], rel=1e-12, abs=1e-15)


def test_cosine_epochs_is_timm_cosine_stepped_as_deit_steps_it():
    """trainer.lr_scheduler=cosine_epochs against timm's own CosineLRScheduler driven as
    DeiT's (and SPP's deit_retrain.py) loop drives it: the epoch trains at the rate the
    scheduler holds, then step(epoch); 16 examples in batches of 4 (4 steps an epoch), 6
    epochs, base 0.1, min 1e-3. Every optimizer step's logged rate is checked."""
    from timm.scheduler import CosineLRScheduler

    from pruneflow.trainer import StageSpec

    epochs, per_epoch, base, low = 6, 4, 0.1, 1e-3
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    timm_sched = CosineLRScheduler(probe, t_initial=epochs, lr_min=low, warmup_t=0)
    theirs = []
    for epoch in range(epochs):
        theirs += [probe.param_groups[0]["lr"]] * per_epoch
        timm_sched.step(epoch)
    cfg = {"precision": "32", "freeze": [], "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9,
           "adam_beta2": 0.999, "adam_epsilon": 1e-8, "lr_scheduler": "cosine_epochs", "min_lr": low, "warmup_ratio": 0.0,
           "warmup_steps": None, "max_grad_norm": 0.0, "log_every": 1}
    trainer = Trainer(OmegaConf.create(cfg), torch.device("cpu"), SimpleNamespace(model=nn.Linear(4, 1)), task=_Regression())  # type: ignore[arg-type]
    logged: list[float] = []
    trainer.train(StageSpec("recover", epochs * per_epoch, lr=base, batch_size=4, seed=0), on_log=lambda rec: logged.append(rec["recover/lr"]))
    assert logged == pytest.approx(theirs, rel=1e-12)
    assert logged[0] == logged[per_epoch] == base and logged[-1] > low  # epochs 0 and 1 at the base rate


def test_timm_models_keep_pos_embed_and_tokens_out_of_weight_decay():
    """A timm ViT/DeiT: its no_weight_decay() parameters (pos_embed, cls_token) get no
    decay, as timm's create_optimizer gives them in DeiT's and SPP's training scripts;
    the matrices keep trainer.weight_decay, biases and norms 0."""
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1)
    trainer = _trainer(model, optimizer="adamw", weight_decay=0.05, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                       lr_scheduler="constant", warmup_steps=None, max_grad_norm=0.0, log_every=1)
    named = {id(p): n for n, p in model.named_parameters()}
    decay = {named[id(p)]: g["weight_decay"] for g in trainer.build_optim(4).optimizer.param_groups for p in g["params"]}
    assert decay["pos_embed"] == decay["cls_token"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == decay["patch_embed.proj.weight"] == decay["head.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["norm.weight"] == 0.0
    # what timm's own factory decides, parameter by parameter
    from timm.optim import param_groups_weight_decay

    theirs = {named[id(p)]: g["weight_decay"] for g in param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay()) for p in g["params"]}
    assert decay == theirs


def test_a_warmup_longer_than_its_schedule_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """trainer.warmup_steps at least as long as the steps it warms up: the LR never
    reaches the stage's lr (it was accepted without a word; final accuracy 0.20 vs 0.66)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pruneflow.runner import Run
    from pruneflow.trainer import StageSpec

    specs = {n: StageSpec(name=n, steps=s, lr=1e-3, batch_size=8, seed=0) for n, s in (("finetune", 50), ("prune", 20), ("recover", 0))}
    fake = SimpleNamespace(cfg=OmegaConf.create({"trainer": {"warmup_steps": 30}}))
    with caplog.at_level("WARNING", logger="pruneflow"):
        Run.warn_long_warmup(fake, specs, continuous=False)
    assert "as long as the prune stage or longer (20 steps)" in caplog.text and "finetune" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pruneflow"):
        Run.warn_long_warmup(fake, specs, continuous=True)  # one schedule over 70 steps
    assert caplog.text == ""
