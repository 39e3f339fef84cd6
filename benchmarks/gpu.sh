#!/usr/bin/env bash
# The GPU checks of turbovae in one call (about 5 minutes on one H100; GPU_TESTS picks other test files, e.g. the whole models/objectives/fast-path set of the first run): the model tests on CUDA, then
# the speed benchmarks of issues 3 and 10 on the same card. Each step has its own time limit, so one
# slow step cannot eat the others. JSON lines go to $OUT/gpu.jsonl, logs to $OUT/gpu.log; a short
# table is printed last.
#
#   bash benchmarks/gpu.sh            # on a machine with a CUDA build of torch and turbovae's deps
#   DEVICE=cpu STEPS=2 WINDOWS=1 EXTRA='--compile off' TRAIN_EXTRA='--epochs 1' bash benchmarks/gpu.sh
#                                     # a dry run of every command on the CPU
#
# No network is assumed: turbovae runs from src/ (PYTHONPATH), Fashion-MNIST is found through
# $TURBOVAE_DATA (default .gpudata/, which holds fashion-mnist/*.gz) or the Debian package.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/turbovae-gpu}; mkdir -p "$OUT"; LOG="$OUT/gpu.jsonl"; : > "$LOG"
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-100}; WINDOWS=${WINDOWS:-5}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TURBOVAE_DATA=${TURBOVAE_DATA:-$PWD/.gpudata} XDG_CACHE_HOME=${XDG_CACHE_HOME:-$OUT/cache}
PY=${PY:-$(command -v python3 || command -v python)}
TV="$PY -m turbovae"
exec > >(tee -a "$OUT/gpu.log") 2>&1

echo "== card and software"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'

if [ "$DEVICE" = cuda ]; then
  echo "== 1. model, objective and fast-path tests on CUDA"
  HVAE_TESTS=$(ls tests/test_hvae.py 2>/dev/null)
  TURBOVAE_DEVICE=cuda timeout ${TEST_LIMIT:-90} $PY -m pytest -q -p no:cacheprovider -p no:warnings \
    ${GPU_TESTS:-tests/test_optim.py $HVAE_TESTS} 2>&1 | tail -15
fi

bench() {  # bench LIMIT_S ARGS...: one JSON line into $LOG, or a note of the failure
  local limit=$1; shift
  echo "== bench $*"
  timeout "$limit" $TV bench --data fashion-mnist --device "$DEVICE" --json --windows "$WINDOWS" \
    --window-steps "$STEPS" --lr 1e-3 "$@" ${EXTRA:-} > "$OUT/one.json" && cat "$OUT/one.json" >> "$LOG" \
    || echo "   failed or timed out (rc $?)"
}
MLP="--model mlp --hidden 400 --latent 20 --likelihood bernoulli-grey"
echo "== 2. MLP, the peer's settings (batch 128) against pytorch/examples on the same card"
bench 90 $MLP --batch-size 128 --vs examples --compile on
bench 60 $MLP --batch-size 128 --compile off
if [ -f src/turbovae/configs/fmnist-hvae-gpu.yaml ]; then
  echo "== 5. the hierarchical VAE preset: bf16 as one CUDA graph against fp32 eager without graphs (issue 10)"
  bench 75 --config fmnist-hvae-gpu --compile off --precision bf16 --windows 3 --window-steps 40
  bench 60 --config fmnist-hvae-gpu --compile off --precision fp32 --windows 3 --window-steps 20 \
    train.cuda_graph=false
fi
echo "== 3. MLP at GPU-sized batches (the peer at the same batch, for reference)"
bench 75 $MLP --batch-size 8192 --compile on
echo "== 4. conv VAE against the card's bf16 matmul ceiling; and the same model eager fp32"
CONV="--model conv --channels 64,128 --latent 32 --batch-size 1024 --likelihood bernoulli-grey"
bench 100 $CONV --compile on --precision bf16
bench 60 $CONV --compile off --precision fp32
echo "== 6. time to quality of the fast preset, whole process"
t0=$(date +%s.%N)
timeout 60 $TV train --config fmnist-mlp-fast --device "$DEVICE" --out "$OUT/fast" --overwrite \
  --progress off ${TRAIN_EXTRA:-} > /dev/null && t1=$(date +%s.%N) \
  && $PY - "$OUT/fast/summary.json" "$t0" "$t1" <<'PY' | tee -a "$OUT/fast.txt"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"fmnist-mlp-fast on {s.get('device')}: process {float(sys.argv[3]) - float(sys.argv[2]):.1f} s, training {s['train_seconds']:.1f} s, "
      f"test NELBO {s['test_nelbo']:.2f}, {s['samples_per_second']:,.0f} samples/s, compile: {s.get('compile')}")
PY

echo "== summary"
$PY - "$LOG" <<'PY'
import json, sys
print(f"{'model':6} {'batch':>6} {'prec':5} {'compile':26} {'samples/s':>12} {'peer/s':>10} {'speedup':>8} "
      f"{'TFLOP/s':>8} {'ceiling%':>8} {'step ms':>8}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['model']:6} {r['batch_size']:>6} {r['precision']:5} {r['compile'][:26]:26} "
          f"{r['samples_per_second']:>12,.0f} {r.get('peer_samples_per_second', 0):>10,.0f} "
          f"{r.get('speedup', 0):>8.2f} {r['flops_per_second'] / 1e12:>8.2f} {100 * r['ceiling_fraction']:>8.2f} "
          f"{r['step_ms']:>8.3f}")
if lines := open(sys.argv[1]).read().splitlines():
    print("matmul ceiling in the first line's precision:", f"{json.loads(lines[0])['ceiling_flops_per_second'] / 1e12:.0f} TFLOP/s",
          "| device:", json.loads(lines[0])["device"])
PY

