"""The speed scripts run, at toy sizes on the CPU, and ``scripts/bench_gpu.sh`` calls them
with flags they accept: it has never run on a GPU here, and must work unchanged the
first time one is available (issue 15). The figures themselves are not checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


# Toy sizes for each script on the CPU. bench_gpu.sh's calls get them after their own
# flags (argparse keeps the last value of a repeated flag).
TOY_FLAGS = {
    "bench_overhead.py": "--layers 1 --batch 2 --seq 16 --steps 2 --warmup 2 --method-warmup 2 --prune-steps 30 --threads 1",
    "bench_speed.py": "--batch 1 --seq 16 --repeats 1 --warmup 1 --threads 1",
    "bench_semi_structured.py": "--batch 1 --seq 16 --repeats 1",
}


def run_script(name: str) -> str:
    """``name`` at its toy sizes."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *shlex.split(TOY_FLAGS[name])], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_overhead_prints_every_method_with_exact_counts() -> None:
    out = run_script("bench_overhead.py")
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^method=(\w+) ratio=[\d.]+ .*$", out, re.M)}
    assert set(lines) == {"seven", "platon", "movement", "magnitude", "random"}
    assert all(line.endswith("exact_count=ok") for line in lines.values()), lines


@pytest.mark.slow
def test_bench_speed_checks_the_compressed_model_against_the_masked_one() -> None:
    out = run_script("bench_speed.py")
    assert "-> equal" in out
    assert re.search(r"^ratio=[\d.]+ hand_shrunk_ratio=[\d.]+ compressed_vs_hand_shrunk=[\d.]+$", out, re.M), out
    assert re.search(r"^gflop_per_s: dense=[\d.]+ compressed=[\d.]+ hand_shrunk=[\d.]+ matmul_1024=[\d.]+$", out, re.M), out


def test_bench_speed_counts_flops_as_by_hand() -> None:
    """The FLOPs that bench_speed divides its times by, for a small BERT counted by hand."""
    import importlib.util

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPTS / "bench_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    h, inter, layers, b, s = 32, 64, 2, 3, 5
    model = BertForSequenceClassification(BertConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                                     num_attention_heads=4, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (b, s))
    per_token = layers * (4 * h * h + 2 * h * inter)  # q, k, v, o; fc1, fc2 (multiply-adds)
    attention = layers * 2 * b * s * s * (h + h)  # q k^T and attention v, all heads
    head = b * (h * h + h * 2)  # pooler and classifier, on the first token only
    assert bench.forward_flops(model, ids, torch.ones_like(ids)) == 2 * b * s * per_token + attention + 2 * head


def test_bench_semi_structured_reports_no_gpu_instead_of_failing() -> None:
    out = run_script("bench_semi_structured.py")
    assert out.strip().splitlines()[-1].startswith("semi_structured=unavailable")


def gpu_script_calls() -> list[tuple[str, list[str]]]:
    """(script, its arguments) for every ``$PY scripts/<name>.py ...`` in bench_gpu.sh."""
    text = (SCRIPTS / "bench_gpu.sh").read_text().replace("\\\n", " ")
    return [(m.group(1), shlex.split(m.group(2))) for m in re.finditer(r"\$PY scripts/(\w+\.py)([^\n]*)", text)]


def test_bench_gpu_sh_is_valid_bash_and_passes_only_flags_its_scripts_accept() -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "bench_gpu.sh")], check=True)
    calls = gpu_script_calls()
    assert {name for name, _ in calls} == {"bench_overhead.py", "bench_speed.py", "bench_semi_structured.py"}
    for name, args in calls:
        # the flags its argparse defines (read from the source: --help would import torch)
        accepted = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (SCRIPTS / name).read_text()))
        assert accepted, name
        flags = {a for a in args if a.startswith("--")}
        assert flags <= accepted, f"{name}: bench_gpu.sh passes {sorted(flags - accepted)}, not among {sorted(accepted)}"



@pytest.mark.slow
def test_bench_gpu_sh_runs_every_section_at_toy_sizes_on_the_cpu(tmp_path: Path) -> None:
    """The whole script, unchanged, through its ``PYTHON`` override: bf16 autocast, the
    compiled models of section 1b and the section bookkeeping run as they will on a GPU."""
    cases = "\n".join(f'  scripts/{script}) extra=({flags});;' for script, flags in TOY_FLAGS.items())
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'args=(); for a in "$@"; do [ "$a" = cuda ] && a=cpu; args+=("$a"); done\n'
        f'extra=(); case "$1" in\n{cases}\nesac\n'
        f'exec {shlex.quote(sys.executable)} "${{args[@]}}" "${{extra[@]}}"\n'
    )
    wrapper.chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPTS / "bench_gpu.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": str(wrapper)})
    out = proc.stdout
    assert proc.returncode == 0 and "!!" not in out, out[-3000:] + proc.stderr[-3000:]
    assert [line for line in out.splitlines() if line.startswith("## ")] == [
        "## " + line.split('"')[1] for line in (SCRIPTS / "bench_gpu.sh").read_text().splitlines() if line.startswith("section \"")
    ]
    methods = re.findall(r"^method=(\w+) ratio=[\d.]+ .*exact_count=ok$", out, re.M)
    assert methods == ["seven", "platon", "movement", "magnitude", "random", "seven"], out
    assert "model_compile=True" in out and "precision=bf16" in out
    assert re.search(r"^ratio=[\d.]+ hand_shrunk_ratio=[\d.]+ compressed_vs_hand_shrunk=[\d.]+$", out, re.M), out
    assert re.search(r"^gflop_per_s: dense=[\d.]+ compressed=[\d.]+ hand_shrunk=[\d.]+ matmul_1024=[\d.]+$", out, re.M), out
    assert re.search(r"^semi_structured=unavailable ", out, re.M), out
