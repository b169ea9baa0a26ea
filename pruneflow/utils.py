"""Small helpers shared by the runner: seeding, atomic writes, hashing, devices."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: the command line imports this module
# (unwritable) and answers a wrong setting or --help without the ~2 s torch import.


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm progress bar; in logs (not a terminal) it updates every 30 s instead of
    flooding the file with carriage returns."""
    import sys

    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.2 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kwargs)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG state in a form ``torch.load(weights_only=True)`` accepts."""
    import torch

    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. Its tensors may come back on the run's device (a
    checkpoint is loaded with ``map_location=device``); generators take CPU tensors."""
    import torch

    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it can only be read by
    setting it, and a file another thread creates in that instant gets mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory, then rename (atomic on POSIX). The
    file gets the mode any new file gets (mkstemp's is 0600: results and cache entries on
    a shared folder would be unreadable to the other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:  # noqa: ANN401
    """``obj`` with every NaN or infinity as None: JSON has no such numbers, and Python's
    ``NaN`` token breaks other readers (JavaScript's JSON.parse; jq reads it as null). An
    undefined metric (Pearson of a constant prediction) is then ``null``."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:  # noqa: ANN401
    """Strict JSON (no NaN tokens) for the files a run writes."""
    return json.dumps(json_safe(obj), default=_json_default, allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new, not an empty one
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    import torch

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return json_safe(o.tolist())
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def resolve_device(name: str) -> torch.device:
    import torch

    from pruneflow.errors import invalid

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise invalid("trainer.device", name, "auto, cpu, cuda, cuda:<index>")
    if name.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise invalid("trainer.device", name, "cuda or auto under torchrun",
                      "torchrun gives each process its own GPU (cuda:LOCAL_RANK); an index would put every process on that one GPU.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise invalid("trainer.device", name, "auto, cpu, cuda", "No CUDA device is available here.")
    return torch.device(name)


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write (read-only folder, full disk) into one clear error naming the file."""
    from pruneflow.errors import UserError

    try:
        yield
    except OSError as e:
        raise UserError(
            f"Cannot write {path}: {e.strerror or e}. Free some disk space or make the folder writable, or choose "
            "another output folder (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep); the same command then resumes "
            "from the last checkpoint."
        ) from e


def unwritable(path: Path) -> str | None:
    """Why ``path`` (or the folder that would hold it) cannot be written, or None."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is read-only"
    try:  # root passes access checks: try for real
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p}: {e.strerror or e}"
    return None
