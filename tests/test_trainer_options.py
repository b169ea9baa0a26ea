"""trainer.compile, trainer.pin_memory and trainer.lr_scheduler: what they change on the
model, the batches and the learning rate."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pruneflow.trainer import LR_SCHEDULERS, LRSchedule, Trainer


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
