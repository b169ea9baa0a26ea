"""The stage cache's entries: checked byte for byte before reuse, readable like any new file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pruneflow.cache import StageCache
from pruneflow.utils import atomic_write_json


def test_an_entry_whose_bytes_changed_is_moved_aside_and_computed_again(tmp_path: Path) -> None:
    """Overwritten bytes in a weights file still parse: only a checksum tells them apart."""
    calls = []

    def compute(d: Path) -> dict:
        calls.append(d)
        (d / "sub").mkdir(exist_ok=True)
        (d / "sub" / "w.bin").write_bytes(bytes(range(64)))
        return {"metrics": {"accuracy": 0.5}}

    cache = StageCache(tmp_path, "finetune", {"lr": 1e-3})
    assert cache.get_or_compute(compute) == ({"metrics": {"accuracy": 0.5}}, False)
    assert cache.get_or_compute(compute)[1] is True and len(calls) == 1
    weights = cache.dir / "sub" / "w.bin"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # same size, same structure
    weights.write_bytes(bytes(data))
    assert cache.get_or_compute(compute)[1] is False and len(calls) == 2
    (aside,) = (tmp_path / "finetune").glob("*.corrupt-*")
    assert (aside / "sub" / "w.bin").read_bytes() == bytes(data)  # kept for inspection
    assert weights.read_bytes() == bytes(range(64)) and cache.get_or_compute(compute)[1] is True


def test_written_files_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """Results and cache entries on a shared folder: readable by the group and others as the
    umask allows (a temporary file's 0600 was kept before)."""
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "result.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644


def test_a_stop_requested_before_computing_an_entry_computes_nothing(tmp_path):
    """The signal that stops the job computing an entry also frees its lock; a job of the
    same sweep that got the signal too (its wait ended in that instant) must stop, not start
    computing the entry for one step and stop with a checkpoint of it."""
    import signal

    from filelock import FileLock

    from pruneflow.errors import RunStopped
    from pruneflow.stop import STOP

    cache = StageCache(tmp_path, "finetune", {"k": 1})
    computed = []
    STOP.signum = signal.SIGINT
    try:
        with pytest.raises(RunStopped, match="Stopped by SIGINT before computing the cached finetune .* had not started training"):
            cache.get_or_compute(lambda d: computed.append(d) or {})
    finally:
        STOP.signum = None
    assert not computed and not cache.exists()
    with FileLock(str(cache.dir) + ".lock", timeout=0):  # released
        pass
    assert cache.get_or_compute(lambda d: {"n": 1}) == ({"n": 1}, False)
