"""Evaluations during training (``trainer.eval_every``), one JSON line each in the run
folder's ``eval_history.jsonl``.

The authors' loops evaluate while they train (SEVEN after every epoch; PLATON's mt-dnn
``train.py`` every ``--eval_per_updates`` steps and after every epoch) and their logs
show those numbers; a run's ``result.json`` holds the model after each stage. The
history puts both side by side: one row per evaluation, the stage-end ones included.
A resumed run drops the rows its checkpoint does not cover, so the file reads as an
uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pruneflow")

EVAL_HISTORY = "eval_history.jsonl"
STAGE_ORDER = ("finetune", "prune", "recover")


def parse_eval_every(value: Any) -> int | str:  # noqa: ANN401
    """``trainer.eval_every`` as checked by validation: an integer >= 0 or ``epoch``."""
    return "epoch" if value == "epoch" else int(value or 0)


def read_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of a history file and whether every line was whole (a kill can cut the
    last one short: it is skipped)."""
    if not path.exists():
        return [], True
    out, whole = [], True
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            whole = False
            continue
        if isinstance(row, dict) and row.get("stage") in STAGE_ORDER:
            out.append(row)
    return out, whole


def _lines(rows: list[dict[str, Any]]) -> str:
    from pruneflow.utils import json_text

    return "".join(json_text(r) + "\n" for r in rows)


class EvalHistory:
    """The rows of ``eval_history.jsonl``: ``{"stage", "step", "epoch", "end",
    ["sparsity",] "metrics"}``; ``step`` counts the stage's optimizer steps, ``epoch`` is
    ``step`` over the stage's steps per epoch and ``end`` marks the stage-end evaluation
    (the one ``result.json`` holds)."""

    def __init__(self, run_dir: Path, enabled: bool, write: bool = True) -> None:
        self.path = Path(run_dir) / EVAL_HISTORY
        self.enabled = enabled
        self.write = write  # torchrun: only rank 0 writes

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.path)[0]

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not (self.enabled and self.write and rows):
            return
        with self.path.open("a") as f:
            f.write(_lines(rows))

    def record(self, stage: str, step: int, steps_per_epoch: int, metrics: dict[str, float],
               sparsity: float | None = None, end: bool = False) -> dict[str, Any]:
        row: dict[str, Any] = {"stage": stage, "step": step, "epoch": round(step / max(steps_per_epoch, 1), 4), "end": end}
        if sparsity is not None:
            row["sparsity"] = round(sparsity, 6)
        row["metrics"] = metrics
        self.append([row])
        return row

    def start_over(self) -> None:
        """A run that starts from its first step: no earlier rows."""
        if self.write:
            self.path.unlink(missing_ok=True)

    def trim_to(self, stage: str, step: int, complete: bool) -> None:
        """Keep the rows a resume from the checkpoint at (``stage``, ``step``) covers: the
        earlier stages', and this stage's up to ``step`` (all of them once it is complete)."""
        if not self.write:
            return
        from pruneflow.utils import atomic_write_text

        at = STAGE_ORDER.index(stage)
        rows, whole = read_rows(self.path)
        kept = [r for r in rows if STAGE_ORDER.index(r["stage"]) < at
                or (r["stage"] == stage and (complete or int(r.get("step", 0)) <= step))]
        if len(kept) == len(rows) and whole:
            return
        if kept:
            atomic_write_text(self.path, _lines(kept))
        else:
            self.path.unlink(missing_ok=True)

    def save_stage(self, stage: str, target: Path) -> None:
        """Copy one stage's rows to ``target`` (the finetune cache entry)."""
        rows = [r for r in self.rows() if r["stage"] == stage]
        if rows:
            target.write_text(_lines(rows))

    def load_stage(self, stage: str, source: Path) -> bool:
        """Append a cached stage's rows from ``source``; whether it had any."""
        rows = [r for r in read_rows(source)[0] if r["stage"] == stage and not r.get("end")]  # this run records the end itself
        self.append(rows)
        return bool(rows)

    def best(self, metric: str, stage: str, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The row of ``stage`` (the run's last) with the highest ``metric``, the earliest
        among ties, among those at the stage-end's sparsity or above: a prune stage's
        evaluations before its schedule reached the target are not candidates. ``rows``:
        the file's, if the caller has read them."""
        rows = [r for r in (self.rows() if rows is None else rows)
                if r["stage"] == stage and isinstance(r.get("metrics", {}).get(metric), (int, float))]
        end = [r for r in rows if r.get("end")]
        if end and "sparsity" in end[-1]:
            rows = [r for r in rows if r.get("sparsity", -1.0) >= end[-1]["sparsity"] - 1e-6]
        return max(rows, key=lambda r: r["metrics"][metric]) if rows else None
