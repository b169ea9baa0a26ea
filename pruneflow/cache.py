"""Fine-tune once, prune many: a file-locked cache of stage results.

Entries live in ``<cache_dir>/<kind>/<key>/`` where the key hashes everything the
result depends on. A lock file makes parallel sweep jobs wait for the one job
that computes an entry instead of computing it twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from pruneflow.utils import atomic_write_json, stable_hash

log = logging.getLogger("pruneflow")


class StageCache:
    def __init__(self, root: str | Path, kind: str, key_material: dict[str, Any]) -> None:
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
    def lock(self, timeout: float = -1):  # noqa: ANN201
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir) + ".lock", timeout=timeout):
            yield

    def read(self) -> dict[str, Any]:
        return json.loads(self.done_file.read_text())

    def get_or_compute(self, compute: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """Return (entry, reused). ``compute(dir)`` writes its files into ``dir`` and returns
        the entry's metadata; it runs under the lock, once per key."""
        with self.lock():
            if self.exists():
                log.info("Reusing cached %s from %s", self.kind, self.dir)
                return self.read(), True
            self.dir.mkdir(parents=True, exist_ok=True)
            entry = compute(self.dir)
            atomic_write_json(self.dir / "key.json", self.key_material)
            atomic_write_json(self.done_file, entry)
            log.info("Cached %s in %s", self.kind, self.dir)
            return entry, False
