"""Published numbers of an experiment (``experiment_info.published``) as flat rows.

An experiment config lists what its paper printed, one entry per method, task and
metric, as ``../shared/published.md`` transcribes it::

    published:
      - {method: seven_pre, task: glue/mrpc, metric: accuracy,
         curve: {0.1: 0.845, 0.2: "≈0.857", 0.9: "<0.70"}}   # figure points by sparsity
      - {method: dense, task: glue/mrpc, metric: accuracy, value: 0.852}
      - {method: magnitude, task: glue/mnli, metric: accuracy, sparsity: 0.9, value: 0.783,
         when: {distill.enabled: true}}                      # only runs with that setting

Perplexities (``metric: perplexity``) are stored as printed (e.g. 6.42) and their
``tolerance`` is relative (0.05: within 5 %); every other metric is a fraction.
A value is a number; ``"≈x"`` is a point read less precisely (``tolerance_approx``,
e.g. hidden behind another marker) and ``"<x"`` a curve that left the plot below x.
``tolerance`` (default for the experiment, or per entry) is how far a measured mean may
be from the published value and still count as reproduced. ``method: dense`` rows are
the paper's dense baseline. The older form ``{task: {metric: value | {sparsity:
value}}}`` is read as rows of the experiment's own method.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TOLERANCE = 0.01  # one point (metrics are fractions) where a paper prints a table
# Metrics that are not fractions: shown as they are (not x100), lower is better, and an
# experiment's ``tolerance`` for them is relative (0.05: within 5 % of the published value).
RAW_METRICS = ("perplexity",)


def metric_scale(metric: str) -> float:
    """What a metric is multiplied by for display: 100 for fractions, 1 for perplexity."""
    return 1.0 if metric in RAW_METRICS else 100.0


def fmt_metric(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None:
        return "–"
    scaled = value * metric_scale(metric)
    digits = 2 if metric in RAW_METRICS else 1
    return f"{scaled:+.{digits}f}" if signed else f"{scaled:.{digits}f}"
_NUMBER = re.compile(r"^\s*(?P<op>[≈~<])?\s*(?P<num>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class PublishedPoint:
    """One published number: ``value`` of ``metric`` for ``method`` on ``task`` at ``sparsity``."""

    method: str | None  # None: the experiment's own method (legacy form)
    task: str
    metric: str
    sparsity: float | None  # None: any sparsity (a dense baseline, or a one-setting table)
    value: float
    kind: str  # "value" | "approx" | "below" (the curve left the plot under ``value``)
    tolerance: float
    when: tuple[tuple[str, Any], ...] = field(default=())
    mark: str = ""

    def label(self) -> str:
        prefix = {"approx": "≈", "below": "<"}.get(self.kind, "")
        return f"{prefix}{fmt_metric(self.value, self.metric)}"

    @property
    def allowed(self) -> float:
        """The tolerance in the metric's units (relative for perplexity)."""
        return self.tolerance * abs(self.value) if self.metric in RAW_METRICS else self.tolerance

    def tolerance_label(self) -> str:
        return f"{self.tolerance * 100:g} %" if self.metric in RAW_METRICS else f"{self.tolerance * 100:.1f}"

    def within(self, measured: float) -> bool:
        if self.kind == "below":
            return measured <= self.value + self.allowed
        return abs(measured - self.value) <= self.allowed + 1e-12

    def matches_config(self, config: dict[str, Any]) -> bool:
        return all(_lookup(config, key) == want for key, want in self.when)


def _lookup(config: dict[str, Any], dotted: str) -> Any:  # noqa: ANN401
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_value(raw: Any, tol: float, tol_approx: float) -> tuple[float, str, float]:  # noqa: ANN401
    """(value, kind, tolerance) of one published entry."""
    if isinstance(raw, bool):
        raise ValueError(f"published value {raw!r} is not a number")
    if isinstance(raw, (int, float)):
        return float(raw), "value", tol
    m = _NUMBER.match(str(raw))
    if not m:
        raise ValueError(f"published value {raw!r}: expected a number, '≈<number>' or '<<number>'")
    op, value = m.group("op"), float(m.group("num"))
    if op in ("≈", "~"):
        return value, "approx", tol_approx
    if op == "<":
        return value, "below", tol
    return value, "value", tol


def published_points(info: dict[str, Any] | None) -> list[PublishedPoint]:
    """Every published number of an experiment, one point per sparsity."""
    if not info or not info.get("published"):
        return []
    tol = float(info.get("tolerance") or DEFAULT_TOLERANCE)
    tol_approx = float(info.get("tolerance_approx") or tol)
    mark = str(info.get("mark") or "")
    entries = info["published"]
    if isinstance(entries, dict):  # legacy: {task: {metric: value | {sparsity: value}}}
        entries = [
            {"task": task, "metric": metric, **({"curve": v} if isinstance(v, dict) else {"value": v})}
            for task, metrics in entries.items()
            for metric, v in (metrics or {}).items()
        ]
    points: list[PublishedPoint] = []
    for e in entries:
        e_tol = float(e.get("tolerance", tol))
        e_tol_approx = float(e.get("tolerance_approx", max(tol_approx, e_tol)))
        when = tuple(sorted((str(k), v) for k, v in (e.get("when") or {}).items()))
        common = {"method": e.get("method"), "task": str(e["task"]), "metric": str(e["metric"]), "when": when, "mark": str(e.get("mark", mark))}
        if "curve" in e:
            items = [(float(s), v) for s, v in (e["curve"] or {}).items()]
        else:
            items = [(None if e.get("sparsity") is None else float(e["sparsity"]), e["value"])]
        for sparsity, raw in items:
            if raw is None:
                continue  # a point the paper does not give
            value, kind, t = parse_value(raw, e_tol, e_tol_approx)
            points.append(PublishedPoint(sparsity=sparsity, value=value, kind=kind, tolerance=t, **common))
    return points


def same_sparsity(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, abs_tol=1e-9)


def find_point(
    info: dict[str, Any] | None, method: str, task: str, metric: str, sparsity: float | None, config: dict[str, Any] | None = None
) -> PublishedPoint | None:
    """The published number for a run (its method, task, metric, target and settings)."""
    for p in published_points(info):
        if p.task != task or p.metric != metric or (p.method is not None and p.method != method):
            continue
        if p.sparsity is not None and not same_sparsity(p.sparsity, sparsity):
            continue
        if config is not None and not p.matches_config(config):
            continue
        return p
    return None

