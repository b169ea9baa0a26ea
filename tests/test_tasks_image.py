"""Digits (scikit-learn's bundled images), CIFAR (python pickle batches) and ImageNet
(ImageFolder): loading, timm preprocessing, end to end."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from task_data import (
    cifar_arrays,
    compose,
    read_jsonl,
    run_pipeline,
    write_cifar,
    write_imagefolder,
)

from pruneflow.errors import UserError
from pruneflow.models import build_model
from pruneflow.tasks import build_task
from pruneflow.tasks.image import image_metrics

# tiny_vit with 3 input channels: the model's 8x8 input size drives the preprocessing.
TINY = ["model=tiny_vit", "model.kwargs.depth=1"]


def loaded(overrides: list[str]):  # noqa: ANN201
    cfg = compose(overrides)
    task = build_task(cfg.task, 0)
    task.load()
    return cfg, task


def test_digits_are_scikit_learns_images_and_split() -> None:
    """The digits task reads scikit-learn's file itself and keeps its split in a file:
    both equal what ``load_digits`` and ``train_test_split`` give."""
    from omegaconf import OmegaConf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from pruneflow.tasks.digits import Digits, load_digits_arrays

    ref = load_digits()
    images, target = load_digits_arrays()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    tr, ev = train_test_split(np.arange(len(ref.target)), test_size=0.2, stratify=ref.target, random_state=0)
    task = Digits(OmegaConf.create({"name": "digits", "max_train_samples": None, "max_eval_samples": None}))
    task.load()
    expect_x = torch.tensor(ref.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    assert torch.equal(task.train_set.images, expect_x[tr]) and torch.equal(task.train_set.labels, torch.tensor(ref.target[tr]))
    assert torch.equal(task.eval_sets["validation"].images, expect_x[ev])
    assert torch.equal(task.eval_sets["validation"].labels, torch.tensor(ref.target[ev]))


def test_cifar10_batches_read_pixel_exact(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, n_per_batch=4, n_test=6)
    _, task = loaded(["task=cifar10", f"task.path={path}"])
    assert task.num_labels == 10 and task.main_split == "test" and len(task.train_set) == 20 and len(task.eval_sets["test"]) == 6
    data, labels = cifar_arrays(4, 10, seed=2)  # data_batch_2 holds training images 4..7
    img = np.asarray(task.train_set.load(5))
    assert img.shape == (32, 32, 3)
    assert np.array_equal(img, data[1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert int(task.train_set.labels[5]) == labels[1]
    assert task.class_names[:2] == ["class0", "class1"]


def test_cifar100_in_its_distributed_folder(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-100-python", 100, n_per_batch=4, n_test=5)
    _, task = loaded(["task=cifar100", f"task.path={tmp_path}", "task.max_train_samples=7"])  # the parent folder
    assert task.num_labels == 100 and len(task.train_set) == 7 and len(task.eval_sets["test"]) == 5
    assert task.eval_sets["test"].labels.tolist() == cifar_arrays(5, 100, seed=99)[1]


def test_cifar_missing_files(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, 2, 2)
    (path / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"'task.path'.*data_batch_3"):
        loaded(["task=cifar10", f"task.path={path}"])


def test_preprocessing_follows_the_timm_data_config(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, 4, 6)
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}"])
    bundle = build_model(cfg.model, task)
    task.prepare(bundle)
    assert task.data_config["input_size"] == (3, 8, 8)
    assert task.data_config["mean"] == bundle.model.pretrained_cfg["mean"]
    batch = task.collate([task.eval_sets["test"][i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["labels"].tolist() == [0, 1, 2]
    # A pretrained-size model keeps its 224 input and ImageNet statistics (DeiT).
    cfg2 = compose(["model=deit_tiny", "model.pretrained=false", "task=cifar10", f"task.path={path}"])
    model = build_model(cfg2.model, task).model
    dc = task.resolve_data_config(model)
    assert dc["input_size"] == (3, 224, 224) and dc["mean"] == pytest.approx((0.485, 0.456, 0.406))



def test_training_augments_evaluation_does_not(tmp_path: Path) -> None:
    """task.augment: timm's training transform (random resized crop, flip) for the train split
    only, with task.augment_kwargs passed to it; evaluation is always the deterministic
    resize + centre crop; augment=false trains on the evaluation transform."""
    path = write_cifar(tmp_path / "c10", 10, 4, 6)

    def names(tf) -> list[str]:  # noqa: ANN001
        return [type(t).__name__ for t in tf.transforms]

    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}", "+task.augment_kwargs.scale=[0.5,1.0]"])
    task.prepare(build_model(cfg.model, task))
    train_tf, eval_tf = task.train_set.transform, task.eval_sets["test"].transform
    assert names(train_tf)[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert train_tf.transforms[0].scale == (0.5, 1.0)
    assert names(eval_tf)[:2] == ["Resize", "CenterCrop"] and not any("Random" in n for n in names(eval_tf))
    items = [task.eval_sets["test"][i] for i in range(3)]
    torch.manual_seed(1)
    random.seed(1)
    first = task.collate(items)["pixel_values"]
    torch.manual_seed(2)
    random.seed(2)
    assert torch.equal(first, task.collate(items)["pixel_values"])  # evaluation does not depend on the RNG
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}", "task.augment=false"])
    task.prepare(build_model(cfg.model, task))
    assert task.train_set.transform is task.eval_sets["test"].transform



def test_the_deit_training_transform_from_augment_kwargs(tmp_path: Path) -> None:
    """DeiT's training transform (their datasets.build_transform): RandAugment
    rand-m9-mstd0.5-inc1, colour jitter 0.3, random erasing 0.25 per pixel; an
    interpolation in augment_kwargs replaces the data config's for training only."""
    path = write_cifar(tmp_path / "c10", 10, 4, 6)
    kwargs = ["+task.augment_kwargs.auto_augment=rand-m9-mstd0.5-inc1", "+task.augment_kwargs.color_jitter=0.3",
              "+task.augment_kwargs.re_prob=0.25", "+task.augment_kwargs.re_mode=pixel", "+task.augment_kwargs.re_count=1",
              "+task.augment_kwargs.interpolation=bilinear"]
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}", *kwargs])
    task.prepare(build_model(cfg.model, task))
    tf = task.train_set.transform.transforms
    names = [type(t).__name__ for t in tf]
    assert "RandAugment" in names and names[-1] == "RandomErasing"
    assert tf[-1].probability == 0.25 and tf[-1].mode == "pixel"
    assert "bilinear" in str(tf[0].interpolation).lower()
    assert task.data_config["interpolation"] != "bilinear"  # evaluation keeps the model's
    assert task.collate([task.train_set[i] for i in range(4)])["pixel_values"].shape == (4, 3, 8, 8)


