#!/usr/bin/env bash
# Every speed figure of DESIGN.md §7 on one GPU, in one run (about 5-7 minutes on an
# H100/H200): the pruning-step overhead of each method at BERT-base shape (batch
# 32 x 128, bf16) with the training throughput dense vs each method, the SPP-compressed
# model against dense, and the 2:4 semi-structured speed-up of a 2:4-pruned BERT-base.
# Needs no network (random-init BERT-base shapes). Run from the repository root:
#   bash scripts/bench_gpu.sh            # uses .venv/bin/python if present
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'PYEOF'
import torch
print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PYEOF
echo "## 1. pruning-step overhead and training throughput (BERT-base, batch 32x128, bf16)"
timeout 300 $PY scripts/bench_overhead.py --device cuda --precision bf16 --batch 32 --seq 128 --steps 10 --warmup 3 --compile false | grep -v '^#   '
echo "## 2. SPP: compressed (50 % structured) vs dense forward (batch 32x128, bf16)"
timeout 120 $PY scripts/bench_speed.py --device cuda --dtype bf16 --batch 32 --seq 128 --repeats 30
echo "## 3. 2:4 semi-structured vs dense (batch 32x128, bf16)"
timeout 120 $PY scripts/bench_semi_structured.py --batch 32 --seq 128 --dtype bf16
