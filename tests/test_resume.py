"""A run killed with SIGKILL and started again ends exactly like an uninterrupted one."""

import pytest
from safetensors.torch import load_file

from conftest import SMALL, read_result, run_cli

pytestmark = pytest.mark.slow

ARGS = [*SMALL, "method=magnitude", "sparsity=0.7"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):  # noqa: ANN001, ANN201
    """One uninterrupted run that every kill point is compared with."""
    tmp = tmp_path_factory.mktemp("ref")
    ref = run_cli([*ARGS, f"hydra.run.dir={tmp / 'ref'}", f"cache_dir={tmp / 'c1'}"], cwd=tmp)
    assert ref.returncode == 0, ref.stderr
    return tmp / "ref"


@pytest.mark.parametrize("kill_at", ["finetune:6", "prune:6", "recover:3"])
def test_kill_and_resume_gives_the_same_result(tmp_path, reference, kill_at):
    ref_dir, run_dir = reference, tmp_path / "killed"

    cmd = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c2'}"]
    killed = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": kill_at})
    assert killed.returncode == -9  # SIGKILL
    assert not (run_dir / "result.json").exists()

    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr + resumed.stdout or "Resuming from" in (run_dir / "pruneflow.log").read_text()

    a, b = read_result(ref_dir), read_result(run_dir)
    assert a["metrics"] == b["metrics"]
    assert a["sparsity"] == b["sparsity"]
    # provenance says where the run was resumed (it did not before)
    stage, step = kill_at.split(":")
    assert a["provenance"]["resumes"] == []
    (resume,) = b["provenance"]["resumes"]
    assert (resume["stage"], resume["step"], resume["complete"]) == (stage, int(step), False)
    assert resume["torch_threads"] == resume["checkpoint_torch_threads"]
    assert resume["pruneflow_source"] == resume["checkpoint_pruneflow_source"] == b["provenance"]["pruneflow_source"]
    assert b["provenance"]["git_dirty"] in (True, False, None)
    # the finetune's cache entry is in the result also when the resumed process skipped that stage
    source = b["provenance"]["finetune"]
    assert source["cache"].startswith(str(tmp_path / "c2")) and source["computed_by"]["run_dir"] == str(run_dir)
    wa = load_file(str(ref_dir / "model" / "model.safetensors"))
    wb = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize("stage", ["finetune", "prune"])
def test_a_kill_between_a_stages_checkpoint_and_progress_keeps_its_metrics(tmp_path, reference, stage):
    """The stage-end checkpoint is written before progress.json records the stage. Before,
    a kill between the two resumed after the stage, and result.json had no entry (and no
    time) for it, with exit 0."""
    run_dir = tmp_path / "killed"
    cmd = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c3'}"]
    assert run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": f"{stage}:done"}).returncode == -9
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_result(reference), read_result(run_dir)
    assert a["metrics"] == b["metrics"] and set(b["time_s"]) == set(a["time_s"])
    (resume,) = b["provenance"]["resumes"]
    assert (resume["stage"], resume["complete"]) == (stage, True)


def test_a_resume_under_changed_code_says_so(tmp_path):  # noqa: ANN001, ANN201
    import torch

    run_dir = tmp_path / "killed"
    cmd = [*ARGS, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}"]
    assert run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"}).returncode == -9
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["pruneflow_source"] = "0123456789abcdef"  # as if written by other code
    torch.save(ckpt, path)
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "pruneflow's code changed since this checkpoint was written (source 0123456789abcdef" in (run_dir / "pruneflow.log").read_text()
    assert read_result(run_dir)["provenance"]["resumes"][0]["checkpoint_pruneflow_source"] == "0123456789abcdef"


# The authors' protocols: one optimizer across stages (its state in every checkpoint and in
# the finetune cache), trainable scores, in-place masks, a distillation teacher.
PROTOCOLS = {
    # their --global_topk: a raw-score threshold held between recomputations (every 4 steps)
    "movement": ["method=movement", "method.scope=global", "method.selection=authors", "method.threshold_every=4",
                 "trainer.continuous=true", "stages.prune.batch_size=64", "stages.recover.batch_size=64"],
    "platon": ["method=platon", "trainer.continuous=true", "method.deltaT=2", "stages.prune.batch_size=64", "stages.recover.batch_size=64"],
    "seven_distill": ["method=seven", "distill.enabled=true"],
    # two micro-batches per step: a resumed stage skips twice as many batches as steps
    "seven_accum": ["method=seven", "trainer.gradient_accumulation_steps=2"],
    # the DeiT recipe: Mixup/CutMix draw from numpy's RNG at every batch, one factor per image
    "seven_mixup": ["method=seven", "task.mixup.mixup_alpha=0.8", "task.mixup.cutmix_alpha=1.0", "task.mixup.mode=elem",
                    "task.label_smoothing=0.1"],
}


@pytest.mark.parametrize("name, kill_at", [("movement", "prune:6"), ("platon", "prune:9"), ("seven_distill", "recover:3"), ("seven_accum", "prune:6"),
                                            ("seven_mixup", "prune:6")])
def test_authors_protocols_resume_to_the_same_result(tmp_path, name, kill_at):
    args = [*SMALL, "sparsity=0.7", *PROTOCOLS[name]]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli([*args, f"hydra.run.dir={ref_dir}", f"cache_dir={tmp_path / 'c1'}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    cmd = [*args, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c2'}"]
    killed = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": kill_at})
    assert killed.returncode == -9
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_result(ref_dir), read_result(run_dir)
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
    wa = load_file(str(ref_dir / "model" / "model.safetensors"))
    wb = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


class _OnAnotherDevice:
    """Stands in for a tensor that ``torch.load(map_location="cuda")`` put on a GPU:
    usable only after ``.cpu()`` (numpy() and torch's generators take CPU tensors)."""

    def __init__(self, t):
        self._t = t

    def cpu(self):
        return self._t


def test_rng_state_restores_from_a_checkpoint_loaded_onto_the_run_device():
    import random

    import numpy as np
    import torch

    from pruneflow.utils import rng_state, set_rng_state

    state = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    moved = {**state, "numpy": _OnAnotherDevice(state["numpy"]), "torch": _OnAnotherDevice(state["torch"])}
    set_rng_state(moved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