def test_task_data_config_overrides_the_models(tmp_path: Path) -> None:
    """task.data_config wins over the model's data config, input_size included (a list in YAML)."""
    path = write_cifar(tmp_path / "c10", 10, 2, 2)
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}", "+task.data_config.crop_pct=1.0",
                        "+task.data_config.input_size=[3,16,16]"])
    dc = task.resolve_data_config(build_model(cfg.model, task).model)
    assert dc["input_size"] == (3, 16, 16) and dc["crop_pct"] == 1.0


def test_threaded_decoding_gives_the_same_batches(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, 4, 6)
    batches = []
    for workers in (0, 3):
        cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}", f"task.num_workers={workers}"])
        task.prepare(build_model(cfg.model, task))
        torch.manual_seed(0)  # random augmentation follows the main RNGs (timm's crop: python's)
        random.seed(0)
        batches.append(task.collate([task.train_set[i] for i in range(8)])["pixel_values"])
    assert torch.equal(batches[0], batches[1])


def test_imagefolder(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "inet", classes=("n01", "n02", "n03"), n_train=4, n_val=2)
    import shutil

    shutil.rmtree(root / "val" / "n02")  # val without a class: its labels still use train's indices
    cfg, task = loaded([*TINY, "task=imagenet", f"task.path={root}", "task.max_train_samples=5"])
    assert task.classes == ["n01", "n02", "n03"] and task.num_labels == 3
    assert len(task.train_set) == 5 and sorted(set(task.train_set.ids)) == task.train_set.ids
    assert task.eval_sets["validation"].labels.tolist() == [0, 0, 2, 2]
    bundle = build_model(cfg.model, task)
    assert bundle.model.num_classes == 3
    task.prepare(bundle)
    assert task.collate([task.eval_sets["validation"][i] for i in range(2)])["pixel_values"].shape == (2, 3, 8, 8)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'task.path'.*ImageFolder"):
        loaded(["task=imagenet"])
    root = write_imagefolder(tmp_path / "inet", n_train=1, n_val=2)
    (root / "val" / "n04").mkdir()
    Path(root / "val" / "n01" / "n01_0.JPEG").rename(root / "val" / "n04" / "x.JPEG")
    with pytest.raises(UserError, match="n04"):
        loaded(["task=imagenet", f"task.path={root}"])
    with pytest.raises(UserError, match="val/"):
        loaded(["task=imagenet", f"task.path={root / 'train'}"])


