"""Sweeps through Hydra launcher plugins: joblib, basic, submitit_local.

A failing job leaves error.txt and does not stop the others; re-launching a sweep
into the same hydra.sweep.dir runs only the jobs without a result.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sweep_helpers import result, run_cli, tiny_config_dir

pytestmark = pytest.mark.slow


def job(sweep: Path, part: str) -> Path:
    """The one job directory of the sweep whose name contains ``part``."""
    found = [d for d in sweep.iterdir() if d.is_dir() and part in d.name.split(",")]
    assert len(found) == 1, (part, sorted(d.name for d in sweep.iterdir()))
    return found[0]


def test_joblib_sweep_isolates_failures_and_relaunch_skips_finished(tmp_path: Path) -> None:
    conf = tiny_config_dir(tmp_path)
    sweep = tmp_path / "sweep"
    # a batch larger than the 128 examples: a job that fails once its data is read
    args = ["experiment=pf_tiny", "method=magnitude", "sparsity=0.5", "stages.recover.batch_size=32,1000", f"hydra.sweep.dir={sweep}",
            f"cache_dir={tmp_path / 'cache'}"]
    # trainer.torch_threads=null: the thread count per job is joblib's choice
    first = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.torch_threads=null", *args], tmp_path, conf)
    assert first.returncode == 1, first.stderr[-3000:]  # the sweep ran both jobs and reports the failed one
    assert "1 job(s) of the sweep failed" in first.stderr and "stages.recover.batch_size=1000" in first.stderr
    good, bad = job(sweep, "stages.recover.batch_size=32"), job(sweep, "stages.recover.batch_size=1000")
    r = result(good)
    assert r["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-5)
    assert not (bad / "result.json").exists()
    assert "Invalid value for 'stages.recover.batch_size': 1000" in (bad / "error.txt").read_text()
    # joblib's loky workers limit each job's threads so that 2 jobs share the cores
    assert 1 <= r["provenance"]["torch_threads"] <= max(1, (os.cpu_count() or 1) // 2)

    # same sweep again (basic launcher): the finished job is skipped, the failed one retried
    good_mtime = (good / "result.json").stat().st_mtime_ns
    (bad / "error.txt").unlink()
    second = run_cli(["-m", "trainer.torch_threads=null", *args], tmp_path, conf)
    assert second.returncode == 1, second.stderr[-3000:]
    assert (good / "result.json").stat().st_mtime_ns == good_mtime
    assert "this run is finished, skipping it" in (good / "pruneflow.log").read_text()
    assert "Invalid value for 'stages.recover.batch_size': 1000" in (bad / "error.txt").read_text()  # failed again, sweep went on

    # the report lists the failed job and tabulates the finished one
    from pruneflow.report import main

    assert main([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert "1 failed" in md and "stages.recover.batch_size=1000" in md
    assert "| magnitude | tiny_vit | 50 | 1 (0) |" in md


@pytest.mark.parametrize("sig, code, target, n_jobs", [("SIGTERM", 143, "launcher", 2), ("SIGINT", 130, "group", 2), ("SIGINT", 130, "group", 4),
                                                    ("SIGINT", 130, "group", 0)])
def test_a_signal_stops_a_joblib_sweep_with_checkpoints_and_the_same_command_resumes_it(
    tmp_path: Path, sig: str, code: int, target: str, n_jobs: int
) -> None:
    """SIGTERM to the launching process only (``kill <pid>``, a container's stop) or Ctrl-C
    (SIGINT to the whole process group, idle workers included when n_jobs > jobs): the
    running jobs save a checkpoint and stop, a queued job does not start, the sweep exits
    143/130 listing them, with no traceback; the same command then finishes every job.
    n_jobs=0: Hydra's basic launcher, one job at a time in the launching process (it exited
    at the first stopped job: the queued ones got no stopped.txt and no listing)."""
    import signal
    import subprocess
    import sys
    import time

    from sweep_helpers import env

    sweep = tmp_path / "sweep"
    # 3 jobs on 2 workers; each running job saves a checkpoint at prune step 3 and waits there
    # (PRUNEFLOW_TEST_HOLD_AT) until it is asked to stop, so the signal, sent once every running
    # job waits, finds each inside the stage on a machine of any speed; the resume runs without the wait
    launcher_args = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"] if n_jobs else []
    n_jobs = n_jobs or 1  # the basic launcher runs one job at a time
    cmd = [sys.executable, "-m", "pruneflow.cli", "-m", *launcher_args,
           "experiment=pf_tiny", "stages.prune.steps=9", "trainer.checkpoint_every=3", "method=magnitude", "sparsity=0.5",
           "seed=0,1,2", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}", "--config-dir", str(tiny_config_dir(tmp_path))]
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env(HYDRA_FULL_ERROR="0", PRUNEFLOW_TEST_HOLD_AT="prune:3"),
                                    stdout=o, stderr=e, start_new_session=True)
        deadline = time.time() + 300

        def held() -> int:  # jobs waiting after their prune step-3 checkpoint (a finetune's end writes last.pt too)
            return sum("PRUNEFLOW_TEST_HOLD_AT" in p.read_text() for p in sweep.glob("*/pruneflow.log"))

        while held() < min(n_jobs, 3) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert launcher.poll() is None, err.read_text()[-3000:]
        if target == "launcher":
            os.kill(launcher.pid, getattr(signal, sig))
        else:
            os.killpg(launcher.pid, getattr(signal, sig))
        try:
            rc = launcher.wait(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    stderr = err.read_text()
    assert rc == code, stderr[-3000:]
    assert "Traceback" not in stderr and "3 job(s) of the sweep were stopped" in stderr, stderr[-3000:]
    jobs = {s: job(sweep, f"seed={s}") for s in (0, 1, 2)}
    assert not any((d / "result.json").exists() for d in jobs.values())
    stopped = {s: (d / "stopped.txt").read_text() for s, d in jobs.items()}
    started = [s for s in stopped if "a checkpoint was saved" in stopped[s]]
    assert len(started) == min(n_jobs, 3) and all(f"Stopped by {sig} after step 3 of 9 of the prune stage" in stopped[s]
                                                  for s in started), stopped
    assert f"stopped ({len(started)} while running, {3 - len(started)} before they started;" in " ".join(stderr.split())
    for queued in set(jobs) - set(started):
        assert "Not started" in stopped[queued] and not (jobs[queued] / "checkpoints").exists()
        if not launcher_args:  # the basic launcher announced each queued job as if it ran ("#2 : ... seed=2")
            assert not any(f"seed={queued}" in line and " : " in line for line in (out.read_text() + stderr).splitlines()), out.read_text()
    assert not (sweep / ".pruneflow-stop").exists()
    from pruneflow.report import ReportError, build_report

    with pytest.raises(ReportError) as no_result:  # nothing finished: the report says where each job stands
        build_report(sweep)
    said = str(no_result.value)
    assert "3 unfinished" in said and said.count(f"Stopped by {sig} after") == len(started), said

    again = subprocess.run(cmd, cwd=tmp_path, env=env(HYDRA_FULL_ERROR="0"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "stopped" not in again.stderr, again.stderr[-3000:]
    for s, d in jobs.items():
        assert result(d)["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-5)
        assert not (d / "stopped.txt").exists()
        assert (s in started) == ("Resuming" in (d / "pruneflow.log").read_text())


def test_submitit_local_two_jobs(tmp_path: Path) -> None:
    conf = tiny_config_dir(tmp_path)
    sweep = tmp_path / "sweep"
    out = run_cli(
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "experiment=pf_tiny", "method=random",
         "sparsity=0.6", "seed=0,1", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"],
        tmp_path, conf,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for s in (0, 1):
        r = result(job(sweep, f"seed={s}"))
        assert r["seed"] == s and r["method"] == "random"
        assert r["sparsity"]["measured"] == pytest.approx(0.6, abs=1e-5)
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit


def test_the_sweep_precheck_leaves_a_slurm_jobs_devices_to_its_node() -> None:
    """Every job of a sweep is checked before the first starts, on this machine: a CUDA
    device is required of local jobs only (a Slurm login node has no GPU)."""
    import torch

    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    if not torch.cuda.is_available():
        assert "No CUDA device" in (precheck(["-m", "trainer.device=cuda", "sparsity=0.5,0.7"]) or "")
    assert precheck(["-m", "hydra/launcher=submitit_slurm", "trainer.device=cuda", "sparsity=0.5,0.7"]) is None
    assert "[0, 1)" in (precheck(["-m", "hydra/launcher=submitit_slurm", "trainer.device=cuda", "sparsity=0.5,1.7"]) or "")


def test_a_sweep_with_its_own_config_dir_is_checked_before_any_job(tmp_path: Path) -> None:
    """--config-dir: the user's experiments compose in the pre-check as in Hydra, so a
    wrong value in any job stops the sweep before the first job starts."""
    from pruneflow.cli import precheck
    from pruneflow.config import register_configs

    register_configs()
    conf = tiny_config_dir(tmp_path)
    assert precheck(["--config-dir", str(conf), "-m", "experiment=pf_tiny", "sparsity=0.5,0.7"]) is None
    assert precheck([f"--config-dir={conf}", "-m", "experiment=pf_tiny", "sparsity=0.5,0.7"]) is None
    assert precheck([f"-cd={conf}", "-m", "experiment=pf_tiny", "sparsity=0.5,0.7"]) is None
    assert precheck(["--config-d", str(conf), "-m", "experiment=pf_tiny", "sparsity=0.5,0.7"]) is None  # argparse's abbreviation
    bad = precheck(["-cd", str(conf), "-m", "experiment=pf_tiny", "sparsity=0.5,1.5"])
    assert bad is not None and "sparsity=1.5" in bad and "no job was started" in bad
    # Hydra takes the last --config-dir only: so does the check
    other = tmp_path / "other"
    (other / "experiment").mkdir(parents=True)
    (other / "experiment" / "pf_tiny.yaml").write_text("# @package _global_\nsparsity: 1.5\n")
    assert precheck(["-cd", str(other), "-cd", str(conf), "-m", "experiment=pf_tiny", "seed=0,1"]) is None
    assert "sparsity" in (precheck(["-cd", str(conf), "-cd", str(other), "-m", "experiment=pf_tiny", "seed=0,1"]) or "")
    # a misspelt option of the user's own group is offered from their folder
    typo_option = precheck(["-cd", str(conf), "-m", "experiment=pf_tinyy", "seed=0,1"]) or ""
    assert "Closest: pf_tiny" in typo_option
    # a folder name the override cannot quote: left to Hydra (no crash)
    quoted = tmp_path / "o'brien"
    quoted.mkdir()
    assert precheck(["-cd", str(quoted), "-m", "sparsity=0.5,0.7"]) is None
    # the user's experiment is composed: a key it sets cannot be misspelt on the command line either
    typo = precheck(["--config-dir", str(conf), "-m", "experiment=pf_tiny", "task.max_train_sample=64", "seed=0,1"])
    assert typo is not None and "task.max_train_sample" in typo

    sweep = tmp_path / "sweep"
    out = run_cli(["-m", "experiment=pf_tiny", "method=magnitude", "sparsity=0.5,1.5", f"hydra.sweep.dir={sweep}",
                   f"cache_dir={tmp_path / 'cache'}"], tmp_path, conf)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "sparsity=1.5" in out.stderr and "no job was started" in out.stderr
    assert not sweep.exists()


def test_a_killed_joblib_worker_ends_the_sweep_in_one_paragraph_and_the_same_command_resumes(tmp_path: Path) -> None:
    """A worker killed by the system (out of memory) makes joblib end the whole sweep. Before,
    that was a TerminatedWorkerError traceback with no list of the jobs left."""
    conf = tiny_config_dir(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=pf_tiny", "stages.prune.steps=12", "trainer.checkpoint_every=3",
            "method=magnitude", "sparsity=0.3,0.5", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"]
    killed = run_cli(["-m", *args], tmp_path, conf, extra_env={"PRUNEFLOW_TEST_KILL_AT": "prune:6", "HYDRA_FULL_ERROR": "0"})
    err = " ".join(killed.stderr.split())
    assert killed.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "A worker process of the sweep's launcher died (TerminatedWorkerError)" in err and "have no result" in err
    again = run_cli(["-m", *args], tmp_path, conf)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(result(job(sweep, f"sparsity={s}"))["sparsity"]["target"] == s for s in (0.3, 0.5))
