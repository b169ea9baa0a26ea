"""Loading Hugging Face datasets: from the Hub, or from ``task.path`` offline.

``task.path`` is a directory with one file per split, named by the Hub's split
names (``train.parquet``, ``validation.jsonl``, ``validation_matched.csv``, ...;
shards such as ``train-00000-of-00002.parquet`` as the Hub stores them work
too), or a folder written by ``DatasetDict.save_to_disk``. A directory holding a
sub-folder named after the Hub config (``<path>/sst2/...``, the Hub's own
layout) is also accepted. Everything is read by the real ``datasets`` loaders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pruneflow import hub
from pruneflow.errors import UserError, invalid

log = logging.getLogger("pruneflow")

# file extension -> datasets packaged builder
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
PATH_HELP = (
    "a directory with one file per split named by the Hub's split names (train, validation, validation_matched, "
    "validation_mismatched, test) with the extension .parquet, .jsonl, .json or .csv, or a folder written by "
    "DatasetDict.save_to_disk"
)


def sample_limit(cfg: DictConfig, key: str) -> int | None:
    """``task.max_train_samples`` / ``task.max_eval_samples``: a positive int or null."""
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise invalid(f"task.{key}", v, "a positive integer (the first N examples are used) or null (all)")
    return int(v)


def _split_files(folder: Path, split: str) -> list[Path]:
    files = []
    for ext in BUILDERS:
        files += [folder / f"{split}{ext}"] if (folder / f"{split}{ext}").is_file() else []
        files += sorted(folder.glob(f"{split}-*{ext}"))
    return files


def _find_folder(root: Path, hub_config: str | None, splits: Sequence[str]) -> Path:
    """``root`` itself, or ``root/<hub_config>`` when the split files are there (Hub layout)."""
    if (root / "dataset_dict.json").is_file() or any(_split_files(root, s) for s in splits):
        return root
    if hub_config and (root / hub_config).is_dir():
        return root / hub_config
    return root


def check_local_splits(cfg: DictConfig, hub_config: str | None, splits: Sequence[str]) -> tuple[Path, dict[str, list[Path]] | None]:
    """``task.path``'s folder and each split's files, checked without reading them, so that
    every job of a sweep is checked before the first starts. ``None`` for the files of a
    ``save_to_disk`` folder (its ``dataset_dict.json`` lists the splits)."""
    path = cfg.get("path")
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise invalid("task.path", str(path), PATH_HELP, f"'{root}' is not an existing directory.")
    folder = _find_folder(root, hub_config, splits)
    if (folder / "dataset_dict.json").is_file():
        try:
            names = list(json.loads((folder / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            return folder, None  # load_from_disk says what is wrong with it
        missing = [s for s in splits if s not in names]
        if missing:
            raise invalid(
                "task.path", str(path), PATH_HELP,
                f"The save_to_disk folder {folder} has the splits {sorted(names)} but task={cfg.get('name')} needs {list(splits)}.",
            )
        return folder, None
    files: dict[str, list[Path]] = {}
    for split in splits:
        found = _split_files(folder, split)
        if not found:
            present = sorted(p.name for p in folder.iterdir() if p.suffix in BUILDERS)
            raise invalid(
                "task.path", str(path), PATH_HELP,
                f"task={cfg.get('name')} needs the split(s) {list(splits)}, but there is no '{split}' file "
                f"({', '.join(split + e for e in BUILDERS)}) in {folder} (data files found: {present or 'none'}).",
            )
        if len({BUILDERS[f.suffix] for f in found}) > 1:
            raise invalid(
                "task.path", str(path), PATH_HELP,
                f"The split '{split}' has files in several formats ({', '.join(f.name for f in found)}); keep one.",
            )
        files[split] = found
    return folder, files


def load_splits(cfg: DictConfig, hub_id: str, hub_config: str | None, splits: Sequence[str]) -> dict[str, Any]:
    """The given splits as ``datasets.Dataset`` objects, from ``task.path`` or the Hub."""
    import datasets

    cache_dir = cfg.get("cache_dir")
    path = cfg.get("path")
    if not path:
        hub.offline_if_unreachable()
        try:
            dd = datasets.load_dataset(hub_id, hub_config, cache_dir=cache_dir)
        except Exception as e:  # no network, gated, renamed: many exception types
            raise UserError(
                f"Could not load the dataset {hub_id}{f' ({hub_config})' if hub_config else ''} from the Hugging Face "
                f"Hub for task={cfg.get('name')}: {type(e).__name__}: {e}. Offline, set task.path to {PATH_HELP}."
            ) from e
        missing = [s for s in splits if s not in dd]
        if missing:
            raise UserError(f"The Hub dataset {hub_id} ({hub_config}) has no split(s) {missing}; it has {sorted(dd)}.")
        return {s: dd[s] for s in splits}

    folder, files = check_local_splits(cfg, hub_config, splits)
    if files is None:  # a save_to_disk folder
        try:
            dd = datasets.load_from_disk(str(folder))
        except Exception as e:  # noqa: BLE001 - damaged or partial folders fail in many ways inside datasets
            raise invalid(
                "task.path", str(path), PATH_HELP,
                f"datasets could not read the save_to_disk folder {folder} ({type(e).__name__}: {e}). A split saved "
                "with no rows cannot be read back either; write the folder again.",
            ) from e
        missing = [s for s in splits if s not in dd]
        if missing:
            raise invalid(
                "task.path", str(path), PATH_HELP,
                f"The save_to_disk folder {folder} has the splits {sorted(dd)} but task={cfg.get('name')} needs {list(splits)}.",
            )
        return {s: dd[s] for s in splits}

    out: dict[str, Any] = {}
    for split, paths in files.items():
        try:
            out[split] = datasets.load_dataset(BUILDERS[paths[0].suffix], data_files={split: [str(f) for f in paths]}, split=split, cache_dir=cache_dir)
        except Exception as e:  # malformed file: show what the reader said
            raise UserError(f"Could not read the '{split}' split from {', '.join(str(f) for f in paths)} (task.path): {type(e).__name__}: {e}") from e
    log.info("Loaded %s from %s", ", ".join(f"{s} ({len(d)})" for s, d in out.items()), folder)
    return out


def require_columns(ds: Any, columns: Sequence[str], split: str, cfg: DictConfig, hub_id: str) -> None:
    """UserError naming the expected columns when a split lacks some of them."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(
            f"The '{split}' split of task={cfg.get('name')} (task.path={cfg.get('path')}) lacks the column(s) "
            f"{missing}. Expected the columns of the Hub dataset {hub_id}: {list(columns)}; found {ds.column_names}."
        )


def first(ds: Any, n: int | None) -> Any:
    """The first ``n`` examples (``task.max_*_samples``), as the transformers examples do."""
    return ds if n is None or n >= len(ds) else ds.select(range(n))
