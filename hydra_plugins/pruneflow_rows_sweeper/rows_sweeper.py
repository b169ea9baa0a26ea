"""A Hydra sweeper for tables whose rows differ in more than one setting.

Hydra's basic sweeper runs the cartesian product of ``key=a,b`` lists. A paper's table
is rarely a product: Sanh et al.'s Table 2 runs magnitude and movement pruning at two
sparsities, but soft movement and L0 regularization at penalties instead. An
experiment lists such rows under ``hydra.sweeper.rows`` (each a list of overrides) and
selects this sweeper (``override /hydra/sweeper: rows``); every row then runs once for
each combination of the command line's own sweeps (e.g. ``seed=0,1,2``), the row's
overrides replacing the command line's for the same key. Without rows it is the basic
sweeper. Hydra looks for plugins in the ``hydra_plugins`` namespace only, hence this
package beside ``pruneflow``.
"""

# No ``from __future__ import annotations``: Hydra loads plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations; OmegaConf wants typing's forms.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser


@dataclass
class RowsSweeperConf:
    _target_: str = "hydra_plugins.pruneflow_rows_sweeper.rows_sweeper.RowsSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    rows: List[Any] = field(default_factory=list)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="rows", node=RowsSweeperConf, provider="pruneflow")


def merge_row(job: list[str], row: list[str]) -> list[str]:
    """``job`` with the row's overrides added, a row's key replacing the job's."""
    parser = OverridesParser.create()
    keys = {o.get_key_element() for o in parser.parse_overrides(list(row))}
    kept = [o for o, parsed in zip(job, parser.parse_overrides(list(job)), strict=True) if parsed.get_key_element() not in keys]
    return [*kept, *row]


class RowsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None, rows: list[Any] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.rows = [[str(o) for o in row] for row in (rows or [])]

    def split_arguments(self, overrides, max_batch_size):  # noqa: ANN001, ANN201 - BasicSweeper's signature
        batches = BasicSweeper.split_arguments(overrides, None)
        jobs = [job for batch in batches for job in batch]
        if self.rows:
            jobs = [merge_row(job, row) for job in jobs for row in self.rows]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size)) if max_batch_size else [jobs]
