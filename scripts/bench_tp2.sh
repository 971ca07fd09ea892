#!/usr/bin/env bash
# tp=2 against one GPU on the same 2-GPU machine, with the A/Bs the tp=2 step still owes
# (docs/benchmarks/2026-11-to-12.md, "Not measured yet"), in one go:
#   scripts/bench_tp2.sh [OUT_DIR] [MODEL] [bench_decode args ...]   (default: ./out/tp2, qwen2.5-7b)
# Runs, in this order, `scripts/bench_decode.py --batches 1 64 --repeats 3
# --max-num-batched-tokens 512 --phases` for: tp=2; one GPU (CUDA_VISIBLE_DEVICES=0); tp=2 with
# the logits gathered for greedy steps (JAXSERVE_VOCAB_PARALLEL_GREEDY=0); tp=2 with the SwiGLU
# in XLA (JAXSERVE_SKINNY_GLU=0); tp=2 again. One log per run in OUT_DIR, then a summary: tok/s
# at batch 1 and 64, the decode step and the decode call's host time at 64 rows.
# Each run starts its own engine (~40-80 s with compiles); about 6 minutes in all on 2 x H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/tp2}
model=${2:-qwen2.5-7b}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
bench=(python3 scripts/bench_decode.py --model "$model" --batches 1 64 --repeats 3
       --max-num-batched-tokens 512 --phases "$@")
runs=(tp2 one_gpu tp2_gathered_greedy tp2_xla_glu tp2_again)
for name in "${runs[@]}"; do
  case $name in
    one_gpu)             env CUDA_VISIBLE_DEVICES=0 "${bench[@]}" ;;
    tp2_gathered_greedy) env JAXSERVE_VOCAB_PARALLEL_GREEDY=0 "${bench[@]}" --mesh tp=2 ;;
    tp2_xla_glu)         env JAXSERVE_SKINNY_GLU=0 "${bench[@]}" --mesh tp=2 ;;
    *)                   "${bench[@]}" --mesh tp=2 ;;
  esac > "$out/$name.txt" 2>&1 || echo "$name: exit $?" >&2
done
printf '%-22s %10s %10s %12s %12s\n' run "b=1 tok/s" "b=64 tok/s" "step b=64" "host call"
for name in "${runs[@]}"; do
  f="$out/$name.txt"
  b1=$(awk '$1 == 1 && $2 == "True" {print $4}' "$f")
  b64=$(awk '$1 == 64 && $2 == "True" {print $4}' "$f")
  step=$(grep -o 'decode b=64: [0-9.]* ms' "$f" | head -1 | awk '{print $3}')
  host=$(grep -o 'decode t=64 s=64: [0-9.]*' "$f" | head -1 | awk '{print $4}')
  printf '%-22s %10s %10s %9s ms %9s ms\n' "$name" "${b1:--}" "${b64:--}" "${step:--}" "${host:--}"
done
