"""``pruneflow-report DIR``: a sweep's result.json files as a table, a CSV, plots and
the reproduction ledger (``pruneflow.ledger``).

One row per configuration (experiment, method, model, task, target sparsity, N:M
pattern and any other override that differs between runs), mean ± std over seeds of
every metric of the task, the measured sparsity, parameter counts and time. Fractions
are shown x100, perplexity as it is (``pruneflow.published.metric_scale``). Rows of
``experiment=`` runs show the published number beside the measured one, with
the source (``experiment_info`` in the run's resolved config). Failed jobs
(``error.txt``) and unfinished ones are listed, not averaged in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import statistics
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneflow.config import resume_free
from pruneflow.ledger import experiment_model, ledger_entries, ledger_markdown, plot_figures
from pruneflow.published import (
    PublishedPoint,
    as_typed,
    find_point,
    lower_is_better,
    metric_digits,
    metric_label,
    metric_scale,
    published_points,
    same_sparsity,
)
from pruneflow.results import load_results
from pruneflow.stop import STOPPED_FILE
from pruneflow.utils import unwritable

# Overrides that are the row's own columns or do not change what a run computes. (model.path
# and task.path are settings: runs from other weights or other data are another configuration.)
ROW_COLUMNS = {"method", "method.pattern", "model", "task", "sparsity", "seed", "experiment"}
NOT_A_SETTING_PREFIXES = ("hydra.", "hydra/", "logger.", "speed.")
# |measured - target| above this marks a run that did not reach its target sparsity.
SPARSITY_TOLERANCE = 0.005


class ReportError(Exception):
    """A problem with the report's input, printed as one line without a traceback."""


# ----------------------------------------------------------------------------- collection
@dataclass
class Job:
    """A sweep job that has no usable result.json."""

    path: str
    overrides: str
    reason: str


@dataclass
class Row:
    """One configuration: its runs (one per seed) and their aggregates."""

    experiment: str
    method: str
    model: str
    task: str
    target: float | None
    settings: str
    pattern: str | None = None  # N:M of a semi-structured run (config.method.pattern); None: unstructured
    runs: list[dict[str, Any]] = field(default_factory=list)
    # earlier runs of a seed that ``runs`` already has (a sweep launched twice): one seed is
    # one sample, so they are listed, not averaged in
    repeats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.task, self.experiment, self.model, self.method, self.pattern or "", self.settings,
                self.target if self.target is not None else -1)

    @property
    def main_metric(self) -> str:
        return self.runs[0]["main_metric"]

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r.get("seed", 0)) for r in self.runs})

    def values(self, getter) -> list[float]:  # noqa: ANN001
        return [v for v in (finite_value(r, getter) for r in self.runs) if v is not None]

    def metric_names(self) -> list[str]:
        names: list[str] = [self.main_metric]
        for r in self.runs:
            for k in r["metrics"]["final"]:
                if k not in names:
                    names.append(k)
        return names

    def stat(self, getter) -> tuple[float | None, float | None, int]:  # noqa: ANN001
        return mean_std(self.values(getter))

    def experiment_info(self) -> dict[str, Any] | None:
        return (self.runs[0].get("config") or {}).get("experiment_info")


def best_eval(run: dict[str, Any], metric: str) -> Any:  # noqa: ANN401
    """The best evaluation of the run's last stage at its final sparsity (``trainer.eval_every``)."""
    return run["eval_history"]["best"]["metrics"][metric]


