"""2:4 semi-structured sparsity on a GPU: the Linear layers of a 2:4-pruned BERT-base
(``torch.sparse.to_sparse_semi_structured``, CUDA compute capability >= 8.0, fp16/bf16)
against the same layers dense, side by side, and the whole encoder forward.

    python scripts/bench_semi_structured.py [--batch 32] [--seq 128] [--dtype bf16]

Prints ``linear_speedup=`` (the six Linear shapes of a BERT-base layer, dense ms /
sparse ms) and ``model_speedup=`` (a BERT-base forward with every encoder Linear
converted), with ``backend=`` the torch backend that ran: cuSPARSELt (torch's
default), else CUTLASS. On a CPU, or where neither backend runs, it prints
``semi_structured=unavailable`` with the reason and exits 0.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import BertConfig, BertForSequenceClassification

from pruneflow.masking import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, select_prunable
from pruneflow.methods.admm import nm_mask, to_semi_structured
from pruneflow.speed import time_forward


def semi_structured_copy(model: torch.nn.Module, names: list[str], probe: torch.Tensor) -> tuple[torch.nn.Module | None, str]:
    """A copy of ``model`` with the named Linear weights semi-structured, and the torch
    backend that ran it: cuSPARSELt (torch's default), else CUTLASS (whose kernels torch
    enables for compute capability 8.x only). (None, both errors) when neither runs."""
    from torch.sparse import SparseSemiStructuredTensor

    errors = []
    for backend, force_cutlass in (("cuSPARSELt", False), ("CUTLASS", True)):
        SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
        try:
            sparse = to_semi_structured(copy.deepcopy(model), names)
            with torch.inference_mode():
                sparse.get_submodule(names[0])(probe)  # some backends fail only at the first matmul
            torch.cuda.synchronize()  # (and asynchronously: surface it here)
            return sparse, backend
        except RuntimeError as e:
            errors.append(f"{backend}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    return None, "; ".join(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("semi_structured=unavailable reason='no CUDA device: 2:4 semi-structured kernels need a GPU of compute capability >= 8.0'")
        return
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        print(f"semi_structured=unavailable reason='compute capability {cap[0]}.{cap[1]} < 8.0'")
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig()).to("cuda", dtype).eval()
    names = [w.module_name for w in select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE)]
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w.mul_(nm_mask(w, 2, 4))
    sparse, backend = semi_structured_copy(model, names, torch.randn(64, 768, device="cuda", dtype=dtype))
    if sparse is None:
        print(f"semi_structured=unavailable reason={backend!r}")
        return
    x = torch.randn(args.batch * args.seq, 768, device="cuda", dtype=dtype)
    h = torch.randn(args.batch * args.seq, 3072, device="cuda", dtype=dtype)
    layer = names[:6]  # q, k, v, attention output, FFN in, FFN out of the first layer
    fns = {}
    for i, n in enumerate(layer):
        inp = h if "output.dense" in n and "attention" not in n else x
        dense_layer, sparse_layer = model.get_submodule(n), sparse.get_submodule(n)
        fns[f"dense{i}"] = (lambda m=dense_layer, t=inp: m(t))
        fns[f"sparse{i}"] = (lambda m=sparse_layer, t=inp: m(t))
    with torch.inference_mode():
        times = time_forward(fns, repeats=args.repeats, warmup=5)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
        full = time_forward({"dense": lambda: model(input_ids=ids), "sparse": lambda: sparse(input_ids=ids)}, repeats=args.repeats, warmup=5)
        diff = (model(input_ids=ids).logits.float() - sparse(input_ids=ids).logits.float()).abs().max().item()
    dense_ms = sum(times[f"dense{i}"] for i in range(len(layer)))
    sparse_ms = sum(times[f"sparse{i}"] for i in range(len(layer)))
    print(f"device={torch.cuda.get_device_name()} backend={backend} dtype={args.dtype} tokens={args.batch * args.seq} "
          f"linear_dense_ms={dense_ms:.3f} linear_sparse_ms={sparse_ms:.3f} linear_speedup={dense_ms / sparse_ms:.3f}")
    print(f"model_dense_ms={full['dense']:.2f} model_sparse_ms={full['sparse']:.2f} model_speedup={full['dense'] / full['sparse']:.3f} "
          f"max_abs_logit_diff={diff:.3g}")


if __name__ == "__main__":
    main()
