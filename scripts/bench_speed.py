"""SPP speed benchmark (DESIGN.md §7): dense vs physically compressed BERT-base on CPU.

BERT-base shape (``BertConfig()``, random weights), batch 8 x 128 tokens. The
compressed model removes 50 % of the prunable (encoder Linear) weights uniformly
per layer: half of the query–key inner dims, half of the value–output inner
dims and half of the FFN neurons in every layer (the same random half in every
head). The script

1. checks that the compressed model's outputs equal the masked model's
   (the dense model with those dimensions masked to zero) to float tolerance,
2. times dense and compressed forward passes side by side (interleaved,
   warm-up, medians) and prints ``ratio=<dense ms / compressed ms>``, with a
   BERT shrunk by hand to half its heads (whole heads) and half its FFN neurons
   timed beside them (``hand_shrunk_ratio``, ``compressed_vs_hand_shrunk``),
3. counts each model's FLOPs (its Linear layers, counted by
   ``torch.utils.flop_counter``, plus the two attention products) and prints the
   rate each ran at beside a plain 1024 x 1024 float32 matmul's timed in the same run:
   a speed-up above the FLOP ratio needs the smaller model to run at a higher rate.

Target: ratio >= 1.8 on a 2-core CPU (DESIGN.md; the speed issue asks 2.4).

    python scripts/bench_speed.py [--repeats 10] [--threads N] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

from pruneflow import allocator
from pruneflow.compress import (
    CompressedBertSelfAttention,
    PairedMasks,
    compress,
    find_blocks,
    slice_linear,
)
from pruneflow.speed import time_forward


def prunable_weights(model: torch.nn.Module) -> int:
    return sum(
        lin.weight.numel()
        for pb in find_blocks(model)
        for lin in (pb.attn.query, pb.attn.key, pb.attn.value, pb.proj, pb.fc1, pb.fc2)
    )


@torch.no_grad()
def hand_shrunk(model: BertForSequenceClassification, keep: float) -> BertForSequenceClassification:
    """The comparison the target is set against: BERT shrunk by hand to the first ``keep``
    of its heads (whole heads, 64 dims each) and of its FFN neurons, the same fraction of
    the prunable weights as the compressed model but with fewer, full-size heads (what
    ``prune_heads`` of transformers 4 produced). Its own weights; only its speed matters."""
    model = copy.deepcopy(model)
    for pb in find_blocks(model):
        heads = round(keep * pb.num_heads)
        inner = torch.arange(heads * pb.qk_dim)
        for lin in (pb.attn.query, pb.attn.key, pb.attn.value):
            slice_linear(lin, rows=inner)
        slice_linear(pb.proj, cols=inner)
        ffn = torch.arange(round(keep * pb.ffn_dim))
        slice_linear(pb.fc1, rows=ffn)
        slice_linear(pb.fc2, cols=ffn)
        pb.block.attention.self = CompressedBertSelfAttention(pb.attn, pb.qk_dim, pb.v_dim, pb.scale)
    return model


@torch.no_grad()
def forward_flops(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """FLOPs of one forward: the matmuls of its Linear layers as torch's FLOP counter
    counts them, plus q·k^T and attention·v (2·s²·width each per sequence; counted here
    because the counter has no formula for every CPU attention kernel)."""
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=mask)
    linear = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) in ("aten.addmm", "aten.mm"))
    b, s = ids.shape
    attn = sum(2 * b * s * s * (m.query.out_features + m.value.out_features) for m in model.modules()
               if isinstance(getattr(m, "query", None), torch.nn.Linear) and isinstance(getattr(m, "value", None), torch.nn.Linear))
    return float(linear + attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of each paired dimension kept")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32 | bf16 (the timed models; the equality check runs in fp32)")
    ap.add_argument("--keep-freed-memory", default="auto", choices=["auto", "true", "false"], help="auto (on CPU, as pruneflow runs) | true | false")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"keep_freed_memory={allocator.apply_setting(args.keep_freed_memory, torch.device(args.device).type)}")
    torch.manual_seed(0)
    device = torch.device(args.device)

    dense = BertForSequenceClassification(BertConfig()).eval()
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq))
    mask = torch.ones_like(ids)

    # The same random half of the dims in every layer's heads; masked model first.
    masked = copy.deepcopy(dense)
    masks = PairedMasks(masked, share_heads=True)
    g = torch.Generator().manual_seed(0)
    keep = []
    for e in masks:
        n = e.param.numel()
        k = torch.zeros(n, dtype=torch.bool)
        k[torch.randperm(n, generator=g)[: round(args.keep * n)]] = True
        keep.append(k)
    masks.attach()
    masks.set([k.float() for k in keep])
    layers = masks.kept_layers(keep)
    compressed = compress(copy.deepcopy(dense), layers)

    with torch.no_grad():
        ref = masked(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = compressed(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    err = (ref.hidden_states[-1] - out.hidden_states[-1]).abs().max().item()
    err_logits = (ref.logits - out.logits).abs().max().item()
    ok = torch.allclose(ref.hidden_states[-1], out.hidden_states[-1], atol=1e-4, rtol=1e-4)
    del masked, ref, out

    removed = 1 - prunable_weights(compressed) / prunable_weights(dense)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_comp = sum(p.numel() for p in compressed.parameters())
    print(f"prunable weights removed: {removed:.4f}; parameters {n_dense} -> {n_comp}")
    print(f"compressed vs masked: max |diff| last hidden state {err:.2e}, logits {err_logits:.2e} -> {'equal' if ok else 'DIFFERENT'} (atol=rtol=1e-4)")

    hand = hand_shrunk(dense, args.keep)
    with torch.no_grad():
        hand(input_ids=ids[:1], attention_mask=mask[:1])  # it runs (its outputs are its own)
    print(f"hand-shrunk (whole heads): prunable weights removed {1 - prunable_weights(hand) / prunable_weights(dense):.4f}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dense, compressed = dense.to(device=device, dtype=dtype), compressed.to(device=device, dtype=dtype)
    hand = hand.to(device=device, dtype=dtype)
    ids, mask = ids.to(device), mask.to(device)
    flops = {name: forward_flops(m, ids, mask) for name, m in (("dense", dense), ("compressed", compressed), ("hand_shrunk", hand))}
    a, b = torch.randn(1024, 1024, device=device, dtype=dtype), torch.randn(1024, 1024, device=device, dtype=dtype)
    with torch.inference_mode():
        times = time_forward(
            {
                "dense": lambda: dense(input_ids=ids, attention_mask=mask),
                "compressed": lambda: compressed(input_ids=ids, attention_mask=mask),
                "hand_shrunk": lambda: hand(input_ids=ids, attention_mask=mask),
            },
            repeats=args.repeats,
            warmup=args.warmup,
        )
        matmul_ms = time_forward({"mm": lambda: [a @ b for _ in range(20)]}, repeats=args.repeats, warmup=1, device=device)["mm"] / 20
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(
        f"device={where} dtype={args.dtype} batch={args.batch}x{args.seq} attn={dense.config._attn_implementation} "
        f"dense_ms={times['dense']:.2f} compressed_ms={times['compressed']:.2f} hand_shrunk_ms={times['hand_shrunk']:.2f}"
    )
    print(f"ratio={times['dense'] / times['compressed']:.3f} hand_shrunk_ratio={times['dense'] / times['hand_shrunk']:.3f} "
          f"compressed_vs_hand_shrunk={times['hand_shrunk'] / times['compressed']:.3f}")
    rate = {k: flops[k] / times[k] / 1e6 for k in flops}  # GFLOP/s
    print(f"gflop: dense={flops['dense'] / 1e9:.1f} compressed={flops['compressed'] / 1e9:.1f} hand_shrunk={flops['hand_shrunk'] / 1e9:.1f} "
          f"flop_ratio={flops['dense'] / flops['compressed']:.3f}")
    print(f"gflop_per_s: dense={rate['dense']:.1f} compressed={rate['compressed']:.1f} hand_shrunk={rate['hand_shrunk']:.1f} "
          f"matmul_1024={2 * 1024**3 / matmul_ms / 1e6:.1f}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