def test_head_that_does_not_fit(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, 2, 2)
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={path}"])
    bundle = build_model(cfg.model, task)
    bundle.model.reset_classifier(7)
    with pytest.raises(UserError, match="needs 10 classes.*7"):
        task.prepare(bundle)


def test_a_model_of_another_input_size_is_refused_on_digits() -> None:
    """DeiT-Tiny takes 224x224 inputs, digits are 8x8 tensors: one error naming both sizes
    and the settings that fit, before training (was a shape error from inside timm at
    the first step); the architecture built at 8x8 is accepted."""
    cfg, task = loaded(["model=deit_tiny", "model.pretrained=false", "task=digits"])
    with pytest.raises(UserError, match=r"8x8 images.*model=deit_tiny takes 224x224.*\+model.kwargs.img_size=8"):
        task.prepare(build_model(cfg.model, task))
    cfg, task = loaded(["model=deit_tiny", "model.pretrained=false", "+model.kwargs.img_size=8", "+model.kwargs.patch_size=4", "task=digits"])
    bundle = build_model(cfg.model, task)
    task.prepare(bundle)
    assert bundle.model(task.train_set[0]["pixel_values"][None]).shape == (1, 10)


def test_image_metrics_top5() -> None:
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [0.0, 1, 9, 0, 0, 0]])
    labels = torch.tensor([5, 5, 1])  # top-1 hit, top-5 miss (rank 6), top-5 hit (rank 2)
    m, recs = image_metrics(logits, labels, ids=[10, 11, 12])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["top5"] == pytest.approx(2 / 3)
    assert recs[0] == {"id": 10, "prediction": 5, "reference": 5, "top5": [5, 4, 3, 2, 1]}
    # 5 classes or fewer: every label is among the five best, so top5 is undefined, not 1.0
    m, recs = image_metrics(logits[:, :3], torch.tensor([2, 2, 1]))
    assert m["accuracy"] == pytest.approx(1 / 3) and math.isnan(m["top5"]) and recs[1]["top5"] == [0, 1, 2]


@pytest.mark.slow
def test_e2e_cifar10(tmp_path: Path) -> None:
    path = write_cifar(tmp_path / "c10", 10, 8, 12)
    result = run_pipeline(tmp_path / "run", [*TINY, "task=cifar10", f"task.path={path}"])
    assert result["main_metric"] == "accuracy" and set(result["metrics"]["final"]) == {"accuracy", "top5"}
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["reference"] for r in records] == cifar_arrays(12, 10, seed=99)[1]
    acc = sum(r["prediction"] == r["reference"] for r in records) / len(records)
    top5 = sum(r["reference"] in r["top5"] for r in records) / len(records)
    assert result["metrics"]["final"] == pytest.approx({"accuracy": acc, "top5": top5})


