"""User mistakes: one clear paragraph naming the key, non-zero exit, no traceback."""

import pytest

from conftest import run_cli

CASES = [
    (["sparsity=1.5"], "sparsity"),
    (["sparsity=-0.1"], "sparsity"),
    (["method=nosuch"], "method"),
    (["model=nosuch"], "model"),
    (["task=nosuch"], "task"),
    (["stages.finetune.epochs=-1"], "stages.finetune.epochs"),
    (["stages.prune.steps=10"], "stages.prune.epochs"),  # both epochs and steps set
    (["stages.prune.lr=0"], "stages.prune.lr"),
    (["task.path=/nonexistent/data"], "task.path"),
    (["schedule.initial_warmup=100000"], "schedule"),
    (["method=dense", "sparsity=0.5"], "sparsity"),
    (["method.scope=everywhere"], "method.scope"),
    (["trainer.device=cuda"], "trainer.device"),
    (["model=bert_tiny"], "mismatch"),
]


@pytest.mark.parametrize("args,key", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_clear_paragraph(tmp_path, args, key):
    proc = run_cli([*args, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert "Traceback" not in err, err
    assert key.lower() in err.lower(), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
