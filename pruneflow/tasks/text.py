"""Shared parts of the text tasks (GLUE, SQuAD): tokenisation limits and padding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pruneflow.errors import UserError, invalid
from pruneflow.tasks.base import Task

if TYPE_CHECKING:
    from pruneflow.models import ModelBundle


class TextTask(Task):
    modality = "text"
    default_max_seq_length: int = 128
    needs_fast_tokenizer: bool = False  # SQuAD: offsets and overflowing windows

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.name = str(cfg.get("name"))  # e.g. "glue/sst2" (instance value for messages)
        self.tokenizer: Any = None
        self._collator: Any = None

    def max_seq_length(self) -> int:
        v = self.cfg.get("max_seq_length", self.default_max_seq_length)
        if isinstance(v, bool) or not isinstance(v, int) or v < 8:
            raise invalid("task.max_seq_length", v, "an integer >= 8 (tokens per input, longer inputs are truncated)")
        return int(v)

    def check_model(self, bundle: ModelBundle) -> None:
        """The model and tokenizer can take this task's inputs and produce its outputs."""
        if bundle.tokenizer is None:
            raise UserError(f"task={self.name} needs a tokenizer, but model={bundle.name} has none (model.path without tokenizer files?).")
        if self.needs_fast_tokenizer and not getattr(bundle.tokenizer, "is_fast", False):
            raise UserError(
                f"task={self.name} needs a fast (Rust) tokenizer for model={bundle.name} (offsets and overflowing "
                "tokens); the model's tokenizer is slow. Use a model with a tokenizer.json."
            )
        limit = getattr(bundle.model.config, "max_position_embeddings", None)
        if getattr(bundle.model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") and limit:
            limit -= 2  # RoBERTa's position ids start after the padding index
        length = self.max_seq_length()
        if limit and length > limit:
            raise invalid("task.max_seq_length", length, f"at most {limit} for model={bundle.name} (its position embeddings)")
        self.check_head(bundle)

    def check_head(self, bundle: ModelBundle) -> None:
        pass

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest input of the batch."""
        if self._collator is None:
            from transformers import DataCollatorWithPadding

            self._collator = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        return dict(self._collator(examples))
