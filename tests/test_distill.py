"""Knowledge distillation (Sanh et al.'s loss) with any method."""

import math

import pytest
import torch

from pruneflow.distill import kd_loss
from pruneflow.runner import Run


def test_kd_loss_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    # T = 2: p = [sqrt3, 1] / (sqrt3 + 1), times T^2 = 4
    p = torch.tensor([3**0.5, 1.0]) / (3**0.5 + 1)
    expected = 4 * float((p * (p / 0.5).log()).sum())
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # batchmean: two identical rows give the same value as one
    assert kd_loss(s.repeat(2, 1), t.repeat(2, 1), 2.0).item() == pytest.approx(expected, rel=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, *logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits


class _FakeTask:
    """loss_and_logits / logits as pruneflow's tasks give them: the task loss, and one
    logits tensor per head (QA: start and end)."""

    def loss_and_logits(self, bundle, batch):  # noqa: ANN001, ANN201
        return torch.tensor(0.7), bundle.model.logits

    def logits(self, bundle, batch):  # noqa: ANN001, ANN201
        return bundle.model.logits


def test_distiller_loss_averages_the_qa_heads_and_uses_mse_for_regression():
    """QA: the mean of the start and end terms (their masked_run_squad.py); regression:
    MSE to the teacher's prediction."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pruneflow.distill import Distiller

    cfg = OmegaConf.create({"temperature": 2.0, "alpha_ce": 0.25, "alpha_distil": 0.75})
    s0, t0 = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    s1, t1 = torch.tensor([[0.5, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.4]])
    k0, k1 = kd_loss(s0, t0, 2.0).item(), kd_loss(s1, t1, 2.0).item()
    assert abs(k0 - k1) > 0.1  # two different terms: a sum or one of them alone would not match
    qa = Distiller(cfg, _Logits(t0, t1), "question_answering")
    got = qa.loss(SimpleNamespace(model=_Logits(s0, s1)), _FakeTask(), {}).item()
    assert got == pytest.approx(0.75 * (k0 + k1) / 2 + 0.25 * 0.7, rel=1e-6)
    reg = Distiller(cfg, _Logits(torch.tensor([[1.5], [0.0]])), "regression")
    got = reg.loss(SimpleNamespace(model=_Logits(torch.tensor([[0.5], [1.0]]))), _FakeTask(), {}).item()
    assert got == pytest.approx(0.75 * ((1.0**2 + 1.0**2) / 2) + 0.25 * 0.7, rel=1e-6)


def test_distillation_from_the_finetuned_model(config, tmp_path):
    cfg = config("method=magnitude", "sparsity=0.7", "distill.enabled=true", "distill.alpha_ce=0.0", "distill.alpha_distil=1.0", "cache=false")
    run = Run(cfg, tmp_path / "run")
    run.prepare()
    losses = []
    orig = run.task.loss_and_logits

    def spy(bundle, batch):  # noqa: ANN001, ANN202
        loss, logits = orig(bundle, batch)
        losses.append(loss.item())
        return loss, logits

    run.task.loss_and_logits = spy
    seen = []
    train = run.trainer.train

    def record(stage, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append((stage.name, run.trainer.distiller is not None))
        return train(stage, *a, **k)

    run.trainer.train = record
    result = run.execute()
    assert seen == [("finetune", False), ("prune", True), ("recover", True)]
    assert (tmp_path / "run" / "checkpoints" / "teacher.safetensors").exists()
    # The teacher is the dense model after the finetune stage: frozen, unpruned.
    teacher = run.distiller.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(float((p == 0).float().mean()) < 0.1 for n, p in teacher.named_parameters() if n.startswith("blocks.") and p.ndim == 2)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "teacher.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in teacher.state_dict().items())
    # The loss the trainer optimised: alpha_distil * T^2 * KL(teacher || student), teacher
    # logits from the teacher, student logits from the pruned student.
    batch = run.task.collate([run.task.train_set[i] for i in range(8)])
    run.bundle.model.eval()
    with torch.no_grad():
        got = run.distiller.loss(run.bundle, run.task, batch)
        expected = kd_loss(run.bundle.model(batch["pixel_values"]), teacher(batch["pixel_values"]), 2.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    assert result["sparsity"]["measured"] == pytest.approx(0.7, abs=1e-4)


def test_distillation_settings_are_checked(config, tmp_path):
    from pruneflow.errors import UserError

    for bad, key in (("distill.temperature=0", "distill.temperature"), ("distill.teacher=/nowhere", "distill.teacher"),
                     ("distill.stages=[finetune]", "distill.stages"), ("distill.alpha_distil=0", "distill.alpha_distil")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            Run(config("method=magnitude", "distill.enabled=true", bad), tmp_path / "r").prepare()
    with pytest.raises(UserError, match="stages.finetune has 0"):
        Run(config("method=magnitude", "distill.enabled=true", "stages.finetune.steps=0"), tmp_path / "r").prepare()


def test_a_temperature_on_a_regression_task_is_refused(config, tmp_path):
    """STS-B's outputs are distilled by MSE: a temperature changed nothing (same weights in a
    settings audit) while the log printed it."""
    from task_data import write_glue

    from pruneflow.errors import UserError

    data = write_glue(tmp_path / "stsb", "stsb", "csv", n_train=64, n_eval=8)
    common = ["model=bert_tiny", "task=glue/stsb", f"task.path={data}", "method=magnitude", "distill.enabled=true"]
    with pytest.raises(UserError, match=r"'distill.temperature=8\.0' would be ignored: task=glue/stsb is a regression"):
        Run(config(*common, "distill.temperature=8"), tmp_path / "r").prepare()
    Run(config(*common), tmp_path / "ok").prepare()  # the default temperature is not a setting the user made
