"""torchrun / torch.distributed on CPU with the gloo backend: two processes agree on everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sweep_helpers import result, run_cli, tiny_config_dir

from pruneflow import distributed

pytestmark = pytest.mark.slow


def _helpers_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out: dict = {}
        # gradients: each rank holds different values; afterwards both hold the mean
        big = torch.nn.Parameter(torch.zeros(3, 4))
        small = torch.nn.Parameter(torch.zeros(5))
        frozen = torch.nn.Parameter(torch.zeros(2))  # no grad: skipped, not a hang
        big.grad = torch.full((3, 4), float(rank + 1)) * torch.arange(12.0).view(3, 4)
        small.grad = torch.tensor([1.0, 2, 3, 4, 5]) * (10 if rank else -2)
        distributed.average_gradients([big, frozen, small])
        out["big"] = big.grad.tolist()
        out["small"] = small.grad.tolist()
        out["loss"] = distributed.mean_scalar(1.0 + rank, torch.device("cpu"))
        # sharding: contiguous, equal slices of the global batch
        batch = {"x": torch.arange(8).view(8, 1), "y": torch.arange(8)}
        out["shard"] = distributed.shard(batch)["y"].tolist()
        out["same"] = distributed.check_identical("weights", {"w": "abc"})[1]["w"]
        try:
            distributed.check_identical("masks", {"m": f"rank{rank}"})
            out["diverged_raises"] = False
        except RuntimeError as e:
            out["diverged_raises"] = "disagree" in str(e)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_gradient_averaging_sharding_and_checks(tmp_path: Path) -> None:
    mp.spawn(_helpers_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    expected_big = (1.5 * torch.arange(12.0).view(3, 4)).tolist()  # mean of 1x and 2x
    for r in (r0, r1):
        assert r["big"] == expected_big
        assert r["small"] == [4.0, 8.0, 12.0, 16.0, 20.0]  # mean of -2x and 10x
        assert r["loss"] == 1.5
        assert r["same"] == "abc"
        assert r["diverged_raises"] is True
    assert r0["shard"] == [0, 1, 2, 3] and r1["shard"] == [4, 5, 6, 7]


def test_torchrun_two_cpu_processes_identical_masks(tmp_path: Path) -> None:
    conf = tiny_config_dir(tmp_path)
    run_dir = tmp_path / "run"
    out = run_cli(
        # movement: its scores are trained outside the model, and must be averaged too
        ["experiment=pf_tiny", "method=movement", "sparsity=0.8", "trainer.device=cpu", "save_model=true",
         f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"],
        tmp_path, conf,
        prefix=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pruneflow.cli"],
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    r = result(run_dir)
    d = r["provenance"]["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    # each rank's fingerprints (hashes) after the prune stage and of the final model, gathered by rank 0
    after_prune, final = d["fingerprints"]["prune"], d["fingerprints"]["final"]
    assert len(after_prune) == 2 and after_prune[0] == after_prune[1]
    assert set(after_prune[0]) >= {"masks", "weights"}
    assert len(final) == 2 and final[0] == final[1]
    assert r["sparsity"]["measured"] == pytest.approx(0.8, abs=1e-4)  # kept counts rounded per matrix
    # rank 0 alone wrote the outputs; the finetune stage was cached once
    assert (run_dir / "model").is_dir() and (run_dir / "predictions.jsonl").exists()
    assert len(list((tmp_path / "cache" / "finetune").glob("*/entry.json"))) == 1


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun gives each rank cuda:LOCAL_RANK (``trainer.device=cuda``): cuda:0 would put
    every rank on one GPU."""
    from pruneflow.errors import UserError
    from pruneflow.utils import resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="trainer.device.*cuda or auto under torchrun"):
        resolve_device("cuda:0")
    assert resolve_device("cpu").type == "cpu"


def test_torchrun_on_the_default_layout_takes_a_folder_of_its_own(tmp_path: Path) -> None:
    """Without hydra.run.dir, rank 0 claims a fresh outputs/<day>/<time> folder (here every
    second's folder is taken already: another command's) and rank 1 follows it there, so
    two torchrun commands started in the same second never share one."""
    import datetime

    conf = tiny_config_dir(tmp_path)
    now = datetime.datetime.now()
    taken = [tmp_path / "outputs" / t.strftime("%Y-%m-%d") / t.strftime("%H-%M-%S")
             for t in (now + datetime.timedelta(seconds=s) for s in range(-5, 240))]
    for d in taken:
        d.mkdir(parents=True, exist_ok=True)
    out = run_cli(
        ["experiment=pf_tiny", "method=magnitude", "sparsity=0.5", "trainer.device=cpu", "cache=false"], tmp_path, conf,
        prefix=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pruneflow.cli"],
        extra_env={"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    runs = [p.parent for p in (tmp_path / "outputs").glob("*/*/result.json")]
    assert len(runs) == 1 and runs[0].name.endswith("-2") and runs[0].with_name(runs[0].name[:-2]) in taken
    assert result(runs[0])["provenance"]["distributed"]["world_size"] == 2
    assert all(not any(d.iterdir()) for d in taken)  # the other commands' folders untouched
    assert "using rank 0's run directory" not in out.stderr + (runs[0] / "pruneflow.log").read_text()


def test_a_rank_moves_its_log_to_rank_0s_folder_and_removes_the_one_made_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from pruneflow import config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(config, "_FRESH_DIRS", {})
    monkeypatch.setattr(config, "OTHER_RANK_DIRS", {})
    monkeypatch.chdir(tmp_path)
    base = "outputs/2026-01-31/12-00-01"
    assert config._fresh_dir(base) == base and not (tmp_path / base).exists()  # rank 1 claims nothing
    mine = tmp_path / base
    mine.mkdir(parents=True)  # as Hydra does, with the job's log file
    handler = logging.FileHandler(mine / "pruneflow.log")
    root = logging.getLogger()
    root.addHandler(handler)
    chosen = tmp_path / "outputs" / "2026-01-31" / "12-00-00-2"  # rank 0's
    chosen.mkdir(parents=True)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: str(chosen))
    try:
        assert distributed.shared_run_dir(mine) == chosen
        moved = [h for h in root.handlers if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == chosen]
        assert len(moved) == 1 and handler not in root.handlers
        logging.getLogger("pruneflow").warning("from rank 1")
        assert "from rank 1" in (chosen / "pruneflow.log").read_text()
    finally:
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and str(tmp_path) in h.baseFilename]:
            root.removeHandler(h)
            h.close()
    assert not mine.exists() and (tmp_path / "outputs" / "2026-01-31").is_dir()
    # a folder that existed before (another command's) is left alone
    monkeypatch.setattr(config, "OTHER_RANK_DIRS", {})
    other = tmp_path / "outputs" / "2026-01-31" / "12-00-02"
    other.mkdir()
    assert config._fresh_dir(str(other)) == str(other)
    distributed.shared_run_dir(other)
    assert other.is_dir()


def test_setup_joins_with_this_ranks_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's LOCAL_RANK (not the global RANK) picks the GPU, nccl on CUDA and gloo on CPU;
    with WORLD_SIZE=1 (or none) no process group is made."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("gpu", i)))
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.setup(torch.device("cuda"))
    assert calls == []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")  # second node, second GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.setup(torch.device("cuda"))
    assert calls == [("gpu", 1), ("init", "nccl")]
    calls.clear()
    distributed.setup(torch.device("cpu"))
    assert calls == [("init", "gloo")]
