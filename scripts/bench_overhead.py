"""Overhead of a pruning step: a training step with a method updating its mask every
step, against a plain dense training step, side by side (DESIGN.md §7).

BERT-base from ``BertConfig()`` (random init, no download), batch 8 x 128 tokens.
Dense step: forward + backward + AdamW step of the plain, unparametrized model.
Pruned step: the same with the method attached as the trainer runs it (its masks as
the trainer applies them, its score update and its mask update after the optimizer
step, every step; PLATON with deltaT=1). The steps measured are consecutive steps
from the first third of the cubic ramp of a ``--prune-steps`` prune stage (1000:
short for BERT-base on GLUE), so the kept count changes every step, by as much as
a real run's does. The process keeps freed memory as the trainer does on CPU
(``trainer.keep_freed_memory``).
Before them the pruned model alone runs ``--method-warmup`` steps (the schedule's
steps just before), so the method's scores have trained as they have on a run's
ramp. Dense and pruned steps are then interleaved (alternating which goes first); each
ratio is median(pruned) / median(dense) over the measured steps, after warm-up
steps (which also absorb any torch.compile time). After every step the mask is checked to hold exactly
the scheduled number of weights.

    python scripts/bench_overhead.py --threads 2            # full BERT-base shape, 2 threads
    python scripts/bench_overhead.py --layers 2 --steps 5   # a quick check

On a shared machine other processes make single steps vary by 2x or more;
``hooks_ms`` (time inside the method's hooks, the score update and top-k) is
printed beside each ratio as a steadier view of the method's own cost, and
``step_ratio_iqr`` (quartiles of the per-step ratios) shows the noise.

Prints one line per method: ``method=<name> ratio=<pruned/dense>``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruneflow import allocator  # noqa: E402
from pruneflow.masking import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, MaskedWeights, select_prunable  # noqa: E402
from pruneflow.methods import PruneContext, get_method_class  # noqa: E402
from pruneflow.schedules import Schedule  # noqa: E402
from pruneflow.topk import kept_count  # noqa: E402


def build_model(layers: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # problem_type set as pruneflow's models set it: left None, the first forward sets it
    # and a compiled model (--model-compile) compiles a second time.
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, problem_type="single_label_classification"))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as pruneflow's trainer builds it (fused where torch has the kernel)."""
    from pruneflow.trainer import fused_ok

    params = list(model.parameters())
    fused = {"fused": True} if fused_ok([{"params": params}]) else {}
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **fused)


AUTOCAST: dict = {"dtype": None}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, method=None, step: int = 0) -> tuple[float, float]:  # noqa: ANN001
    """(step time, time inside the method's hooks) in seconds; the trainer's hook order:
    backward, optimizer step, the method (scores from this step's gradients, then the
    mask), zero_grad."""
    sync()
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=AUTOCAST["dtype"], enabled=AUTOCAST["dtype"] is not None):
        loss = model(**batch).loss
    extra = method.extra_loss() if method is not None else None
    (loss if extra is None else loss + extra).backward()
    hooks = 0.0
    if method is not None:
        sync()
        t1 = time.perf_counter()
        method.after_backward(step)
        sync()
        hooks += time.perf_counter() - t1
    opt.step()
    if method is not None:
        sync()
        t1 = time.perf_counter()
        method.after_optimizer_step(step)
        sync()
        hooks += time.perf_counter() - t1
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, hooks


def expected_kept(method, sparsity: float) -> int:  # noqa: ANN001
    """What the mask must hold after an update at ``sparsity`` (global or per layer)."""
    if method.scope == "global":
        return kept_count(method.mask_flat.numel(), sparsity)
    return sum(kept_count(n, sparsity) for _, n, _ in method.slices)


