"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test images, 32x32.

Sources, in order:

- ``task.path``: the extracted python version as distributed
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``): ``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, ``batches.meta`` for CIFAR-10; ``train``,
  ``test``, ``meta`` for CIFAR-100 (the folder itself or its parent holding
  ``cifar-10-batches-py`` / ``cifar-100-python``). These are Python pickles; they are
  read with a restricted unpickler that admits only what the CIFAR format holds
  (dicts, lists, bytes, numbers, numpy arrays), so a crafted file cannot run code.
- ``task.source=hub`` (default without a path): ``uoft-cs/cifar10`` / ``uoft-cs/cifar100``.
- ``task.source=torchvision``: ``torchvision.datasets.CIFAR10/100`` downloads the
  same python version into ``task.download_dir``.

CIFAR has no validation split: the metrics are on the ``test`` split, as
reported in papers. CIFAR-100 uses the 100 fine labels. Preprocessing follows the
timm model's data config (``pruneflow.tasks.image``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from pruneflow import hub
from pruneflow.errors import UserError, invalid
from pruneflow.tasks.hf_data import sample_limit
from pruneflow.tasks.image import LazyImages, TimmImageTask

LAYOUT = {
    10: {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta", "labels": b"labels", "names": b"label_names"},
    100: {"dir": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta", "labels": b"fine_labels", "names": b"fine_label_names"},
}
HUB = {10: ("uoft-cs/cifar10", "label"), 100: ("uoft-cs/cifar100", "fine_label")}
SOURCES = ("hub", "torchvision")


# What a CIFAR batch file pickles besides built-in containers: numpy arrays (and, in a
# protocol-2 pickle written by Python 3, bytes rebuilt by _codecs.encode).
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR python format and nothing else: any other global (a function a
    crafted pickle would call) is refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(
            f"task.path: {path} is not a plain CIFAR batch file: it refers to {e}, which the CIFAR format never "
            "contains (a crafted pickle could run code when loaded). It was refused; use the files of the official "
            "cifar-10-python / cifar-100-python archives."
        ) from e
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"task.path: {path} cannot be read as a CIFAR batch file ({type(e).__name__}: {e}).") from e


def read_batches(folder: Path, num_classes: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """{"train": (images NxHxWx3 uint8, labels), "test": ...} from the python pickle files."""
    layout = LAYOUT[num_classes]
    out = {}
    for split in ("train", "test"):
        arrays, labels = [], []
        for name in layout[split]:
            batch = load_batch(folder / name)  # the distributed format is a pickle: restricted loader
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += [int(v) for v in batch[layout["labels"]]]
        out[split] = (np.ascontiguousarray(np.concatenate(arrays)), labels)
    return out


class Cifar(TimmImageTask):
    main_split = "test"
    eval_splits = ("test",)

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.num_labels = 100 if self.name.endswith("100") else 10
        self.class_names: list[str] = []

    def _folder(self) -> Path:
        layout = LAYOUT[self.num_labels]
        root = Path(str(self.cfg.path)).expanduser()
        expected = ", ".join(layout["train"] + layout["test"] + [layout["meta"]])
        help_ = f"a directory with the python version of {self.name} ({expected}) or its parent holding {layout['dir']}/"
        if not root.is_dir():
            raise invalid("task.path", str(self.cfg.path), help_, f"'{root}' is not an existing directory.")
        for folder in (root, root / layout["dir"]):
            if all((folder / n).is_file() for n in layout["train"] + layout["test"]):
                return folder
        missing = [n for n in layout["train"] + layout["test"] if not (root / n).is_file()]
        raise invalid("task.path", str(self.cfg.path), help_, f"Missing in {root}: {', '.join(missing)}.")

    def check_path(self) -> None:
        if self.cfg.get("path"):
            self._folder()

    def _read(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        if self.cfg.get("path"):
            folder = self._folder()
            meta = folder / LAYOUT[self.num_labels]["meta"]
            if meta.is_file():
                info = load_batch(meta)  # a pickle too: the same restricted loader
                if not isinstance(info, dict):
                    raise UserError(f"task.path: {meta} is not a CIFAR meta file (a pickled dict of class names); it holds a {type(info).__name__}.")
                names = info.get(LAYOUT[self.num_labels]["names"], [])
                self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            try:
                return read_batches(folder, self.num_labels)
            except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as e:
                raise UserError(f"Could not read the {self.name} batch files in {folder} (task.path): {type(e).__name__}: {e}") from e
        source = self.cfg.get("source", "hub")
        if source not in SOURCES:
            raise invalid("task.source", source, SOURCES, "(or set task.path to the extracted python version)")
        if source == "torchvision":
            return self._read_torchvision()
        return self._read_hub()

    def _read_torchvision(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        import torchvision

        root = Path(str(self.cfg.get("download_dir") or "~/.cache/pruneflow/cifar")).expanduser()
        cls = torchvision.datasets.CIFAR10 if self.num_labels == 10 else torchvision.datasets.CIFAR100
        try:
            sets = {s: cls(str(root), train=s == "train", download=True) for s in ("train", "test")}
        except Exception as e:  # no network
            raise UserError(f"Could not download {self.name} with torchvision into {root}: {e}. Offline, set task.path to the extracted python version.") from e
        self.class_names = list(sets["train"].classes)
        return {s: (np.asarray(d.data), [int(t) for t in d.targets]) for s, d in sets.items()}

    def _read_hub(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        import datasets

        hub_id, label_col = HUB[self.num_labels]
        hub_id = str(self.cfg.get("hub_id") or hub_id)
        hub.offline_if_unreachable()
        try:
            dd = datasets.load_dataset(hub_id, cache_dir=self.cfg.get("cache_dir"))
        except Exception as e:  # no network
            raise UserError(
                f"Could not load {hub_id} from the Hugging Face Hub for task={self.name}: {type(e).__name__}: {e}. "
                "Offline, set task.path to the extracted python version (data_batch_1..5, test_batch / train, test)."
            ) from e
        out = {}
        for split in ("train", "test"):
            ds = dd[split]
            image_col = "img" if "img" in ds.column_names else "image"
            images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in ds[image_col]])
            out[split] = (images, [int(v) for v in ds[label_col]])
        names = dd["train"].features[label_col]
        self.class_names = list(getattr(names, "names", []))
        return out

    def load(self) -> None:
        from PIL import Image

        limits = {"train": sample_limit(self.cfg, "max_train_samples"), "test": sample_limit(self.cfg, "max_eval_samples")}
        data = self._read()
        sets: dict[str, LazyImages] = {}
        for split, (images, labels) in data.items():
            n = limits[split] or len(labels)
            images, labels = images[:n], labels[:n]
            bad = sorted({y for y in labels if not 0 <= y < self.num_labels})
            if bad:
                raise UserError(f"task={self.name}: labels {bad[:5]} outside 0..{self.num_labels - 1} in the {split} split.")

            def load(i: int, images: Any = images) -> Any:
                return Image.fromarray(images[i])

            sets[split] = LazyImages(load, labels)
        self.train_set = sets["train"]
        self.eval_sets = {"test": sets["test"]}
