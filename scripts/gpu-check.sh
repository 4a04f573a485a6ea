#!/usr/bin/env bash
# The GPU check, as one prepared run on a lent GPU machine (H100/H200): parity on the committed
# fixtures, then multi-adapter throughput at Llama-7B shape, and the HF PEFT baseline in the same
# run when its script is carried. It builds nothing: the x86-64 release binary built on the dev
# machine is carried (see README, "The GPU backend"). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
BIN=${OPENLORA_BIN:-target/gpu/openlora}
# cuBLAS is not always in the loader's cache on those machines; NVRTC and the driver are.
for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.csv" 2>&1
timeout "${OPENLORA_BENCH_TIMEOUT:-420}" "$BIN" bench --device cuda:0 --fixtures tests/fixtures \
    --out "$OUT/openlora_bench.json" 2>&1 | tee "$OUT/openlora_bench.log"
status=${PIPESTATUS[0]}
if [ -f bench/hf_peft_multilora.py ]; then
    OUT="$OUT" PYTHONUNBUFFERED=1 timeout "${PEFT_TIMEOUT:-300}" python3 bench/hf_peft_multilora.py \
        2>&1 | tail -n 40 >"$OUT/peft.log"
fi
exit "$status"
