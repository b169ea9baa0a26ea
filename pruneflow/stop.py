"""SIGTERM (schedulers, ``timeout``) and SIGINT (Ctrl-C) ask a run to stop: the trainer
saves a checkpoint at the end of the current step and stops cleanly; the same command
resumes it exactly. A second signal stops at once."""

from __future__ import annotations

import os
import signal
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (a launcher's worker thread): leave it
                return

    def handle(self, signum: int, frame: Any) -> None:  # noqa: ANN401
        if self.signum is not None:  # the second: stop at once, with the exit code a scheduler expects
            os.write(2, (f"\npruneflow: stopped at once by a second {name(signum)}; the last checkpoint saved before it "
                         "is kept: run the same command again to resume from it.\n").encode())
            os._exit(128 + signum)  # no unwinding: a traceback through whatever was running helps no one
        self.signum = signum

    def requested(self) -> int | None:
        """The signal that asked to stop (the same answer on every torchrun rank)."""
        from pruneflow import distributed

        if distributed.is_distributed():
            return distributed.broadcast_object(self.signum)
        return self.signum


STOP = StopRequest()


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
