#!/usr/bin/env bash
# The GPU checks of turbovae, in one call (about 6 minutes on one H100): the test suite on CUDA, then
# the benchmarks of issue 3 on the same card. Writes JSON lines to ${OUT:-/tmp/turbovae-gpu}/gpu.jsonl
# and prints a short table last. Needs a CUDA build of torch (installs it into a venv if missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/turbovae-gpu}; mkdir -p "$OUT"; LOG="$OUT/gpu.jsonl"; : > "$LOG"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || { python -m pip install -q torch; }
python -m pip install -q -e '.[dev]'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"

# 1. the test suite on CUDA (the model tests honour TURBOVAE_DEVICE); 2 minutes at most
TURBOVAE_DEVICE=cuda timeout 150 python -m pytest -x -q -p no:warnings tests/test_models.py tests/test_objectives.py \
  tests/test_fast_path.py 2>&1 | tail -3

# 2. the MLP at the peer's settings against pytorch/examples on the same card (target 4: 20x)
B="timeout 120 turbovae bench --data fashion-mnist --device cuda --json --windows 5 --window-steps 100"
$B --model mlp --hidden 400 --latent 20 --batch-size 128 --lr 1e-3 --likelihood bernoulli-grey --vs examples \
  --compile on >> "$LOG"
# 3. the MLP at a GPU-sized batch, and the conv VAE against the card's bf16 matmul ceiling (target 4: 35%)
$B --model mlp --hidden 400 --latent 20 --batch-size 4096 --lr 1e-3 --likelihood bernoulli-grey --vs examples \
  --compile on >> "$LOG"
$B --model conv --channels 64,128 --latent 32 --batch-size 512 --compile on >> "$LOG"
$B --model conv --channels 64,128 --latent 32 --batch-size 512 --compile off --precision fp32 >> "$LOG"
# 4. time to quality of the fast preset on the GPU, whole process
( time timeout 120 turbovae train --config fmnist-mlp-fast --device cuda --out "$OUT/fast" --overwrite \
  --progress off ) 2>&1 | tail -4

python - "$LOG" <<'PY'
import json, sys
print(f"{'model':6} {'batch':>6} {'prec':5} {'compile':22} {'samples/s':>12} {'peer/s':>10} {'speedup':>8} {'ceiling%':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['model']:6} {r['batch_size']:>6} {r['precision']:5} {r['compile'][:22]:22} {r['samples_per_second']:>12,.0f} "
          f"{r.get('peer_samples_per_second', 0):>10,.0f} {r.get('speedup', 0):>8.1f} {100*r['ceiling_fraction']:>8.1f}")
PY