@pytest.mark.slow
def test_e2e_imagefolder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "inet", n_train=6, n_val=3)
    caplog.set_level("WARNING", logger="pruneflow")
    result = run_pipeline(tmp_path / "run", [*TINY, "task=imagenet", f"task.path={root}", "task.num_workers=2"])
    # said once, as the folder is read; not at each of the four evaluations
    assert sum("top5" in r.getMessage() for r in caplog.records) == 1, [r.getMessage() for r in caplog.records]
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["id"] for r in records] == list(range(9)) and [r["reference"] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    acc = sum(r["prediction"] == r["reference"] for r in records) / len(records)
    assert result["metrics"]["final"]["accuracy"] == pytest.approx(acc)
    assert result["metrics"]["final"]["top5"] is None  # 3 classes: undefined (null), not a perfect score
    assert result["params"]["total"] > 0 and (tmp_path / "run" / "model" / "config.json").is_file()


def test_own_checkpoint_keeps_a_fitting_head(tmp_path: Path) -> None:
    """model.path: a 10-class checkpoint keeps its head for CIFAR-10, gets a fresh one for CIFAR-100."""
    from safetensors.torch import save_model

    c10 = write_cifar(tmp_path / "c10", 10, 2, 2)
    c100 = write_cifar(tmp_path / "c100", 100, 2, 2)
    cfg, task = loaded([*TINY, "task=cifar10", f"task.path={c10}"])
    own = build_model(cfg.model, task).model
    (tmp_path / "ckpt").mkdir()
    save_model(own, str(tmp_path / "ckpt" / "model.safetensors"))
    for path, same_head in ((c10, True), (c100, False)):
        cfg, task = loaded([*TINY, f"task=cifar{task_size(path)}", f"task.path={path}", f"model.path={tmp_path / 'ckpt'}"])
        model = build_model(cfg.model, task).model
        assert torch.equal(model.blocks[0].attn.qkv.weight, own.blocks[0].attn.qkv.weight)
        assert (model.head.weight.shape == own.head.weight.shape and torch.equal(model.head.weight, own.head.weight)) == same_head


def task_size(path: Path) -> int:
    return 10 if path.name == "c10" else 100


# --- the DeiT recipe's batch mixing and label smoothing (task.mixup, task.label_smoothing) ---
def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    """Distinct labels and images whose pixels all differ from their mirror image's."""
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 1, 8, 8, generator=g), "labels": torch.arange(n)}


def _task(*overrides: str):  # noqa: ANN202
    from pruneflow.tasks.digits import Digits

    return Digits(compose(list(overrides)).task)


def test_mixup_mixes_each_image_with_its_mirror_by_the_targets_factor() -> None:
    """Mixup only (batch mode): image i is lam*x_i + (1-lam)*x_{n-1-i}, and its soft target
    lam*t_i + (1-lam)*t_{n-1-i} with t the smoothed one-hot ((1-s) + s/C on the class, s/C
    elsewhere); lam is read back from the targets, not taken from timm."""
    s, c = 0.1, 10
    task = _task("task.mixup.mixup_alpha=0.8", f"task.label_smoothing={s}")
    batch = _batch()
    x, y = batch["pixel_values"].clone(), batch["labels"]
    t = torch.full((len(y), c), s / c).scatter_(1, y[:, None], 1 - s + s / c)
    lams = set()
    for seed in range(4):
        np.random.seed(seed)
        out = task.train_batch(dict(batch))
        assert torch.equal(batch["pixel_values"], x)  # the caller's tensor is left as it was
        lam = float((out["labels"][0, y[0]] - s / c) / (1 - s))
        assert 0 < lam <= 1
        lams.add(round(lam, 6))
        torch.testing.assert_close(out["labels"], lam * t + (1 - lam) * t.flip(0))
        torch.testing.assert_close(out["pixel_values"], lam * x + (1 - lam) * x.flip(0))
    assert len(lams) == 4  # a factor drawn per batch


