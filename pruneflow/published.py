"""Published numbers of an experiment (``experiment_info.published``) as flat rows.

An experiment config lists what its paper printed, one entry per method, task and
metric, as ``../shared/published.md`` transcribes it::

    published:
      - {method: seven_pre, task: glue/mrpc, metric: accuracy,
         curve: {0.1: 0.845, 0.2: "≈0.857", 0.9: "<0.70"}}   # figure points by sparsity
      - {method: dense, task: glue/mrpc, metric: accuracy, value: 0.852}
      - {method: magnitude, task: glue/mnli, metric: accuracy, sparsity: 0.9, value: 0.783,
         when: {distill.enabled: true}}                      # only runs with that setting
      - {method: wanda, task: lm/wikitext2, metric: perplexity, sparsity: 0.5, value: 6.42,
         when: {method.pattern: null}}                       # unstructured runs only
      - {method: wanda, task: lm/wikitext2, metric: perplexity, sparsity: 0.5, value: 11.02,
         when: {method.pattern: "2:4"}}                      # quoted: YAML reads 2:4 as 124

Perplexities (``metric: perplexity``; see ``is_raw``) are stored as printed (e.g. 6.42),
shown as is (not x100), lower is better, and their ``tolerance`` is relative (0.05:
within 5 % of the published value; 5 % unless the entry or the experiment gives one).
Every other metric is a fraction, shown x100, with an absolute ``tolerance`` (0.01 = one
point unless given). A value is a number; ``"≈x"`` is a point read less precisely
(``tolerance_approx``, e.g. hidden behind another marker), ``"<x"`` a curve that left
the plot below x and ``">x"`` one that left it above x (a perplexity that blew up).
``tolerance`` (default for the experiment, or per entry) is how far a measured mean may
be from the published value and still count as reproduced. ``when`` keys are dotted
config paths; ``null`` matches a run whose setting is null or absent. ``method: dense``
rows are the paper's dense baseline. The older form ``{task: {metric: value |
{sparsity: value}}}`` is read as rows of the experiment's own method.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any


def as_typed(value: Any) -> str:  # noqa: ANN401
    """A setting's value as a command line writes it: ``true``, not Python's ``True``
    (messages, report rows and ledger conditions)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


DEFAULT_TOLERANCE = 0.01  # one point (metrics are fractions) where a paper prints a table
# Perplexity moves a little with fp16 kernels and library versions, in proportion to its size.
DEFAULT_RELATIVE_TOLERANCE = 0.05
# Metrics that are not fractions (the last part of the name, "wikitext/word_perplexity"
# included): shown as they are (not x100), lower is better, tolerance relative.
RAW_METRICS = ("perplexity", "ppl", "loss", "nll", "bits_per_byte")


def is_raw(metric: str) -> bool:
    """A metric that is not a fraction in [0, 1] (perplexity, loss)."""
    last = metric.rsplit("/", 1)[-1]
    return last in RAW_METRICS or last.endswith("perplexity")


def metric_scale(metric: str) -> float:
    """What a metric is multiplied by for display: 100 for fractions, 1 for perplexity."""
    return 1.0 if is_raw(metric) else 100.0


def lower_is_better(metric: str) -> bool:
    """Perplexity and loss fall as a model gets better; every fraction here rises."""
    return is_raw(metric)


def metric_digits(metric: str) -> int:
    """Decimals shown: 2 for perplexity (6.42), 1 for a fraction x100 (71.3)."""
    return 2 if is_raw(metric) else 1


def metric_label(metric: str) -> str:
    """An axis or column label saying how the numbers are shown."""
    return f"{metric} (lower is better)" if lower_is_better(metric) else f"{metric} (×100)"


def fmt_metric(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None:
        return "–"
    scaled = value * metric_scale(metric)
    digits = metric_digits(metric)
    return f"{scaled:+.{digits}f}" if signed else f"{scaled:.{digits}f}"


_NUMBER = re.compile(r"^\s*(?P<op>[≈~<>])?\s*(?P<num>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class PublishedPoint:
    """One published number: ``value`` of ``metric`` for ``method`` on ``task`` at ``sparsity``."""

    method: str | None  # None: the experiment's own method (legacy form)
    task: str
    metric: str
    sparsity: float | None  # None: any sparsity (a dense baseline, or a one-setting table)
    value: float
    kind: str  # "value" | "approx" | "below" / "above" (the curve left the plot under / over ``value``)
    tolerance: float
    when: tuple[tuple[str, Any], ...] = field(default=())
    mark: str = ""
    of: str | None = None  # whose number it is, where a stand-in method runs against it (SPP's LLM row: RIA)

    def label(self) -> str:
        prefix = {"approx": "≈", "below": "<", "above": ">"}.get(self.kind, "")
        return f"{prefix}{fmt_metric(self.value, self.metric)}"

    @property
    def allowed(self) -> float:
        """The tolerance in the metric's units (relative for perplexity)."""
        return self.tolerance * abs(self.value) if is_raw(self.metric) else self.tolerance

    def tolerance_label(self) -> str:
        return f"{self.tolerance * 100:g} %" if is_raw(self.metric) else f"{self.tolerance * 100:.1f}"

    def within(self, measured: float) -> bool:
        if self.kind == "below":
            return measured <= self.value + self.allowed
        if self.kind == "above":
            return measured >= self.value - self.allowed
        return abs(measured - self.value) <= self.allowed + 1e-12

    def matches_config(self, config: dict[str, Any]) -> bool:
        return all(same_setting(_lookup(config, key), want) for key, want in self.when)


def same_setting(got: Any, want: Any) -> bool:  # noqa: ANN401
    """A run's setting against a ``when`` value; null (None) matches only a setting that
    is null or absent (``method.pattern: null`` is the unstructured run)."""
    if want is None or got is None:
        return want is None and got is None
    return bool(got == want)


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
        raise ValueError(f"published value {raw!r}: expected a number, '≈<number>', '<<number>' or '><number>'")
    op, value = m.group("op"), float(m.group("num"))
    if op in ("≈", "~"):
        return value, "approx", tol_approx
    if op == "<":
        return value, "below", tol
    if op == ">":
        return value, "above", tol
    return value, "value", tol


def published_points(info: dict[str, Any] | None) -> list[PublishedPoint]:
    """Every published number of an experiment, one point per sparsity."""
    if not info or not info.get("published"):
        return []
    # None: each metric's default (an absolute point for fractions, 5 % for perplexity)
    tol = None if info.get("tolerance") is None else float(info["tolerance"])
    tol_approx = None if info.get("tolerance_approx") is None else float(info["tolerance_approx"])
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
        default = tol if tol is not None else (DEFAULT_RELATIVE_TOLERANCE if is_raw(str(e["metric"])) else DEFAULT_TOLERANCE)
        e_tol = float(e.get("tolerance", default))
        e_tol_approx = float(e.get("tolerance_approx", max(default if tol_approx is None else tol_approx, e_tol)))
        when = tuple(sorted((str(k), v) for k, v in (e.get("when") or {}).items()))
        for k, v in when:
            if k.endswith(".pattern") and isinstance(v, int) and not isinstance(v, bool):
                # a silent never-match otherwise: no run's pattern is the number 124
                raise ValueError(f"published 'when: {{{k}: {v}}}': write the N:M pattern quoted (\"2:4\"); unquoted, YAML reads 2:4 as the base-60 number 124")
        common = {"method": e.get("method"), "task": str(e["task"]), "metric": str(e["metric"]), "when": when, "mark": str(e.get("mark", mark)),
                  "of": None if e.get("of") is None else str(e["of"])}
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

