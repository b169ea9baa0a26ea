"""Masks on weights through ``torch.nn.utils.parametrize``.

Following ``torch.ao.pruning``'s split: a method (the *sparsifier*) decides the
mask, a schedule decides how many weights to keep, and this module *applies* the
mask. The effective weight is ``original * mask``, so a masked entry is exactly
zero in every forward pass whatever the optimizer (weight decay, momentum) does
to ``original``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


class Mask(nn.Module):
    """Parametrization ``W -> W * mask`` with the mask kept as a (saved) buffer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


# Every nn.Linear inside the encoder blocks: timm ViT/DeiT/Swin and transformers
# BERT-family names. Embeddings, LayerNorm, biases, pooler and task head stay dense.
DEFAULT_INCLUDE = ["blocks.*", "*encoder.layer.*", "*.layers.*"]
DEFAULT_EXCLUDE = ["*pooler*", "*classifier*", "*qa_outputs*", "head", "head.*", "*.head"]


@dataclass
class PrunableWeight:
    """One prunable tensor: ``module.weight`` of a Linear layer (or its ``bias``, for
    methods that prune biases with their weights, as PLATON's code does)."""

    name: str  # key in the plain state dict, e.g. "blocks.0.attn.qkv.weight"
    module_name: str
    module: nn.Module
    attr: str = "weight"

    @property
    def param(self) -> nn.Parameter:
        """The trainable tensor (the parametrization's ``original`` once masked)."""
        if parametrize.is_parametrized(self.module, self.attr):
            return getattr(self.module.parametrizations, self.attr).original
        return getattr(self.module, self.attr)

    @property
    def parametrization(self) -> nn.Module | None:
        if parametrize.is_parametrized(self.module, self.attr):
            return getattr(self.module.parametrizations, self.attr)[0]
        return None

    @property
    def mask(self) -> torch.Tensor | None:
        p = self.parametrization
        return getattr(p, "mask", None)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def numel(self) -> int:
        return self.param.numel()


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_prunable(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str], biases: bool = False
) -> list[PrunableWeight]:
    """Every ``nn.Linear`` whose module name matches ``include`` and not ``exclude``
    (its weight, and its bias too with ``biases=True``).

    Patterns are shell-style (``fnmatch``) over module names such as
    ``blocks.0.attn.qkv`` (timm) or ``bert.encoder.layer.0.attention.self.query``.
    """
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and _matches(mname, include) and not _matches(mname, exclude):
            out.append(PrunableWeight(name=f"{mname}.weight", module_name=mname, module=module))
            if biases and module.bias is not None:
                out.append(PrunableWeight(name=f"{mname}.bias", module_name=mname, module=module, attr="bias"))
    return out


class MaskedWeights:
    """The set of prunable weights of a model and their masks."""

    def __init__(self, weights: list[PrunableWeight]) -> None:
        self.weights = weights

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        return iter(self.weights)

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    @property
    def attached(self) -> bool:
        return all(w.mask is not None for w in self.weights)

    def attach(self, factory: Callable[[torch.Tensor], nn.Module] = Mask, masks: Sequence[torch.Tensor] | None = None) -> None:
        """Register a mask parametrization (all ones, or ``masks``) on every weight not yet masked."""
        for i, w in enumerate(self.weights):
            if parametrize.is_parametrized(w.module, w.attr):
                continue
            tensor = getattr(w.module, w.attr)
            init = masks[i].detach().to(tensor.dtype).clone() if masks is not None else torch.ones_like(tensor, requires_grad=False)
            # unsafe=True skips a trial forward; the mask keeps shape and dtype.
            parametrize.register_parametrization(w.module, w.attr, factory(init), unsafe=True)

    def masks(self) -> list[torch.Tensor]:
        return [w.mask for w in self.weights]  # type: ignore[misc]

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """Copy new masks in and zero the pruned entries of the trainable weights.

        Zeroing ``original`` makes a regrown weight start from 0 (as in PLATON's
        code) and makes ``|W|`` of pruned weights 0 for magnitude scores.
        """
        for w, m in zip(self.weights, masks, strict=True):
            w.mask.copy_(m)
            w.param.mul_(w.mask)

    @torch.no_grad()
    def num_kept(self) -> int:
        return int(sum(int(w.mask.count_nonzero()) for w in self.weights))

    def sparsity(self) -> float:
        return 1.0 - self.num_kept() / max(self.numel, 1)

    @torch.no_grad()
    def bake(self, keep_masked: bool = True) -> None:
        """Remove the parametrizations, leaving ``weight = original * mask`` (``keep_masked``)
        or the original weights (masks and gates dropped unapplied)."""
        for w in self.weights:
            if parametrize.is_parametrized(w.module, w.attr):
                parametrize.remove_parametrizations(w.module, w.attr, leave_parametrized=keep_masked)


def strip_parametrization_names(state_dict: dict[str, torch.Tensor], apply_masks: bool = True) -> dict[str, torch.Tensor]:
    """Plain names for a state dict of a parametrized model: each
    ``<m>.parametrizations.<p>.original`` as ``<m>.<p>`` (times its mask ``...<p>.0.mask``
    where ``apply_masks`` and there is one), the parametrizations' own entries left out."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        head, sep, tail = k.partition("parametrizations.")
        if sep and (not head or head.endswith(".")):
            name, _, rest = tail.partition(".")
            if rest == "original":
                mask_key = f"{head}parametrizations.{name}.0.mask"
                out[head + name] = v * state_dict[mask_key] if apply_masks and mask_key in state_dict else v
            continue
        out[k] = v
    return out
