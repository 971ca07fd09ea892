#!/usr/bin/env bash
# Question: does a jaxserve server on a GPU keep its normal clients' latency (within 2x), answer no
# 5xx, return its KV cache to idle and keep RSS flat while clients disconnect, trickle bodies and
# headers, and send hostile input? (scripts/hostile_load.py against a live server on one machine.)
#
# Model: SmolLM2-135M's shape with random (dummy) bf16 weights and the real SmolLM2 tokenizer,
# saved as an orbax checkpoint on the machine (the real GGUF is too large to carry). Needs, in the
# repository root: .whl/ (starlette, uvicorn, h11, click, gguf, uvloop wheels for Python 3.12) and
# .devdata/tok (the SmolLM2 tokenizer saved with save_pretrained).
set -euo pipefail
OUT=${OUT:-/tmp/out}
BASELINE=${BASELINE:-60} ATTACK=${ATTACK:-180}
source experiments/smol_on_gpu.sh
python3 -m jaxserve.cli serve --model /tmp/smol --port 8000 --http-header-timeout 5 \
  --http-body-timeout 10 --compilation-cache-dir "" > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -sf http://127.0.0.1:8000/health >/dev/null && break
  kill -0 $SERVER || { tail -50 "$OUT/server.log"; exit 1; }
  sleep 1
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
python3 scripts/hostile_load.py --base-url http://127.0.0.1:8000 --server-pid $SERVER \
  --baseline-seconds "$BASELINE" --attack-seconds "$ATTACK" --normal-concurrency 16 \
  --disconnect-concurrency 8 --slow-body-connections 300 --slow-header-connections 100 \
  --bad-concurrency 2 --output-json "$OUT/hostile.json" 2> "$OUT/progress.log" || rc=$?
kill -TERM $SERVER; wait $SERVER || true
grep -c "WARNING" "$OUT/server.log" || true
grep -E "ERROR|Traceback" "$OUT/server.log" | head -20 || true
exit $rc
