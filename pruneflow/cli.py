"""``pruneflow``: the Hydra application that runs one job (or a sweep with ``-m``)."""

from __future__ import annotations

import logging
import sys
import textwrap
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pruneflow.config import register_configs
from pruneflow.errors import UserError

log = logging.getLogger("pruneflow")

# conf/ sits beside the package in the source tree (editable install).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _report_error(message: str) -> None:
    print("\n" + textwrap.fill(f"pruneflow: error: {message}", width=100, break_long_words=False, break_on_hyphens=False) + "\n", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from pruneflow.runner import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        result = run(cfg, run_dir, list(hc.overrides.task))
    except UserError as e:
        _report_error(str(e))
        if multirun:  # one failing job does not stop the other jobs of a sweep
            (run_dir / "error.txt").write_text(str(e) + "\n")
            return None
        sys.exit(2)
    except Exception:
        from pruneflow import distributed

        # torchrun: a crash on one rank must stop all ranks (the others wait in a collective)
        if not multirun or distributed.is_distributed():
            raise
        log.error("Job failed:\n%s", traceback.format_exc())
        (run_dir / "error.txt").write_text(traceback.format_exc())
        return None
    final = result["metrics"]["final"]
    return final.get(result["main_metric"])


def main() -> None:
    register_configs()
    _app()


if __name__ == "__main__":
    main()
