"""Image classification: shared evaluation (top-1 / top-5) for digits, CIFAR, ImageNet."""

from __future__ import annotations

from typing import Any

import torch

from pruneflow.models import ModelBundle
from pruneflow.tasks.base import Task


class ImageClassificationTask(Task):
    modality = "image"
    problem = "single_label_classification"
    main_metric = "accuracy"

    def prepare(self, bundle: ModelBundle) -> None:  # data is already tensors
        pass

    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        logits = torch.cat(self.predict(bundle, split, batch_size, device, desc))
        labels = torch.as_tensor([int(self.eval_sets[split][i]["labels"]) for i in range(len(self.eval_sets[split]))])
        return image_metrics(logits, labels)


def image_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], list[dict[str, Any]]]:
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    pred = top[:, 0]
    metrics = {
        "accuracy": float((pred == labels).float().mean()),
        "top5": float((top == labels[:, None]).any(dim=-1).float().mean()),
    }
    predictions = [
        {"id": i, "prediction": int(pred[i]), "reference": int(labels[i]), "top5": top[i].tolist()}
        for i in range(len(labels))
    ]
    return metrics, predictions