def test_cutmix_pastes_one_box_of_the_mirror_image_whose_area_is_the_mirrors_share() -> None:
    task = _task("task.mixup.cutmix_alpha=1.0")
    batch = _batch()
    x, y = batch["pixel_values"], batch["labels"]
    areas = set()
    for seed in range(6):
        np.random.seed(seed)
        out = task.train_batch(dict(batch))
        p = out["pixel_values"]
        box = (p != x)[0, 0]
        assert all(torch.equal((p != x)[i, 0], box) for i in range(len(y)))  # one box for the batch
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):  # a rectangle: every pixel between its first and last row and column
            assert bool(box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
        assert torch.equal(p[:, :, box], x.flip(0)[:, :, box])
        lam = 1 - float(box.float().mean())
        torch.testing.assert_close(out["labels"][torch.arange(len(y)), y], torch.full((len(y),), lam))
        torch.testing.assert_close(out["labels"][torch.arange(len(y)), y.flip(0)], torch.full((len(y),), 1 - lam))
        areas.add(round(lam, 6))
    assert len(areas) > 1


def test_mixup_needs_an_even_batch_and_is_checked_before_work(tmp_path: Path) -> None:
    task = _task("task.mixup.mixup_alpha=0.8")
    with pytest.raises(UserError, match="even number of images, but one has 7"):
        task.train_batch(_batch(7))
    from pruneflow.runner import check_settings

    cfg = compose(["task.mixup.mixup_alpha=0.8", "stages.prune.batch_size=33"])
    with pytest.raises(UserError, match=r"'stages.prune.batch_size': 33. Allowed: an even number with task.mixup"):
        check_settings(cfg)
    cfg = compose(["task.mixup.mixup_alpha=0.8", "trainer.drop_last=false"])
    with pytest.raises(UserError, match="'trainer.drop_last': false"):
        check_settings(cfg)
    check_settings(compose(["task.mixup.mixup_alpha=0.8", "stages.recover.batch_size=33", "stages.recover.epochs=0"]))  # a skipped stage


def test_mixup_off_leaves_batches_as_they_are() -> None:
    batch = _batch()
    assert _task().train_batch(batch) is batch


def test_label_smoothing_and_soft_target_losses_by_hand() -> None:
    """Cross-entropy with task.label_smoothing=s: (1-s)·NLL + s·mean over classes of -log p
    (timm's LabelSmoothingCrossEntropy); with a mixed batch's soft targets t: -Σ t·log p."""
    from pruneflow.models import ModelBundle

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    model = torch.nn.Linear(1, 3)

    class Fixed(ModelBundle):  # forward gives the fixed logits
        def forward(self, batch):  # noqa: ANN001, ANN202
            return logits

    bundle = Fixed(model=model, family="timm", name="fixed")
    logp = logits.log_softmax(-1)
    labels = torch.tensor([0, 2])
    task = _task("task.label_smoothing=0.2")
    loss, _ = task.loss_and_logits(bundle, {"pixel_values": torch.zeros(2), "labels": labels})
    nll = -logp[torch.arange(2), labels]
    expect = (0.8 * nll + 0.2 * (-logp).mean(-1)).mean()
    assert abs(float(loss) - float(expect)) < 1e-6
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8]])
    loss, _ = task.loss_and_logits(bundle, {"pixel_values": torch.zeros(2), "labels": soft})
    assert abs(float(loss) - float(-(soft * logp).sum(-1).mean())) < 1e-6  # no second smoothing


