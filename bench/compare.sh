#!/usr/bin/env bash
# openlora vs Hugging Face transformers + PEFT on the same model, adapters and requests, on
# this machine, in one run: `bash bench/compare.sh [openlora bench options...]`.
# Writes target/bench/{openlora.json, peft.json, compare.md, slora.svg}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=target/bench
data=target/bench-data
mkdir -p "$out"
cargo build --release --locked -p openlora
target/release/openlora bench --device cpu --dtype bf16 --kv-cache-dtype bf16 --keep "$data" --out "$out/openlora.json" "$@" >/dev/null
venv=target/peft-venv
if ! "$venv/bin/python" -c "import torch, transformers, peft" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/requirements.txt
fi
"$venv/bin/python" bench/hf_peft_baseline.py --report "$out/openlora.json" --data "$data" --out "$out/peft.json" >/dev/null
target/release/openlora bench --device cpu --compare "$out/openlora.json" --baseline "$out/peft.json" \
    --svg "$out/slora.svg" > "$out/compare.md"
cat "$out/compare.md"
