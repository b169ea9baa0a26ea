"""The ``pruneflow ...`` commands the README shows pass the checks made before any work,
so that a renamed key or option cannot leave the README telling users to type a command
that is refused. Running them is for the end-to-end tests; these only compose and check."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from sweep_helpers import command_problem

ROOT = Path(__file__).resolve().parent.parent
# the README's example of a refused command, and what it must say
REFUSED = {"pruneflow sparsity=1.5": "Invalid value for 'sparsity': 1.5"}


def readme_commands() -> list[str]:
    """Every ``pruneflow`` command in the README's code blocks, continuation lines joined,
    without its trailing ``# remark``."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("pruneflow "):
                out.append(" ".join(re.split(r"\s+#", line)[0].split()))
    return out


def _covered_elsewhere(args: list[str]) -> str | None:
    """Why a command is not checked here, or None."""
    if any("<" in a for a in args):
        return "a placeholder for the user's own path"
    if "-m" in args and any(a.startswith("experiment=") for a in args) and all(
        a == "-m" or a.startswith(("experiment=", "seed=")) for a in args
    ):  # every job of every experiment (and seeds change no setting's validity): test_experiments.py
        return "an experiment's whole sweep, checked job by job in test_experiments.py"
    return None


def test_the_readme_has_commands_to_check() -> None:
    commands = readme_commands()
    assert len(commands) >= 20  # the parser still finds the README's commands
    assert set(REFUSED) <= set(commands)


@pytest.mark.parametrize("command", [c for c in readme_commands() if not _covered_elsewhere(shlex.split(c)[1:])])
def test_the_commands_in_the_readme_pass_the_checks(command: str, lm_text: Path, tmp_path: Path) -> None:
    """A sweep's jobs are checked one by one by the CLI's pre-check (as the command runs
    them); a single run's composed config by the runner's checks. Devices are not checked
    (no GPU here), local paths the README makes (`make lm-text`) are the tests' copy, and
    output folders are under tmp_path."""
    args = []
    for a in shlex.split(command)[1:]:
        key, _, value = a.partition("=")
        if key == "task.path" and value == "outputs/lm_text":
            a = f"task.path={lm_text}"
        elif key in ("hydra.sweep.dir", "hydra.run.dir"):
            a = f"{key}={tmp_path / 'out'}"
        elif a == "trainer.device=cuda":
            continue
        args.append(a)
    problem = command_problem(args)
    if command in REFUSED:
        assert problem is not None and REFUSED[command] in problem, problem
    else:
        assert not problem, f"pruneflow {' '.join(args)}\n  -> {problem}"
