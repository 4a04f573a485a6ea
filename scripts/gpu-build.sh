#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a lent GPU machine, here (x86-64): the release
# `openlora` and the engine test binary, stripped into target/gpu (carry it), and the HF PEFT
# baseline script copied into bench/ when ../shared/bench has it (carry it too).
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENLORA_GIT_COMMIT=${OPENLORA_GIT_COMMIT:-$(git rev-parse --short HEAD)}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p openlora
test_bin=$(cargo test --release -p openlora --test engine --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "engine":
        print(m["executable"])')
mkdir -p target/gpu
objcopy --strip-all "$target/release/openlora" target/gpu/openlora
objcopy --strip-all "$test_bin" target/gpu/engine-tests
if [ -f ../shared/bench/hf_peft_multilora.py ]; then
    mkdir -p bench && cp ../shared/bench/hf_peft_multilora.py bench/
    grep -qx '/bench/' .git/info/exclude 2>/dev/null || echo /bench/ >>.git/info/exclude
fi
du -ch target/gpu/* | tail -n 1
echo "carry: target/gpu (and bench/ if made); run: OUT=\$OUT bash scripts/gpu-check.sh"