def test_a_run_with_the_deit_recipe_mixes_training_batches_only(tmp_path: Path) -> None:
    """End to end on digits: mixing and smoothing each change the trained model, and the
    mixing is seeded: the same command gives the same result; predictions hold plain labels."""
    base = ["method=magnitude", "sparsity=0.5"]
    smooth = ["task.label_smoothing=0.1"]
    deit = ["task.mixup.mixup_alpha=0.8", "task.mixup.cutmix_alpha=1.0", *smooth]
    a = run_pipeline(tmp_path / "a", [*base, *deit])
    b = run_pipeline(tmp_path / "b", [*base, *deit])
    smoothed = run_pipeline(tmp_path / "s", [*base, *smooth])
    plain = run_pipeline(tmp_path / "p", base)
    from safetensors.torch import load_file

    w = {d: load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in "absp"}
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"]) and a["metrics"] == b["metrics"]
    for one, other in (("a", "s"), ("s", "p")):
        assert any(not torch.equal(w[one][k], w[other][k]) for k in w[one]), (one, other)
    assert smoothed["sparsity"]["measured"] == plain["sparsity"]["measured"]
    refs = {r["reference"] for r in read_jsonl(tmp_path / "a" / "predictions.jsonl")}
    assert refs <= set(range(10))


def test_forces_target_logit_loss_takes_a_mixed_batchs_soft_targets() -> None:
    """FORCE's scoring loss (-logit of the label, their get_average_gradients) with soft
    targets t is -Σ t·logit: the same number for one-hot targets, a weighted one for mixed."""
    from omegaconf import OmegaConf

    from pruneflow.methods.force import Force
    from pruneflow.models import ModelBundle

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])

    class Fixed(ModelBundle):
        def forward(self, batch):  # noqa: ANN001, ANN202
            return logits

    bundle = Fixed(model=torch.nn.Linear(1, 3), family="timm", name="fixed")
    force = Force(OmegaConf.merge(OmegaConf.load(Path(__file__).parent.parent / "conf/method/force.yaml"),
                                  {"scoring_loss": "target_logit"}), 0.5)
    task = _task("task.mixup.mixup_alpha=0.8")
    hard = force.scoring_loss(task, bundle, {"pixel_values": torch.zeros(2), "labels": torch.tensor([0, 2])})
    one_hot = force.scoring_loss(task, bundle, {"pixel_values": torch.zeros(2), "labels": torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])})
    assert float(hard) == float(one_hot) == -(2.0 + 3.0) / 2
    soft = force.scoring_loss(task, bundle, {"pixel_values": torch.zeros(2), "labels": torch.tensor([[0.5, 0.5, 0], [0, 0.25, 0.75]])})
    assert abs(float(soft) - -(0.5 * 2.0 + 0.5 * -1.0 + 0.25 * 0.2 + 0.75 * 3.0) / 2) < 1e-6


def test_eval_precision_runs_the_evaluation_under_autocast_and_only_there() -> None:
    """trainer.eval_precision=bf16: each evaluation forward under bf16 autocast (SPP's DeiT
    scripts evaluate under fp16 autocast); 32 leaves the model's precision and the finetune
    cache keys of runs made before the setting existed."""
    from torch.utils.data import DataLoader

    from pruneflow.runner import Run, trainer_key

    cfg, task = loaded([*TINY, "task=digits", "task.max_eval_samples=40"])
    bundle = build_model(cfg.model, task)
    full = torch.cat(task.predict(bundle, "validation", 16, torch.device("cpu")))
    task.eval_autocast = torch.bfloat16
    half = torch.cat(task.predict(bundle, "validation", 16, torch.device("cpu")))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # by hand, batch by batch as predict
        loader = DataLoader(task.eval_sets["validation"], batch_size=16, shuffle=False, collate_fn=task.collate)
        by_hand = torch.cat([bundle.forward(b).float() for b in loader])
    assert half.dtype == torch.float32 and torch.equal(half, by_hand)
    assert not torch.equal(half, full) and torch.allclose(half, full, atol=0.1)  # bf16 rounding, not another model
    for precision, autocast in (("32", None), ("bf16", torch.bfloat16)):
        run = Run(compose([*TINY, "logger=none", f"trainer.eval_precision={precision}"]), Path("unused"), [])
        run.check_settings()
        assert run.task.eval_autocast == autocast
        # evaluation does not change the weights: one dense finetune serves every precision
        assert "eval_precision" not in trainer_key(run.cfg.trainer)
