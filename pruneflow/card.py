"""The model card (``model/README.md``, the Hub's format) of a pruneflow run.

YAML metadata (library, base model, task, dataset, metrics as a ``model-index``, the
``pruneflow`` tag, sparsity) and a body: the method and its settings, sparsity per
layer type, metrics per stage with the dense baseline, and how the model was made.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import yaml


def layer_type(name: str) -> str:
    """A per-layer weight name with the block index wildcarded: its type."""
    return re.sub(r"\.\d+\.", ".*.", name)


def sparsity_by_type(per_layer: dict[str, float], shapes: dict[str, int] | None = None) -> list[tuple[str, float, int]]:
    """(layer type, sparsity, layers) averaged over the layers of each type (equal sizes within a type)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, s in per_layer.items():
        groups[layer_type(name)].append(float(s))
    return [(t, sum(v) / len(v), len(v)) for t, v in groups.items()]


def _pipeline(result: dict[str, Any]) -> str:
    task = str(result.get("task", ""))
    if task.startswith("squad/"):
        return "question-answering"
    if task.startswith("glue/"):
        return "text-classification"
    if task.startswith("lm/"):
        return "text-generation"
    return "image-classification"


def _value(name: str, v: Any) -> str:  # noqa: ANN401
    """Accuracy-like metrics as percentages; perplexity and losses as they are."""
    if "perplexity" in name or "loss" in name:
        return f"{float(v):.2f}"
    return f"{100 * float(v):.2f}"


def metadata(result: dict[str, Any]) -> dict[str, Any]:
    cfg = result.get("config") or {}
    model, task = cfg.get("model") or {}, cfg.get("task") or {}
    final = (result.get("metrics") or {}).get("final") or {}
    meta: dict[str, Any] = {
        "library_name": "timm" if model.get("family") == "timm" else "transformers",
        "tags": ["pruneflow", "pruning", "sparse", str(result.get("method"))],
        "pipeline_tag": _pipeline(result),
    }
    base = model.get("hub_id") if model.get("pretrained", True) and not model.get("path") else None
    if base:
        meta["base_model"] = base
    if task.get("hub_id") and not task.get("path"):
        meta["datasets"] = [task["hub_id"]]
    meta["metrics"] = list(final)
    sp = result.get("sparsity") or {}
    meta["pruneflow"] = {"method": result.get("method"), "sparsity": sp.get("measured"), "target_sparsity": sp.get("target")}
    meta["model-index"] = [{
        "name": f"{result.get('model')}-{str(result.get('task')).replace('/', '-')}-{result.get('method')}-{sp.get('measured')}",
        "results": [{
            "task": {"type": _pipeline(result)},
            "dataset": {"name": str(result.get("task")), "type": task.get("hub_id") or str(result.get("task")),
                        **({"config": task["subtask"]} if task.get("subtask") else {})},
            "metrics": [{"type": k, "value": round(float(v), 6)} for k, v in final.items()],
        }],
    }]
    return meta


def model_card(result: dict[str, Any]) -> str:
    cfg = result.get("config") or {}
    sp = result.get("sparsity") or {}
    params = result.get("params") or {}
    metrics = result.get("metrics") or {}
    method_cfg = {k: v for k, v in (cfg.get("method") or {}).items() if k != "name"}
    prov = result.get("provenance") or {}
    causal = (cfg.get("model") or {}).get("family") == "causal_lm"
    load = ("import pruneflow\nmodel = pruneflow.load_model(\"<this folder>\")" if params.get("compressed_total")
            else "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"<this folder>\")" if causal
            else ("from transformers import AutoModel\nmodel = AutoModel.from_pretrained(\"<this folder>\")"
                  if (cfg.get("model") or {}).get("family") != "timm" else "import pruneflow\nmodel = pruneflow.load_model(\"<this folder>\")"))
    lines = [
        "---", yaml.safe_dump(metadata(result), sort_keys=False).rstrip(), "---", "",
        f"# {result.get('model')} on {result.get('task')}, pruned with {result.get('method')}", "",
        f"Made with pruneflow: {result.get('method')} at a measured sparsity of "
        f"{100 * float(sp.get('measured') or 0):.2f} % of the prunable weights "
        f"({params.get('nonzero')} non-zero of {params.get('total')} parameters"
        + (f"; physically compressed to {params['compressed_total']} parameters" if params.get("compressed_total") else "") + ").", "",
        "## Method", "", f"`method={result.get('method')}` with:", "", "```yaml", yaml.safe_dump(method_cfg, sort_keys=True).rstrip(), "```", "",
        "## Sparsity per layer type", "", "| layer type | layers | sparsity % |", "|---|---|---|",
    ]
    lines += [f"| `{t}` | {n} | {100 * s:.2f} |" for t, s, n in sparsity_by_type(sp.get("per_layer") or {})]
    lines += ["", f"Overall (all parameters): {100 * float(sp.get('overall') or 0):.2f} %.", "", "## Metrics", ""]
    names = list(metrics.get("final") or {})
    lines += ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    labels = {"dense": "dense (before pruning)", "finetune": "dense (after fine-tuning)", "prune": "after pruning",
              "recover": "after recovery", "final": "**final**"}
    for stage, label in labels.items():
        if stage in metrics:
            lines.append(f"| {label} | " + " | ".join(_value(k, metrics[stage].get(k, float("nan"))) for k in names) + " |")
    if "finetune" not in metrics and "dense" not in metrics:
        lines += ["", "No dense fine-tuning stage ran in this run: the dense baseline is not measured here."]
    lines += [
        "", "## How it was made", "",
        "```bash", "pruneflow " + " ".join(result.get("overrides") or []), "```", "",
        f"pruneflow {((prov.get('versions') or {}).get('pruneflow'))}, git {prov.get('git_sha')}, torch {((prov.get('versions') or {}).get('torch'))}, "
        f"transformers {((prov.get('versions') or {}).get('transformers'))}; device {prov.get('device')}. The full resolved configuration is in "
        "`result.json` of the run.", "",
        "## Load", "", "```python", load, "```", "",
    ]
    return "\n".join(lines)
