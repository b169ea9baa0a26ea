"""Image classification: shared evaluation (top-1 / top-5) for digits, CIFAR, ImageNet.

``TimmImageTask`` (CIFAR, ImageNet) preprocesses with the timm model's own data
config (``timm.data.resolve_data_config`` / ``create_transform``): input size,
interpolation, mean/std and crop of the pretrained weights. Images are decoded
lazily: a dataset item is a handle, and ``collate`` decodes the batch (in
``task.num_workers`` threads) and then applies the transforms in the main
thread, so random augmentation follows the run's seeded RNG whatever the number
of threads (a resumed run sees the same crops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, default_collate

from pruneflow.errors import UserError, invalid
from pruneflow.models import ModelBundle
from pruneflow.tasks.base import Task


def fixed_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """(height, width) a timm ViT-family model was built for (``patch_embed.img_size``,
    which follows an ``img_size`` given at creation), or None for a model without one."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


MIXUP_MODES = ("batch", "pair", "elem")


def _fraction(value: object, key: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise invalid(key, value, allowed)
    return float(value)


def mixup_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """timm ``Mixup`` arguments from ``task.mixup`` (checked), or None when both alphas are 0."""
    m = cfg.get("mixup") or {}
    if not hasattr(m, "get"):
        raise invalid("task.mixup", m, "a mapping: {mixup_alpha, cutmix_alpha, prob, switch_prob, mode}")
    alphas = {}
    for key in ("mixup_alpha", "cutmix_alpha"):
        v = m.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise invalid(f"task.mixup.{key}", v, "a number >= 0 (0: off; DeiT: mixup_alpha 0.8, cutmix_alpha 1.0)")
        alphas[key] = float(v)
    mode = m.get("mode", "batch")
    if mode not in MIXUP_MODES:
        raise invalid("task.mixup.mode", mode, MIXUP_MODES, "One mixing factor per batch, per pair of images, or per image.")
    prob = _fraction(m.get("prob", 1.0), "task.mixup.prob", "a number in [0, 1]: the chance that a batch is mixed")
    switch = _fraction(m.get("switch_prob", 0.5), "task.mixup.switch_prob",
                       "a number in [0, 1]: the chance of CutMix instead of Mixup when both alphas are on")
    if not any(alphas.values()):
        return None
    return {**alphas, "prob": prob, "switch_prob": switch, "mode": str(mode)}


class ImageClassificationTask(Task):
    """Image classification. Training batches may be mixed (``task.mixup``: timm's
    Mixup/CutMix, as the DeiT recipe) and the loss label-smoothed
    (``task.label_smoothing``); evaluation always sees the plain images and labels."""

    modality = "image"
    problem = "single_label_classification"
    main_metric = "accuracy"

    #: the (height, width) of the task's ready-made image tensors (digits: 8x8); None: decoded
    #: and resized to each model's input size (TimmImageTask)
    image_size: tuple[int, int] | None = None

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.mixup = mixup_settings(cfg)
        smoothing = cfg.get("label_smoothing", 0.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise invalid("task.label_smoothing", smoothing, "a number in [0, 1) (DeiT: 0.1)")
        self.label_smoothing = float(smoothing)
        self._mixer: Any = None

    def train_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch as the model sees it: mixed by timm's ``Mixup`` when
        ``task.mixup`` is on, its labels then soft targets (label smoothing folded in, as
        timm does). timm draws the mixing from numpy's global RNG, which checkpoints keep."""
        if self.mixup is None:
            return batch
        n = len(batch["labels"])
        if n % 2:  # timm mixes an image with its mirror in the batch (DeiT drops a short last batch)
            raise UserError(
                f"task.mixup mixes each training image with another of its batch, so a batch needs an even number of "
                f"images, but one has {n}. Use an even stages.<stage>.batch_size with trainer.drop_last=true, "
                "or task.mixup.mixup_alpha=0 task.mixup.cutmix_alpha=0."
            )
        if self._mixer is None:
            from timm.data import Mixup

            self._mixer = Mixup(**self.mixup, label_smoothing=self.label_smoothing, num_classes=self.num_labels)
        pixels, targets = self._mixer(batch["pixel_values"].clone(), batch["labels"])  # Mixup works in place
        return {**batch, "pixel_values": pixels, "labels": targets}

    def loss_and_logits(self, bundle: ModelBundle, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Cross-entropy with class labels (smoothed by ``task.label_smoothing``) or with the
        soft targets of a mixed batch (timm's ``SoftTargetCrossEntropy``: the same sum)."""
        if self.mixup is None and not self.label_smoothing:
            return super().loss_and_logits(bundle, batch)
        out = bundle.forward(batch)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        labels = batch["labels"]
        smoothing = 0.0 if labels.is_floating_point() else self.label_smoothing
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing), [logits]

    def prepare(self, bundle: ModelBundle) -> None:  # data is already tensors
        """A fixed-size model must take this task's image size: else one clear error
        now, not a shape error from inside timm at the first training step."""
        size = fixed_input_size(bundle.model)
        if self.image_size is None or size is None or getattr(bundle.model.patch_embed, "dynamic_img_size", False):
            return
        if size != self.image_size:
            h, w = self.image_size
            raise UserError(
                f"task={self.name} has {h}x{w} images with {self.image_channels} channel(s), but model={bundle.name} takes "
                f"{size[0]}x{size[1]} inputs. Use model=tiny_vit (built for {h}x{w}), or build this architecture from "
                f"scratch at that size: model.pretrained=false +model.kwargs.img_size={h} +model.kwargs.patch_size=4."
            )

    def evaluate(self, bundle: ModelBundle, split: str, batch_size: int, device: torch.device, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
        logits = torch.cat(self.predict(bundle, split, batch_size, device, desc))
        ds = self.eval_sets[split]
        labels = getattr(ds, "labels", None)
        if labels is None:
            labels = torch.as_tensor([int(ds[i]["labels"]) for i in range(len(ds))])
        return image_metrics(logits, torch.as_tensor(labels), getattr(ds, "ids", None))


def image_metrics(logits: torch.Tensor, labels: torch.Tensor, ids: Sequence[int] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Top-1 ``accuracy`` and ``top5``; one record per image (id = index in the split).
    With 5 classes or fewer every label is among the five best: ``top5`` is undefined
    (NaN, null in result.json), not a perfect 1.0."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    pred = top[:, 0]
    metrics = {
        "accuracy": float((pred == labels).double().mean()),
        "top5": float((top == labels[:, None]).any(dim=-1).double().mean()) if logits.shape[-1] > 5 else math.nan,
    }
    ids = list(range(len(labels))) if ids is None else list(ids)
    predictions = [
        {"id": int(ids[i]), "prediction": int(pred[i]), "reference": int(labels[i]), "top5": top[i].tolist()}
        for i in range(len(labels))
    ]
    return metrics, predictions


class LazyImage:
    """A not yet decoded image: ``load()`` gives a PIL image, ``transform`` the tensor."""

    __slots__ = ("dataset", "index")

    def __init__(self, dataset: LazyImages, index: int) -> None:
        self.dataset, self.index = dataset, index


class LazyImages(Dataset):
    """Images from ``load(i) -> PIL.Image`` with integer labels, transformed at collate time.

    ``ids`` are the examples' indices in the full split (predictions.jsonl).
    """

    def __init__(self, load: Callable[[int], Any], labels: Sequence[int], ids: Sequence[int] | None = None) -> None:
        self.load = load
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.ids = list(range(len(self.labels))) if ids is None else list(ids)
        self.transform: Callable[[Any], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": LazyImage(self, i), "labels": self.labels[i]}


class TimmImageTask(ImageClassificationTask):
    """Image tasks whose inputs are prepared with the timm model's data config."""

    default_num_workers: int = 0

    def __init__(self, cfg: DictConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.name = str(cfg.get("name"))
        self.data_config: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None

    def num_workers(self) -> int:
        v = self.cfg.get("num_workers", self.default_num_workers)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise invalid("task.num_workers", v, "an integer >= 0 (threads decoding images; 0 decodes in the main thread)")
        return int(v)

    def _dict(self, key: str) -> dict[str, Any]:
        v = self.cfg.get(key) or {}
        if isinstance(v, DictConfig):
            v = OmegaConf.to_container(v, resolve=True)
        if not isinstance(v, dict):
            raise invalid(f"task.{key}", v, "a mapping of timm data-config keys, e.g. {crop_pct: 1.0}")
        return dict(v)

    def resolve_data_config(self, model: torch.nn.Module) -> dict[str, Any]:
        """timm's data config for the model; a fixed-size model's own input size wins
        (timm reports the pretrained size even when ``img_size`` was changed)."""
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        size = fixed_input_size(model)
        if size is not None:
            config["input_size"] = (self.image_channels, *size)
        overrides = self._dict("data_config")
        if "input_size" in overrides:
            overrides["input_size"] = tuple(overrides["input_size"])
        config.update(overrides)
        return config

    def check_head(self, bundle: ModelBundle) -> None:
        n = getattr(bundle.model, "num_classes", None)
        if n is not None and n != self.num_labels:
            raise UserError(
                f"Model head does not fit task={self.name}: it needs {self.num_labels} classes but model={bundle.name} "
                f"has a head with {n}."
            )

    def prepare(self, bundle: ModelBundle) -> None:
        from timm.data import create_transform

        self.check_head(bundle)
        self.data_config = self.resolve_data_config(bundle.model)
        eval_tf = create_transform(**self.data_config, is_training=False)
        augment = self.cfg.get("augment", True)
        if not isinstance(augment, bool):
            raise invalid("task.augment", augment, "true (timm's training transform: random resized crop, flip, colour jitter) or false")
        # augment_kwargs may also name a data-config key (interpolation): it wins for training
        train_tf = create_transform(**{**self.data_config, **self._dict("augment_kwargs")}, is_training=True) if augment else eval_tf
        self.train_set.transform = train_tf
        for ds in self.eval_sets.values():
            ds.transform = eval_tf

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        handles = [e["pixel_values"] for e in examples]
        if not handles or not isinstance(handles[0], LazyImage):
            return default_collate(examples)
        workers = self.num_workers()
        if workers > 0:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pruneflow-decode")
            images = list(self._pool.map(lambda h: h.dataset.load(h.index), handles))
        else:
            images = [h.dataset.load(h.index) for h in handles]
        pixels = torch.stack([h.dataset.transform(img) for h, img in zip(handles, images, strict=True)])
        return {"pixel_values": pixels, "labels": torch.stack([e["labels"] for e in examples])}
