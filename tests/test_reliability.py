"""Reliability: bad inputs rejected before any work with the key and what is allowed,
no run silently lost or mixed up, signals and damaged files handled, untrusted files safe."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, SMALL, read_result, run_cli

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).with_name("bad_input_harness.py")

# (command line, the key the message must name, a fragment of what is allowed)
BAD_INPUTS: list[tuple[list[str], str, str]] = [
    # Hydra's own errors, explained: unknown keys (closest first), types, group options
    (["metod=seven"], "metod", "Closest: method"),
    (["trainer.lerning_rate=3"], "trainer.lerning_rate", "Valid keys at 'trainer'"),
    (["trainer.weight_decy=0.1"], "trainer.weight_decy", "Closest: weight_decay"),
    (["stages.prune.lr=abc"], "stages.prune.lr", "a positive number"),
    (["stages.finetune.epochs=true"], "stages.finetune.epochs", "a number"),
    (["stages.prune.steps=1.5"], "stages.prune.steps", "an integer"),
    (["seed=abc"], "seed", "an integer"),
    (["overwrite=maybe"], "overwrite", "true or false"),
    (["allow_config_change=true"], "allow_config_change", "holds no run to resume"),  # was ignored: a new run started
    (["trainer.gradient_accumulation_steps=x"], "trainer.gradient_accumulation_steps", "an integer"),
    (["speed.batch=x"], "speed.batch", "an integer"),
    (["speed.batch=0"], "speed.batch", ">= 1"),  # was a traceback after the whole run
    (["speed.repeats=0"], "speed.repeats", ">= 1"),
    (["sparsity=[0.5]"], "sparsity", "a number"),
    (["trainer.max_grad_norm=[1,2]"], "trainer.max_grad_norm", "a number"),
    (["method=sevn"], "method", "Closest: seven"),
    (["model=bert"], "model", "bert_base"),
    (["task=glue/sst3"], "task", "glue/sst2"),
    (["schedule=cubicc"], "schedule", "cubic"),
    (["logger=wandbb"], "logger", "wandb"),
    (["trainer=fast"], "trainer", "default"),
    (["stages=short"], "stages", "default"),
    (["experiment=seven/glue"], "experiment", "seven/glue_bert_base"),
    (["published=seven_plot1"], "published", "experiment=seven_pre/plot1_bert_base"),  # data, not a choice
    (["+model.kwargs.foo=1"], "model.kwargs", "foo"),  # was advice to set pretrained=false, which it was
    (["~method"], "method", "choose another option"),  # was a traceback and a left-over run folder
    (["~seed"], "seed", "seed=<value>"),
    (["~logger"], "logger", "choose another option"),  # was ignored: the run went on
    (["~trainer.optimizer"], "trainer.optimizer", "trainer.optimizer=<value>"),  # Hydra's "Error merging override"
    # Hydra's own settings: checked before any run starts, as the others
    (["hydra/launcher=joblibb"], "hydra/launcher", "Closest: joblib"),
    (["hydra.launcher.n_jobs=2"], "hydra.launcher.n_jobs", "hydra/launcher=joblib"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=abc", "method=magnitude,random"], "hydra.launcher.n_jobs", "an integer"),
    (["hydra.run.dirr=x"], "hydra.run.dirr", "Closest: dir"),
    (["method=seven", "method.alpha_3=1"], "method.alpha_3", "alpha_1"),
    (["task.max_seq_lenght=64", "task=glue/sst2"], "task.max_seq_lenght", "max_seq_length"),
    (["model.hub=x"], "model.hub", "Valid keys at 'model'"),
    (["schedule.warmup=3"], "schedule.warmup", "initial_warmup"),
    (["distill.temp=2"], "distill.temp", "temperature"),
    (["logger.modee=offline"], "logger.modee", "mode"),
    # keys added with +key=... that nothing reads
    (["+foo=1"], "foo", "Valid keys at the top level"),
    (["method=magnitude", "+method.beta1=0.85"], "method.beta1", "Valid keys at 'method'"),
    (["+stages.finetune.lrr=1"], "stages.finetune.lrr", "Closest: lr"),
    (["+model.config_overrides.hidden_dropout_prob=0"], "model.config_overrides.hidden_dropout_prob", "model.kwargs"),
    (["-m", "sparsity=0.5,0.7", "+method.foo=1"], "method.foo", "Valid keys at 'method'"),
    (["method=seven", "+method.signed=true"], "method.signed", "without the '+'"),
    (["recovery=lora"], "recovery", "task=lm/"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "recovery=lora", "recovery.rnk=8"], "recovery.rnk", "target_modules"),
    (["method=snip", "method.eval_mode=maybe"], "method.eval_mode", "true, false"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=snip", "method.eval_mode=false"], "method.eval_mode", "eval mode"),
    (["method=grasp", "method.reinit_head=2"], "method.reinit_head", "true, false"),
    (["method=force", "method.selection=theirs"], "method.selection", "exact, authors"),
    (["method=grasp", "method.samples_per_class=0"], "method.samples_per_class", "an integer >= 1"),
    (["method=force", "method.scoring_loss=ce"], "method.scoring_loss", "task, target_logit"),
    (["method=force", "method.scoring_loss=target_logit", "task=squad/v1", "model=bert_tiny"], "method.scoring_loss", "question answering"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=force", "method.scoring_loss=target_logit"], "method.scoring_loss", "causal-LM"),
    (["method=grasp", "method.samples_per_class=1000"], "method.samples_per_class", "fewer than 1000 examples of class(es) 0"),
    (["method=grasp", "method.samples_per_class=10", "stages.prune.batch_size=8"], "'stages.prune.batch_size=8' would be ignored", "by class"),
    (["-m", "method=seven,sevn"], "method", "Closest: seven"),
    (["-m", "sparsity=0.5,abc"], "sparsity", "a number"),
    (["sparsity=0.5,0.7"], "sparsity", "-m"),
    (["trainer.freeze=abc"], "trainer.freeze", "a list in brackets"),
    (["=7"], "command line", "key=value"),
    (["hydra.run.dir=/proc/pruneflow_test"], "hydra.run.dir", "cannot be written"),
    (["hydra.run.dir="], "hydra.run.dir", "it is empty"),
    (["trainer.min_lr=1e-4"], "trainer.min_lr=1e-4", "trainer.lr_scheduler=cosine_epochs ends"),
    (["trainer.lr_scheduler=cosine_epochs", "trainer.warmup_ratio=0.1"], "trainer.warmup_ratio=0.1", "without warm-up"),
    (["trainer.lr_scheduler=cosine_epochs", "trainer.min_lr=-1"], "trainer.min_lr", "a number >= 0"),
    (["-m", "sparsity=0.5,0.6", "hydra.sweep.dir="], "hydra.sweep.dir", "it is empty"),
    # values checked before any data is read
    (["sparsity=1.5"], "sparsity", "[0, 1)"),
    (["sparsity=-0.1"], "sparsity", "[0, 1)"),
    (["method=admm", "sparsity=0.7"], "sparsity", "method.pattern"),
    (["method=dense", "sparsity=0.5"], "sparsity", "does not prune"),
    (["method=admm", "method.pattern=4:2"], "method.pattern", "0 < N < M"),
    (["method=admm", "method.pattern=abc"], "method.pattern", "2:4"),
    (["method=admm", "method.pattern=2:128"], "method.pattern=2:128", "method.exclude"),  # fc2 (256 inputs) fits, the rest (64) not
    (["method=admm", "method.pattern=3:2"], "method.pattern", "0 < N < M"),
    (["method=nosuch"], "method", "seven"),
    (["model=nosuch"], "model", "tiny_vit"),
    (["task=nosuch"], "task", "digits"),
    (["stages.prune.steps=10"], "stages.prune.epochs", "Set only one"),
    (["method.scope=everywhere"], "method.scope", "global, local"),
    (["task.path=/nonexistent/data"], "task.path", "null for task=digits"),
    (["trainer.lr_scheduler=nope"], "trainer.lr_scheduler", "linear, cosine"),
    (["trainer.optimizer=lion"], "trainer.optimizer", "adamw"),
    (["trainer.precision=fp8"], "trainer.precision", "32, bf16, fp16"),
    (["trainer.precision=fp16"], "trainer.precision", "32 or bf16"),
    (["trainer.compile=maybe"], "trainer.compile", "true or false"),
    (["trainer.pin_memory=true"], "trainer.pin_memory", "auto or false"),
    (["trainer.device=gpu"], "trainer.device", "auto, cpu, cuda"),
    (["trainer.device=cuda"], "trainer.device", "No CUDA device"),
    (["trainer.gradient_accumulation_steps=0"], "trainer.gradient_accumulation_steps", ">= 1"),
    (["trainer.torch_threads=-1"], "trainer.torch_threads", ">= 1"),
    (["trainer.keep_freed_memory=maybe"], "trainer.keep_freed_memory", "auto (on CPU), true or false"),
    (["trainer.warmup_ratio=-1"], "trainer.warmup_ratio", "[0, 1)"),
    (["trainer.warmup_ratio=0.1", "trainer.warmup_steps=5"], "trainer.warmup_steps", "Set only one"),
    (["trainer.weight_decay=-1"], "trainer.weight_decay", ">= 0"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm", ">= 0"),
    (["trainer.momentum=0.9"], "trainer.momentum", "trainer.optimizer=sgd"),
    (["trainer.lr_scheduler=constant", "trainer.warmup_steps=10"], "trainer.lr_scheduler", "constant_with_warmup"),
    (["trainer.adam_beta1=1.5"], "trainer.adam_beta1", "[0, 1)"),
    (["stages.eval_batch_size=0"], "stages.eval_batch_size", ">= 1"),
    (["stages.prune.batch_size=100000"], "stages.prune.batch_size", "at most"),
    (["stages.prune.epochs=2", "stages.prune.steps=5"], "stages.prune.epochs", "Set only one"),
    (["stages.prune.lr=0"], "stages.prune.lr", "a positive number"),
    (["stages.finetune.epochs=-1"], "stages.finetune.epochs", ">= 0"),
    (["task.max_train_samples=0"], "task.max_train_samples", ">= 1"),
    (["task.max_train_samples=-5"], "task.max_train_samples", ">= 1"),
    (["task.max_eval_samples=0"], "task.max_eval_samples", ">= 1"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode", "offline, online, disabled"),
    (["task.path=/tmp"], "task.path", "null for task=digits"),
    (["task=glue/sst2", "task.path=/nonexistent/glue"], "task.path", "does not exist"),
    (["method=seven", "method.preset=sst2"], "method.preset", "auto or null"),
    (["method=seven", "method.alpha_1=1.5"], "method.alpha_1", "[0, 1)"),
    (["method=seven", "method.signed=maybe"], "method.signed", "true, false"),
    (["method=seven", "method.scope=layer"], "method.scope", "global, local"),
    (["method=seven", "method.granularity=block"], "method.granularity", "unstructured, head, neuron"),
    (["method=seven", "method.selection=best"], "method.selection", "exact, authors"),
    (["method=platon", "method.deltaT=0"], "method.deltaT", ">= 1"),
    (["method=platon", "schedule.frequency=5"], "schedule.frequency", "method.deltaT"),
    (["method=movement", "method.score_lr=-1"], "method.score_lr", "a positive number"),
    (["method=soft_movement", "sparsity=0.5"], "sparsity", "method.final_lambda"),
    (["method=spp", "method.rank=first"], "method.rank", "support_time, entry"),
    (["method=spp", "method.search_lr=0"], "method.search_lr", "a positive number"),
    (["method=spp", "stages.prune.lr=0.001"], "stages.prune.lr", "trains its masks at method.search_lr"),
    (["method=spp", "schedule.final_warmup=3"], "schedule.final_warmup", "no sparsity schedule"),
    (["method=dense", "stages.prune.lr=0.1"], "stages.prune.lr", "does not prune"),
    (["schedule.final_warmup=100000"], "schedule", "cannot reach its target"),
    (["model=bert_tiny"], "Model/task mismatch", "model=tiny_vit, built for its 8x8 images"),
    (["model=deit_tiny", "model.pretrained=false"], "model=deit_tiny takes 224x224 inputs", "+model.kwargs.img_size=8"),  # was timm's shape error
    (["task=glue/sst2", "model=tiny_vit"], "Model/task mismatch", "text model"),  # before the data is looked for
    (["task=lm/wikitext2", "method=wanda"], "Model/task mismatch", "model=tiny_llama"),  # not a text model it would refuse
    (["distill.enabled=true", "distill.teacher=/nonexistent"], "distill.teacher", "finetuned"),
    (["distill.enabled=true", "distill.temperature=0"], "distill.temperature", "a positive number"),
    (["distill.enabled=true", "stages.finetune.epochs=0"], "distill.teacher=finetuned", "stages.finetune has 0"),
    (["trainer.continuous=true"], "stages.finetune.batch_size", "one batch size"),
    # settings a run would ignore
    (["method=spp", "schedule=linear"], "'schedule=linear' would be ignored", "no sparsity schedule"),
    (["method=seven_pre", "stages.prune.lr=0.1"], "stages.prune.lr", "no weight updates"),
    (["method=magnitude", "stages.prune.update_weights=false", "stages.prune.lr=0.1"], "stages.prune.lr", "no weight updates"),
    (["method=seven", "method.total_epochs=20"], "method.total_epochs", "method.preset=auto"),
    (["method=seven", "method.lengthen_to_fit=true"], "method.lengthen_to_fit=true", "method.preset=auto"),
    (["distill.temperature=3"], "distill.temperature", "distill.enabled=true"),
    (["logger=none", "logger.mode=online"], "logger.mode", "logger=wandb"),
    (["task=lm/wikitext2", "model=opt_125m", "method=wanda", "recovery=full"], "model.dtype", "bfloat16 or float32"),
    # a sweep: every job checked before the first starts (only the product has spp with linear)
    (["-m", "sparsity=0.5,1.5"], "sparsity=1.5", "[0, 1)"),
    (["-m", "schedule=cubic,linear", "method=magnitude,spp"], "schedule=cubic method=spp", "no sparsity schedule"),
    (["cache_dir=/proc/pruneflow-cache"], "cache_dir", "cache=false"),  # before the data, not at the finetune stage's end
    # a swept key that job folder names leave out: its jobs would share one folder
    (["-m", "trainer.torch_threads=1,2"], "trainer.torch_threads", "its own hydra.sweep.dir"),
    # typed at its default value, an unused setting is still one the run would ignore
    (["method=spp", "schedule=cubic"], "'schedule=cubic' would be ignored", "no sparsity schedule"),
    (["method=dense", "stages.prune.epochs=4"], "'stages.prune.epochs=4' would be ignored", "Remove it"),  # as typed, not 4.0
    (["logger=none", "logger.mode=offline"], "'logger.mode=offline' would be ignored", "logger=wandb uses logger.*"),
    (["distill.enabled=false", "distill.temperature=2.0"], "'distill.temperature=2.0' would be ignored", "distill.enabled=true"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "trainer.eval_every=5"], "'trainer.eval_every=5' would be ignored", "does not train"),
    (["trainer.eval_every=-3"], "'trainer.eval_every': -3", "or epoch"),
    # checks of the run's plan that need no data: a sweep refuses them before its first job (they ran job #0 first)
    (["-m", "schedule.frequency=1,0"], "'schedule.frequency': 0", "no job was started"),
    (["-m", "stages.prune.epochs=1,0"], "stages.prune has 0 steps", "no job was started"),
    (["-m", "trainer.continuous=true", "seed=0,1"], "one batch size", "stages.finetune.batch_size=64"),
    (["-m", "method=spp", "trainer.continuous=true", "stages.finetune.batch_size=32", "seed=0,1"], "cannot carry the optimizer", "continuous=false"),
    (["-m", "model.path=/nonexistent/model", "seed=0,1"], "'model.path'", "save_pretrained"),
    # a group's .name relabels the option it has (the run kept its settings and recorded the other name)
    (["schedule.name=foo"], "'schedule.name=foo' renames the schedule", "schedule=foo"),
    (["stages.name=pretrained_text"], "'stages.name=pretrained_text' renames the stages", "stages=pretrained_text"),
    (["method.name=seven"], "'method.name=seven' renames the method", "method=seven"),
    (["method=admm", "method.export.dtype=fp8"], "'method.export.dtype': 'fp8'", "auto, bf16, fp16"),
    # Hydra's schema errors, once "could not be composed: Error merging override X" with no reason
    (["seed=null"], "'seed': null", "cannot be null (now seed=0)"),
    (["stages.prune=5"], "'stages.prune': 5", "stages.prune.batch_size=..."),
    (["logger.run_name=[x]"], "'logger.run_name': [x]", "one string"),
    (["method=admm", "method.export.semi_structured=maybe"], "'method.export.semi_structured'", "true, false"),
    (["method=admm", "method.pattern=1:3"], "'method.pattern': '1:3'", "divides every prunable layer's input width"),  # no layer fits
    (["method=platon", "method.granularity=head"], "'method.biases': True", "false with method.granularity=head"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0", "sparsity=0.5,0.6"], "'hydra.launcher.n_jobs': 0", "-1: one per CPU core"),
    # causal-LM settings that peft, torch or the allocation refused (or misused) only after the pruning
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "recovery=lora", "recovery.r=0"], "'recovery.r': 0", "an integer >= 1"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "recovery=lora", "recovery.dropout=2"], "'recovery.dropout': 2", "[0, 1)"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "allocation.name=owl", "allocation.owl_lambda=2"], "'allocation.owl_lambda': 2", "(0, 0.5]"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "model.offload=true"], "'model.offload': True", "false on a CPU run"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "task.zero_shot=[no_such_task]"], "'task.zero_shot'", "Unknown: ['no_such_task']"),
    # switched off or not used by the choice made: ignored, so refused
    (["speed.enabled=false", "speed.batch=4"], "'speed.batch=4' would be ignored", "speed.enabled=false"),
    (["trainer.optimizer=sgd", "trainer.adam_beta1=0.5"], "'trainer.adam_beta1=0.5' would be ignored", "trainer.momentum"),
    (["schedule=oneshot", "schedule.final_warmup=5"], "'schedule.final_warmup=5' would be ignored", "prunes once"),
    # patterns that select or remove nothing (typos), refused once the model is built
    (["method.exclude=[blocks.*.mlp.fc]"], "'method.exclude'", "blocks.0.mlp.fc1"),
    (["method.include=[encoder.*]"], "'method.include'", "blocks.0.attn.qkv"),
    (["trainer.freeze=[foo*]"], "'trainer.freeze'", "match(es) no parameter"),
    (["trainer.freeze=[*]"], "'trainer.freeze'", "freeze every parameter"),
    (["-m", "experiment=seven_pre/plot2_vit_b32", "stages.prune.lr=1e-4"], "A job of this sweep", "no weight updates"),
    (["-m", "method=magnitude,random", "hydra.sweeper.params.sparsity=0.5,0.7"], "sweeps Hydra's own setting", "pruneflow -m sparsity=<values>"),
    # a value of the wrong type: the same allowed range as a value out of it
    (["sparsity=abc"], "Invalid value for 'sparsity': 'abc'", "a number in [0, 1)"),
    (["seed=1.5"], "Invalid value for 'seed': 1.5.", "an integer"),  # a number as typed, not '1.5'
    # the DeiT recipe's batch mixing and label smoothing
    (["task.mixup.mode=pixel", "task.mixup.mixup_alpha=0.8"], "task.mixup.mode", "batch, pair, elem"),
    (["task.mixup.cutmix_alpha=-1"], "task.mixup.cutmix_alpha", "a number >= 0"),
    (["task.label_smoothing=1"], "task.label_smoothing", "[0, 1)"),
    (["task.mixup.mixup_alpha=0.8", "stages.recover.batch_size=31"], "stages.recover.batch_size", "an even number with task.mixup"),
    (["task.mixup.prob=0.5"], "'task.mixup.prob=0.5' would be ignored", "mixing is off"),
    (["task.mixup.mixup_alpha=0.8", "task.mixup.switch_prob=0.2"], "'task.mixup.switch_prob=0.2' would be ignored", "only one of their alphas"),
    # a key that only some jobs' method has: the error names the job it fails in
    (["-m", "method=seven,platon", "method.beta1=0.85"], "A job of this sweep (method=seven method.beta1=0.85", "Unknown key 'method.beta1'"),
    (["-m", "method=platon,seven", "method.beta1=0.85"], "A job of this sweep (method=seven method.beta1=0.85", "Unknown key 'method.beta1'"),
    # two of Hydra's modes (Hydra itself raises a bare ValueError)
    (["-m", "sparsity=0.5,0.7", "--cfg", "job"], "--cfg and -m cannot be given together", "pruneflow <overrides> --cfg job"),
    (["--info", "--cfg", "job"], "--cfg and --info cannot be given together", "describes it (--info)"),
    # --cfg job checks the values as the run would (it printed a beta1 of 2 with exit 0)
    (["method=platon", "method.beta1=2", "--cfg", "job"], "Invalid value for 'method.beta1': 2", "[0, 1)"),
    # nan and inf pass range checks written as comparisons: max_grad_norm=nan ran to the end,
    # epochs=nan ended in a traceback, sparsegpt's dampening=inf passed its "> 0"
    (["trainer.max_grad_norm=nan"], "Invalid value for 'trainer.max_grad_norm': nan", "a finite number"),
    (["stages.finetune.epochs=inf"], "Invalid value for 'stages.finetune.epochs': inf", "a finite number"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=sparsegpt", "method.dampening=inf"], "'method.dampening': inf", "a finite number"),
    # settings the chosen options never read (a settings audit ran each and got the same weights)
    (["method=admm", "method.sr_ste_fraction=0.5"], "'method.sr_ste_fraction=0.5' would be ignored", "SR-STE is off"),
    (["method=admm", "method.export.semi_structured=false", "method.export.batch=3"], "'method.export.batch=3' would be ignored",
     "the semi-structured export is off"),
    (["method=admm", "method.iterations=0", "method.sr_ste=true", "method.rho=5"], "'method.rho=5' would be ignored", "no ADMM iterations"),
    (["method=spp", "method.optimizer=sgd", "method.adam_eps=1e-3"], "'method.adam_eps=1e-3' would be ignored", "sgd has no epsilon"),
    (["method=spp", "method.rank=entry", "method.check_every=5"], "'method.check_every=5' would be ignored", "first entry step"),
    (["stages.recover.epochs=0", "stages.recover.lr=0.5"], "'stages.recover.lr=0.5' would be ignored", "the stage is skipped"),
    (["distill.enabled=true", "distill.stages=[recover]", "stages.recover.epochs=0"], "Invalid value for 'distill.stages'",
     "stages that run here: finetune, prune"),
    (["task=cifar10", "task.path=/nonexistent/cifar", "task.hub_id=foo/bar"], "'task.hub_id=foo/bar' would be ignored", "task.path reads local files"),
    (["task=cifar10", "task.augment=false", "+task.augment_kwargs={scale:[0.5,1.0]}"], "would be ignored", "task.augment=false trains on"),
    (["model=bert_tiny", "task=glue/sst2", "model.pretrained=true", "model.path=/tmp", "model.config.hidden_size=32"],
     "'model.config.hidden_size=32' would be ignored", "loads the architecture and tokenizer"),
    (["task=lm/wikitext2", "model=tiny_llama", "model.path=/tmp"], "model.path=/tmp would be ignored", "model.pretrained=true"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "allocation.owl_lambda=0.1"], "'allocation.owl_lambda=0.1' would be ignored",
     "allocation.name=uniform"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "task.zero_shot_limit=5"], "'task.zero_shot_limit=5' would be ignored",
     "no zero-shot task is listed"),
    (["task=lm/wikitext2", "model=tiny_llama", "method=wanda", "stages.eval_batch_size=7"], "'stages.eval_batch_size=7' would be ignored",
     "window by window"),
    # an experiment's calibration.* serves its table's other rows, a sweep's its other jobs: a run's own is refused
    (["task=lm/wikitext2", "model=tiny_llama", "method=magnitude", "calibration.nsamples=64"],
     "'calibration.nsamples=64' would be ignored", "reads no calibration data"),
    # no stage updates a weight: the optimizer's settings as typed would be ignored
    (["method=magnitude", "stages.finetune.epochs=0", "stages.recover.epochs=0", "stages.prune.update_weights=false",
      "trainer.weight_decay=0.3"], "'trainer.weight_decay=0.3' would be ignored", "the prune stage makes no weight updates"),
    (["method=dense", "stages.finetune.epochs=0", "stages.recover.epochs=0", "trainer.optimizer=sgd"],
     "'trainer.optimizer=sgd' would be ignored", "the prune stage does not run"),
    (["method=seven_pre", "method.pattern='2:4'", "method.scope=local"], "'method.scope=local' would be ignored", "keeps the N highest"),
    (["logger=wandb", "logger.mode=disabled", "logger.project=foo"], "'logger.project=foo' would be ignored", "makes no W&B run"),
]


BAD_INPUT_SHARDS = 3


@pytest.mark.parametrize("shard", range(BAD_INPUT_SHARDS))
def test_bad_inputs_are_one_paragraph_before_any_work(tmp_path, shard):
    """Every BAD_INPUTS command line as a user would type it; in shards, so that parallel
    test workers share them (~2 s each: Hydra composes each command line several times)."""
    assert len(BAD_INPUTS) >= 60
    base = ["logger=none", "speed.enabled=false", "task.max_train_samples=256"]
    cases = []
    mine = [(i, case) for i, case in enumerate(BAD_INPUTS) if i % BAD_INPUT_SHARDS == shard]
    for i, (argv, _, _) in mine:
        keys = {a.split("=")[0] for a in argv}
        lm = any(a.startswith("task=lm/") for a in argv)  # causal-LM runs have no task.max_train_samples, no speed.*
        extra = [b for b in base if b.split("=")[0] not in keys and "-m" not in argv and not (lm and b.split(".")[0] in ("task", "speed"))]
        out = f"hydra.sweep.dir={tmp_path / f'sweep{i}'}" if "-m" in argv else f"hydra.run.dir={tmp_path / f'run{i}'}"
        cache = [f"cache_dir={tmp_path / 'cache'}"] if "cache_dir" not in keys else []
        cases.append([*argv, *extra, *([out] if not keys & {"hydra.run.dir", "hydra.sweep.dir"} else []), *cache])
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(HARNESS), str(tmp_path / "cases.json"), str(tmp_path / "out.json")], cwd=tmp_path,
                   check=True, timeout=1200, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"})
    results = json.loads((tmp_path / "out.json").read_text())
    problems = []
    for (i, (argv, key, allowed)), (code, err) in zip(mine, results, strict=True):
        msg = " ".join(err.split())
        if code != 2 or "Traceback" in err or key not in msg or allowed not in msg or "pruneflow: error:" not in msg:
            problems.append(f"{argv}: exit {code}, {msg[-300:]!r}")
        for left in (tmp_path / f"run{i}", tmp_path / f"sweep{i}"):  # nothing half-written for a wrong setting
            if left.exists():
                problems.append(f"{argv}: left {left}: {sorted(p.name for p in left.iterdir())}")
    assert not problems, "\n".join(problems)


def test_a_runs_settings_are_refused_before_hydra_starts_it(tmp_path, monkeypatch):
    """A setting the run would refuse as it starts is refused by the checks before Hydra
    runs anything: one composition of the command line, no output folder. The run's own
    check then composes nothing more (the groups' defaults composed here are reused)."""
    import hydra._internal.config_loader_impl as loader
    from hydra import compose, initialize_config_dir

    from pruneflow.cli import CONFIG_DIR, precheck
    from pruneflow.config import register_configs
    from pruneflow.runner import check_settings
    from pruneflow.validation import _composed_defaults

    register_configs()
    _composed_defaults.cache_clear()
    composed = []
    real = loader.ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(loader.ConfigLoaderImpl, "load_configuration", lambda self, *a, **k: composed.append(1) or real(self, *a, **k))
    run_dir = tmp_path / "run"
    problem = precheck(["method=dense", "stages.prune.lr=0.1", "logger=none", f"hydra.run.dir={run_dir}"])
    assert problem is not None and "'stages.prune.lr=0.1' would be ignored: method=dense" in problem
    assert not run_dir.exists()
    assert len(composed) == 2  # the command line (its hydra.run.dir included) and the groups' defaults
    composed.clear()
    assert precheck(["method=magnitude", "logger=none", f"hydra.run.dir={run_dir}"]) is None and len(composed) == 2
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # as the run's app: the same config sources
        cfg = compose(config_name="config", overrides=["method=magnitude", "logger=none"])
        composed.clear()
        check_settings(cfg, True, ["method=magnitude", "logger=none"])
    assert composed == []


def test_the_groups_defaults_are_composed_again_once_a_config_file_changes(tmp_path):
    """They are kept per process (a sweep's check reuses them job by job), but a long-lived
    process (a notebook using the API) sees an option file edited since."""
    from hydra import initialize_config_dir

    from pruneflow.cli import CONFIG_DIR
    from pruneflow.config import register_configs
    from pruneflow.validation import group_defaults

    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    register_configs()
    chosen = OmegaConf.create({"method": {"name": "magnitude"}})
    option = conf / "method" / "magnitude.yaml"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert group_defaults(chosen)["method.scope"] == "auto"
        assert group_defaults(chosen) is group_defaults(chosen)  # composed once
        option.write_text(option.read_text().replace("scope: auto ", "scope: local "))
        os.utime(option, ns=(option.stat().st_atime_ns, option.stat().st_mtime_ns + 10**9))  # a coarse-mtime file system
        assert group_defaults(chosen)["method.scope"] == "local"


def test_the_command_line_answers_help_and_misspelt_keys_without_importing_torch(tmp_path):
    """--help and the pre-checks' errors (a misspelt key, an unknown option, a sparsity out
    of range) come before the first `import torch` (~2 s of a 2-core VM's ~2.7 s answer)."""
    probe = (
        "import sys\nfrom pruneflow import cli\nsys.argv = ['pruneflow', *sys.argv[1:]]\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('\\nEXIT', code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    from importlib.metadata import version

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    for argv, said in ((["--help"], "Configuration groups"), (["--version"], f"pruneflow {version('pruneflow')} (Hydra "),  # it said Hydra's only
                       (["trainer.lrr=1"], "Unknown key 'trainer.lrr'"),
                       (["method=sevn"], "Closest: seven"), (["sparsity=1.5"], "Invalid value for 'sparsity': 1.5")):
        p = subprocess.run([sys.executable, "-c", probe, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert said in p.stdout + p.stderr, (argv, p.stdout[-500:], p.stderr[-500:])
        assert p.stdout.strip().splitlines()[-1] == f"EXIT {0 if argv in (['--help'], ['--version']) else 2} False False", (argv, p.stdout[-300:])


def test_a_refused_run_leaves_no_empty_folders_in_the_default_layout(tmp_path):
    """outputs/<day>/<time>/ of a run refused for a setting is removed, and the day folder
    too when nothing else is in it; another run's folder of the same day stays."""
    import datetime

    first = run_cli(["sparsity=1.5", "logger=none"], cwd=tmp_path)
    assert first.returncode == 2 and "sparsity" in first.stderr
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or [p.name for p in outputs.iterdir()] == []
    day = outputs / datetime.datetime.now().strftime("%Y-%m-%d")
    (day / "00-00-00").mkdir(parents=True)
    again = run_cli(["sparsity=1.5", "logger=none"], cwd=tmp_path)
    assert again.returncode == 2
    assert [p.name for p in day.iterdir()] == ["00-00-00"]
    # a date-named folder of the user's own hydra.run.dir is theirs: only the run's folder goes
    (tmp_path / "mine" / "2024-01-01").mkdir(parents=True)
    own = run_cli(["sparsity=1.5", "logger=none", "hydra.run.dir=mine/2024-01-01/run"], cwd=tmp_path)
    assert own.returncode == 2
    assert (tmp_path / "mine" / "2024-01-01").is_dir() and not (tmp_path / "mine" / "2024-01-01" / "run").exists()


# ----------------------------------------------------------------------------- no run lost or mixed up
def _claim_default_folder(base: str, queue) -> None:  # noqa: ANN001 - one racing command's process
    from pruneflow.config import _fresh_dir

    queue.put(_fresh_dir(base))


def test_commands_started_in_the_same_second_get_their_own_default_folders(tmp_path, monkeypatch):
    """`pruneflow ... &` in a loop: commands resolving the same outputs/<day>/<time> each
    get a folder of their own (<time>, <time>-2, ...), claimed atomically, for runs and
    for sweeps; every later read of the setting gives the folder the command took."""
    import datetime
    import multiprocessing

    import hydra.core.utils
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pruneflow import config

    base = str(tmp_path / "race" / "12-00-00")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    racers = [ctx.Process(target=_claim_default_folder, args=(base, queue)) for _ in range(4)]
    for r in racers:
        r.start()
    taken = sorted(queue.get(timeout=120) for _ in racers)
    for r in racers:
        r.join(10)
    assert taken == sorted([base, base + "-2", base + "-3", base + "-4"])
    assert all(Path(t).is_dir() for t in taken)

    # the shipped config goes through it: a folder of the same second (another command's) is not reused
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return cls(2026, 1, 31, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.setattr(config, "_FRESH_DIRS", {})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "2026-01-31" / "12-00-00").mkdir(parents=True)
    (tmp_path / "outputs" / "multirun" / "2026-01-31" / "12-00-00").mkdir(parents=True)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    assert cfg.hydra.run.dir == "outputs/2026-01-31/12-00-00-2" == cfg.hydra.run.dir
    assert cfg.hydra.sweep.dir == "outputs/multirun/2026-01-31/12-00-00-2" == cfg.hydra.sweep.dir
    assert (tmp_path / cfg.hydra.run.dir).is_dir() and (tmp_path / cfg.hydra.sweep.dir).is_dir()
    # a command that only prints its config, resolved, takes no folder
    shown = run_cli(["--cfg", "all", "--resolve"], cwd=tmp_path / "race")
    assert shown.returncode == 0 and "dir: outputs/" in shown.stdout
    assert sorted(p.name for p in (tmp_path / "race").iterdir()) == [Path(t).name for t in taken]


def test_long_sweep_job_names_never_collide_and_failed_jobs_fail_the_sweep(tmp_path):
    from pruneflow.config import _dirname

    long = ",".join(f"trainer.log_every={10 + i}" for i in range(20))
    a, b = _dirname(long + ",trainer.weight_decay=0.0"), _dirname(long + ",trainer.weight_decay=0.5")
    assert a != b and len(a) <= 200 and len(b) <= 200
    # Hydra's override_dirname escapes ':'; the folder does not (it was method.pattern=2\:4)
    assert _dirname("method=wanda,method.pattern=2\\:4,task=lm/wikitext2") == "method=wanda,method.pattern=2:4,task=lm_wikitext2"
    # a long name keeps more of its values: keys' parents as initials before the cut (the audit's swept task.path was cut off)
    audit = ("logger=none,method=magnitude,model=minilm,sparsity=0.5,stages.finetune.epochs=2,"
             "stages.prune.epochs=3,stages.recover.epochs=1,task.max_eval_samples=64,task.max_seq_length=64,task.max_train_samples=256,"
             "task.path=data/sst2_bad,task=glue/sst2,trainer.torch_threads=1")
    short = _dirname(audit)
    assert len(short) <= 200 and "s.f.epochs=2,s.p.epochs=3" in short and "t.path=data_sst2_bad" in short
    assert short != _dirname(audit.replace("sst2_bad", "sst2"))
    pad = "stages.eval_batch_size=" + "0" * 190 + "64"  # a long override: the job names are cut
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *SMALL, "method=magnitude", "sparsity=0.5", "stages.recover.batch_size=32,1000", "seed=0", pad,
                   f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path)  # 1000 > 256 examples: fails at run time
    assert out.returncode == 1, out.stderr[-2000:]
    assert "1 job(s) of the sweep failed" in out.stderr and "batch_size" in out.stderr
    dirs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 2 and sum((d / "result.json").exists() for d in dirs) == 1
    # a later launch into the same folder whose own job succeeds: the earlier failure is not its own
    (err,) = sweep.glob("*/error.txt")
    os.utime(err, (err.stat().st_mtime - 60, err.stat().st_mtime - 60))
    again = run_cli(["-m", *SMALL, "method=magnitude", "sparsity=0.5", "stages.recover.batch_size=32", "seed=0", pad,
                     f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert again.returncode == 0 and "failed" not in again.stderr, again.stderr[-2000:]


def test_a_run_directory_is_locked_and_resume_refuses_other_settings(tmp_path):
    from filelock import FileLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}"]
    with FileLock(str(run_dir / ".pruneflow.lock")):
        busy = run_cli(args, cwd=tmp_path)
    assert busy.returncode == 2 and "in use by another pruneflow process" in " ".join(busy.stderr.split())
    killed = run_cli(args, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"})
    assert killed.returncode == -9

    def record() -> dict[str, bytes]:  # the command's .hydra/ record of the run in the folder
        return {p.name: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}

    first = record()
    assert sorted(first) == ["config.yaml", "hydra.yaml", "overrides.yaml"] and b"sparsity=0.5" in first["overrides.yaml"]
    # what a signal's stop and a failed sweep job leave for pruneflow-report to show
    notes = {"stopped.txt": "Stopped by SIGTERM after step 6 of 24 of the prune stage", "error.txt": "a failed attempt"}
    for name, text in notes.items():
        (run_dir / name).write_text(text)
    other = run_cli([*args, "stages.recover.lr=5e-4"], cwd=tmp_path)
    message = " ".join(other.stderr.split())
    assert other.returncode == 2 and "stages.recover.lr: 0.001 -> 0.0005" in message and "allow_config_change=true" in message
    assert record() == first  # a refused command leaves the run's record alone, and its notes (both were deleted)
    assert {name: (run_dir / name).read_text() for name in notes} == notes
    allowed = run_cli([*args, "stages.recover.lr=5e-4", "allow_config_change=true"], cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert f"pruneflow: result in {run_dir / 'result.json'}" in allowed.stdout  # a run says where its result is
    assert not any((run_dir / name).exists() for name in notes)  # the accepted command's run is not stopped or failed
    assert read_result(run_dir)["config"]["stages"]["recover"]["lr"] == 5e-4
    accepted = record()
    assert b"stages.recover.lr=5e-4" in accepted["overrides.yaml"]  # an accepted change is the run's record now
    # finished: the same settings are skipped; other settings are not answered with its result
    before = (run_dir / "result.json").read_bytes()
    for checkpoints_deleted in (False, True):  # deleted to free space: result.json still says which settings it is for
        if checkpoints_deleted:
            shutil.rmtree(run_dir / "checkpoints")
        same = run_cli([*args, "stages.recover.lr=5e-4"], cwd=tmp_path)
        assert same.returncode == 0 and "this run is finished, skipping it" in same.stderr + same.stdout
        finished = run_cli([*args, "sparsity=0.6"], cwd=tmp_path)
        message = " ".join(finished.stderr.split())
        assert finished.returncode == 2 and "holds a finished run with other settings (sparsity: 0.5 -> 0.6" in message, message[-800:]
        assert (run_dir / "result.json").read_bytes() == before and record() == accepted


def test_resuming_with_another_thread_count_says_the_result_may_differ(tmp_path):
    """torch_threads is left out of the resume check (joblib picks it per job) but changes
    CPU sums in the last bits: a resume with another count says so and how to resume exactly."""
    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}"]
    killed = run_cli([*args, "trainer.torch_threads=1"], cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"})
    assert killed.returncode == -9
    resumed = run_cli([*args, "trainer.torch_threads=2"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = " ".join((tmp_path / "run" / "pruneflow.log").read_text().split())
    assert "Resuming with 2 torch threads; the checkpoint was written with 1" in log and "trainer.torch_threads=1 resumes exactly" in log


def test_a_run_waiting_for_another_process_cache_entry_stops_on_a_signal(tmp_path):
    """A job waits while another computes the finetune it shares (the entry's lock); a
    SIGTERM then stops it at once with one paragraph, not after the other job's training."""
    import signal
    import subprocess
    import sys
    import time

    from filelock import FileLock

    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"cache_dir={tmp_path / 'c'}"]
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (lock_path,) = (tmp_path / "c" / "finetune").glob("*.lock")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HYDRA_FULL_ERROR": "0"}
    with FileLock(str(lock_path)):  # "another process" computing the entry
        waiting = subprocess.Popen([sys.executable, "-m", "pruneflow.cli", *args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "b" / ".hydra").exists() and waiting.poll() is None:
            time.sleep(0.2)  # the run has its folder (and its stop handler); it then loads the data and waits
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
        waiting.send_signal(signal.SIGTERM)
        try:
            _, stderr = waiting.communicate(timeout=30)
        finally:
            waiting.kill()
    said = " ".join(stderr.split())
    assert waiting.returncode == 143 and "Traceback" not in said, said[-2000:]
    assert "Stopped by SIGTERM while waiting for another process to compute the cached finetune" in said


SIGNAL_ARGS = [*SMALL, "method=seven", "sparsity=0.7", "trainer.checkpoint_every=50"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):  # noqa: ANN001, ANN201
    tmp = tmp_path_factory.mktemp("ref")
    ref = run_cli([*SIGNAL_ARGS, f"hydra.run.dir={tmp / 'ref'}", f"cache_dir={tmp / 'c1'}"], cwd=tmp)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return tmp / "ref"


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_signals_save_a_checkpoint_and_resume_exactly(tmp_path, uninterrupted, sig, code):
    from safetensors.torch import load_file

    args = SIGNAL_ARGS
    cmd = [*args, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c2'}"]
    stopped = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_SIGNAL_AT": f"prune:7:{sig}"})
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and f"Stopped by SIG{sig} after step 7 of 10 of the prune stage" in " ".join(stopped.stderr.split())
    assert f"pruneflow: stopped: Stopped by SIG{sig}" in " ".join(stopped.stderr.split())  # asked for: not labelled an error
    assert not (tmp_path / "run" / "result.json").exists()
    # the report lists it as stopped, with the message (it said "no result.json (running, killed, or skipped)")
    assert f"Stopped by SIG{sig} after step 7" in (tmp_path / "run" / "stopped.txt").read_text()
    from pruneflow.report import find_incomplete

    _, unfinished = find_incomplete(tmp_path / "run", set())
    assert [job.reason for job in unfinished] == [f"Stopped by SIG{sig} after step 7 of 10 of the prune stage; a checkpoint was saved. Run the same command again to resume from it."]
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "run" / "stopped.txt").exists()
    a, b = read_result(uninterrupted), read_result(tmp_path / "run")
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
    wa, wb = load_file(str(uninterrupted / "model" / "model.safetensors")), load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_a_stop_in_the_default_folder_names_the_folder_to_resume_in(tmp_path, uninterrupted):
    """The default output folder is a new one for every command (outputs/<day>/<time>): "run
    the same command again" started over in a new folder. The message now names the folder,
    and that command resumes there."""
    cmd = [*SIGNAL_ARGS, f"cache_dir={tmp_path / 'c2'}"]
    stopped = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_SIGNAL_AT": "prune:7:TERM"})
    said = " ".join(stopped.stderr.split())
    assert stopped.returncode == 143, said[-2000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    hint = (f"Run the same command again to resume from it. The same command means with hydra.run.dir={run_dir.resolve()} added: "
            "without it, the command starts over in a new folder.")
    assert hint in said and hint in (run_dir / "stopped.txt").read_text().replace("\n", " ")
    resumed = run_cli([*cmd, f"hydra.run.dir={run_dir.resolve()}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in (run_dir / "pruneflow.log").read_text()
    assert read_result(run_dir)["metrics"] == read_result(uninterrupted)["metrics"]
    # a second signal's own line (it stops at once) names it too
    (tmp_path / "again").mkdir()
    twice = run_cli(cmd, cwd=tmp_path / "again", env={"PRUNEFLOW_TEST_SIGNAL_AT": "prune:7:TERMx2"})
    (other,) = (tmp_path / "again" / "outputs").glob("*/*")
    assert twice.returncode == 143 and f"The same command means with hydra.run.dir={other.resolve()} added" in " ".join(twice.stderr.split())


def test_a_signal_between_two_stages_stops_before_the_next_and_resumes_exactly(tmp_path, uninterrupted):
    """A signal that comes as a stage ends (its complete checkpoint and progress.json written):
    the run stops before the next stage starts, and the resume starts that stage."""
    from safetensors.torch import load_file

    cmd = [*SIGNAL_ARGS, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c2'}"]
    stopped = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_SIGNAL_AT": "prune:done:TERM"})
    said = " ".join(stopped.stderr.split())
    assert stopped.returncode == 143 and "Traceback" not in said, said[-2000:]
    assert "Stopped by SIGTERM after the prune stage; its checkpoint is saved" in said
    assert "its checkpoint is saved" in (tmp_path / "run" / "stopped.txt").read_text()
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_result(uninterrupted), read_result(tmp_path / "run")
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
    (resume,) = b["provenance"]["resumes"]
    assert (resume["stage"], resume["complete"]) == ("prune", True)
    wa, wb = load_file(str(uninterrupted / "model" / "model.safetensors")), load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_a_signal_during_the_spp_search_stops_it_at_once_and_the_resume_matches(tmp_path):
    """SPP's search is its own loop: a SIGTERM stops it at once (it once went on to the
    search's end, 26 s later in a 300-step search) with a checkpoint of the search, and a
    SIGKILL loses only the steps since its last periodic checkpoint (trainer.checkpoint_every;
    the search once started over, hours of an ImageNet search). Both resume in the search,
    at their step, to the uninterrupted run's path, weights and metrics."""
    from safetensors.torch import load_file

    args = [*SMALL, "method=spp", "sparsity=0.5", "stages.prune.steps=40", "trainer.checkpoint_every=15"]
    ref = run_cli([*args, f"hydra.run.dir={tmp_path / 'ref'}", f"cache_dir={tmp_path / 'c1'}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    for name, env, step in (("stop", {"PRUNEFLOW_TEST_SIGNAL_AT": "spp:3:TERM"}, 3), ("kill", {"PRUNEFLOW_TEST_KILL_AT": "spp:30"}, 30)):
        run_dir = tmp_path / name
        cmd = [*args, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / ('c_' + name)}"]
        stopped = run_cli(cmd, cwd=tmp_path, env=env)
        err = " ".join(stopped.stderr.split())
        if name == "stop":
            assert stopped.returncode == 143 and "Stopped by SIGTERM at step 3 of 40 of the SPP search; a checkpoint was saved" in err, err[-2000:]
            assert "Traceback" not in err
        else:
            assert stopped.returncode == -9
        assert not (run_dir / "result.json").exists()
        resumed = run_cli(cmd, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"SPP search: resuming at step {step} of 40" in (run_dir / "pruneflow.log").read_text()
        a, b = read_result(tmp_path / "ref"), read_result(run_dir)
        assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]
        path_a, path_b = (json.loads((d / "spp_path.json").read_text())["path"] for d in (tmp_path / "ref", run_dir))
        assert len(path_b) == 40 and path_a == path_b  # every step's loss, support and entries
        wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "ref", run_dir))
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_a_second_signal_stops_at_once_with_the_signals_exit_code(tmp_path, uninterrupted):
    """Ctrl-C twice (or a scheduler's second SIGTERM): exit 143/130 at once with one line, no
    traceback; the checkpoint saved before it is kept and the same command resumes exactly."""
    cmd = [*SIGNAL_ARGS, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c2'}"]
    stopped = run_cli(cmd, cwd=tmp_path, env={"PRUNEFLOW_TEST_SIGNAL_AT": "prune:7:TERMx2"})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and "stopped at once by a second SIGTERM" in " ".join(stopped.stderr.split())
    resumed = run_cli(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_result(uninterrupted), read_result(tmp_path / "run")
    assert a["metrics"] == b["metrics"] and a["sparsity"] == b["sparsity"]


def test_a_sweeps_launcher_passes_a_stop_on_to_its_jobs_through_the_stop_file(tmp_path, monkeypatch):
    """The launching process writes the signal it got (or got before the jobs started) into
    the sweep folder; a job reads it there as a request, not as a signal of its own (Ctrl-C
    reaching it too must not be the second signal that stops at once)."""
    import signal

    from pruneflow.stop import STOP_FILE, StopRequest

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    launcher = StopRequest()
    launcher.launcher_pid = os.getpid()
    launcher.handle(signal.SIGTERM, None)  # before the sweep started
    assert exits == [] and launcher.signum == signal.SIGTERM and not (tmp_path / STOP_FILE).exists()
    launcher.share_with_jobs(tmp_path)
    assert (tmp_path / STOP_FILE).read_text() == str(int(signal.SIGTERM))
    assert launcher.requested_here() == signal.SIGTERM
    launcher.forget_stop_file()
    assert not (tmp_path / STOP_FILE).exists()

    job = StopRequest()
    job.launcher_pid = os.getpid() + 1  # another process launched it
    job.watch(tmp_path)
    assert job.requested_here() is None
    (tmp_path / STOP_FILE).write_text(str(int(signal.SIGINT)))
    assert job.requested_here() == signal.SIGINT and job.received == 0
    job.handle(signal.SIGINT, None)  # its own Ctrl-C after the file's request: the first signal it got
    assert exits == [] and job.signum == signal.SIGINT and job.received == 1
    job.handle(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]

    (tmp_path / STOP_FILE).unlink()
    own = StopRequest()
    own.launcher_pid = os.getpid() + 1
    own.watch(tmp_path)
    own.handle(signal.SIGTERM, None)
    assert own.requested_here() == signal.SIGTERM and not (tmp_path / STOP_FILE).exists()  # a job writes no stop file


def test_a_signal_with_no_name_is_named_by_its_number():
    from pruneflow.stop import name

    assert name(15) == "SIGTERM" and name(999) == "999"


# ----------------------------------------------------------------------------- damaged files
def test_a_guarded_stream_outlives_its_reader():
    """A write to a pipe whose reader is gone points the descriptor at /dev/null and goes
    on (no BrokenPipeError); other errors still raise."""
    from pruneflow.console import GuardedStream

    read_end, write_end = os.pipe()
    raw = os.fdopen(write_end, "w", buffering=1)
    stream = GuardedStream(raw)
    stream.write("before\n")
    assert os.read(read_end, 100) == b"before\n"
    os.close(read_end)
    with pytest.raises(BrokenPipeError):  # what the unguarded stream does
        raw.write("x\n")
        raw.flush()
    stream.write("after\n")  # the guard: no error, the descriptor now goes nowhere
    stream.flush()
    assert stream.lost and os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
    assert stream.isatty() is False and stream.fileno() == write_end  # everything else is the stream's
    raw.close()
    with pytest.raises(ValueError):  # closed by its owner, not a lost reader: not hidden
        GuardedStream(raw).write("x")


def test_a_run_goes_on_when_its_console_pipe_breaks(tmp_path):
    """`pruneflow ... | tee run.txt` and the tee is killed (a Slurm job step, a dropped SSH
    session): the run finishes as if nothing happened, and its log says what was lost.
    Unguarded, the first progress-bar write raised BrokenPipeError: exit code 1, nothing
    in the log, the stage's progress since the last checkpoint gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pruneflow.cli", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout.read(1)  # the run has started writing
    proc.stdout.close()  # the reader goes away
    assert proc.wait(timeout=600) == 0
    assert read_result(tmp_path / "run")["sparsity"]["measured"] > 0
    log = (tmp_path / "run" / "pruneflow.log").read_text()
    assert log.count("The console's reader went away (broken pipe)") == 1 and "recover:" in log


def test_a_damaged_checkpoints_message_does_not_repeat_torchs_advice_to_load_it_unsafely(tmp_path):
    import torch

    from pruneflow.errors import load_error_text

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x80\x02" + bytes(range(256)) * 8)  # a pickle header, then nonsense
    with pytest.raises(pickle.UnpicklingError, match="weights_only") as info:
        torch.load(bad, weights_only=True)
    text = load_error_text(info.value)
    assert text.startswith("not a weights-only checkpoint") and "weights_only" not in text and "\n" not in text
    assert load_error_text(ValueError("first\nsecond")) == "first"


def test_flipped_bits_in_a_checkpoints_weights_are_named(tmp_path):
    """Before: torch.load read the changed weights without a word; the resumed run diverged
    and its message blamed the learning rate."""
    import zipfile

    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_cli(args, cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"}).returncode == -9
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with zipfile.ZipFile(last) as z:
        record = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(last.read_bytes())
    data[record.header_offset + 30 + len(record.filename) + len(record.extra) + 100] ^= 0x40  # one exponent bit of a weight
    last.write_bytes(bytes(data))
    out = run_cli(args, cwd=tmp_path)
    said = " ".join(out.stderr.split())
    assert out.returncode == 2 and "last.pt cannot be read" in said and "fails the CRC-32 check" in said, said[-2000:]
    assert "Traceback" not in said


def test_truncated_checkpoint_is_named_and_a_truncated_cache_entry_is_recomputed(tmp_path):
    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"cache_dir={tmp_path / 'c'}"]
    run_dir = tmp_path / "run"
    killed = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env={"PRUNEFLOW_TEST_KILL_AT": "prune:6"})
    assert killed.returncode == -9
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    out = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    said = " ".join(out.stderr.split())  # the message is wrapped to the terminal: where depends on the path's length
    assert out.returncode == 2 and "last.pt cannot be read" in said and "overwrite=true" in said and "Traceback" not in said
    last.unlink()  # deleted: the finetune stage's recorded metrics have no weights to resume from
    out = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    said = " ".join(out.stderr.split())
    assert out.returncode == 2 and "last.pt is missing" in said and "finetune" in said and "Traceback" not in said
    assert " ".join((out.stdout + out.stderr).split()).count("last.pt is missing") == 1  # one paragraph, no log line
    assert "last.pt is missing" in (run_dir / "pruneflow.log").read_text()
    # the finetune cache entry written by that run, truncated: moved aside, computed again
    entry = next((tmp_path / "c" / "finetune").glob("*/model.safetensors"))
    entry.write_bytes(entry.read_bytes()[:500])
    again = run_cli([*args, f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (tmp_path / "run2" / "pruneflow.log").read_text()
    assert "is damaged" in log and "Cached finetune" in log
    assert list((tmp_path / "c" / "finetune").glob("*.corrupt-*"))


def test_results_are_saved_when_the_model_cannot_be(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model").write_text("a file where the model folder should go")
    out = run_cli([*SMALL, "method=magnitude", "sparsity=0.5", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = read_result(run_dir)
    assert "model/" in result["output_errors"] and result["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-4)
    assert (run_dir / "predictions.jsonl").exists()


def test_divergence_is_logged_and_can_resume_with_a_lower_lr(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "method=magnitude", "sparsity=0.5", f"hydra.run.dir={run_dir}", "cache=false"]
    out = run_cli([*args, "stages.finetune.lr=1e30"], cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "The training loss became" in (run_dir / "pruneflow.log").read_text()
    again = run_cli([*args, "stages.finetune.lr=1e-3", "allow_config_change=true"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    # in the default folder (a new one per command) the message names it, and the command with it goes on there
    plain = [a for a in args if not a.startswith("hydra.run.dir=")]
    out = run_cli([*plain, "stages.finetune.lr=1e30"], cwd=tmp_path)
    (default_dir,) = (tmp_path / "outputs").glob("*/*")
    said = " ".join(out.stderr.split())
    assert out.returncode == 2 and f"The same command means with hydra.run.dir={default_dir.resolve()} added" in said, said[-1500:]
    again = run_cli([*plain, "stages.finetune.lr=1e-3", "allow_config_change=true", f"hydra.run.dir={default_dir.resolve()}"], cwd=tmp_path)
    assert again.returncode == 0 and (default_dir / "result.json").exists(), again.stderr[-2000:]


# ----------------------------------------------------------------------------- untrusted files
def test_a_crafted_cifar_pickle_cannot_run_code(tmp_path):
    from pruneflow.errors import UserError
    from pruneflow.tasks.cifar import load_batch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (shutil.copyfile, (__file__, str(marker)))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="not a plain CIFAR batch file"):
        load_batch(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the same file, unrestricted, does run its code:
    assert marker.exists()  # so the check above is a real one


def test_a_crafted_cifar_meta_file_cannot_run_code(tmp_path):
    """The meta file (class names) is a pickle too: a task.path whose batch files are plain
    but whose meta file is crafted is refused before the pickle runs anything."""
    from task_data import write_cifar

    from pruneflow.errors import UserError
    from pruneflow.tasks.cifar import Cifar

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (shutil.copyfile, (__file__, str(marker)))

    folder = write_cifar(tmp_path / "c10", 10, n_per_batch=4, n_test=6)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}, protocol=2))
    task = Cifar(OmegaConf.create({"name": "cifar10", "path": str(folder)}))
    with pytest.raises(UserError, match="not a plain CIFAR batch file"):
        task.load()
    assert not marker.exists()
    (folder / "batches.meta").write_bytes(pickle.dumps(3))  # plain, but no meta dict
    with pytest.raises(UserError, match="not a CIFAR meta file"):
        task.load()


def test_offline_wandb_makes_no_network_request(tmp_path):
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace.txt"
    tiny = [o for o in SMALL if not o.startswith(("stages.", "logger="))] + [
        "stages.finetune.epochs=null", "stages.finetune.steps=2", "stages.prune.epochs=null", "stages.prune.steps=2",
        "stages.recover.epochs=null", "stages.recover.steps=1"]
    # --seccomp-bpf stops only at connect(): without it every syscall is traced (3x slower)
    seccomp = ["--seccomp-bpf"] if subprocess.run(["strace", "--seccomp-bpf", "-f", "-o", "/dev/null", "true"],
                                                  capture_output=True).returncode == 0 else []
    cmd = ["strace", *seccomp, "-f", "-e", "trace=connect", "-o", str(trace), sys.executable, "-m", "pruneflow.cli", *tiny,
           "method=magnitude", "sparsity=0.5", "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}", "cache=false"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-rn", *cmd]  # no network at all, as offline should need
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    inet = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
    assert not inet, inet[:5]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_added_keys_are_found_outside_pass_through_mappings_and_descriptions():
    from pruneflow.validation import added_keys

    theirs = {"seed": 0, "model.kwargs.img_size": 8, "model.config_overrides": {}, "task.path": None,
              "stages.finetune.lr": 1e-3, "stages.finetune.epochs": 3}
    fine = {"model.kwargs.drop_rate": 0.1, "model.config_overrides.classifier_dropout": 0.0, "task.path.train": "a.csv",
            "stages.finetune": None, "experiment_info.name": "x", "hydra.run.dir": "out"}
    assert added_keys({**theirs, **fine}, theirs) == []
    assert added_keys({**theirs, "foo": 1, "stages.finetune.lrr": 1, "model.kwarg.x": 1}, theirs) == [
        "foo", "stages.finetune.lrr", "model.kwarg.x"]


def test_a_setting_the_run_ignores_is_refused_unless_it_says_not_used():
    """null and 0 say "not used"; false is a value (a switch the run would ignore), and a
    group's option is named as chosen (schedule=linear); a longer key is another setting."""
    from pruneflow.errors import UserError
    from pruneflow.validation import check_unused

    cfg = OmegaConf.create({})
    check_unused(cfg, [("distill", "off")], {"distill.temperature": None, "distill.alpha": 0, "distiller.x": 1, "seed": 3})
    with pytest.raises(UserError, match=r"^'distill.hard=false' would be ignored: off\. Remove it"):
        check_unused(cfg, [("distill", "off")], {"distill.hard": False})
    check_unused(cfg, [("speed", "not measured")], {"speed.enabled": False})  # switching a section off (an LM run's speed)
    with pytest.raises(UserError, match=r"^'speed.enabled=true' would be ignored"):
        check_unused(cfg, [("speed", "not measured")], {"speed.enabled": True})
    with pytest.raises(UserError, match=r"^'schedule=linear' would be ignored: no schedule"):
        check_unused(cfg, [("schedule", "no schedule")], {"schedule.name": "linear"})
    with pytest.raises(UserError, match=r"^'stages.prune.epochs=4' would be ignored"):  # as typed, not 4.0
        check_unused(cfg, [("stages.prune", "dense")], {"stages.prune.epochs": 4.0}, ["stages.prune.epochs=4"])


def test_hub_warnings_print_once_through_the_root_handlers():
    """Offline, huggingface_hub's ~15 retry warnings each printed twice: once by its own
    stderr handler, once by the root's (Hydra's console and pruneflow.log)."""
    import io
    import logging

    import huggingface_hub.utils.logging  # noqa: F401 - the library's own handler, as a run imports it

    from pruneflow.console import hub_logs_through_root

    hub, root = logging.getLogger("huggingface_hub"), logging.getLogger()
    own = list(hub.handlers)
    assert any(type(h) is logging.StreamHandler for h in own)
    lines = io.StringIO()
    mine = logging.StreamHandler(lines)
    saved = root.handlers[:]
    root.handlers = [mine]  # as Hydra's job logging sets the root up
    try:
        hub_logs_through_root()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        assert lines.getvalue() == "Retrying in 1s [Retry 1/5].\n"
        assert not any(type(h) is logging.StreamHandler for h in hub.handlers)
    finally:
        root.handlers = saved
        for h in own:
            if h not in hub.handlers:
                hub.addHandler(h)
