# Sourced by the GPU experiments: installs the carried wheels (.whl/) and writes /tmp/smol, an
# orbax checkpoint of SmolLM2-135M's shape with random bf16 weights and the real SmolLM2
# tokenizer (.devdata/tok, saved with save_pretrained; the real GGUF is too large to carry).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
rm -rf /tmp/smol
python3 - <<'PY'
from transformers import AutoTokenizer
from jaxserve.loading import load_model
from jaxserve.loading.orbax_io import save_orbax
lm = load_model("smollm2-135m", load_format="dummy", dtype="bfloat16")
save_orbax(lm.model, lm.hf_config, "/tmp/smol", tokenizer=AutoTokenizer.from_pretrained(".devdata/tok"))
PY
