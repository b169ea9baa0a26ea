"""Experiment loggers. W&B runs offline by default and can never fail a run."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("pruneflow")


class NullLogger:
    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def summary(self, result: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def run_id(run_dir: str | os.PathLike) -> str:
    """The W&B run id of a run folder: made on its first launch, kept in ``.wandb_run_id``."""
    import secrets

    from pruneflow.utils import atomic_write_text

    path = Path(run_dir) / ".wandb_run_id"
    if path.exists():
        rid = path.read_text().strip()
        if rid:
            return rid
    rid = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
    atomic_write_text(path, rid + "\n")
    return rid


class WandbLogger(NullLogger):
    """One W&B run per job, grouped per sweep; offline runs can be uploaded with ``wandb sync``."""

    def __init__(self, cfg: DictConfig, run_dir: Path, mode: str | None = None) -> None:
        lc = cfg.logger
        mode = mode or str(lc.get("mode", "offline"))
        if mode != "online":
            # Offline means no network at all: W&B's error reporting (Sentry) would look up
            # its server's address; the cloud-metadata probes (machine info) are off too.
            os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        self.wandb = wandb
        self.mode = mode
        group = lc.get("group") or _sweep_group()
        name = lc.get("run_name") or f"{cfg.method.name}-{cfg.model.name}-{cfg.task.name}-s{cfg.get('sparsity')}-seed{cfg.seed}"
        self.run = wandb.init(
            # one W&B run per run folder: a resumed run goes on in it (wandb sync uploads the
            # offline folders of its launches as one run), overwrite=true starts a new one
            id=run_id(run_dir),
            resume="allow",
            project=lc.get("project", "pruneflow"),
            entity=lc.get("entity"),
            group=group,
            name=name,
            tags=list(lc.get("tags") or []),
            mode=mode,
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, init_timeout=float(lc.get("init_timeout", 30)),
                                    **({"x_disable_machine_info": True} if mode != "online" else {})),
        )

    def log(self, metrics: dict[str, Any]) -> None:
        try:
            self.run.log(metrics)
        except Exception as e:  # noqa: BLE001 - logging must never fail a run
            log.warning("W&B log failed: %s", e)

    def summary(self, result: dict[str, Any]) -> None:
        try:
            flat = {f"final/{k}": v for k, v in result["metrics"]["final"].items()}
            flat.update({"sparsity/measured": result["sparsity"]["measured"], "sparsity/target": result["sparsity"]["target"], "params/nonzero": result["params"]["nonzero"]})
            self.run.summary.update(flat)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B summary failed: %s", e)

    def finish(self) -> None:
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B finish failed: %s", e)


def _sweep_group() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # e.g. "2026-01-31/12-00-00" for outputs/multirun/2026-01-31/12-00-00
            return "/".join(Path(hc.sweep.dir).parts[-2:])[-128:]
    except Exception:  # noqa: BLE001 - not inside a Hydra app
        return None
    return None


def make_logger(cfg: DictConfig, run_dir: Path) -> NullLogger:
    name = cfg.logger.get("name", "none")
    if name == "none":
        return NullLogger()
    if name != "wandb":
        from pruneflow.errors import invalid

        raise invalid("logger", name, ["wandb", "none"])
    os.environ.setdefault("WANDB_SILENT", "true")
    mode = str(cfg.logger.get("mode", "offline"))
    try:
        return WandbLogger(cfg, run_dir)
    except Exception as e:  # noqa: BLE001 - W&B unreachable / not logged in never fails a run
        if mode == "online":
            # a start refused before any folder was made (no API key) leaves no run-* folder to point to
            failed = sorted(p.name for p in (Path(run_dir) / "wandb").glob("run-*") if p.is_dir() and not p.is_symlink())
            log.warning(
                "W&B online could not start (%s); logging offline instead under %s/wandb — upload later with "
                "`wandb sync %s/wandb/offline-run-*` once the server is reachable and you are logged in (`wandb login`).%s",
                _one_line(e), run_dir, run_dir,
                f" The failed attempt's own folder (wandb/{failed[-1]}) holds its debug log." if failed else "",
            )
            try:
                import wandb

                wandb.teardown()  # the failed online start still holds the run id: release it
                return WandbLogger(cfg, run_dir, mode="offline")
            except Exception as e2:  # noqa: BLE001
                e = e2
        log.warning("W&B could not start (%s); continuing without it. Use logger.mode=offline or logger=none.", _one_line(e))
        return NullLogger()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
