#!/usr/bin/env bash
# The GPU check of issue 8, one command on one H100/H200 (about 8.5 minutes at most):
#   nvidia-smi; train_step.py --peer (every case, llava_jax and transformers, one process per case);
#   decode.py (if present) in the time that is left.
# Tables go to $OUT (default ./bench_out): train_step.md/.json, decode.txt, and the full logs.
# Budgets (seconds, environment): TOTAL_S=510, TRAIN_DEADLINE_S=360, CASE_TIMEOUT_S=170, MIN_DECODE_S=90;
# PROFILE=1 also traces 2 steps of each llava_jax case (train_step.py --profile_dir=$OUT/profiles) and prints
# its busiest device ops under the table (costs some seconds per case);
# VARIANTS="NAME:key=value,... NAME2:..." adds llava_jax rows with other settings to every case (train_step.py
# --variant; they run after the case's two main rows, so a deadline drops them first);
# DECODE_ARGS="..." are passed to decode.py (e.g. --profile_dir=... --jax_variant=NAME:XLA_FLAGS);
# TRAIN=0 skips train_step.py (a decode-only run: DECODE_FIRST=1 DECODE_S=...);
# DECODE_FIRST=1 runs decode.py first, limited to DECODE_S (default 240) seconds, then train_step.py in the time
# left before TOTAL_S;
# CASES=... overrides the case list (by default stage2-7b is left out on cards under 100 GB: both sides need
# about 90 GB there; the peer's measured peak is 87.7 GB).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-510}
TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-360}
CASE_TIMEOUT_S=${CASE_TIMEOUT_S:-170}
MIN_DECODE_S=${MIN_DECODE_S:-90}
start=$SECONDS

nvidia-smi || echo "nvidia-smi failed"
git log -1 --format='commit %H %cd' 2>/dev/null || true
python -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"

if [ -z "${CASES:-}" ]; then
  mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  if [ -n "$mem_mib" ] && [ "$mem_mib" -lt 100000 ]; then
    CASES=stage1-7b,stage2-1b,stage2-7b-remat
    echo "GPU memory ${mem_mib} MiB < 100 GB: stage2-7b (4 x 2048, ~90 GB) is left out; CASES=... to force it"
  else
    CASES=stage1-7b,stage2-1b,stage2-7b,stage2-7b-remat
  fi
fi

run_decode() {  # $1: time limit in seconds
  [ -f benchmarks/decode.py ] || return
  if [ "$1" -ge "$MIN_DECODE_S" ]; then
    echo "=== decode (limit $1 s) ==="
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$1" python benchmarks/decode.py --deadline_s=$(($1 - 15)) ${DECODE_ARGS:-} > "$OUT/decode.txt" 2> "$OUT/decode.log"
    echo "decode exit $? after $((SECONDS - start)) s"
    cat "$OUT/decode.txt"
    tail -n 20 "$OUT/decode.log"
  else
    echo "=== decode skipped: $1 s left (< ${MIN_DECODE_S} s) ==="
  fi
}

if [ -n "${DECODE_FIRST:-}" ]; then
  run_decode "${DECODE_S:-240}"
  TRAIN_DEADLINE_S=$((TOTAL_S - (SECONDS - start) - 40))
fi

run_train() {
  # Each case runs in a fresh process: JAX may take 95% of the card (the peer runs after it exits).
  echo "=== train_step: $CASES (deadline ${TRAIN_DEADLINE_S} s) ==="
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95} \
    timeout -k 10 $((TRAIN_DEADLINE_S + 30)) \
    python benchmarks/train_step.py --peer --cases="$CASES" --out="$OUT/train_step.md" \
      --deadline_s="$TRAIN_DEADLINE_S" --timeout_s="$CASE_TIMEOUT_S" \
      ${PROFILE:+--profile_dir="$OUT/profiles"} ${VARIANTS:+$(printf -- ' --variant=%s' $VARIANTS)} \
      > "$OUT/train_step.out" 2> "$OUT/train_step.log"
  echo "train_step exit $? after $((SECONDS - start)) s (log: $OUT/train_step.log)"
  [ -f "$OUT/train_step.md" ] && cat "$OUT/train_step.md"
  tail -n 30 "$OUT/train_step.log"
}

if [ "${TRAIN:-1}" = 0 ]; then
  echo "=== train_step skipped (TRAIN=0) ==="
else
  run_train
fi

[ -z "${DECODE_FIRST:-}" ] && run_decode $((TOTAL_S - (SECONDS - start)))
echo "total $((SECONDS - start)) s"
