"""Causal language models (``AutoModelForCausalLM``) for one-shot LLM pruning.

Hub models load with ``from_pretrained`` from ``model.hub_id`` or ``model.path`` in
``model.dtype``; ``tiny_llama`` is built from a config with a byte-level BPE tokenizer
trained on the task's own training text, so it needs no download.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from pruneflow import hub
from pruneflow.errors import UserError, check_bool, invalid
from pruneflow.models import ModelBundle
from pruneflow.models.text import apply_config_overrides

if TYPE_CHECKING:
    from pruneflow.tasks.base import Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(cfg: DictConfig) -> torch.dtype:
    name = str(cfg.get("dtype", "float32"))
    if name not in DTYPES:
        raise invalid("model.dtype", cfg.get("dtype"), list(DTYPES), "The dtype the causal LM's weights are loaded in.")
    return DTYPES[name]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000):  # noqa: ANN201
    """A byte-level BPE fast tokenizer (GPT-2/LLaMA-3 style) trained locally, adding a
    BOS token in front of every text as LLaMA's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_causal_lm(cfg: DictConfig, task: Task) -> ModelBundle:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = model_dtype(cfg)
    trust = check_bool(cfg.get("trust_remote_code", False), "model.trust_remote_code")
    source = cfg.get("path") or cfg.get("hub_id")
    if source and not cfg.get("path") and check_bool(cfg.get("pretrained", True), "model.pretrained"):
        hub.offline_if_unreachable()
    attn = cfg.get("attn_implementation")
    attention = {"attn_implementation": str(attn)} if attn is not None else {}
    if check_bool(cfg.get("pretrained", True), "model.pretrained") and source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
            apply_config_overrides(config, cfg)
            model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, trust_remote_code=trust, low_cpu_mem_usage=True,
                                                         **attention)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, gated, unreachable or damaged files
            raise UserError(
                f"Could not load model={cfg.name} from '{source}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "Offline, use model.path=<a local directory written by save_pretrained> or the offline model=tiny_llama; "
                "gated models (LLaMA) need `huggingface-cli login` and accepted terms."
            ) from e
    else:
        arch: dict[str, Any] | None = OmegaConf.to_container(cfg.config, resolve=True) if cfg.get("config") else None
        if arch is None:
            raise UserError(f"model={cfg.name}: with model.pretrained=false a 'model.config' (the architecture, as in "
                            "conf/model/tiny_llama.yaml) is needed; model.pretrained=true loads the pretrained weights.")
        tok_cfg = cfg.get("tokenizer") or {}
        tokenizer = train_bpe_tokenizer(task.tokenizer_corpus(), vocab_size=int(tok_cfg.get("vocab_size", 1000)))
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **arch,
        )
        apply_config_overrides(config, cfg)
        try:
            model = AutoModelForCausalLM.from_config(config, **attention).to(dtype)
        except ValueError as e:  # an attention implementation this model or install does not have
            raise invalid("model.attn_implementation", attn, "eager, sdpa, or another that transformers offers for the model "
                          "and this install", str(e).splitlines()[0] if str(e) else "") from e
    model.config.use_cache = False  # calibration and perplexity never decode
    model.eval()
    return ModelBundle(model=model, family="causal_lm", name=cfg.name, tokenizer=tokenizer, arch={"head": "causal_lm"})
