"""Run the ``pruneflow`` command many times in one process (torch imported once) and
report, per command line, the exit code and what it printed: a fast way to try many
bad inputs as a user would. Usage: python bad_input_harness.py cases.json out.json"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from pruneflow.cli import main


def run(argv: list[str]) -> tuple[int, str]:
    sys.argv = ["pruneflow", *argv]
    err, out = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # noqa: BLE001 - a crash is a finding, not a harness failure
            import traceback

            code = -1
            err.write("Traceback (most recent call last):\n" + traceback.format_exc() + repr(e))
    return int(code) if isinstance(code, int) else (0 if code is None else 1), err.getvalue()


if __name__ == "__main__":
    cases_file, out_file = sys.argv[1], sys.argv[2]  # run() replaces sys.argv
    cases = json.loads(open(cases_file).read())
    results = [run(argv) for argv in cases]
    with open(out_file, "w") as f:
        json.dump(results, f)
