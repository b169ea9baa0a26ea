"""scikit-learn's bundled 8x8 handwritten digits: real data, no download.

A fixed stratified 80/20 split (split seed 0, whatever the run's seed): 1,437
training and 360 evaluation images. Pixels 0..16 are scaled to [-1, 1].
"""

from __future__ import annotations

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
    main_split = "validation"
    eval_splits = ("validation",)

    def load(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
        y = torch.tensor(data.target, dtype=torch.long)
        idx = torch.arange(len(y))
        tr, ev = train_test_split(idx.numpy(), test_size=0.2, stratify=y.numpy(), random_state=0)
        tr, ev = torch.as_tensor(tr), torch.as_tensor(ev)
        n_train = self.cfg.get("max_train_samples")
        n_eval = self.cfg.get("max_eval_samples")
        tr = tr[: n_train or None]
        ev = ev[: n_eval or None]
        self.train_set = TensorImageDataset(x[tr], y[tr])
        self.eval_sets = {"validation": TensorImageDataset(x[ev], y[ev])}
