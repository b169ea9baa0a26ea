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
