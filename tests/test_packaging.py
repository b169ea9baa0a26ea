"""pruneflow installed from its wheel, without a checkout, finds its configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_list_covers_every_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".")
             for top in ("pruneflow", "hydra_plugins") for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert listed == found | {"pruneflow.conf"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, unpacked into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: pip builds in the source tree (build/), which stays the checkout's own
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pruneflow", "hydra_plugins", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("pruneflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {"pruneflow/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)[:5]
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pruneflow").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)[:5]
    zipfile.ZipFile(wheel).extractall(tmp / "site")
    return tmp / "site"


def run_installed(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # The unpacked wheel comes first on the path, before this checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_runs_the_command_line_and_the_api_without_a_checkout(installed: Path, tmp_path: Path) -> None:
    """Before: the wheel held no conf/, so `pruneflow` failed with FileNotFoundError and
    pruneflow.methods.create said the method had no config."""
    p = run_installed(installed, ["-c", "import pruneflow; print(pruneflow.CONFIG_DIR)"], tmp_path)
    assert p.returncode == 0 and Path(p.stdout.strip()) == installed / "pruneflow" / "conf", p.stderr[-2000:]
    p = run_installed(installed, ["-m", "pruneflow.cli", "method=magnitude", "model=bert_tiny", "task=glue/sst2", "--cfg", "job"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "name: magnitude" in p.stdout and "name: glue/sst2" in p.stdout
    p = run_installed(installed, ["-m", "pruneflow.cli", "method=magnitud"], tmp_path)
    assert p.returncode == 2 and "magnitude" in p.stderr and "Traceback" not in p.stderr
    code = ("import torch, pruneflow; net = torch.nn.Sequential(torch.nn.Linear(8, 8)); "
            "p = pruneflow.methods.create('magnitude', sparsity=0.5, steps=1, model=net, include=['0']); "
            "p.after_optimizer_step(0); p.end(); p.remove(); "
            "print(pruneflow.sparsity_report(net, include=['0'])['prunable']['sparsity'])")
    p = run_installed(installed, ["-c", code], tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("0.5"), p.stderr[-2000:]
