"""SIGTERM (schedulers, ``timeout``) and SIGINT (Ctrl-C) ask a run to stop: the trainer
saves a checkpoint at the end of the current step and stops cleanly; the same command
resumes it exactly. A second signal stops at once.

A sweep whose jobs run in other processes on this machine (``hydra/launcher=joblib``,
``submitit_local``) passes the request on through a file in the sweep folder
(``STOP_FILE``): the launching process writes it when it gets the signal, and every
job reads it at each step. A signal sent only to the launching process (``kill
<pid>``, a container's stop) then stops every job with a checkpoint, and the jobs do
not count the file as a second signal when Ctrl-C reaches them directly too.
joblib's workers ignore both signals until a job installs the handler: a
KeyboardInterrupt in a worker waiting for a job (``n_jobs`` above the job count, or
the sweep's last jobs) would abort the sweep and kill the workers saving a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

STOP_FILE = ".pruneflow-stop"  # in hydra.sweep.dir; holds the signal's number
STOPPED_FILE = "stopped.txt"  # in a sweep job's folder: why it stopped (or did not start)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = 0  # signals this process got itself (a request read from STOP_FILE is not one)
        self.launcher_pid: int | None = None  # the process that runs the command (and launches a sweep's jobs)
        self.stop_file: Path | None = None
        self.resume_hint = ""  # the CLI's: which folder "the same command" must name

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (a launcher's worker thread): leave it
                return

    def handle(self, signum: int, frame: Any) -> None:  # noqa: ANN401
        self.received += 1
        if self.received > 1:  # the second: stop at once, with the exit code a scheduler expects
            os.write(2, (f"\npruneflow: stopped at once by a second {name(signum)}; the last checkpoint saved before it "
                         f"is kept: run the same command again to resume from it.{self.resume_hint}\n").encode())
            os._exit(128 + signum)  # no unwinding: a traceback through whatever was running helps no one
        if self.signum is None:
            self.signum = signum
        if self.in_launcher() and self.stop_file is not None:
            self._write_stop_file()

    def in_launcher(self) -> bool:
        return self.launcher_pid == os.getpid()

    def share_with_jobs(self, sweep_dir: Path) -> None:
        """In the launching process, as a sweep of local worker processes starts: its
        jobs will read the request from ``sweep_dir``."""
        self.stop_file = sweep_dir / STOP_FILE
        if self.signum is not None:  # asked to stop before the jobs were launched
            self._write_stop_file()

    def watch(self, sweep_dir: Path) -> None:
        """In a sweep's job: also stop when the launching process was asked to."""
        self.stop_file = sweep_dir / STOP_FILE

    def forget_stop_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def _write_stop_file(self) -> None:
        try:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            self.stop_file.write_text(str(self.signum))  # type: ignore[union-attr]
        except OSError:  # an unwritable sweep folder: jobs that got the signal themselves still stop
            pass

    def requested(self) -> int | None:
        """The signal that asked to stop (the same answer on every torchrun rank: a
        collective, so every rank must call it at the same point)."""
        from pruneflow import distributed

        signum = self.requested_here()
        if distributed.is_distributed():
            return distributed.broadcast_object(signum)
        return signum

    def requested_here(self) -> int | None:
        """The signal that asked this process to stop (or its sweep, through the stop file)."""
        if self.signum is None and self.stop_file is not None and not self.in_launcher():
            try:
                self.signum = int(self.stop_file.read_text())
            except (OSError, ValueError):  # no request (or one being written: read at the next step)
                pass
        return self.signum


STOP = StopRequest()


def _ignore_until_a_job_starts() -> None:
    """joblib worker initializer (runs in each new worker process)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def quiet_idle_joblib_workers() -> None:
    """Have joblib's loky workers start with SIGINT and SIGTERM ignored. Hydra's joblib
    launcher asks for ``backend="loky"`` by name, so the name is registered again with
    the initializer (the only way to give one through ``Parallel``). Left as it is if
    joblib's internals have moved."""
    try:
        from joblib import register_parallel_backend
        from joblib._parallel_backends import LokyBackend
    except ImportError as e:
        logging.getLogger("pruneflow").debug("joblib workers keep their signal handlers: %s", e)
        return

    class QuietLokyBackend(LokyBackend):
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
            kwargs.setdefault("initializer", _ignore_until_a_job_starts)
            super().__init__(*args, **kwargs)

    register_parallel_backend("loky", QuietLokyBackend)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