def finite_value(run: dict[str, Any], getter) -> float | None:  # noqa: ANN001
    """``getter(run)`` if it is a finite number, else None (missing, null, NaN)."""
    try:
        v = getter(run)
    except (KeyError, TypeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return None, None, 0
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std, len(values)


def _override_items(overrides: list[str]) -> list[tuple[str, str]]:
    items = []
    for o in overrides or []:
        if "=" not in o:
            continue
        key, value = o.split("=", 1)
        items.append((key.lstrip("+~"), value))
    return items


def _config_value(config: dict[str, Any], key: str) -> Any:  # noqa: ANN401
    """The resolved config's value at a dotted key (KeyError if there is none)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _canonical(value: Any) -> str | None:  # noqa: ANN401
    """One spelling per value (``true``/``True``, ``1e-3``/``0.001``, ``3``/``3.0``); None for a section."""
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # a float-typed setting (stages.*.epochs) typed as 3 resolves to 3.0: shown as typed
    if isinstance(value, (bool, int, float, str)):
        return as_typed(value)
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return None


def settings_of(result: dict[str, Any]) -> str:
    """Overrides that distinguish configurations beyond the row's named columns, each
    with the value the run resolved (a single run keeps ``true`` as typed, a sweep's job
    ``True``: one configuration)."""
    keep = []
    config = result.get("config") or {}
    free = resume_free(config)
    for key, value in _override_items(result.get("overrides", [])):
        if key in ROW_COLUMNS or key in free or key.startswith(NOT_A_SETTING_PREFIXES):
            continue
        try:
            resolved = _canonical(_config_value(config, key))
        except KeyError:  # a group's option (schedule=linear) or an older result without its config
            resolved = None
        keep.append(f"{key}={resolved if resolved is not None else value.replace(chr(92) + ':', ':')}")  # Hydra's sweep escapes ':' (2\:4)
    return " ".join(sorted(keep))


def pattern_of(result: dict[str, Any]) -> str | None:
    """The run's N:M pattern ("2:4"), None for unstructured: from the resolved config, so
    runs that set it in an experiment or through the API are told apart as well."""
    method = (result.get("config") or {}).get("method")
    pattern = method.get("pattern") if isinstance(method, dict) else None
    if pattern is None:
        pattern = (result.get("sparsity") or {}).get("pattern")
    return None if pattern is None else str(pattern)


def dense_baseline(run: dict[str, Any], metric: str) -> float:
    """The unpruned model's metric: after the finetune stage, or for causal LMs (which
    have no finetune stage) the evaluation before pruning, ``metrics.dense``."""
    for stage in ("finetune", "dense"):
        value = (run["metrics"].get(stage) or {}).get(metric)
        if value is not None:
            return value
    raise KeyError(metric)


def has_dense_stage(rows: list[Row], metric: str) -> bool:
    """Whether runs carry their own dense evaluation (after the finetune stage, or a causal
    LM's before pruning): the table shows it beside each row, and the plot draws it when
    no ``method=dense`` row is there to compare with."""
    return any(metric in (r["metrics"].get(stage) or {}) for row in rows for r in row.runs for stage in ("finetune", "dense"))


def experiment_name(result: dict[str, Any]) -> str:
    info = (result.get("config") or {}).get("experiment_info") or {}
    if info.get("name"):
        return str(info["name"])
    for key, value in _override_items(result.get("overrides", [])):
        if key == "experiment":
            return value
    return ""


def group_results(results: list[dict[str, Any]]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for r in results:
        target = (r.get("sparsity") or {}).get("target")
        ident = (experiment_name(r), r["method"], r["model"], r["task"], target, settings_of(r), pattern_of(r))
        if ident not in rows:
            rows[ident] = Row(*ident)
        rows[ident].runs.append(r)
    for row in rows.values():  # the latest run of each seed
        latest: dict[int, dict[str, Any]] = {}
        for r in sorted(row.runs, key=lambda r: r.get("_mtime", 0.0)):
            seed = int(r.get("seed", 0))
            if seed in latest:
                row.repeats.append(latest[seed])
            latest[seed] = r
        row.runs = [r for r in row.runs if latest.get(int(r.get("seed", 0))) is r]
    return sorted(rows.values(), key=lambda row: row.key)


def _job_overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    try:
        import yaml

        return " ".join(str(o) for o in yaml.safe_load(path.read_text()) or [])
    except Exception:  # noqa: BLE001 - a listing, not worth failing the report for
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty error.txt)"


def _job_label(d: Path, root: Path) -> str:
    """A job's folder relative to the report's root; the root as given when the report is
    of one run's own folder (not '.')."""
    rel = d.relative_to(root)
    return str(root) if rel == Path(".") else str(rel)


def find_incomplete(root: Path, finished: set[str]) -> tuple[list[Job], list[Job]]:
    """(failed, unfinished) jobs under root: error.txt, or a Hydra job dir without result."""
    failed, unfinished = [], []
    seen: set[str] = set()
    for err in sorted(root.rglob("error.txt")):
        d = err.parent
        if str(d) in finished or ".cache" in d.parts:
            continue
        seen.add(str(d))
        failed.append(Job(_job_label(d, root), _job_overrides(d), _last_line(err.read_text(errors="replace"))))
    for hydra_dir in sorted(root.rglob(".hydra")):
        d = hydra_dir.parent
        if str(d) in finished or str(d) in seen or ".cache" in d.parts:
            continue
        result = d / "result.json"
        reason = "result.json is unreadable" if result.exists() else "no result.json (running, killed, or skipped)"
        if (d / "checkpoints" / "progress.json").exists() and not result.exists():
            try:
                done = list(json.loads((d / "checkpoints" / "progress.json").read_text())["done"])
                reason = f"no result.json; stages done: {', '.join(done) or 'none'} (resume with the same command)"
            except Exception:  # noqa: BLE001
                pass
        if (d / STOPPED_FILE).exists() and not result.exists():  # a signal stopped the run: it says where
            reason = _last_line((d / STOPPED_FILE).read_text(errors="replace"))
        seen.add(str(d))
        unfinished.append(Job(_job_label(d, root), _job_overrides(d), reason))
    for result in sorted(root.rglob("result.json")):  # outside a Hydra job folder too: never dropped silently
        d = result.parent
        if str(d) in finished or str(d) in seen or ".cache" in d.parts:
            continue
        unfinished.append(Job(_job_label(d, root), _job_overrides(d), "result.json is unreadable (damaged, or not a pruneflow result)"))
    return failed, unfinished


# ----------------------------------------------------------------------------- published numbers
def published_value(info: dict[str, Any] | None, task: str, metric: str, sparsity: float | None, method: str | None = None) -> float | None:
    """The published number for (method, task, metric) at a sparsity, from ``experiment_info``."""
    point = find_point(info, method, task, metric, sparsity) if method else _any_method_point(info, task, metric, sparsity)
    return None if point is None else point.value


def _any_method_point(info: dict[str, Any] | None, task: str, metric: str, sparsity: float | None) -> PublishedPoint | None:
    for p in published_points(info):
        if p.task == task and p.metric == metric and (p.sparsity is None or same_sparsity(p.sparsity, sparsity)):
            return p
    return None


# Methods whose sparsity follows from their settings (soft movement, L0) have no target:
# their runs match a published sparsity when the measured one is this close.
MEASURED_MATCH = 0.01


def row_sparsity(row: Row) -> float | None:
    """The sparsity a row is compared at: its target, or for methods without one the
    measured fraction removed (under the paper's definition where the experiment gives it)."""
    if row.target is not None:
        return row.target
    mean = row.stat(lambda r: r["sparsity"]["paper"]["removed"])[0]
    if mean is None:
        mean = row.stat(lambda r: r["sparsity"]["measured"])[0]
    if mean is None:
        return None
    info = row.experiment_info()
    grid = sorted({p.sparsity for p in published_points(info) if p.sparsity is not None}, key=lambda s: abs(s - mean))
    return grid[0] if grid and abs(grid[0] - mean) <= MEASURED_MATCH else mean


def row_point(row: Row, metric: str) -> PublishedPoint | None:
    """The published number a row of runs reproduces (method, task, sparsity and settings)."""
    return find_point(row.experiment_info(), row.method, row.task, metric, row_sparsity(row), row.runs[0].get("config") or {})


# ----------------------------------------------------------------------------- formatting
def fmt_pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None:
        return "–"
    s = f"{mean * scale:.{digits}f}"
    if std is not None:
        s += f" ± {std * scale:.{digits}f}"
    return s


def fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_stat(mean: float | None, std: float | None, metric: str) -> str:
    """mean ± std of a metric as the report shows it (x100 for fractions, perplexity as is)."""
    return fmt_pm(mean, std, scale=metric_scale(metric), digits=metric_digits(metric))


def fmt_counted(mean: float | None, std: float | None, n: int, runs: int, metric: str) -> str:
    """``fmt_stat`` with ``(k/n)`` when only k of the row's n runs have a finite value: an
    undefined metric (Pearson of a constant prediction, written as null) is left out of the
    mean, and the cell says so rather than passing the other runs' mean for all of them."""
    return fmt_stat(mean, std, metric) + (f" ({n}/{runs})" if n < runs else "")


def metric_header(metric: str) -> str:
    return f"{metric} ↓" if lower_is_better(metric) else metric


def fmt_target(t: float | None) -> str:
    return "–" if t is None else f"{t:g}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


class Sources:
    """Numbered citations for published values."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, info: dict[str, Any]) -> int:
        source = str(info.get("source") or info.get("name") or "unknown source")
        if source not in self.items:
            self.items.append(source)
        return self.items.index(source) + 1


# ----------------------------------------------------------------------------- outputs
def task_metrics(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for m in row.metric_names():
            if m not in names:
                names.append(m)
    return names


def markdown(rows: list[Row], failed: list[Job], unfinished: list[Job], root: Path, plots: dict[str, str], figures: list[Path] | None = None) -> str:
    sources = Sources()
    out = [f"# pruneflow report: `{root}`", ""]
    n_runs = sum(len(r.runs) for r in rows)
    out.append(
        f"{n_runs} finished run(s) in {len(rows)} configuration(s); {len(failed)} failed, {len(unfinished)} unfinished. "
        "Metrics ×100 (perplexity as is; ↓: lower is better), mean ± std over seeds (sample std; none for one seed). Sparsity in %; "
        "`!` marks a measured sparsity more than 0.5 points from its target. Time: wall time from the first "
        "stage to the result (`time_s.total`: start-up, data and model loading left out; a finetune stage reused "
        "from the cache counts as ~0 s)."
    )
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    for task, task_rows in by_task.items():
        out += ["", f"## {task}", ""]
        metrics = task_metrics(task_rows)
        main = task_rows[0].main_metric
        show_exp = any(r.experiment for r in task_rows)
        common = set.intersection(*(set(r.settings.split()) for r in task_rows))
        if common:
            out += [f"Overrides common to every row: `{' '.join(sorted(common))}`", ""]
        differing = {id(r): " ".join(t for t in r.settings.split() if t not in common) for r in task_rows}
        show_settings = any(differing.values())
        has_pub = {m: any(row_point(r, m) is not None for r in task_rows) for m in metrics}
        show_compressed = any(r.stat(lambda x: x["params"]["compressed_total"])[0] is not None for r in task_rows)
        show_pattern = any(r.pattern for r in task_rows)
        show_dense = has_dense_stage(task_rows, main)
        show_best = any(r.values(lambda x, m=main: best_eval(x, m)) for r in task_rows)
        if show_best:
            out += [f"{main} (best eval): the best of the evaluations during the last stage at its final sparsity "
                    "(`trainer.eval_every`, `eval_history.jsonl`), for comparison with papers that report one; the "
                    f"{main} column is the final model's. (k/n): only k of the row's n runs evaluated during training.", ""]
        if any(row.stat(lambda r, m=m: r["metrics"]["final"][m])[2] < len(row.runs) for row in task_rows for m in metrics):
            out += ["(k/n) beside a metric: only k of the row's n runs have a value for it. An undefined metric (e.g. "
                    "Pearson or Spearman of a constant prediction, `null` in result.json) is left out of the mean.", ""]
        header = (["experiment"] if show_exp else []) + ["method", "model"] + (["pattern"] if show_pattern else [])
        header += (["settings"] if show_settings else []) + ["target %", "seeds"]
        for m in metrics:
            header.append(f"**{metric_header(m)}**" if m == main else metric_header(m))
            if has_pub[m]:
                header.append(f"{m} (published)")
            if m == main and show_dense:
                header.append(f"{m} (dense)")
            if m == main and show_best:
                header.append(f"{m} (best eval)")
        header += ["measured sparsity %", "nonzero params"] + (["compressed params"] if show_compressed else []) + ["time (s)"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        for row in task_rows:
            info = row.experiment_info()
            cells = ([row.experiment or "–"] if show_exp else []) + [row.method, row.model]
            if show_pattern:
                cells.append(row.pattern or "unstructured")
            if show_settings:
                cells.append(_md_escape(differing[id(row)]) or "–")
            cells += ["–" if row.target is None else f"{row.target * 100:g}", f"{len(row.runs)} ({','.join(map(str, row.seeds))})"]
            for m in metrics:
                cells.append(fmt_counted(*row.stat(lambda r, m=m: r["metrics"]["final"][m]), len(row.runs), m))
                if has_pub[m]:
                    pt = row_point(row, m)
                    cells.append("–" if pt is None else f"{pt.label()} [{sources.ref(info)}]")
                if m == main and show_dense:
                    mean, std, n = row.stat(lambda r, m=m: dense_baseline(r, m))
                    cells.append(fmt_counted(mean, std, n, len(row.runs) if n else 0, m))  # none: no finetune stage
                if m == main and show_best:
                    mean, std, n = row.stat(lambda r, m=m: best_eval(r, m))
                    cells.append(fmt_stat(mean, std, m) + (f" ({n}/{len(row.runs)})" if 0 < n < len(row.runs) else ""))
            sp_mean, sp_std, _ = row.stat(lambda r: r["sparsity"]["measured"])
            flag = " !" if sp_mean is not None and row.target is not None and abs(sp_mean - row.target) > SPARSITY_TOLERANCE else ""
            cells.append(fmt_pm(sp_mean, sp_std, digits=2) + flag)
            cells.append(fmt_count(row.stat(lambda r: r["params"]["nonzero"])[0]))
            if show_compressed:
                cells.append(fmt_count(row.stat(lambda r: r["params"]["compressed_total"])[0]))
            t_mean, t_std, _ = row.stat(lambda r: r["time_s"]["total"])
            cells.append(fmt_pm(t_mean, t_std, scale=1.0, digits=0))
            out.append("| " + " | ".join(cells) + " |")
        plot = plots.get(task)
        if plot:
            out += ["", f"![{task}: {main} vs sparsity]({plot})"]
    out += overall_section(rows, sources)
    entries = ledger_entries(rows)
    out += ledger_markdown(entries, sources.ref)
    for p in figures or []:  # a blank line first: a line right after a table is read as one more row
        out += ["", f"![{p.stem}]({p.name})"]
    experiments: dict[str, dict[str, Any]] = sweep_experiments(root)
    for r in rows:
        if r.experiment and r.experiment_info():
            experiments.setdefault(r.experiment, r.experiment_info())
    if sources.items:
        out += ["", "## Sources of published numbers", ""]
        out += [f"[{i}] {s}" + "  " for i, s in enumerate(sources.items, 1)]
    if experiments:
        out += ["", "## Experiments", ""]
        for name, info in experiments.items():
            line = f"- `{name}`: {info.get('source') or 'no source given'}"
            if info.get("note"):
                line += f". Note: {info['note']}"
            out.append(line)
        out += deviations_section(experiments, rows)
    repeats = [(row, r) for row in rows for r in row.repeats]
    if repeats:
        out += ["", "## Repeated runs (not in the table)", "",
                "Earlier runs of a configuration and seed that a later run repeats: one seed counts once, "
                "so the table uses the latest run of each seed.", "",
                "| job | overrides | repeated by |", "|---|---|---|"]
        for row, r in repeats:
            later = next(x for x in row.runs if int(x.get("seed", 0)) == int(r.get("seed", 0)))
            out.append(f"| `{_rel(r, root)}` | {_md_escape(' '.join(r.get('overrides') or [])) or '–'} | `{_rel(later, root)}` |")
    for title, jobs in (("Failed runs (not in the table)", failed), ("Unfinished runs (not in the table)", unfinished)):
        if jobs:
            out += ["", f"## {title}", "", "| job | overrides | reason |", "|---|---|---|"]
            out += [f"| `{j.path}` | {_md_escape(j.overrides) or '–'} | {_md_escape(j.reason)} |" for j in jobs]
    return "\n".join(out) + "\n"


def _rel(result: dict[str, Any], root: Path) -> str:
    path = Path(result.get("_path", ""))
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def sweep_experiments(root: Path) -> dict[str, dict[str, Any]]:
    """The experiment a sweep was launched with (``multirun.yaml``, Hydra's record of the
    launch). A paper table's jobs each carry a row's experiment (``experiment=...`` in
    the row), so the table's own source and deviations (e.g. a penalty grid instead of
    the authors' per-run choice) are in no job's result.json. Earlier launches into the
    same folder left ``multirun.<time>.yaml``; for one experiment the latest record wins."""
    from omegaconf import OmegaConf

    records = sorted(root.rglob("multirun*.yaml"), key=lambda p: p.name, reverse=True)  # newest moved-aside first
    records.sort(key=lambda p: (str(p.parent), p.name != "multirun.yaml"))  # stable: the current record leads
    found: dict[str, dict[str, Any]] = {}
    for path in records:
        if ".cache" in path.parts:
            continue
        try:
            info = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("experiment_info")  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a damaged record: the jobs' own experiments still show
            continue
        if isinstance(info, dict) and info.get("name"):
            found.setdefault(str(info["name"]), info)
    return found


def deviations_section(experiments: dict[str, dict[str, Any]], rows: list[Row] = ()) -> list[str]:  # type: ignore[assignment]
    """Each experiment's ``experiment_info.deviations``: where the run differs from what
    the authors ran, and the setting that restores their behaviour (if any). The table
    describes the experiment as shipped; its runs' own overrides are listed under it,
    since they take precedence over what the table says."""
    out: list[str] = []
    for name, info in experiments.items():
        devs = info.get("deviations") or []
        out += ["", f"### Deviations from the authors' setting: `{name}`", ""]
        overrides = sorted({o for row in rows if row.experiment == name for r in row.runs for o in (r.get("overrides") or [])
                            if not o.lstrip("+~").startswith(("experiment=", "seed="))})
        if overrides:
            out += [f"Its runs here also set `{' '.join(overrides)}`: where the table below speaks of one of these "
                    "settings, the run's own value holds, not the experiment's.", ""]
        if not devs:
            out.append("None recorded.")
            continue
        out += ["| what | the authors | this experiment (as shipped) | to restore theirs |", "|---|---|---|---|"]
        for d in devs:
            out.append("| " + " | ".join(_md_escape(str(d.get(k) or "–")) for k in ("what", "authors", "here", "restore")) + " |")
    return out


OVERALL_LABELS = {
    "glue_score": "GLUE score: mean over the GLUE tasks run of each task's main metric (×100)",
    "params_reduction": "parameter reduction: 1 − final / original parameters (%)",
}


def overall_values(rows: list[Row]) -> list[dict[str, Any]]:
    """Published overall numbers (``published_overall``) beside the measured counterpart.

    Rows of one experiment are combined across tasks when they share method, model,
    target sparsity and settings.
    """
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        info = row.experiment_info() or {}
        if info.get("published_overall"):
            groups[(row.experiment, row.method, row.model, row.target, row.settings, row.pattern)].append(row)
    out = []
    for (exp, method, model, target, settings, _pattern), members in groups.items():
        info = members[0].experiment_info()
        for key, published in info["published_overall"].items():
            measured, detail = None, ""
            if key == "glue_score":
                glue = [m for m in members if m.task.startswith("glue/")]
                means = [m.stat(lambda r: r["metrics"]["final"][r["main_metric"]])[0] for m in glue]
                means = [v for v in means if v is not None]
                measured = statistics.fmean(means) if means else None
                detail = f"{len(means)} of 8 GLUE tasks"
            elif key == "params_reduction":
                vals = [
                    1 - (r["params"]["compressed_total"] if r["params"].get("compressed_total") is not None else r["params"]["nonzero"]) / r["params"]["total"]
                    for m in members for r in m.runs
                ]
                measured = statistics.fmean(vals) if vals else None
                detail = f"{len(vals)} run(s)"
            out.append({"experiment": exp, "method": method, "model": model, "target": target, "settings": settings,
                        "key": key, "published": float(published), "measured": measured, "detail": detail, "info": info})
    return out


def overall_section(rows: list[Row], sources: Sources) -> list[str]:
    items = overall_values(rows)
    if not items:
        return []
    out = ["", "## Overall scores", "", "| experiment | method | model | target % | score | measured | published | over |", "|---|---|---|---|---|---|---|---|"]
    for it in items:
        label = OVERALL_LABELS.get(it["key"], it["key"])
        measured = "–" if it["measured"] is None else f"{it['measured'] * 100:.1f}"
        target = "–" if it["target"] is None else f"{it['target'] * 100:g}"
        out.append(
            f"| {it['experiment']} | {it['method']} | {it['model']} | {target} | {label} | {measured} | "
            f"{it['published'] * 100:.1f} [{sources.ref(it['info'])}] | {it['detail']} |"
        )
    return out


def write_csv(rows: list[Row], path: Path) -> None:
    metrics = task_metrics(rows)
    fields = ["experiment", "method", "model", "task", "pattern", "settings", "target_sparsity", "n_runs", "seeds", "main_metric", "main_mean", "main_std",
              "main_n", "main_dense_mean", "main_best_eval_mean", "main_best_eval_n"]
    for m in metrics:
        fields += [f"{m}_mean", f"{m}_std", f"{m}_n", f"{m}_published"]
    fields += [
        "measured_sparsity_mean", "measured_sparsity_std", "overall_sparsity_mean", "params_total", "params_nonzero_mean",
        "params_compressed_total_mean", "time_s_mean", "time_s_std", "published_source", "published_model", "run_dirs",
    ]

    def num(v: float | None) -> str:
        return "" if v is None else repr(round(v, 8))

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            info = row.experiment_info()
            main_mean, main_std, main_n = row.stat(lambda r: r["metrics"]["final"][r["main_metric"]])
            rec: dict[str, Any] = {
                "experiment": row.experiment, "method": row.method, "model": row.model, "task": row.task,
                "pattern": row.pattern or "", "settings": row.settings, "target_sparsity": "" if row.target is None else row.target,
                "n_runs": len(row.runs), "seeds": " ".join(map(str, row.seeds)), "main_metric": row.main_metric,
                "main_mean": num(main_mean), "main_std": num(main_std), "main_n": main_n,
                "main_dense_mean": num(row.stat(lambda r: dense_baseline(r, r["main_metric"]))[0]),
            }
            best_mean, _, best_n = row.stat(lambda r: best_eval(r, r["main_metric"]))
            rec.update(main_best_eval_mean=num(best_mean), main_best_eval_n=best_n)
            any_pub = False
            for m in metrics:
                mean, std, n = row.stat(lambda r, m=m: r["metrics"]["final"][m])
                pt = row_point(row, m)
                any_pub |= pt is not None
                rec.update({f"{m}_mean": num(mean), f"{m}_std": num(std), f"{m}_n": n, f"{m}_published": num(None if pt is None else pt.value)})
            rec.update(
                measured_sparsity_mean=num(row.stat(lambda r: r["sparsity"]["measured"])[0]),
                measured_sparsity_std=num(row.stat(lambda r: r["sparsity"]["measured"])[1]),
                overall_sparsity_mean=num(row.stat(lambda r: r["sparsity"]["overall"])[0]),
                params_total=num(row.stat(lambda r: r["params"]["total"])[0]),
                params_nonzero_mean=num(row.stat(lambda r: r["params"]["nonzero"])[0]),
                params_compressed_total_mean=num(row.stat(lambda r: r["params"]["compressed_total"])[0]),
                time_s_mean=num(row.stat(lambda r: r["time_s"]["total"])[0]),
                time_s_std=num(row.stat(lambda r: r["time_s"]["total"])[1]),
                published_source=str(info.get("source", "")) if info and any_pub else "",
                # the model the published numbers are of: another than `model` marks a stand-in run
                published_model=(experiment_model(row.experiment) or "") if any_pub else "",
                run_dirs=" ".join(r.get("_path", "") for r in row.runs),
            )
            w.writerow(rec)


def line_label(row: Row, rows: list[Row]) -> str:
    """The method, plus whatever else differs between the task's lines: pruned lines among
    themselves, dense lines among themselves (a dense run's stage settings differ from
    every pruned run's, which says nothing about either)."""
    parts = [row.method]
    rows = [r for r in rows if (r.method == "dense") == (row.method == "dense")]
    if len({r.pattern for r in rows}) > 1:
        parts.append(row.pattern or "unstructured")
    if len({r.model for r in rows}) > 1:
        parts.append(row.model)
    if len({r.experiment for r in rows}) > 1 and row.experiment:
        parts.append(row.experiment)
    common = set.intersection(*(set(r.settings.split()) for r in rows))
    differing = " ".join(t for t in row.settings.split() if t not in common)  # as the table's settings column
    if differing:
        parts.append(differing)
    return " · ".join(parts)


def dense_lines(rows: list[Row], metric: str) -> dict[str, tuple[float, float | None]]:
    """The plot's dense reference when no ``method=dense`` row is there: each run's own
    dense evaluation (after fine-tuning, or a causal LM's before pruning), one line per
    model, mean ± std over the dense models. Every row of a seed shares its fine-tuned
    model, so each (seed, value) counts once: a value per row would narrow the band."""
    out: dict[str, tuple[float, float | None]] = {}
    for model in sorted({r.model for r in rows}):
        values = ((int(x.get("seed", 0)), finite_value(x, lambda x: dense_baseline(x, metric))) for r in rows if r.model == model for x in r.runs)
        models = {(seed, v) for seed, v in values if v is not None}
        y, yerr, _ = mean_std([v for _, v in sorted(models)])
        if y is None:
            continue
        label = f"dense · {model}" if len({r.model for r in rows}) > 1 else "dense"
        n_seeds = len({seed for seed, _ in models})
        out[label + (f" · {len(models)} fine-tuned models" if len(models) > n_seeds else "")] = (y, yerr)
    return out


def plot_task(task: str, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0].main_metric
    k = metric_scale(metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    dense: dict[str, tuple[float, float | None]] = {}
    for row in rows:
        y, yerr, _ = row.stat(lambda r: r["metrics"]["final"][metric])
        x, _, _ = row.stat(lambda r: r["sparsity"]["measured"])
        if y is None or x is None:
            continue
        label = line_label(row, rows)
        if row.method == "dense":
            dense[label] = (y, yerr)
        else:
            lines[label].append((x * 100, y * k, (yerr or 0.0) * k))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_lines = len(lines)
    line_color = {label: colors[i % len(colors)] for i, label in enumerate(sorted(lines))}
    for i, (label, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        xs, ys, es = zip(*pts, strict=True)
        dodge = (i - (n_lines - 1) / 2) * 0.4  # keeps error bars at the same sparsity apart
        ax.errorbar([x + dodge for x in xs], ys, yerr=es, marker="o", capsize=3, label=label, color=colors[i % len(colors)])
    if not dense and has_dense_stage(rows, metric):
        dense = dense_lines(rows, metric)
    for label, (y, yerr) in dense.items():
        ax.axhline(y * k, color="gray", linestyle="--", linewidth=1, label=f"{label} ({fmt_stat(y, None, metric)})")
        if yerr:
            ax.axhspan((y - yerr) * k, (y + yerr) * k, color="gray", alpha=0.15)
    seen: set[tuple[str, str, str | None]] = set()
    for row in rows:  # published numbers of experiment runs: curves dotted, single values as stars
        key = (row.experiment, row.method, row.pattern)  # 2:4 and unstructured have their own numbers
        if key in seen or row.method == "dense":
            continue
        seen.add(key)
        pub_label = " · ".join([row.method] + ([row.pattern or "unstructured"] if len({r.pattern for r in rows}) > 1 else []))
        style = {"color": line_color[line_label(row, rows)]} if line_label(row, rows) in line_color else {}  # as its measured line
        config = row.runs[0].get("config") or {}
        pts = sorted(
            (p.sparsity, p.value) for p in published_points(row.experiment_info())
            if p.method in (None, row.method) and p.task == task and p.metric == metric and p.sparsity is not None and p.matches_config(config)
        )
        if len(pts) > 1:
            xs, ys = zip(*pts, strict=True)
            ax.plot([x * 100 for x in xs], [y * k for y in ys], linestyle=":", marker="s", fillstyle="none", label=f"{pub_label} (published)", **style)
        elif pts or row_point(row, metric) is not None:
            x = pts[0][0] if pts else row.target
            y = pts[0][1] if pts else row_point(row, metric).value  # type: ignore[union-attr]
            if x is not None:
                ax.plot([x * 100], [y * k], linestyle="none", marker="*", markersize=11, label=f"{pub_label} (published)", **style)
    shift = (n_lines - 1) / 2 * 0.4
    ax.set_xlabel("measured sparsity (% of prunable weights removed)"
                  + (f"\nmeasured lines drawn up to ±{shift:.1f} apart, so that error bars at one sparsity do not overlap" if n_lines > 1 else ""),
                  fontsize=9 if n_lines > 1 else None)
    ax.set_ylabel(metric_label(metric))
    n_seeds = sorted({len(r.runs) for r in rows})
    ax.set_title(f"{task}: {metric} vs sparsity (mean ± std over {'/'.join(map(str, n_seeds))} seed(s))", fontsize=10)
    ax.grid(True, alpha=0.3)
    # below the axes, labels wrapped: a line's settings can be long, and inside the axes
    # the legend covered the lines; bbox_inches="tight" grows the figure to hold it
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [textwrap.fill(t, 70, subsequent_indent="  ") for t in labels], fontsize=8,
              loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def build_report(root: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write report.md, report.csv and plot_<task>_<metric>.png; return what was written."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"'{root}' is not a directory. Give the run or sweep directory, e.g. pruneflow-report outputs/multirun/<date>/<time>.")
    results = [r for r in load_results(root) if _usable(r)]
    finished = {r["_path"] for r in results}
    failed, unfinished = find_incomplete(root, finished)
    if not results:
        jobs = [*failed, *unfinished]
        if len(jobs) == 1 and jobs[0].path == str(root):  # the folder of one run, which has no usable result
            if (root / "result.json").exists() and not failed:
                raise ReportError(f"The run in '{root}' has a result.json that cannot be read (damaged, or not a pruneflow "
                                  "result). Run its command again with overwrite=true to redo the run.")
            state = "failed" if failed else "has not finished"
            raise ReportError(
                f"The run in '{root}' {state}: {jobs[0].reason.rstrip('.')}. pruneflow-report collects finished runs "
                "(their result.json); give it this run's folder again once the run has finished, or a sweep directory."
            )
        # a sweep's default folder is a new one per command: "the same command" must name this one
        same = (f"the same command with hydra.sweep.dir={shlex.quote(str(root.absolute()))}" if (root / "multirun.yaml").exists()
                else "the same command (with hydra.sweep.dir set to the sweep's folder)")
        if failed:
            next_step = f"Mend what the failed jobs' error.txt says and run {same} again, then report."
        elif unfinished:
            next_step = f"Run {same} again to finish them (a stopped job resumes from its checkpoint), then report."
        else:
            next_step = "Point pruneflow-report at a run or sweep directory (hydra.run.dir / hydra.sweep.dir)."
        raise ReportError(
            f"No finished run under '{root}': no readable result.json was found "
            f"({len(failed)} failed job(s) with error.txt, {len(unfinished)} unfinished). {next_step}"
            + "".join(f"\n  {job.path}: {job.reason}" for job in jobs[:20])
        )
    out_dir = Path(out) if out is not None else root
    if problem := unwritable(out_dir):
        raise ReportError(f"The report cannot be written to '{out_dir}' ({problem}). Give --out a folder this user "
                          "can create and write (it is created if missing), or leave --out out to write into DIR.")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = group_results(results)
    plots: dict[str, str] = {}
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    for task, task_rows in by_task.items():
        name = f"plot_{slug(task)}_{slug(task_rows[0].main_metric)}.png"
        plot_task(task, task_rows, out_dir / name)
        plots[task] = name
    figures = plot_figures(ledger_entries(rows), out_dir, slug)
    (out_dir / "report.md").write_text(markdown(rows, failed, unfinished, root, plots, figures))
    write_csv(rows, out_dir / "report.csv")
    return {"rows": rows, "failed": failed, "unfinished": unfinished, "plots": [out_dir / p for p in plots.values()] + figures, "out": out_dir}


def _usable(result: dict[str, Any]) -> bool:
    try:
        return isinstance(result["metrics"]["final"], dict) and bool(result["method"]) and "main_metric" in result
    except (KeyError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pruneflow-report",
        description="Collect every result.json under DIR into report.md, report.csv and plot_<task>_<metric>.png.",
    )
    parser.add_argument("dir", metavar="DIR", help="a run or sweep directory (searched recursively)")
    parser.add_argument("--out", metavar="OUT", default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args(argv)
    try:
        info = build_report(args.dir, args.out)
    except ReportError as e:
        print(f"pruneflow-report: error: {e}", file=sys.stderr)
        return 2
    out = info["out"]
    runs, configs = sum(len(r.runs) for r in info["rows"]), len(info["rows"])
    print(f"{runs} run{'s' * (runs != 1)} in {configs} configuration{'s' * (configs != 1)} -> {out / 'report.md'}, {out / 'report.csv'}")
    for p in info["plots"]:
        print(f"plot: {p}")
    repeats = sum(len(r.repeats) for r in info["rows"])
    if repeats:
        print(f"{repeats} earlier run(s) of a configuration and seed that a later run repeats: left out, listed in report.md", file=sys.stderr)
    if info["failed"] or info["unfinished"]:
        print(f"{len(info['failed'])} failed and {len(info['unfinished'])} unfinished job(s) listed in report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
