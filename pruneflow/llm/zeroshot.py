"""Zero-shot accuracy of an in-memory causal LM through lm-evaluation-harness (``lm-eval``).

The model is handed to lm-eval's ``HFLM`` as an object, so a model pruned in memory is scored
as it is, without saving it and reloading it from a hub id.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any

from pruneflow import hub
from pruneflow.errors import UserError, invalid

# The zero-shot suite of Wanda and SparseGPT (lm-eval task names).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")

INSTALL_HINT = "pip install 'pruneflow[llm]' (or: pip install 'lm-eval>=0.4')"


def _import_lm_eval() -> tuple[Any, Any, Any, str]:
    """Import lm-eval lazily: it is an optional dependency and slow to import."""
    try:
        from importlib.metadata import version

        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"zero-shot evaluation needs lm-eval: {INSTALL_HINT}. Import failed: {e}") from e
    return lm_eval, HFLM, TaskManager, version("lm_eval")


def _float(x: Any) -> float | None:
    """lm-eval writes "N/A" for a stderr it could not compute (e.g. one example)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _metric(entry: dict[str, Any], name: str) -> Any:
    """Results are keyed "<metric>,<filter>"; multiple-choice tasks use the "none" filter."""
    if f"{name},none" in entry:
        return entry[f"{name},none"]
    for key, value in entry.items():
        if key.split(",", 1)[0] == name:
            return value
    return None


@functools.lru_cache(maxsize=8)
def check_tasks(tasks: tuple[str, ...], include_path: str | None = None) -> Any:  # noqa: ANN401
    """lm-eval's TaskManager once every name in ``tasks`` is known to it (a UserError naming
    ``task.zero_shot`` otherwise): run before any work, and for every job of a sweep (cached:
    indexing lm-eval's ~14k bundled YAMLs takes ~10 s)."""
    if not tasks:
        raise UserError("evaluate_zero_shot: no tasks given; e.g. task.zero_shot=[arc_easy]")
    _, _, TaskManager, lm_eval_version = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise invalid("task.zero_shot_include", include_path, "a folder of lm-eval task YAMLs, or null")
    task_manager = None
    if include_path is not None:
        # Skip indexing the bundled YAMLs when the user's folder has every task asked for
        # (its YAMLs may still `include:` bundled files by path).
        task_manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in task_manager.all_tasks and not Path(t).is_file() for t in tasks):
            task_manager = None
    if task_manager is None:
        task_manager = TaskManager(include_path=include_path)
    # lm-eval's own error for a wrong name is a bare KeyError deep in loading
    unknown = [t for t in tasks if t not in task_manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f" or in {include_path}" if include_path else " (task.zero_shot_include adds a folder of your own YAMLs)"
        raise invalid("task.zero_shot", list(tasks), f"lm-eval {lm_eval_version}'s task or group names, or task YAML paths",
                      f"Unknown: {unknown}, not among its tasks{where}. Wanda's and SparseGPT's suite: {list(PAPER_TASKS)}.")
    return task_manager


def evaluate_zero_shot(model: Any, tokenizer: Any, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                       include_path: str | None = None, device: str | None = "cpu", seed: int = 0,
                       offline: bool | None = None) -> dict[str, Any]:
    """Zero-shot (num_fewshot=0) lm-eval accuracy of an already-loaded transformers causal LM.

    ``tasks`` are lm-eval task/group names (see PAPER_TASKS) or YAML paths; ``include_path`` is a
    folder of extra task YAMLs (e.g. on local jsonl files). ``limit`` caps the examples per task.
    The model is moved to ``device`` (unless it is spread over devices with a device_map, or
    ``device`` is None). With ``offline`` no Hub request is made: hub datasets must already be
    in the datasets cache; None (default) follows ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``,
    so on a machine with network the tasks' datasets are downloaded on first use.

    Returns ``{"harness": {"name", "version"}, "tasks": {name: {"acc", "acc_norm", "acc_stderr",
    "acc_norm_stderr", "n"}}, "average": {"acc", "acc_norm"}}``; acc_norm is None when the task
    does not report it. Groups (e.g. ``mmlu``) appear with their aggregate and their subtasks;
    the average is over the names asked for.
    """
    lm_eval, HFLM, _, lm_eval_version = _import_lm_eval()
    if offline is None:
        offline = hub.is_offline()
    task_manager = check_tasks(tuple(tasks), include_path)
    with hub.offline() if offline else contextlib.nullcontext():
        if device is not None and not getattr(model, "hf_device_map", None):
            model.to(device)
        was_training = model.training
        # HFLM takes the device from the model object; it calls model.eval() (restored below).
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=task_manager,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
        except ConnectionError as e:  # datasets' and huggingface_hub's offline errors subclass it
            raise UserError(
                f"zero-shot tasks {list(tasks)} need a dataset that is not available offline ({e}). "
                "Download it once into the datasets cache on a machine with network, or point "
                "task.zero_shot_include at task YAMLs on local files.") from e
        finally:
            model.train(was_training)

    if out is None:  # not rank 0 of a distributed run
        return {"harness": {"name": "lm-eval", "version": lm_eval_version}, "tasks": {}, "average": {}}
    n_samples = out.get("n-samples", {})
    per_task: dict[str, dict[str, Any]] = {}
    for name, entry in out["results"].items():
        acc = _float(_metric(entry, "acc"))
        if acc is None:
            continue  # e.g. a generation task: no accuracy to report here
        n = n_samples.get(name, {}).get("effective")
        if n is None and name in out.get("groups", {}):  # a group: its subtasks' examples
            n = sum(n_samples.get(t, {}).get("effective", 0) for t in out.get("group_subtasks", {}).get(name, []))
        per_task[name] = {
            "acc": acc,
            "acc_norm": _float(_metric(entry, "acc_norm")),
            "acc_stderr": _float(_metric(entry, "acc_stderr")),
            "acc_norm_stderr": _float(_metric(entry, "acc_norm_stderr")),
            "n": n,
        }
    asked = [t for t in tasks if t in per_task] or list(per_task)
    average: dict[str, float | None] = {"acc": sum(per_task[t]["acc"] for t in asked) / len(asked) if asked else None}
    norms = [per_task[t]["acc_norm"] for t in asked]
    average["acc_norm"] = sum(norms) / len(norms) if norms and None not in norms else None
    return {"harness": {"name": "lm-eval", "version": lm_eval_version}, "tasks": per_task, "average": average}
