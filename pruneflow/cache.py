"""Fine-tune once, prune many: a file-locked cache of stage results.

Entries live in ``<cache_dir>/<kind>/<key>/`` where the key hashes everything the
result depends on: the settings, and the code that computed it (a hash of
pruneflow's source and the versions of the libraries that train and load models),
so that an upgrade or an edit never reuses an entry that older code computed. A
lock file makes parallel sweep jobs wait for the one job that computes an entry
instead of computing it twice.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from pruneflow.utils import atomic_write_json, stable_hash

log = logging.getLogger("pruneflow")

#: libraries whose version can change a cached result (training, models, data loading)
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "timm", "safetensors", "peft")


# Modules that cannot change what a cached stage computes: they read results (the report,
# its ledger and published numbers), write the model card, upload, log to W&B, or run
# inside another trainer. A release that only touches them keeps every cached fine-tune
# (hours of GPU time for a BERT-base task) instead of recomputing it.
NOT_IN_STAGES = ("report.py", "ledger.py", "published.py", "card.py", "push.py", "loggers.py", "integrations/")
# The dense fine-tune runs no pruning method's code (a method only plans the stage's
# length, which its key holds): editing or adding a method keeps the cached fine-tunes.
NOT_IN_FINETUNE = ("methods/",)


def source_hash(root: Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of every ``*.py`` file under ``root`` (paths and contents) but ``skip`` (file
    names relative to ``root``; a name ending in ``/`` is a folder). Hidden names are left
    out: editors' lock links (``.#x.py``) and notebook checkpoints are no code."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if any(rel.as_posix() == s or (s.endswith("/") and rel.as_posix().startswith(s)) for s in skip):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def path_fingerprint(path: str | None, deep: bool = True) -> list[list[Any]] | None:
    """What a cache key holds of a local path the settings name (``model.path``,
    ``task.path``): each file's name, size and modification time, so that other weights
    or data at the same path make another key. ``deep=False`` lists only the top level
    (an ImageFolder's million images: its class folders' times change when files come or go)."""
    if not path:
        return None
    root = Path(str(path))
    if not root.exists():
        return None
    entries = [root] if root.is_file() else sorted(root.rglob("*") if deep else root.iterdir())
    out = []
    for p in entries:
        st = p.stat()
        out.append([p.relative_to(root).as_posix() if p != root else ".", st.st_size if p.is_file() else -1, st.st_mtime_ns])
    return out


@functools.cache
def code_fingerprint(skip: tuple[str, ...] = ()) -> dict[str, str]:
    """What every cache key includes besides its settings: pruneflow's source (but
    ``NOT_IN_STAGES`` and ``skip``) and the installed versions of ``LIBRARIES``."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {"pruneflow_source": source_hash(Path(__file__).resolve().parent, NOT_IN_STAGES + skip), **versions}


class StageCache:
    def __init__(self, root: str | Path, kind: str, key_material: dict[str, Any], code_skip: tuple[str, ...] = ()) -> None:
        key_material = {**key_material, "code": code_fingerprint(code_skip)}
        self.key = stable_hash(key_material)
        self.dir = Path(root) / kind / self.key
        self.kind = kind
        self.key_material = key_material

    @property
    def done_file(self) -> Path:
        return self.dir / "entry.json"

    def exists(self) -> bool:
        return self.done_file.exists()

    @contextmanager
    def lock(self):  # noqa: ANN201
        """The entry's lock, waited for as long as another process holds it (it is computing
        the entry), but not past a stop request: SIGTERM/SIGINT while waiting stops the run."""
        from filelock import Timeout

        from pruneflow.errors import RunStopped
        from pruneflow.stop import STOP, name

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir) + ".lock")

        def stopped(signum: int, where: str) -> RunStopped:
            return RunStopped(f"Stopped by {name(signum)} {where} the cached {self.kind} ({self.dir}); this run had not "
                              "started training. Run the same command again.", signum)

        waited = False
        while True:
            try:
                lock.acquire(timeout=1.0)
                break
            except Timeout:
                waited = True
                signum = STOP.requested_here()  # not the collective: other ranks are elsewhere
                if signum is not None:
                    raise stopped(signum, "while waiting for another process to compute") from None
        # The signal that stopped the process computing the entry (a sweep's jobs share it)
        # frees the lock: stop here rather than start computing the entry for one step.
        signum = STOP.requested_here()
        if signum is not None:
            lock.release()
            raise stopped(signum, "while waiting for another process to compute" if waited else "before computing")
        try:
            yield
        finally:
            lock.release()

    def read(self) -> dict[str, Any]:
        return json.loads(self.done_file.read_text())

    @property
    def sums_file(self) -> Path:
        return self.dir / "sha256.json"

    def _digests(self) -> dict[str, str]:
        """SHA-256 of every file the entry's computation wrote (relative path: digest)."""
        out = {}
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            if rel in ("entry.json", "key.json", "sha256.json"):
                continue
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
        return out

    def _verify(self) -> None:
        """A file changed since it was cached (overwritten bytes parse as well as the right
        ones): ValueError naming it. Entries written before checksums were kept pass."""
        if not self.sums_file.exists():
            return
        expected = json.loads(self.sums_file.read_text())
        found = self._digests()
        for rel, digest in expected.items():
            if found.get(rel) != digest:
                raise ValueError(f"{rel} {'is missing' if rel not in found else 'does not match its SHA-256 from when it was cached'}")

    def _move_aside(self, error: Exception) -> Path:
        import time

        bad = self.dir.with_name(f"{self.dir.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.dir.exists():
            self.dir.rename(bad)
        log.warning("The cached %s in %s is damaged (%s: %s); moved it to %s and computing it again.",
                    self.kind, self.dir, type(error).__name__, str(error).splitlines()[0] if str(error) else "", bad)
        return bad

    def quarantine(self, error: Exception) -> Path:
        """Move a damaged entry aside (kept for inspection) so that it is computed again."""
        with self.lock():
            return self._move_aside(error)

    def reuse(self, compute: Callable[[Path], dict[str, Any]], load: Callable[[Path], None]) -> bool:
        """``get_or_compute`` then ``load(dir)`` of a reused entry; a damaged entry (one that
        does not load) is moved aside and computed again. Returns whether it was reused."""
        _, reused = self.get_or_compute(compute)
        if not reused:
            return False
        try:
            load(self.dir)
            return True
        except Exception as e:  # noqa: BLE001 - truncated or otherwise unreadable files
            self.quarantine(e)
        self.get_or_compute(compute)
        return False

    def get_or_compute(self, compute: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Return (entry, reused). ``compute(dir)`` writes its files into ``dir`` and returns
        the entry's metadata; it runs under the lock, once per key. An entry whose
        metadata cannot be read is moved aside and computed again."""
        with self.lock():
            if self.exists():
                try:
                    entry = json.loads(self.done_file.read_text())
                    self._verify()
                    log.info("Reusing cached %s from %s", self.kind, self.dir)
                    return entry, True
                except (OSError, ValueError) as e:
                    self._move_aside(e)
            self.dir.mkdir(parents=True, exist_ok=True)
            entry = compute(self.dir)
            atomic_write_json(self.dir / "key.json", self.key_material)
            atomic_write_json(self.sums_file, self._digests())  # before entry.json, which marks the entry done
            atomic_write_json(self.done_file, entry)
            log.info("Cached %s in %s", self.kind, self.dir)
            return entry, False
