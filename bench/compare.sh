#!/usr/bin/env bash
# disp vs HF transformers / PyTorch, side by side: `bench/compare.sh [--rounds 3] [--only eval,speed,search]`.
# Builds the release binary, uses .venv-fixtures (this checkout's, else $DISP_PYTHON, else creates
# it from tests/fixtures/requirements.txt), prints a markdown table. Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p disp-cli >&2
python=${DISP_PYTHON:-}
if [ -z "$python" ]; then
    if [ ! -x .venv-fixtures/bin/python ]; then
        python3 -m venv .venv-fixtures >&2 && .venv-fixtures/bin/pip install -q -r tests/fixtures/requirements.txt >&2
    fi
    python=.venv-fixtures/bin/python
fi
[ -f models/smollm2-135m-instruct/model.safetensors ] || { echo "models/smollm2-135m-instruct missing: run cargo xtask fetch-assets" >&2; exit 1; }
exec "$python" bench/compare.py --disp target/release/disp --python "$python" "$@"
