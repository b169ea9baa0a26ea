"""trainer.compile, trainer.pin_memory and trainer.lr_scheduler: what they change on the
model, the batches and the learning rate."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pruneflow.trainer import LR_SCHEDULERS, EpochBatches, LRSchedule, Trainer


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


@pytest.mark.parametrize("name", LR_SCHEDULERS)
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
