"""2:4 export of a pruned causal LM: ``torch.sparse.to_sparse_semi_structured`` on CUDA,
timed against the dense weights on one evaluation window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pruneflow.llm.runner import LLMRun


@torch.no_grad()
def time_semi_structured(run: LLMRun, repeats: int = 10) -> dict[str, Any]:
    from pruneflow.methods.admm import to_semi_structured
    from pruneflow.speed import time_forward

    cap = torch.cuda.get_device_capability(run.device)
    if cap < (8, 0):
        return {"available": False, "reason": f"compute capability {cap[0]}.{cap[1]}; semi-structured kernels need 8.0 or newer"}
    model = run.model.to(run.device)
    if model.dtype not in (torch.float16, torch.bfloat16):
        return {"available": False, "reason": f"model dtype {model.dtype}: semi-structured kernels need model.dtype=float16 or bfloat16"}
    names = list(run.pruner.named_linears())
    eligible = [n for n in names if all(d % 64 == 0 for d in model.get_submodule(n).weight.shape)]
    if not eligible:
        return {"available": False, "reason": "no prunable layer has both dimensions multiples of 64"}
    ids = run.task.eval_ids[: run.seqlen].reshape(1, -1).to(run.device)
    dense_logits = model(input_ids=ids).logits.float()
    dense = time_forward({"dense": lambda: model(input_ids=ids)}, repeats=repeats, device=ids.device)["dense"]
    # in place: the model is saved already and not used after this
    to_semi_structured(model, eligible)
    diff = float((model(input_ids=ids).logits.float() - dense_logits).abs().max())
    sparse = time_forward({"sparse": lambda: model(input_ids=ids)}, repeats=repeats, device=ids.device)["sparse"]
    return {"available": True, "dtype": str(model.dtype).removeprefix("torch."), "tokens": int(ids.numel()),
            "layers": len(eligible), "skipped_layers": [n for n in names if n not in eligible],
            "dense_ms": round(dense, 3), "sparse_ms": round(sparse, 3), "speedup": round(dense / max(sparse, 1e-9), 3),
            "max_abs_logit_diff": diff}
