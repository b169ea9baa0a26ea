#!/usr/bin/env bash
# Every speed figure of DESIGN.md §7 on one GPU, in one run (expected 3-6 minutes on an
# H100/H200; each section has its own time limit, 7.5 minutes in all): the pruning-step
# overhead of each method at BERT-base shape (batch 32 x 128, bf16) with the training
# throughput dense vs each method, the same with torch.compile, the SPP-compressed model
# against dense, and the 2:4 semi-structured speed-up of a 2:4-pruned BERT-base.
# Needs no network (random-init BERT-base shapes). A failing section is reported and
# the next one still runs. Run from the repository root:
#   bash scripts/bench_gpu.sh            # uses .venv/bin/python if present
#   PYTHON=python3 bash scripts/bench_gpu.sh
# Without `make install` the interpreter needs only torch, transformers >= 5 and
# omegaconf (with its antlr4-python3-runtime; pruneflow itself comes from this checkout
# through PYTHONPATH); checked with transformers 5.17 and 5.25 (on a CPU, at toy sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
section() {  # section TITLE SECONDS COMMAND...: run with a limit, drop the per-step lines
  local title=$1 limit=$2; shift 2
  echo "## $title"
  timeout "$limit" "$@" | grep -v '^#   '
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ]; then echo "!! section over its ${limit} s limit"; status=1
  elif [ "$rc" -ne 0 ]; then echo "!! section failed (exit $rc)"; status=1; fi
}
$PY - <<'PYEOF'
import torch
print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PYEOF
section "1. pruning-step overhead and training throughput (BERT-base, batch 32x128, bf16)" 120 \
  $PY scripts/bench_overhead.py --device cuda --precision bf16 --batch 32 --seq 128 --steps 10 --warmup 3 --compile false
# 1b compiles BERT-base forward and backward twice (dense, then the pruned copy): the longest limit.
section "1b. seven with trainer.compile=true (torch.compile of both models; compile time in the warm-up)" 180 \
  $PY scripts/bench_overhead.py --device cuda --precision bf16 --batch 32 --seq 128 --steps 10 --warmup 3 --compile false --model-compile true --methods seven
section "2. SPP: compressed (50 % structured) vs dense forward (batch 32x128, bf16)" 70 \
  $PY scripts/bench_speed.py --device cuda --dtype bf16 --batch 32 --seq 128 --repeats 30
section "3. 2:4 semi-structured vs dense (batch 32x128, bf16)" 70 \
  $PY scripts/bench_semi_structured.py --batch 32 --seq 128 --dtype bf16
exit $status
