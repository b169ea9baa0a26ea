"""One-shot LLM pruning: time and peak memory, block by block vs whole model (DESIGN.md §9).

A 1B-parameter-class LLaMA (TinyLlama-1.1B's shape: hidden 2048, FFN 5632, 22 blocks,
32 heads, 4 KV heads, vocabulary 32000) with random weights is pruned to 50 % by the
chosen method from random calibration tokens, once per mode, each in a fresh process
so that peak memory is that mode's alone:

- ``blockwise``: pruneflow's default (calibration inputs captured once, each block
  pruned and its outputs passed on: one forward of each block per sample, twice);
- ``whole``: ``calibration.blockwise=false``, the reference that recomputes every
  block's inputs from the embeddings through the whole model.

Printed side by side: prune time, peak RSS of the process, and what the model itself
takes; the masks of the two modes are compared (Wanda: equal).

    python scripts/bench_llm_memory.py [--method wanda] [--layers 22] [--nsamples 8] [--seqlen 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.config.use_cache = False
    return model


def one(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from pruneflow.llm.blocks import BlockPruner
    from pruneflow.methods import get_one_shot_class

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    params = sum(p.numel() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cls = get_one_shot_class(args.method)
    method = cls(OmegaConf.create({"name": args.method, "pattern": None, "block_size": 128, "dampening": 0.01, "a": 0.5, "scope": "auto"}), 0.5)
    pruner = BlockPruner(model, method, torch.device("cpu"), offload=False)
    samples = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    pruner.run(samples, [0.5] * args.layers, blockwise=args.mode == "blockwise")
    seconds = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # a fingerprint of the masks, to compare the two modes
    digest = 0
    for i in range(args.layers):
        for lin in pruner.linears(i).values():
            digest = (digest * 31 + int((lin.weight == 0).nonzero()[:, 1].sum())) % (2**61 - 1)
    return {"mode": args.mode, "params": params, "prune_s": seconds, "peak_rss_gib": rss_peak / 2**30,
            "model_rss_gib": rss_model / 2**30, "mask_digest": digest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "ria", "magnitude"])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", choices=["blockwise", "whole"], help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = []
    for mode in ("blockwise", "whole"):
        cmd = [sys.executable, __file__, "--mode", mode] + [f"--{k}={getattr(args, k)}" for k in ("method", "layers", "nsamples", "seqlen", "threads", "dtype")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"# {mode} done: {rows[-1]['prune_s']:.1f} s", flush=True)
    b, w = rows
    print(f"model: LLaMA {b['params'] / 1e9:.2f}B params ({args.layers} blocks, {args.dtype}), method={args.method}, "
          f"calibration {args.nsamples} x {args.seqlen} tokens, {args.threads} threads, CPU")
    print(f"{'mode':<10} {'prune s':>9} {'peak RSS GiB':>13} {'model GiB':>10} {'above model GiB':>16}")
    for r in rows:
        print(f"{r['mode']:<10} {r['prune_s']:>9.1f} {r['peak_rss_gib']:>13.2f} {r['model_rss_gib']:>10.2f} {r['peak_rss_gib'] - r['model_rss_gib']:>16.2f}")
    print(f"time ratio whole/blockwise = {w['prune_s'] / b['prune_s']:.2f}; "
          f"peak memory above the model whole/blockwise = {(w['peak_rss_gib'] - w['model_rss_gib']) / max(b['peak_rss_gib'] - b['model_rss_gib'], 1e-9):.2f}; "
          f"masks equal: {b['mask_digest'] == w['mask_digest']}")


if __name__ == "__main__":
    main()
