"""ImageNet-1k (ILSVRC 2012) as an ImageFolder: ``task.path`` holds ``train/`` and ``val/``.

Each split has one sub-folder per class (the WordNet ids ``n01440764`` ...),
as after the usual reorganisation of the validation images into class folders.
Classes are indexed in sorted folder-name order, the order of timm's pretrained
ImageNet heads. Any other ImageFolder (fewer classes, other images) works the
same; the number of classes is the number of ``train/`` folders. Preprocessing
follows the timm model's data config; metrics are top-1 ``accuracy`` and
``top5`` on ``val/``.

``task.max_train_samples`` / ``task.max_eval_samples`` take a fixed random
subset (seed 0, the same for every run), since the folders are sorted by class.
Images are decoded in ``task.num_workers`` threads (default 8).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from pruneflow.errors import UserError, invalid
from pruneflow.tasks.hf_data import sample_limit
from pruneflow.tasks.image import LazyImages, TimmImageTask

log = logging.getLogger("pruneflow")

PATH_HELP = "a directory with train/ and val/, each holding one folder of images per class (an ImageFolder)"


def subset(n_total: int, n: int | None) -> list[int]:
    """A fixed random subset of ``n`` indices (sorted), or all indices."""
    if n is None or n >= n_total:
        return list(range(n_total))
    g = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


class ImageNet(TimmImageTask):
    main_split = "validation"
    eval_splits = ("validation",)
    default_num_workers = 8

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.classes: list[str] = []

    def check_path(self) -> None:
        if self.cfg.get("path"):  # none given: the run says so when it loads (--cfg job still shows an experiment)
            self._root()

    def _root(self) -> Path:
        if not self.cfg.get("path"):
            raise invalid("task.path", None, PATH_HELP, f"task={self.name} reads a local ImageFolder; there is no automatic download.")
        root = Path(str(self.cfg.path)).expanduser()
        if not root.is_dir():
            raise invalid("task.path", str(self.cfg.path), PATH_HELP, f"'{root}' is not an existing directory.")
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise invalid("task.path", str(self.cfg.path), PATH_HELP, f"Missing in {root}: {', '.join(s + '/' for s in missing)}.")
        return root

    def load(self) -> None:
        from torchvision.datasets import ImageFolder

        root = self._root()
        self.num_workers()
        folders = {}
        for split in ("train", "val"):
            try:
                folders[split] = ImageFolder(str(root / split))
            except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
                raise invalid("task.path", str(self.cfg.path), PATH_HELP, f"{root / split}: {e}") from e
        train, val = folders["train"], folders["val"]
        unknown = sorted(set(val.classes) - set(train.classes))
        if unknown:
            raise UserError(f"task={self.name}: val/ has class folders that train/ lacks: {unknown[:5]} (task.path={self.cfg.path}).")
        self.classes = list(train.classes)
        self.num_labels = len(self.classes)
        if self.num_labels <= 5:
            self.undefined_by_design = frozenset({"top5"})
            log.warning("task=%s: train/ has %d classes, so every label is among the five best: top5 is undefined "
                        "(null in result.json).", self.name, self.num_labels)
        remap = [train.class_to_idx[c] for c in val.classes]  # val's own indices -> train's
        limits = {"train": sample_limit(self.cfg, "max_train_samples"), "val": sample_limit(self.cfg, "max_eval_samples")}
        sets = {}
        for split, folder in folders.items():
            idx = subset(len(folder.samples), limits[split])
            samples = [folder.samples[i] for i in idx]
            labels = [t if split == "train" else remap[t] for _, t in samples]
            paths = [p for p, _ in samples]
            sets[split] = LazyImages(lambda i, paths=paths, loader=folder.loader: loader(paths[i]), labels, ids=idx)
        self.train_set = sets["train"]
        self.eval_sets = {"validation": sets["val"]}
