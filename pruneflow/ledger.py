"""The reproduction ledger of ``pruneflow-report``: every published number of the
experiments that ran, beside what pruneflow measured.

For each published point (``pruneflow.published``) of an experiment present in the
report: the runs that reproduce it (same experiment, method, task, target sparsity
and ``when`` settings), their mean ± std over seeds, the difference and whether it is
within the point's tolerance (rows of another model than the experiment's are shown
without a verdict and not counted). Points no run reproduces are listed as not run. A
figure (``experiment_info.figure``) is drawn as its paper draws it: published curves
dashed, measured means with error bars, the dense baseline as a horizontal line.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneflow.published import (
    PublishedPoint,
    as_typed,
    fmt_metric,
    metric_label,
    metric_scale,
    published_points,
    same_sparsity,
)

if TYPE_CHECKING:
    from pruneflow.report import Row


@dataclass
class Entry:
    experiment: str
    figure: str | None
    point: PublishedPoint
    method: str  # the point's method (the experiment's own for the legacy form)
    row: Row | None  # the runs that reproduce it; None: not run
    mean: float | None = None
    std: float | None = None
    n: int = 0
    info: dict[str, Any] | None = None  # the experiment_info whose source a not-run number cites

    @property
    def diff(self) -> float | None:
        return None if self.mean is None else self.mean - self.point.value

    @property
    def paper_model(self) -> str | None:
        """The model the experiment runs (its paper's), None where unknown or not run."""
        return None if self.row is None else experiment_model(self.row.experiment)

    @property
    def other_model(self) -> str | None:
        """The row's model where it is not the one the experiment's paper used (a smaller
        stand-in such as ``model=minilm`` under a BERT-base experiment): shown beside the
        published number, but no reproduction either way."""
        paper = self.paper_model
        return self.row.model if paper is not None and self.row.model != paper else None

    @property
    def within(self) -> bool | None:
        return None if self.mean is None or self.other_model else self.point.within(self.mean)

    @property
    def series(self) -> str:
        """The curve a point belongs to in a figure: its method, and its ``when`` (a 2:4
        number is not a point of the unstructured curve)."""
        return " ".join([self.method, *(f"{k}={as_typed(v)}" for k, v in self.point.when)])


@functools.cache
def experiment_model(experiment: str) -> str | None:
    """The model an experiment config runs (its ``override /model`` default), None where
    the config is not in conf/experiment/ or chooses no model."""
    from omegaconf import OmegaConf

    from pruneflow.cli import CONFIG_DIR

    path = Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml"
    if not experiment or not path.is_file():
        return None
    for item in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if isinstance(item, dict) and "override /model" in item:
            return str(item["override /model"])
    return None


def _reproduces(point: PublishedPoint, row: Row, experiment: str) -> bool:
    if row.experiment != experiment or row.task != point.task:
        return False
    if point.method is not None and row.method != point.method:
        return False
    if point.method is None and row.method == "dense":
        return False
    from pruneflow.report import row_sparsity

    if point.sparsity is not None and not same_sparsity(point.sparsity, row_sparsity(row)):
        return False
    if point.metric not in row.metric_names():
        return False
    return all(point.matches_config(r.get("config") or {}) for r in row.runs)


def ledger_entries(rows: list[Row]) -> list[Entry]:
    """Every published point of the experiments that ran, with the rows that reproduce it.

    Experiments of one figure or table (the same ``experiment_info.figure``, e.g. Sanh et
    al.'s per-method experiments, which all carry the whole table) are one group: each
    published number is listed once, matched against the rows of every experiment in it."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}  # figure (or experiment) -> experiment -> info
    for row in rows:
        info = row.experiment_info()
        if row.experiment and info and info.get("published"):
            groups.setdefault(str(info.get("figure") or row.experiment), {}).setdefault(row.experiment, info)
    entries: list[Entry] = []
    for key, infos in groups.items():
        names = list(infos)
        info = infos[names[0]]
        label = names[0] if len(names) == 1 else key
        points = list(dict.fromkeys(p for i in infos.values() for p in published_points(i)))  # each number once
        exp_rows = [r for r in rows if r.experiment in infos]
        # the experiment's own method, for numbers that do not name one (a dense baseline row is not it)
        methods = {r.method for r in exp_rows if r.method != "dense"}
        own = methods.pop() if len(methods) == 1 else "?"
        tasks = {r.task for r in exp_rows}
        for p in points:
            if p.task not in tasks:  # a figure's other panels belong to the experiments that run them
                continue
            matched = [r for r in exp_rows if _reproduces(p, r, r.experiment)]
            method = p.method or own
            if not matched and p.method == "dense":
                # causal-LM runs evaluate the dense model before pruning (metrics.dense): one row is enough
                lm_rows = [r for r in exp_rows if r.task == p.task and all(p.metric in ((x.get("metrics") or {}).get("dense") or {}) for x in r.runs)]
                if lm_rows:
                    mean, std, n = lm_rows[0].stat(lambda x, m=p.metric: x["metrics"]["dense"][m])
                    entries.append(Entry(lm_rows[0].experiment, info.get("figure"), p, method, lm_rows[0], mean, std, n))
                    continue
            if not matched:
                entries.append(Entry(label, info.get("figure"), p, method, None, info=info))
                continue
            for r in matched:
                mean, std, n = r.stat(lambda x, m=p.metric: x["metrics"]["final"][m])
                entries.append(Entry(r.experiment, info.get("figure"), p, method, r, mean, std, n))
    return entries


def ledger_markdown(entries: list[Entry], ref) -> list[str]:  # noqa: ANN001 - Sources.ref
    if not entries:
        return []
    measured = [e for e in entries if e.mean is not None and not e.other_model]
    stand_ins = [e for e in entries if e.mean is not None and e.other_model]
    ok = sum(1 for e in measured if e.within)
    others = sorted({f"model={e.other_model} under {e.row.experiment}, whose paper used {e.paper_model}" for e in stand_ins})
    out = [
        "", "## Reproduction ledger", "",
        f"**{ok} of {len(measured)} measured rows within tolerance**; {len(entries) - len(measured) - len(stand_ins)} published "
        "number(s) not run"
        + (f"; {len(stand_ins)} row(s) of another model than the paper's, shown but not counted ({'; '.join(others)})" if stand_ins else "")
        + ". Published and measured ×100 (perplexity as is; its tolerance is relative); measured is the mean ± std over seeds (n runs); "
        "diff = measured − published; \"≈\" marks a value read less precisely off a figure, \"<\" a curve that left "
        "the plot below that value (within: measured at most that plus the tolerance), \">\" one that left it above.",
        "",
        "| experiment | method | task | metric | sparsity % | condition | published | measured (n) | diff | ± tolerance | within |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        p = e.point
        cond = " ".join(f"{k}={as_typed(v)}" for k, v in p.when) or "–"
        sp = "–" if p.sparsity is None else f"{p.sparsity * 100:g}"
        m = p.metric
        meas = "not run" if e.row is None else (
            "–" if e.mean is None else fmt_metric(e.mean, m) + (f" ± {fmt_metric(e.std, m)}" if e.std is not None else "") + f" ({e.n})"
        )
        within = f"– (model {e.other_model})" if e.other_model else "–" if e.within is None else ("yes" if e.within else "**no**")
        info = e.row.experiment_info() if e.row is not None else e.info
        out.append(
            f"| {e.experiment} | {e.method}{f' (against {p.of} published)' if p.of else ''} | {p.task} | {p.metric} | {sp} | {cond} | {p.label()} [{ref(info) if info else '–'}] | "
            f"{meas} | {fmt_metric(e.diff, m, signed=True)} | {p.tolerance_label()} | {within} |"
        )
    return out


def plot_figures(entries: list[Entry], out_dir: Path, slug) -> list[Path]:  # noqa: ANN001
    """One PNG per figure, a panel per (task, metric), drawn as the paper draws it."""
    by_figure: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        if e.figure and (e.point.sparsity is not None or e.method == "dense"):
            by_figure[str(e.figure)].append(e)
    paths: list[Path] = []
    if not by_figure:
        return paths
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for figure, fig_entries in by_figure.items():
        panels: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        for e in fig_entries:
            panels[(e.point.task, e.point.metric)].append(e)
        keys = sorted(panels)
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), dpi=110, squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        methods = sorted({e.series for e in fig_entries if e.method != "dense"})
        color = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
        for ax, key in zip(axes[0], keys, strict=True):
            panel = panels[key]
            k = metric_scale(key[1])
            for m in methods:
                pub = sorted((e.point.sparsity * 100, e.point.value * k, e.point.kind) for e in panel if e.series == m and e.point.sparsity is not None)
                if pub:
                    ax.plot([x for x, _, _ in pub], [y for _, y, _ in pub], linestyle="--", marker=".", color=color[m], label=f"{m} (published)")
                    for kind, marker in (("below", "v"), ("above", "^")):  # the curve left the plot there
                        off = [(x, y) for x, y, kd in pub if kd == kind]
                        if off:
                            ax.plot(*zip(*off, strict=True), linestyle="none", marker=marker, color=color[m])
                for other in sorted({e.other_model or "" for e in panel if e.series == m}):  # a stand-in model: its own hollow points
                    meas = sorted(
                        (e.point.sparsity * 100, e.mean * k, (e.std or 0.0) * k)
                        for e in panel if e.series == m and (e.other_model or "") == other and e.mean is not None and e.point.sparsity is not None
                    )
                    if meas:
                        ax.errorbar([x for x, _, _ in meas], [y for _, y, _ in meas], yerr=[s for _, _, s in meas],
                                    linestyle="none", marker="o", capsize=3, color=color[m], fillstyle="none" if other else "full",
                                    label=f"{m} (pruneflow, model {other})" if other else f"{m} (pruneflow)")
            for e in panel:
                if e.method == "dense":
                    ax.axhline(e.point.value * k, color="gray", linestyle="--", linewidth=1, label="dense (published)")
                    if e.mean is not None:
                        ax.axhline(e.mean * k, color="gray", linestyle="-", linewidth=1, label="dense (pruneflow)")
            ax.set_title(f"{key[0]}: {key[1]}", fontsize=10)
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel(metric_label(key[1]))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{figure}: published (dashed) vs pruneflow (points, mean ± std)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"figure_{slug(figure)}.png"
        fig.savefig(path, bbox_inches="tight")  # holds the suptitle, which tight_layout left clipped on one panel
        plt.close(fig)
        paths.append(path)
    return paths
