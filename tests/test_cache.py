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


def test_an_entry_with_a_file_gone_is_moved_aside_and_computed_again(tmp_path: Path) -> None:
    """A weights file deleted from an entry (a cleanup script, a partial copy): not reused."""
    calls = []

    def compute(d: Path) -> dict:
        calls.append(d)
        (d / "w.bin").write_bytes(b"w" * 8)
        (d / "o.bin").write_bytes(b"o" * 8)
        return {}

    cache = StageCache(tmp_path, "finetune", {"lr": 1e-3})
    cache.get_or_compute(compute)
    (cache.dir / "o.bin").unlink()
    assert cache.get_or_compute(compute) == ({}, False) and len(calls) == 2
    assert (cache.dir / "o.bin").exists() and len(list((tmp_path / "finetune").glob("*.corrupt-*"))) == 1


def test_the_key_holds_every_setting_but_not_their_order(tmp_path: Path) -> None:
    """The same settings in another order (an experiment's keys, a command line's) reuse the entry."""
    a = StageCache(tmp_path, "finetune", {"model": {"name": "m", "path": None}, "seed": 0})
    b = StageCache(tmp_path, "finetune", {"seed": 0, "model": {"path": None, "name": "m"}})
    c = StageCache(tmp_path, "finetune", {"seed": 1, "model": {"path": None, "name": "m"}})
    assert a.key == b.key != c.key and a.dir != c.dir


def test_the_key_holds_the_library_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch or transformers upgrade computes the fine-tune again, as an edit of pruneflow does."""
    import importlib.metadata

    from pruneflow import cache

    fp = cache.code_fingerprint.__wrapped__()
    assert set(cache.LIBRARIES) < set(fp) and fp["torch"] == importlib.metadata.version("torch")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "99.0" if n == "torch" else real(n))
    assert cache.code_fingerprint.__wrapped__() == {**fp, "torch": "99.0"}


def test_the_key_follows_what_lies_at_a_path(tmp_path: Path) -> None:
    """Each file's name, size and time, in subfolders too (a model's shards); for a data
    folder (``deep=False``) only the top level, whose folders' times change with their files."""
    from pruneflow.cache import path_fingerprint

    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "w.bin").write_bytes(b"1234")
    t = 1_700_000_000 * 10**9
    os.utime(root / "sub" / "w.bin", ns=(t, t))
    first = path_fingerprint(str(root))
    assert ["sub/w.bin", 4, t] in first
    (root / "sub" / "w.bin").write_bytes(b"12345")  # other bytes, the same time
    os.utime(root / "sub" / "w.bin", ns=(t, t))
    assert path_fingerprint(str(root)) != first
    (root / "sub" / "w.bin").write_bytes(b"1234")
    os.utime(root / "sub" / "w.bin", ns=(t + 10**9, t + 10**9))  # the same size, another time
    assert path_fingerprint(str(root)) != first
    os.utime(root / "sub" / "w.bin", ns=(t, t))
    assert path_fingerprint(str(root)) == first
    assert [e[0] for e in path_fingerprint(str(root), deep=False)] == ["sub"]
    assert path_fingerprint(str(root / "sub" / "w.bin"))[0][:2] == [".", 4]
    assert path_fingerprint(None) is None and path_fingerprint(str(tmp_path / "nothing")) is None
