"""trainer.compile and trainer.pin_memory: what they change on the model and the batches."""

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

from pruneflow.trainer import Trainer


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