def method_config(name: str, compile_mode: str):  # noqa: ANN201
    cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
    cfg.compile = compile_mode
    if "deltaT" in cfg:
        cfg.deltaT = 1  # PLATON: mask update every step, like the others
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="seven,platon,movement,magnitude,random")
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per method (single steps vary by several %% even on an idle machine)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured first steps (allocator and compile warm-up)")
    ap.add_argument("--method-warmup", type=int, default=10,
                    help="pruned-model steps before the interleaved ones (schedule steps just before them), so the method's "
                         "scores and top-k have trained as on a run's ramp (0: start from fresh scores)")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--prune-steps", type=int, default=1000, help="length of the prune stage whose cubic ramp the measured steps come from")
    ap.add_argument("--keep-freed-memory", default="auto", choices=["auto", "true", "false"], help="auto (on CPU, as the trainer) | true | false")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="method.compile: auto | true | false")
    ap.add_argument("--model-compile", default="false", choices=["true", "false"], help="true: torch.compile both models, as trainer.compile=true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--precision", default="32", choices=["32", "bf16"], help="32 | bf16 (autocast)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.apply_setting(args.keep_freed_memory, torch.device(args.device).type)
    torch.manual_seed(0)
    device = torch.device(args.device)
    AUTOCAST["dtype"] = torch.bfloat16 if args.precision == "bf16" else None

    dense = build_model(args.layers).to(device)
    dense.train()
    model_compile = args.model_compile == "true"
    template = copy.deepcopy(dense)  # what each method's model starts from (a compiled module does not deepcopy)
    if model_compile:
        dense.compile()
    dense_opt = make_optimizer(dense)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, dense.config.vocab_size, (args.batch, args.seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device),
    }
    n_prunable = sum(w.numel() for w in select_prunable(dense, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"# BERT layers={args.layers} batch={args.batch}x{args.seq} prunable={n_prunable:,} {where} precision={args.precision} "
          f"steps={args.steps} (+{args.warmup} warm-up, after {args.method_warmup} pruned-only) sparsity={args.sparsity} compile={args.compile} model_compile={model_compile} "
          f"prune_steps={args.prune_steps} keep_freed_memory={allocator.applied()}", flush=True)

    total = args.warmup + args.steps
    first = args.prune_steps // 3  # the schedule's step of the first (warm-up) step
    if not 0 < total <= args.prune_steps - first:
        sys.exit(f"--prune-steps {args.prune_steps} is too short for {total} steps from its first third")
    if not 0 <= args.method_warmup <= first:
        sys.exit(f"--method-warmup {args.method_warmup}: at most {first} (the steps before the first third of --prune-steps {args.prune_steps})")
    all_exact = True
    for name in args.methods.split(","):
        model = copy.deepcopy(template)
        if model_compile:  # a fresh compile of the copy (its own graph, with the method's masks)
            model.compile()
        weights = MaskedWeights(select_prunable(model, DEFAULT_INCLUDE, DEFAULT_EXCLUDE))
        cfg = method_config(name, args.compile)
        method = get_method_class(name)(cfg, args.sparsity)
        method.validate(model, weights)
        schedule = Schedule("cubic", args.sparsity, args.prune_steps)
        method.use_zeroed_masks()  # as pruneflow's trainer: no W * mask in the forward
        method.setup(PruneContext(model=model, weights=weights, schedule=schedule, sparsity=args.sparsity, total_steps=args.prune_steps, device=device))
        opt = make_optimizer(model)
        for group in method.param_groups():  # movement pruning's scores
            opt.add_param_group({"params": group["params"], "lr": group["pf_lr"], "weight_decay": 0.0})
        t_dense, t_pruned, t_hooks, exact = [], [], [], True
        # A run reaches its ramp with scores already trained (movement's from 0, SEVEN's and
        # PLATON's sums): steps from fresh scores are a transient (movement's first Adam
        # steps give every score the same size, so its top-k brackets miss for ~5 steps).
        for step in range(first - args.method_warmup, first):
            tp, th = train_step(model, opt, batch, method, step)
            expected = expected_kept(method, method.target_sparsity(step))
            kept = method.kept_count_now()
            exact &= kept == expected
            print(f"#   {name} method warm-up step {step}: pruned {tp * 1e3:.0f} ms (method hooks {th * 1e3:.0f} ms), "
                  f"kept {kept:,} (scheduled {expected:,})", flush=True)
        for i, step in enumerate(range(first, first + total)):
            if i % 2:  # alternate which runs first, so drift on a shared machine hits both alike
                tp, th = train_step(model, opt, batch, method, step)
                td, _ = train_step(dense, dense_opt, batch)
            else:
                td, _ = train_step(dense, dense_opt, batch)
                tp, th = train_step(model, opt, batch, method, step)
            expected = expected_kept(method, method.target_sparsity(step))
            kept = method.kept_count_now()
            exact &= kept == expected
            if i >= args.warmup:
                t_dense.append(td)
                t_pruned.append(tp)
                t_hooks.append(th)
            print(f"#   {name} step {step}: dense {td * 1e3:.0f} ms, pruned {tp * 1e3:.0f} ms (method hooks {th * 1e3:.0f} ms), "
                  f"kept {kept:,} (scheduled {expected:,})", flush=True)
        md, mp, mh = statistics.median(t_dense), statistics.median(t_pruned), statistics.median(t_hooks)
        # Quartiles of the per-step ratios (each pruned step over the dense step beside it): how
        # far apart two runs of this script may land on this machine.
        q1, _, q3 = statistics.quantiles([p / d for p, d in zip(t_pruned, t_dense, strict=True)], n=4)
        print(f"method={name} ratio={mp / md:.3f} dense_ms={md * 1e3:.1f} pruned_ms={mp * 1e3:.1f} hooks_ms={mh * 1e3:.1f} "
              f"step_ratio_iqr={q1:.2f}-{q3:.2f} dense_samples_s={args.batch / md:.1f} pruned_samples_s={args.batch / mp:.1f} "
              f"exact_count={'ok' if exact else 'FAILED'}", flush=True)
        all_exact &= exact
        del model, weights, method, opt
        gc.collect()
    if not all_exact:
        sys.exit("a mask did not hold the scheduled number of weights")


if __name__ == "__main__":
    main()
