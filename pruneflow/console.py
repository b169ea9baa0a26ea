"""A run outlives its console.

``pruneflow ... | tee run.txt`` under Slurm or over SSH: when the reader of the pipe goes
away (the tee was killed with the job step, the SSH session dropped), the next write to
stdout or stderr (a progress bar, a log line) raises ``BrokenPipeError``, and an hours-long
run would end there with exit code 1 and nothing in its log. :func:`guard_console` wraps
``sys.stdout`` and ``sys.stderr`` so that such a write instead points the broken stream's
file descriptor at ``os.devnull`` (C-level writers included), notes it once in
``pruneflow.log``, and carries on: training, checkpoints, a signal's clean stop and the
result files are unaffected; the log file keeps everything.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any, TextIO

NOTE = "The console's reader went away (broken pipe): the run goes on, logging to pruneflow.log only."


_noted = False  # one note per process, whichever stream broke first


def _note_in_log_files() -> None:
    global _noted
    if _noted:
        return
    _noted = True
    record = logging.getLogger("pruneflow").makeRecord("pruneflow", logging.WARNING, __file__, 0, NOTE, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class GuardedStream:
    """A text stream whose writes survive the loss of their reader (see the module)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.lost = False

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # later writes, the buffered rest and C code go nowhere
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's StringIO): drop writes here instead
            self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        _note_in_log_files()

    def _call(self, name: str, *args: Any) -> Any:  # noqa: ANN401
        try:
            return getattr(self._stream, name)(*args)
        except OSError as e:
            if e.errno != errno.EPIPE:  # BrokenPipeError's; any other failure is not a lost reader
                raise
            self._lose()
            try:
                return getattr(self._stream, name)(*args)
            except OSError:
                return None

    def write(self, text: str) -> int:
        out = self._call("write", text)
        return len(text) if out is None else out

    def flush(self) -> None:
        self._call("flush")

    def writelines(self, lines: Any) -> None:  # noqa: ANN401
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - isatty, fileno, encoding, buffer, ...
        return getattr(self._stream, name)


def guard_console() -> None:
    """Wrap sys.stdout and sys.stderr (once; launcher workers call it again)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))


def hub_logs_through_root() -> None:
    """huggingface_hub prints through a stderr handler of its own and also passes its records
    on to the root logger, whose handlers (Hydra's console line, pruneflow.log) print them
    again: offline, each of its ~15 retry warnings came twice. Its records now go through the
    root's handlers only (one formatted line, and in pruneflow.log). Its import is cheap (lazy)."""
    if not logging.getLogger().handlers:  # no root handlers (not under Hydra): keep the library's own
        return
    import huggingface_hub.utils.logging  # noqa: F401 - attaches the library's handler, which goes now

    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:
            hub.removeHandler(handler)
