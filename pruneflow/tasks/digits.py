"""scikit-learn's bundled 8x8 handwritten digits: real data, no download.

A fixed stratified 80/20 split (split seed 0, whatever the run's seed): 1,437
training and 360 evaluation images. Pixels 0..16 are scaled to [-1, 1].

The images are read from the file scikit-learn ships (``digits.csv.gz``, what
``load_digits`` reads) and the split is stored beside this module (``digits_split.json``,
what ``train_test_split(..., stratify=target, random_state=0)`` gave): importing
scikit-learn (scipy, pandas) cost 2-3 s of every run's start-up on a 2-core VM, and a
stored split cannot change with the installed scikit-learn. tests/test_tasks_image.py
checks both against scikit-learn's functions.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pruneflow.tasks.image import ImageClassificationTask


class TensorImageDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class Digits(ImageClassificationTask):
    name = "digits"
    num_labels = 10
    image_channels = 1
    image_size = (8, 8)
    main_split = "validation"
    eval_splits = ("validation",)

    def load(self) -> None:
        images, target = load_digits_arrays()
        x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
        y = torch.tensor(target, dtype=torch.long)
        split = json.loads(SPLIT_FILE.read_text())
        tr, ev = torch.tensor(split["train"]), torch.tensor(split["validation"])
        n_train = self.cfg.get("max_train_samples")
        n_eval = self.cfg.get("max_eval_samples")
        tr = tr[: n_train or None]
        ev = ev[: n_eval or None]
        self.train_set = TensorImageDataset(x[tr], y[tr])
        self.eval_sets = {"validation": TensorImageDataset(x[ev], y[ev])}


SPLIT_FILE = Path(__file__).with_name("digits_split.json")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images (1797, 8, 8) float64, target (1797,) int), as
    ``sklearn.datasets.load_digits`` gives them, without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(r) / "datasets" / "data" / "digits.csv.gz" for r in roots), None)
    if path is None or not path.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.images, data.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
