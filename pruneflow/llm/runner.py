"""The causal-LM pipeline: calibrate → prune (one shot, block by block) → evaluate.

``pruneflow model=tiny_llama task=lm/wikitext2 method=wanda`` runs here: the CLI's run
directory, lock, overwrite and resume rules and the result contract are the encoder
path's (DESIGN.md §5, §9). Stages: ``dense`` evaluation (``task.eval_dense``), ``prune``
(resumes from its last finished block), ``final`` evaluation (perplexity, and
lm-evaluation-harness zero-shot accuracy when ``task.zero_shot`` lists tasks).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from pruneflow.errors import RunStopped, UserError, check_bool, invalid
from pruneflow.llm import calibration
from pruneflow.llm.blocks import BlockPruner
from pruneflow.llm.gradient import lm_method_class
from pruneflow.loggers import make_logger
from pruneflow.methods.oneshot import OneShotMethod, check_nm_layer
from pruneflow.models import build_model, check_pairing
from pruneflow.results import paper_sparsity, provenance
from pruneflow.stop import STOP
from pruneflow.stop import name as stop_name
from pruneflow.tasks import build_task
from pruneflow.utils import (
    atomic_write_json,
    atomic_write_text,
    resolve_device,
    seed_everything,
    writing,
)
from pruneflow.validation import (
    check_model_path,
    check_typed_unused,
    check_unused,
    refuse_non_finite,
    switched_off,
    validate_run,
)

log = logging.getLogger("pruneflow")

# Keys of the training pipeline that a one-shot causal-LM run does not use.
TRAINING_ONLY = (
    ("stages.finetune", "a causal-LM task prunes a pretrained model one shot: there is no fine-tuning stage"),
    ("stages.prune", "one-shot pruning of a causal LM has no training steps (calibration.* sets its data)"),
    ("stages.recover", "a pruned causal LM is fine-tuned by recovery=full|lora (recovery.*), not by stages.recover"),
    ("schedule", "one-shot pruning has no sparsity schedule"),
    ("distill", "one-shot pruning of a causal LM does not train, so there is nothing to distil"),
    ("speed", "causal-LM runs record pruning time and peak memory instead of a latency benchmark"),
    *((f"trainer.{k}", "one-shot pruning of a causal LM does not train") for k in (
        "precision", "compile", "pin_memory", "continuous", "optimizer", "gradient_accumulation_steps", "weight_decay",
        "adam_beta1", "adam_beta2", "adam_epsilon", "momentum", "lr_scheduler", "warmup_ratio", "warmup_steps",
        "max_grad_norm", "freeze", "checkpoint_every", "log_every", "eval_every", "keep_freed_memory", "drop_last", "batch_order")),
    ("stages.eval_batch_size", "perplexity is computed window by window (task.*), not in batches of the encoder tasks' evaluation"),
    ("trainer.eval_precision", "perplexity is computed in the model's own dtype (model.dtype)"),
)
ALLOCATIONS = ("uniform", "owl")


def is_lm_task(cfg: DictConfig) -> bool:
    return str(cfg.task.get("name", "")).startswith("lm/")


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class LLMRun:
    def __init__(self, cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.overrides = overrides or []
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.progress_path = self.ckpt_dir / "progress.json"

    # -- settings --------------------------------------------------------------------------
    def check_settings(self, here: bool = True) -> None:
        """Every check that needs no data and changes nothing (see ``Run.check_settings``)."""
        cfg = self.cfg
        from pruneflow.runner import validate_sparsity

        refuse_non_finite(cfg)
        validate_sparsity(cfg.get("sparsity"))
        name = str(cfg.method.name)
        # seven_pre, snip, force score from gradients of the whole model (pruneflow.llm.gradient)
        cls, self.gradient = lm_method_class(
            name, f"task={cfg.task.name} prunes a causal LM from calibration data without training it; method={name} "
                  "prunes while training on a task loss (encoder tasks such as glue/* and squad/*).")
        if here:  # a Slurm job's devices are not this machine's
            self.device = resolve_device(str(cfg.trainer.device))
        validate_run(cfg)
        check_model_path(cfg)
        requested = cfg.get("sparsity")
        if requested is None and self.gradient:
            requested = OneShotMethod.default_sparsity if cfg.method.get("pattern") is None else None
        self.sparsity = cls.resolve_sparsity(cfg.method, requested)
        self.method = cls(cfg.method, self.sparsity)
        unused = [item for item in TRAINING_ONLY if not (self.gradient and item[0] == "schedule")]
        # magnitude under a uniform allocation scores |W| alone: Wanda's prune_magnitude reads no
        # calibration text, so none is loaded or run through the blocks (OWL's ratios need it)
        self.data_free = (not self.gradient and not self.method.pruner_class.needs_inputs
                          and (cfg.get("allocation") or {}).get("name") == "uniform")
        if self.data_free:  # an experiment's calibration.* serves its table's other rows; a sweep's, its other jobs
            check_typed_unused(cfg, [("calibration", f"method={name} with allocation.name=uniform scores |W| alone and reads "
                                                     "no calibration data (allocation.name=owl reads it for its outlier ratios)")],
                               self.overrides)
        elif not self.gradient:
            unused.append(("calibration.batch_size", f"method={name} prunes block by block from each window's activations "
                                                     "(calibration.batch_size is the batch of the gradient-scored methods)"))
        if (cfg.get("allocation") or {}).get("name") == "uniform":
            unused += [(f"allocation.{k}", "allocation.name=uniform gives every block the run's sparsity; OWL reads it")
                       for k in ("owl_m", "owl_lambda")]
        if not cfg.task.get("zero_shot"):
            unused += [(f"task.{k}", "no zero-shot task is listed (task.zero_shot=[])") for k in ("zero_shot_limit", "zero_shot_include")]
        check_unused(cfg, unused + self.method.unused_settings(cfg) + switched_off(cfg), typed=self.overrides)
        if self.gradient and self.method.has_scoring_loss():
            raise invalid("method.scoring_loss", cfg.method.get("scoring_loss"), "task on a causal-LM task",
                          "The calibration windows are scored by their next-token loss.")
        if name == "snip" and not self.method.prune_in_eval_mode:
            raise invalid("method.eval_mode", False, "true on a causal-LM task",
                          "The calibration windows are always scored with the model in eval mode (no dropout), so that "
                          "one calibration set gives one mask.")
        calibration.check_config(cfg.calibration)
        self.offload = check_bool(cfg.model.get("offload", False), "model.offload")
        if self.offload and here and self.device.type != "cuda":
            raise invalid("model.offload", True, "false on a CPU run",
                          "model.offload keeps the blocks in CPU memory and moves one at a time to the GPU; with "
                          f"trainer.device={cfg.trainer.device} the whole model is already in CPU memory.")
        self.blockwise = check_bool(cfg.calibration.get("blockwise", True), "calibration.blockwise")
        if self.offload and not self.blockwise:
            raise invalid("model.offload", True, "false with calibration.blockwise=false",
                          "The whole-model reference keeps every block on the device.")
        if self.offload and self.gradient:
            raise invalid("model.offload", True, "false with method=" + name,
                          f"method={name} back-propagates through the whole model at every scoring step, so the whole "
                          "model must be on the device.")
        alloc = cfg.get("allocation") or {}
        if alloc.get("name") not in ALLOCATIONS:
            raise invalid("allocation.name", alloc.get("name"), ALLOCATIONS)
        if alloc.get("name") == "owl" and self.method.pattern is not None:
            raise invalid("allocation.name", "owl", "uniform with method.pattern (N:M)",
                          "Here N:M holds every layer at 1 - N/M; OWL's N:M variant (wanda_owl_structure, a rounded N per block) is not offered.")
        lam = alloc.get("owl_lambda")
        if alloc.get("name") == "owl" and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 0.5):
            raise invalid("allocation.owl_lambda", lam, "a number in (0, 0.5]",
                          "Block sparsities spread 2 * owl_lambda around the target (their README: 0.08).")
        if alloc.get("name") == "owl" and self.gradient:
            raise invalid("allocation.name", "owl", f"uniform with method={name}",
                          f"method={name} ranks its own scores across the model (method.scope), not per block.")
        if self.gradient:
            bs = cfg.calibration.get("batch_size", 1)
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
                raise invalid("calibration.batch_size", bs, "an integer >= 1 (calibration windows per scoring step)")
            self.score_batch = int(bs)
        self.recovery = self.check_recovery(cfg.get("recovery") or {"name": "none"})
        if self.recovery["name"] == "full" and str(cfg.model.get("dtype")) == "float16":
            # AdamW on float16 weights: eps=1e-8 underflows to 0 and small updates vanish (inf/NaN weights)
            raise invalid("model.dtype", "float16", "bfloat16 or float32 with recovery=full",
                          "recovery=full trains every weight with AdamW in the model's dtype, which float16 cannot "
                          "hold (no fp32 master weights here); recovery=lora trains float32 adapters on float16 weights.")
        pre = cfg.model.get("pretrain") or {}
        self.pretrain_steps = int(pre.get("steps") or 0)
        if self.pretrain_steps and cfg.model.get("pretrained", True):
            raise invalid("model.pretrain.steps", self.pretrain_steps, "0 for a pretrained model",
                          "model.pretrain trains a model built from its config (model.pretrained=false) before pruning.")
        for key in ("zero_shot_limit",):
            v = cfg.task.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise invalid(f"task.{key}", v, "an integer >= 1, or null for all examples")
        if cfg.task.get("zero_shot"):  # lm-eval's names, before the model is built and pruned
            from pruneflow.llm.zeroshot import check_tasks

            include = cfg.task.get("zero_shot_include")
            check_tasks(tuple(str(t) for t in cfg.task.zero_shot), str(include) if include else None)
        self.task = build_task(cfg.task, int(cfg.seed))
        check_pairing(cfg.model, self.task)

    def prepare(self) -> None:
        from pruneflow.runner import begin

        cfg = self.cfg
        begin(self)
        self.task.load()
        self.bundle = build_model(cfg.model, self.task)
        self.task.prepare(self.bundle)
        self.model = self.bundle.model
        if not self.offload:
            self.model.to(self.device)
        self.seqlen = self.task.seqlen(self.model)
        cal_seqlen = cfg.calibration.get("seqlen")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if cal_seqlen is not None and limit is not None and cal_seqlen > limit:
            raise invalid("calibration.seqlen", cal_seqlen, f"at most {limit} (the model's max_position_embeddings)")
        self.cal_seqlen = int(cal_seqlen or limit or self.seqlen)
        self.pruner = BlockPruner(self.model, self.method, self.device, self.offload,
                                  list(cfg.method.get("include") or []) or None, list(cfg.method.get("exclude") or []) or None)
        n_blocks = len(self.pruner.blocks)
        if not any(self.pruner.linears(i) for i in range(n_blocks)):
            raise UserError(f"No prunable weights: no nn.Linear in the decoder blocks of model={cfg.model.name} matches "
                            f"method.include={cfg.method.get('include')} (minus method.exclude={cfg.method.get('exclude')}).")
        for name, lin in self.pruner.named_linears().items():
            check_nm_layer(self.method.pattern, name, lin.in_features)
        if self.gradient:
            from pruneflow.llm.gradient import n_steps
            from pruneflow.schedules import Schedule

            steps = n_steps(int(cfg.calibration.nsamples), self.score_batch)
            self.schedule = Schedule.from_config(cfg.schedule, self.method.schedule_target(), steps)
            self.schedule.validate()
            self.method.check_schedule(self.schedule)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        types = getattr(self.model.config, "layer_types", None) or []
        if len(set(types)) > 1 and self.blockwise and not self.gradient and not self.data_free:
            # transformers hands each block the mask of its layer type; the block-by-block path
            # captures block 0's keyword arguments and gives them to every block
            raise invalid("calibration.blockwise", True, f"false for model={cfg.model.name}",
                          f"Its decoder blocks use different attention masks (layer_types: {', '.join(sorted(set(types)))}); "
                          "the block-by-block path would run every block with the first block's mask. "
                          "calibration.blockwise=false runs the whole model for each block, so each gets its own.")
        targets = self.recovery.get("target_modules") if self.recovery["name"] == "lora" else None
        if targets:  # peft would refuse a name that matches no module only after the pruning
            from peft import LoraConfig
            from peft.tuners.tuners_utils import check_target_module_exists

            names = [n for n, _ in self.model.named_modules()]
            leaves = sorted({n.rsplit(".", 1)[-1] for n in self.pruner.named_linears()})
            for target in targets:
                one = LoraConfig(target_modules=[target], task_type="CAUSAL_LM")
                if not any(check_target_module_exists(one, n) for n in names):
                    raise invalid("recovery.target_modules", list(targets), f"names of model={cfg.model.name}'s Linear modules: "
                                  f"{', '.join(leaves)}", f"'{target}' matches no module of the model (peft matches a name or "
                                  "the end of a dotted module path).")
        if self.data_free:
            log.info("method=%s with allocation=uniform reads no calibration data: calibration.* are not used "
                     "(result.json: calibration.used=false).", cfg.method.name)

    @staticmethod
    def check_recovery(rec: Any) -> dict[str, Any]:  # noqa: ANN401
        rec = OmegaConf.to_container(rec, resolve=True) if not isinstance(rec, dict) else dict(rec)
        if rec.get("name") not in ("none", "full", "lora"):
            raise invalid("recovery", rec.get("name"), ["none", "full", "lora"])
        if rec["name"] == "none":
            return rec
        for key in ("steps", "batch_size"):
            v = rec.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "steps" else 1):
                raise invalid(f"recovery.{key}", v, "an integer >= " + ("0" if key == "steps" else "1"))
        for key in ("lr",):
            v = rec.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise invalid(f"recovery.{key}", v, "a number > 0")

        def integer(v: Any) -> bool:  # noqa: ANN401
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v: Any) -> bool:  # noqa: ANN401
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        # checked here, before the pruning: peft and torch refused them only once the model was pruned
        checks = [("warmup_steps", lambda v: integer(v) and v >= 0, "an integer >= 0"),
                  ("max_grad_norm", lambda v: number(v) and v >= 0, "a number >= 0 (0: no clipping)"),
                  ("weight_decay", lambda v: number(v) and v >= 0, "a number >= 0"),
                  ("seqlen", lambda v: v is None or (integer(v) and v >= 2), "null (the task's seqlen) or an integer >= 2")]
        if rec["name"] == "lora":
            checks += [("r", lambda v: integer(v) and v >= 1, "an integer >= 1 (the adapters' rank)"),
                       ("alpha", lambda v: number(v) and v > 0, "a number > 0 (LoRA's scale is alpha / r)"),
                       ("dropout", lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
                       ("target_modules", lambda v: v is None or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
                        "null (every prunable Linear of the blocks) or a list of Linear names, e.g. [q_proj, v_proj]")]
        for key, ok, allowed in checks:
            if key in rec and not ok(rec[key]):
                raise invalid(f"recovery.{key}", rec[key], allowed)
        if rec["name"] == "lora":
            try:
                import peft  # noqa: F401
            except ImportError as e:
                raise UserError("recovery=lora needs peft: pip install 'pruneflow[llm]' (or pip install peft).") from e
        return rec

    # -- checkpoints -------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        if self.progress_path.exists():
            try:
                return json.loads(self.progress_path.read_text())
            except ValueError as e:
                raise UserError(f"{self.progress_path} is damaged ({e}); start over with overwrite=true.") from e
        return {"blocks_done": 0, "metrics": {}, "time_s": {}, "sparsities": None}

    def save_progress(self, progress: dict[str, Any]) -> None:
        with writing(self.ckpt_dir):
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.progress_path, progress)

    def block_file(self, i: int) -> Path:
        return self.ckpt_dir / "blocks" / f"block_{i:04d}.safetensors"

    def save_block(self, i: int) -> None:
        """The pruned block's Linear weights (SparseGPT changes the kept ones too)."""
        path = self.block_file(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: lin.weight.detach().to("cpu").contiguous() for n, lin in self.pruner.linears(i).items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)

    def load_block(self, i: int) -> None:
        path = self.block_file(i)
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"The checkpoint of block {i} ({path}) cannot be read ({e}); start over with overwrite=true.") from e
        for n, lin in self.pruner.linears(i).items():
            lin.weight.data.copy_(tensors[n].to(lin.weight.device))

    # -- the run --------------------------------------------------------------------------
    def evaluate(self, desc: str) -> dict[str, float]:
        if self.offload:  # evaluation needs the whole model on the device
            self.model.to(self.device)
        out = self.task.evaluate_lm(self.bundle, self.device, desc)
        if self.offload:
            self.model.to("cpu")
        log.info("%s: %s", desc, ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out

    def sparsities(self, samples: torch.Tensor | None) -> list[float] | None:
        n = len(self.pruner.blocks)
        alloc = self.cfg.allocation
        if self.gradient and self.method.scope == "global" and self.method.pattern is None:
            return None  # one ranking across the model: per-block sparsity follows from the scores
        if alloc.name == "uniform":
            return [self.sparsity] * n
        from pruneflow.llm.owl import owl_sparsities

        return owl_sparsities(self.pruner, samples, self.sparsity, float(alloc.owl_m), float(alloc.owl_lambda))

    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.logger = make_logger(cfg, self.run_dir)
        progress = self.progress()
        metrics: dict[str, dict[str, float]] = progress["metrics"]
        times: dict[str, float] = progress["time_s"]
        if self.pretrain_steps:
            self.pretrain(progress)
        if check_bool(cfg.task.get("eval_dense", True), "task.eval_dense") and "dense" not in metrics:
            t0 = time.perf_counter()
            metrics["dense"] = self.evaluate("dense")
            times["eval_dense"] = time.perf_counter() - t0
            self.logger.log({f"dense/{k}": v for k, v in metrics["dense"].items()})
            self.save_progress(progress)

        n_blocks = len(self.pruner.blocks)
        done = int(progress["blocks_done"])
        if done:
            log.info("Resuming the prune stage after block %d of %d (%s)", done - 1, n_blocks, self.ckpt_dir / "blocks")
            for i in range(done):
                self.load_block(i)
        if done < n_blocks:
            t0 = time.perf_counter()
            seed_everything(int(cfg.seed))
            samples = None
            if not self.data_free:
                samples = calibration.calibration_samples(cfg.calibration, cfg.task, self.bundle.tokenizer, self.cal_seqlen)
                times["calibrate"] = times.get("calibrate", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            if progress.get("sparsities") is None:
                progress["sparsities"] = self.sparsities(samples)
                self.save_progress(progress)
            block_t0 = [time.perf_counter()]

            def block_done(i: int) -> None:
                self.save_block(i)
                progress["blocks_done"] = i + 1
                progress["time_s"]["prune"] = progress["time_s"].get("prune", 0.0) + time.perf_counter() - block_t0[0]
                block_t0[0] = time.perf_counter()
                self.save_progress(progress)
                self.logger.log({"prune/block": i})
                signum = STOP.requested()
                if signum is not None and i + 1 < n_blocks:
                    raise RunStopped(f"Stopped by {stop_name(signum)} after block {i} of {n_blocks}; its checkpoint is saved. "
                                     "Run the same command again to resume.", signum)

            if self.gradient:
                self.prune_with_gradients(samples, progress)
                for i in range(n_blocks):
                    block_done(i)
            elif samples is None:
                self.pruner.run_data_free(progress["sparsities"], start=done, on_block_done=block_done)
            else:
                self.pruner.run(samples, progress["sparsities"], start=done, on_block_done=block_done, blockwise=self.blockwise)
            del samples
            log.info("Pruned %d blocks in %.1f s", n_blocks - done, time.perf_counter() - t0)
        if "prune" not in metrics:
            t0 = time.perf_counter()
            metrics["prune"] = self.evaluate("pruned")
            times["eval_prune"] = time.perf_counter() - t0
            self.save_progress(progress)
        last = "prune"
        if self.recovery["name"] != "none" and self.recovery["steps"] > 0:
            t0 = time.perf_counter()
            self.recover()  # not checkpointed: a resumed run recovers again from the pruned blocks
            times["recover"] = time.perf_counter() - t0
            metrics["recover"] = self.evaluate("recovered")
            last = "recover"
        zero_shot = None
        tasks = list(cfg.task.get("zero_shot") or [])
        if tasks:
            t0 = time.perf_counter()
            zero_shot = self.zero_shot(tasks)
            times["zero_shot"] = time.perf_counter() - t0
            for t, m in zero_shot["tasks"].items():
                for k in ("acc", "acc_norm"):
                    if m.get(k) is not None:
                        metrics[last][f"{t}/{k}"] = m[k]
            for k, v in (zero_shot.get("average") or {}).items():
                if v is not None and len(tasks) > 1:
                    metrics[last][f"average/{k}"] = v
        metrics["final"] = dict(metrics[last])
        self.logger.log({f"final/{k}": v for k, v in metrics["final"].items()})
        return self.finish(metrics, times, zero_shot, t_start, progress["sparsities"])

    def prune_with_gradients(self, samples: torch.Tensor, progress: dict[str, Any]) -> None:
        """seven_pre / snip / force: scoring steps of the whole model (not resumable
        mid-way: a stopped run scores again from the first batch)."""
        from pruneflow.llm.gradient import prune_blocks_with_gradients

        steps = self.schedule.total_steps

        def on_step(step: int, loss: float) -> None:
            self.logger.log({"prune/step": step, "prune/loss": loss})
            signum = STOP.requested()
            if signum is not None and step + 1 < steps:
                raise RunStopped(f"Stopped by {stop_name(signum)} at scoring step {step} of {steps}; nothing of "
                                 f"method={self.method.name}'s scoring is kept. Run the same command again to score from "
                                 "the first batch.", signum)

        losses = prune_blocks_with_gradients(self.pruner, self.method, samples, self.score_batch, self.schedule, self.device, on_step)
        uses_schedule = not any(key == "schedule" for key, _ in self.method.unused_settings(self.cfg))
        progress["scoring"] = {"steps": steps, "batch_size": self.score_batch, "whole_model": True,
                               "schedule": self.schedule.kind if uses_schedule else None, "scope": self.method.scope,
                               "first_loss": losses[0], "last_loss": losses[-1]}

    def train_windows(self, seqlen: int) -> torch.Tensor:
        from pruneflow.llm.train import text_windows

        windows = text_windows(self.bundle.tokenizer, self.task.rows["train"]["text"], seqlen)
        if windows.shape[0] == 0:
            raise UserError(f"The training text of task={self.cfg.task.name} is shorter than one window of {seqlen} tokens.")
        return windows

    def pretrain(self, progress: dict[str, Any]) -> None:
        """tiny_llama: a short training on the task's text, stored for resume."""
        from safetensors.torch import load_model, save_model

        from pruneflow.llm.train import train_causal_lm

        path = self.ckpt_dir / "pretrained.safetensors"
        self.pretrain_info = progress.get("pretrain")
        if path.exists():
            load_model(self.model, str(path), device=str(self.device))
            return
        pre = self.cfg.model.pretrain
        t0 = time.perf_counter()
        losses = train_causal_lm(self.model, self.train_windows(int(pre.seqlen)), steps=self.pretrain_steps, lr=float(pre.lr),
                                 batch_size=int(pre.batch_size), seed=int(self.cfg.seed), device=self.device, desc="pretrain tiny model")
        progress["time_s"]["pretrain"] = time.perf_counter() - t0
        progress["pretrain"] = self.pretrain_info = {"steps": self.pretrain_steps, "first_loss": losses[0], "last_loss": losses[-1]}
        with writing(self.ckpt_dir):
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_model(self.model, str(path))
        self.save_progress(progress)

    def recover(self) -> None:
        from pruneflow.llm.train import train_causal_lm

        rec = self.recovery
        seqlen = int(rec.get("seqlen") or self.seqlen)
        windows = self.train_windows(seqlen)
        if self.offload:
            self.model.to(self.device)
        linears = self.pruner.named_linears()
        common = {"steps": int(rec["steps"]), "lr": float(rec["lr"]), "batch_size": int(rec["batch_size"]), "seed": int(self.cfg.seed),
                  "device": self.device, "warmup_steps": int(rec.get("warmup_steps") or 0),
                  "max_grad_norm": float(rec.get("max_grad_norm") or 0.0), "weight_decay": float(rec.get("weight_decay") or 0.0)}
        if rec["name"] == "full":
            train_causal_lm(self.model, windows, keep_zero=[lin.weight for lin in linears.values()], desc="recover (full)", **common)
            return
        from peft import LoraConfig, get_peft_model

        targets = rec.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in linears})
        lora = LoraConfig(r=int(rec["r"]), lora_alpha=int(rec["alpha"]), lora_dropout=float(rec["dropout"]),
                          target_modules=list(targets), task_type="CAUSAL_LM")
        self.peft_model = get_peft_model(self.model, lora)
        train_causal_lm(self.peft_model, windows, desc="recover (LoRA)", **common)
        self.bundle.model = self.peft_model  # evaluation runs with the adapters

    def zero_shot(self, tasks: list[str]) -> dict[str, Any]:
        from pruneflow.llm.zeroshot import evaluate_zero_shot

        if self.offload:
            self.model.to(self.device)
        include = self.cfg.task.get("zero_shot_include")
        return evaluate_zero_shot(self.model, self.bundle.tokenizer, tasks, limit=self.cfg.task.get("zero_shot_limit"),
                                  include_path=str(include) if include else None, device=str(self.device), seed=int(self.cfg.seed))

    # -- result.json --------------------------------------------------------------------------
    @torch.no_grad()
    def sparsity_report(self) -> dict[str, Any]:
        per_layer: dict[str, float] = {}
        per_block: list[float] = []
        zeros = total = 0
        nm = self.method.pattern
        nm_ok = True
        for i in range(len(self.pruner.blocks)):
            bz = bt = 0
            for lname, lin in self.pruner.linears(i).items():
                W = lin.weight
                z = int(W.numel() - W.count_nonzero())
                per_layer[f"{self.pruner.blocks_name}.{i}.{lname}.weight"] = round(z / W.numel(), 6)
                bz, bt = bz + z, bt + W.numel()
                if nm is not None:  # every group of M consecutive inputs keeps at most N
                    groups = (W.reshape(W.shape[0], -1, nm[1]) != 0).sum(-1)
                    nm_ok = nm_ok and int(groups.max()) <= nm[0]
            per_block.append(round(bz / max(bt, 1), 6))
            zeros, total = zeros + bz, total + bt
        nonzero = sum(int(p.count_nonzero()) for p in self.model.parameters())
        out = {
            "target": self.sparsity,
            "measured": round(zeros / max(total, 1), 6),
            "overall": round(1 - nonzero / self.total_params, 6),
            "per_layer": per_layer,
            "per_block": per_block,
            "prunable": total,
            "nonzero_params": nonzero,
        }
        if nm is not None:
            out["pattern"] = f"{nm[0]}:{nm[1]}"
            out["pattern_verified"] = nm_ok
            if getattr(self.method, "reallocation", False):  # RIA's masks are N:M in their permuted column order only
                out["pattern_note"] = ("method.reallocation=true: the N:M groups are cut in RIA's reallocated channel order and "
                                       "the mask is mapped back, as their code does, so the layers' own column order is not N:M")
        return out

    def export_info(self, pattern_verified: bool = True) -> dict[str, Any]:
        nm = self.method.pattern
        if nm != (2, 4):
            return {"semi_structured": {"available": False, "reason": "the run's mask is not 2:4 (method.pattern=2:4 gives one)"}}
        if not pattern_verified:  # the kernels would run on weights that are not 2:4 and time a different model
            return {"semi_structured": {"available": False, "reason": "the weights are not 2:4 in the layers' column order "
                                                                      "(sparsity.pattern_verified is false)"}}
        if self.device.type != "cuda":
            return {"semi_structured": {"available": False, "reason": "no CUDA device" if not torch.cuda.is_available() else "the run's device is not CUDA"}}
        try:
            from pruneflow.llm.export import time_semi_structured

            return {"semi_structured": time_semi_structured(self)}
        except Exception as e:  # noqa: BLE001 - an export problem must not lose the run
            log.warning("Semi-structured export failed: %s", e)
            return {"semi_structured": {"available": False, "reason": f"conversion failed: {type(e).__name__}: {e}"}}

    def finish(self, metrics: dict[str, dict[str, float]], times: dict[str, float], zero_shot: dict[str, Any] | None,
               t_start: float, sparsities: list[float]) -> dict[str, Any]:
        cfg = self.cfg
        failed: dict[str, str] = {}
        peft_model = getattr(self, "peft_model", None)
        if peft_model is not None:
            try:
                peft_model.save_pretrained(self.run_dir / "adapter")
            except Exception as e:  # noqa: BLE001
                failed["adapter/"] = f"{type(e).__name__}: {e}"
            self.model = peft_model.unload()  # the sparse weights, without the (dense) adapters
            self.bundle.model = self.model
        sp = self.sparsity_report()
        if cfg.get("save_model", True):
            try:
                out = self.run_dir / "model"
                self.model.save_pretrained(out, safe_serialization=True)
                self.bundle.tokenizer.save_pretrained(out)
            except Exception as e:  # noqa: BLE001 - a disk problem with one output
                failed["model/"] = f"{type(e).__name__}: {e}"
        export = self.export_info(bool(sp.get("pattern_verified", True)))
        times["total"] = time.perf_counter() - t_start
        memory = {"peak_cpu_rss_bytes": _peak_rss_bytes()}
        if self.device.type == "cuda":
            memory["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        cal = OmegaConf.to_container(cfg.calibration, resolve=True)
        cal["seqlen"] = self.cal_seqlen
        cal["source"] = None if self.data_free else calibration.describe_source(cfg.calibration, cfg.task)
        cal["used"] = not self.data_free
        result = {
            "method": cfg.method.name,
            "model": cfg.model.name,
            "task": cfg.task.name,
            "seed": int(cfg.seed),
            "main_metric": "perplexity",
            "sparsity": {k: sp[k] for k in ("target", "measured", "overall", "per_layer", "per_block")},
            "params": {"total": self.total_params, "prunable": sp["prunable"], "nonzero": sp["nonzero_params"], "compressed_total": None},
            "metrics": metrics,
            "calibration": cal,
            "evaluation": getattr(self.task, "windowing", None),
            "allocation": {"name": cfg.allocation.name, "per_block": sparsities},
            "recovery": self.recovery,
            "pretrain": getattr(self, "pretrain_info", None),
            "speed": None,
            "export": export,
            "memory": memory,
            "time_s": {k: round(v, 3) for k, v in times.items()},
            "config": OmegaConf.to_container(cfg, resolve=True),
            "overrides": list(self.overrides),
            "provenance": provenance(self.device),
        }
        if "pattern" in sp:
            result["sparsity"]["pattern"] = sp["pattern"]
            result["sparsity"]["pattern_verified"] = sp["pattern_verified"]
            if "pattern_note" in sp:
                result["sparsity"]["pattern_note"] = sp["pattern_note"]
        if zero_shot is not None:
            result["zero_shot"] = zero_shot
        definition = (result["config"].get("experiment_info") or {}).get("sparsity_definition")
        paper = paper_sparsity(definition, self.model, False)
        if paper is not None:
            result["sparsity"]["paper"] = paper
        info = self.method.summary()
        if self.gradient:
            info = {**info, "pattern": None if self.method.pattern is None else "{}:{}".format(*self.method.pattern),
                    "scoring": self.progress().get("scoring")}
        if info:
            result["method_info"] = info
        if cfg.get("save_model", True) and "model/" not in failed:
            from pruneflow.card import model_card

            try:
                atomic_write_text(self.run_dir / "model" / "README.md", model_card(result))
            except OSError as e:
                failed["model/README.md"] = f"{type(e).__name__}: {e}"
        if failed:
            result["output_errors"] = failed
        with writing(self.run_dir / "result.json"):
            atomic_write_json(self.run_dir / "result.json", result)
        self.logger.summary(result)
        self.logger.finish()
        return result
