import pytest

from conftest import FAST, run_cli

pytestmark = pytest.mark.slow


def test_multirun_writes_one_result_per_job_and_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", *FAST, "method=magnitude,random", "sparsity=0.5,0.9", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'c'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = sorted(p.parent.name for p in sweep.rglob("result.json"))
    assert results == ["method=magnitude,sparsity=0.5", "method=magnitude,sparsity=0.9", "method=random,sparsity=0.5", "method=random,sparsity=0.9"]

    # Re-launching only runs what is missing; a bad job fails alone.
    proc = run_cli(
        ["-m", *FAST, "method=magnitude", "sparsity=0.5,1.5,0.9", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'c'}"],
        cwd=tmp_path,
    )
    assert (sweep / "method=magnitude,sparsity=1.5" / "error.txt").exists()
    assert "skipping" in proc.stderr + proc.stdout or "skipping" in (sweep / "method=magnitude,sparsity=0.5" / "pruneflow.log").read_text()
