"""pruneflow's Wanda and SparseGPT against llm-compressor's, side by side on one model.

llm-compressor (vllm-project/llm-compressor) is the maintained library with one-shot
``WandaPruningModifier`` and ``SparseGPTModifier``. It pins torch and transformers to
ranges this project's environment is outside of (0.14: torch <= 2.14.0, transformers
<= 5.17), so it is not a dependency and this is a script, run in a separate venv:

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor omegaconf hydra-core safetensors
    /tmp/llmc/bin/python scripts/compare_llmcompressor.py

Both prune copies of the same random-init LLaMA (tiny_llama's shape, larger; float32)
from the same calibration windows, block by block with the pruned block's outputs
feeding the next (llm-compressor's sequential pipeline, pruneflow's default), and the
script prints, per method and pattern, how many mask entries differ and the largest
weight difference.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(layers: int, hidden: int, vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)}


def word_tokenizer(vocab: int):  # noqa: ANN201
    """A stand-in tokenizer (llm-compressor asks for one when given a dataset; the data
    here is token ids already)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


def run_llmcompressor(model: torch.nn.Module, ids: torch.Tensor, method: str, pattern: str | None, sparsity: float) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    structure = pattern or "0:0"
    if method == "wanda":
        recipe = WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    else:
        recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, block_size=128, dampening_frac=0.01,
                                   targets=["Linear"], ignore=["re:.*lm_head"])
    loader = torch.utils.data.DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids], batch_size=1)
    oneshot(model=model, processor=word_tokenizer(model.config.vocab_size), dataset=loader, recipe=recipe,
            pipeline="sequential", num_calibration_samples=ids.shape[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import tempfile

    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM

    from pruneflow.llm import prune_causal_lm

    base = build(args.layers, args.hidden, args.vocab, args.seed)
    saved = tempfile.mkdtemp(prefix="compare_llmc_")
    base.save_pretrained(saved)  # llm-compressor reads the model's config from its path
    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"# LLaMA layers={args.layers} hidden={args.hidden} float32, {args.nsamples} x {args.seqlen} calibration tokens; "
          f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    for method in ("wanda", "sparsegpt"):
        for pattern in (None, "2:4"):
            ours = copy.deepcopy(base)
            theirs = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
            kw = {"pattern": pattern} if pattern else {}
            prune_causal_lm(ours, ids, method=method, sparsity=None if pattern else 0.5, device="cpu", **kw)
            run_llmcompressor(theirs, ids, method, pattern, 0.5)
            a, b = linears(ours), linears(theirs)
            differ = sum(int(((a[n] == 0) != (b[n] == 0)).sum()) for n in a)
            total = sum(a[n].numel() for n in a)
            zeros = (sum(int((a[n] == 0).sum()) for n in a) / total, sum(int((b[n] == 0).sum()) for n in b) / total)
            wdiff = max(float((a[n] - b[n]).abs().max()) for n in a)
            print(f"method={method} pattern={pattern or 'unstructured'} mask_entries_differ={differ} of {total} "
                  f"sparsity pruneflow={zeros[0]:.6f} llmcompressor={zeros[1]:.6f} max_abs_weight_diff={wdiff:.3g}", flush=True)


if __name__ == "__main__":
    main()
