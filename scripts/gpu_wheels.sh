#!/usr/bin/env bash
# Wheels the GPU machine lacks for the HTTP server and `jaxserve bench serve` (starlette, uvicorn
# and their pure-Python needs), downloaded here into .whl/ (git-ignored) for Python 3.12.
# On the GPU machine, before running the server:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl starlette==1.10.0 uvicorn==0.54.0 h11 anyio sniffio click
ls .whl
