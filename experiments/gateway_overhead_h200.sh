#!/usr/bin/env bash
# Question: what do the gateway's keys, limits, usage accounting and request log add to serving?
# The same server without and with `--api-keys-file` (one key with limits it never reaches,
# `--usage-db`, `--request-log`), each measured by `jaxserve bench serve` at 1 req/s (TTFT) and at
# concurrency 64 (throughput), twice in the order A B A B on one machine.
# Model: SmolLM2-135M's shape, random bf16 weights, the real SmolLM2 tokenizer (as
# hostile_load_h200.sh). Needs .whl/ and .devdata/tok in the repository root.
set -euo pipefail
OUT=${OUT:-/tmp/out}
source experiments/smol_on_gpu.sh
KEY=sk-bench-0123456789
printf 'keys:\n  - name: bench\n    key: %s\n    requests_per_minute: 100000\n    tokens_per_minute: 100000000\n    max_concurrent: 1000\n    token_budget: 100000000000\n    budget_period: day\n' "$KEY" > /tmp/keys.yaml
run() {  # $1 = label, $2.. = extra serve flags
  local label=$1; shift
  python3 -m jaxserve serve --model /tmp/smol --port 8000 "$@" > "$OUT/server_$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8000/health >/dev/null && break; sleep 1; done
  local auth=(); [[ "$*" == *api-keys-file* ]] && auth=(--api-key "$KEY")
  python3 -m jaxserve bench serve "${auth[@]}" --tokenizer /tmp/smol --request-rate 1 --num-prompts 60 --input-len 256 \
    --output-len 64 --disable-tqdm --output-json "$OUT/rate1_$label.json" > /dev/null
  python3 -m jaxserve bench serve "${auth[@]}" --tokenizer /tmp/smol --max-concurrency 64 --num-prompts 640 \
    --input-len 256 --output-len 128 --disable-tqdm --output-json "$OUT/conc64_$label.json" > /dev/null
  kill -TERM $pid; wait $pid || true
}
for round in 1 2; do
  run "plain$round"
  run "gateway$round" --api-keys-file /tmp/keys.yaml --usage-db /tmp/usage$round.db \
    --request-log /tmp/requests$round.jsonl
  wc -l /tmp/requests$round.jsonl
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    d = json.load(open(f))
    keys = [k for k in d if any(s in k for s in ("median_ttft", "output_throughput", "request_throughput", "median_itl", "completed"))]
    print(os.path.basename(f), {k: round(d[k], 3) if isinstance(d[k], float) else d[k] for k in keys})
PY
nvidia-smi --query-gpu=name --format=csv,noheader
