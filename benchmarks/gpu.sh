#!/usr/bin/env bash
# The GPU checks of turbovae in one call (about 8 minutes on one H200): the targets of issue 18 first
# (the step at the peer's batch against pytorch/examples, time to quality against the same peer on the
# same card, the conv and hvae fractions of the bf16 ceiling), then the CUDA tests, then the other
# variants. The whole script keeps to BUDGET seconds (default 500): each step's time limit is cut to
# what is left, so one slow step cannot eat the others and the summary table always comes. JSON lines go
# to $OUT/gpu.jsonl, logs to $OUT/gpu.log; a short table is printed last.
#
#   bash benchmarks/gpu.sh            # on a machine with a CUDA build of torch and turbovae's deps
#   DEVICE=cpu STEPS=2 WINDOWS=1 TTQ=0 TRAIN_EXTRA='train.max_steps=20' bash benchmarks/gpu.sh
#                                     # a dry run of every command on the CPU
#
# No network is assumed: turbovae runs from src/ (PYTHONPATH), Fashion-MNIST is found through
# $TURBOVAE_DATA (default .gpudata/, which holds fashion-mnist/*.gz) or the Debian package; schedulefree
# (fmnist-mlp-fast's optimiser) must be importable (the device call carries it as a wheel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/turbovae-gpu}; mkdir -p "$OUT"; LOG="$OUT/gpu.jsonl"; : > "$LOG"
WORK=$(mktemp -d)  # run folders and compile caches: many files, kept out of $OUT
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-100}; WINDOWS=${WINDOWS:-5}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TURBOVAE_DATA=${TURBOVAE_DATA:-$PWD/.gpudata} XDG_CACHE_HOME=${XDG_CACHE_HOME:-$WORK/cache}
export FMNIST_DIR=${FMNIST_DIR:-$( [ -d "$TURBOVAE_DATA/fashion-mnist" ] && echo "$TURBOVAE_DATA/fashion-mnist" || echo /usr/share/datasets/fashion-mnist)}
PY=${PY:-$(command -v python3 || command -v python)}
TV="$PY -m turbovae"
T0=$SECONDS; BUDGET=${BUDGET:-500}
exec > >(tee -a "$OUT/gpu.log") 2>&1

limit() {  # limit S: S or what is left of the budget less 15 s for the summary, whichever is smaller
  local left=$((BUDGET - (SECONDS - T0) - 15))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
echo "== card and software"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'

bench() {  # bench LIMIT_S ARGS...: one JSON line into $LOG, or a note of the failure
  local t; t=$(limit "$1"); shift
  echo "== bench $* (limit ${t} s, $((SECONDS - T0)) s in)"
  [ "$t" -lt 20 ] && { echo "   skipped: the budget is spent"; return; }
  timeout "$t" $TV bench --data fashion-mnist --device "$DEVICE" --json --windows "$WINDOWS" \
    --window-steps "$STEPS" --lr 1e-3 "$@" ${EXTRA:-} > "$OUT/one.json" && cat "$OUT/one.json" >> "$LOG" \
    || echo "   failed or timed out (rc $?)"
}
MLP="--model mlp --hidden 400 --latent 20 --likelihood bernoulli-grey"
CONV="--model conv --channels 64,128 --latent 32 --batch-size 1024 --likelihood bernoulli-grey"

echo "== 1. target 2: MLP at the peer's settings (batch 128) against pytorch/examples on the same card"
bench 60 $MLP --batch-size 128 --vs examples --compile off

if [ "${TTQ:-1}" = 1 ]; then
  t=$(limit 100)
  echo "== 2. target 1: time to quality, whole process: pytorch/examples' 10 epochs, then fmnist-mlp-fast (limit ${t} s)"
  timeout "$t" $PY benchmarks/time_to_quality.py --device "$DEVICE" ${TRAIN_EXTRA:-} | tee "$OUT/ttq.json" \
    || echo "   failed or timed out (rc $?)"
fi
echo "== 3. the fast preset alone, with its summary"
t=$(limit 45)
timeout "$t" $TV train --config fmnist-mlp-fast --device "$DEVICE" --out "$WORK/fast" --overwrite \
  --progress off ${TRAIN_EXTRA:-} > /dev/null && $PY - "$WORK/fast/summary.json" <<'PY' | tee -a "$OUT/fast.txt"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"fmnist-mlp-fast on {s.get('device')}: training {s['train_seconds']:.2f} s, {s['steps']} steps, "
      f"test NELBO {s['test_nelbo']:.2f}, {s['samples_per_second']:,.0f} samples/s, precision {s.get('precision')}, "
      f"compile: {s.get('compile')}")
PY

# the fast preset's own step (schedule-free, captured as one CUDA graph on CUDA) against the peer
bench 45 --config fmnist-mlp-fast --vs examples --compile off

echo "== 4. conv VAE and the hierarchical VAE against the card's bf16 matmul ceiling"
bench 60 $CONV --compile off --precision bf16
if [ -f src/turbovae/configs/fmnist-hvae-gpu.yaml ]; then
  bench 60 --config fmnist-hvae-gpu --compile off --precision bf16 --windows 3 --window-steps 40
fi
bench 100 $CONV --compile on --precision bf16

if [ -f benchmarks/hvae_ops.py ]; then  # issue 35 target 3: aten operators (~ kernel launches) a step
  t=$(limit 60)
  echo "== 4b. fmnist-hvae-gpu's operators per training step at batch 8, bf16 and fp32 (limit ${t} s)"
  for prec in bf16 fp32; do
    timeout "$t" $PY benchmarks/hvae_ops.py --device "$DEVICE" --precision $prec --windows 3 --json \
      | tee -a "$OUT/hvae_ops.jsonl" || echo "   failed or timed out (rc $?)"
  done
fi

if [ "$DEVICE" = cuda ]; then
  t=$(limit 90)
  echo "== 5. optimiser, step and hvae tests on CUDA (limit ${t} s)"
  HVAE_TESTS=$(ls tests/test_hvae.py 2>/dev/null)
  # (the project's addopts already say -q: a second one hides pytest's count line)
  TURBOVAE_DEVICE=cuda timeout "$t" $PY -m pytest -m "not slow" -p no:cacheprovider -p no:warnings -rf \
    ${GPU_TESTS:-tests/test_optim.py $HVAE_TESTS} > "$OUT/gpu-tests.log" 2>&1; echo "   rc $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests.log" | tail -12
fi

echo "== 6. other variants: compiled MLP at 128, GPU-sized batches, fp32 eager"
bench 75 $MLP --batch-size 128 --vs examples --compile on
bench 45 $MLP --batch-size 8192 --compile off
bench 45 $CONV --compile off --precision fp32
if [ -f src/turbovae/configs/fmnist-hvae-gpu.yaml ]; then
  bench 45 --config fmnist-hvae-gpu --compile off --precision fp32 --windows 3 --window-steps 20 \
    train.cuda_graph=false
fi

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

cat "$OUT/ttq.json" "$OUT/fast.txt" 2>/dev/null
[ -f "$OUT/hvae_ops.jsonl" ] && $PY - "$OUT/hvae_ops.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"hvae ops/step {r['precision']} batch {r['batch_size']} on {r['device']}: {r['ops_per_step']:,.0f} "
          f"(target {r['target']:,}; {r['kernel_ops_per_step']:,.0f} not views), eager step {r['step_ms']:.2f} ms")
PY
echo "total $((SECONDS - T0)) s"
