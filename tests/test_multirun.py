import pytest

from conftest import FAST, read_result, run_cli

pytestmark = pytest.mark.slow


def test_multirun_writes_one_result_per_job_and_a_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["-m", *FAST, "method=magnitude,random", "sparsity=0.5,0.9", "stages.recover.batch_size=32", f"hydra.sweep.dir={sweep}",
         f"cache_dir={tmp_path / 'c'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # it ends by saying where the jobs went and how to compare them (the folder had to be found)
    assert proc.stdout.strip().splitlines()[-1] == f"pruneflow: the sweep's jobs are in {sweep}; compare them with: pruneflow-report {sweep}"
    assert "pruneflow: result in" not in proc.stdout  # not once per job
    jobs = sorted(p.parent for p in sweep.rglob("result.json"))
    assert len(jobs) == 4 and all(j.parent == sweep for j in jobs)  # one folder per job
    got = sorted((read_result(j)["method"], read_result(j)["sparsity"]["target"]) for j in jobs)
    assert got == [("magnitude", 0.5), ("magnitude", 0.9), ("random", 0.5), ("random", 0.9)]
    assert all(f"method={m},sparsity={s}" in j.name for j, (m, s) in zip(jobs, got, strict=True))

    # Re-launching only runs what is missing; a job that fails once its data is read (a batch
    # larger than the 512 examples; a wrong value would stop the sweep before any job) fails alone.
    proc = run_cli(
        ["-m", *FAST, "method=magnitude", "sparsity=0.5,0.9", "stages.recover.batch_size=32,1000", f"hydra.sweep.dir={sweep}",
         f"cache_dir={tmp_path / 'c'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "2 job(s) of the sweep failed" in proc.stderr  # listed, exit non-zero
    failed = [p.parent.name for p in sweep.rglob("error.txt")]
    # names over 200 characters give keys' parents as initials (stages.recover.batch_size -> s.r.batch_size)
    assert len(failed) == 2 and all("s.r.batch_size=1000" in f for f in failed)
    assert len(list(sweep.rglob("result.json"))) == 4  # 0.5 and 0.9 were skipped, not re-run
    assert (proc.stdout + proc.stderr).count("this run is finished") == 2
    # Hydra rewrote its record of the launch; the first launch's is kept beside it
    records = sorted(sweep.glob("multirun*.yaml"))
    assert [p.name for p in records][-1] == "multirun.yaml" and len(records) == 2
    assert "method=magnitude,random" in records[0].read_text() and "batch_size=32,1000" in records[1].read_text()


def test_a_setting_given_once_to_a_sweep_is_refused_only_when_no_job_uses_it(tmp_path):
    """`-m method=dense,magnitude stages.prune.lr=5e-4`: the dense job has no prune stage. A
    setting given once for the whole sweep is named in the log of each job that skips it (and
    once by the command) as long as some job uses it; used by none, or swept (jobs would differ
    only by a value they ignore), it is refused before any job starts, as a single run's is."""
    from pruneflow.cli import precheck

    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *FAST, "method=dense,magnitude", "stages.prune.lr=5e-4", f"hydra.sweep.dir={sweep}",
                    f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = next(line for line in proc.stderr.splitlines() if line.startswith("pruneflow: note:"))
    assert note == ("pruneflow: note: stages.prune.lr is not used by 1 of the 2 jobs; stages.prune.steps is not used by 1 of the 2 "
                    "jobs (each such job's log names it)."), note  # FAST's prune steps too
    (dense,) = sweep.glob("method=dense*")
    (magnitude,) = sweep.glob("method=magnitude*")
    log = (dense / "pruneflow.log").read_text()
    assert "'stages.prune.lr=0.0005' is not used by this job: method=dense does not prune" in log
    assert "not used by this job" not in (magnitude / "pruneflow.log").read_text()
    assert read_result(magnitude)["config"]["stages"]["prune"]["lr"] == 5e-4 and read_result(dense)["method"] == "dense"
    for argv in (["-m", "method=dense", "seed=0,1", "stages.prune.lr=5e-4"],  # no job uses it
                 ["-m", "method=dense,magnitude", "stages.prune.lr=5e-4,1e-3"],  # swept
                 ["method=dense", "stages.prune.lr=5e-4"]):  # one run
        problem = precheck([*argv, "logger=none", f"hydra.sweep.dir={tmp_path / 'no'}", f"hydra.run.dir={tmp_path / 'no'}"])
        assert problem is not None and "'stages.prune.lr=" in problem and "' would be ignored: method=dense does not prune" in problem, argv
    assert not (tmp_path / "no").exists() and "PRUNEFLOW_SWEEP_SHARED_UNUSED" not in __import__("os").environ
