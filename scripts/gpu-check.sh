#!/usr/bin/env bash
# The GPU check, as one prepared run on a lent GPU machine (H100/H200). It builds nothing: the
# x86-64 binaries built on the dev machine are carried in target/gpu (see README, "The GPU
# backend"). In order, each step's output in $OUT:
#   1. engine-tests.log: the engine test written once for every backend, on the CPU and cuda:0
#      (mixed adapters, a pool small enough to evict, contribution measure, no leaks);
#   2. serve.log, http-*.json: `openlora serve --device cuda:0` on the embedded model and
#      adapters, answering real HTTP requests (base, adapters, a stream), then `ledger verify`;
#   3. openlora_bench.json: parity on the fixtures (transformers, PEFT, and the serving path on
#      the CPU against the GPU), then throughput at Llama-7B shape and the power-law run;
#   4. peft.log: the HF PEFT baseline in the same run, when its script is carried in bench/.
# Worst case of the step timeouts below: about 590 s, inside one 600 s device call.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
BIN=${OPENLORA_BIN:-target/gpu/openlora}
# OPENLORA_DEVICE=cpu runs the serving part on the CPU (to try the script without a GPU).
DEVICE=${OPENLORA_DEVICE:-cuda:0}
# cuBLAS is not always in the loader's cache on those machines; NVRTC and the driver are.
for d in /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib64 /usr/local/cuda-13.0/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.csv" 2>&1
status=0

if [ -x target/gpu/engine-tests ]; then
    OPENLORA_REPO=$PWD OPENLORA_REQUIRE_GPU=1 timeout "${ENGINE_TEST_TIMEOUT:-90}" target/gpu/engine-tests \
        every_backend --nocapture >"$OUT/engine-tests.log" 2>&1 || status=1
fi

DATA=$(mktemp -d)
printf 'listen = "127.0.0.1:18080"\ndata_dir = "%s"\n' "$DATA" >"$DATA/serve.toml"
"$BIN" serve --device "$DEVICE" --config "$DATA/serve.toml" >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
    curl -sf http://127.0.0.1:18080/ready >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.5
done
ask() { # name, body
    curl -s -o "$OUT/http-$1.json" -w "$1 %{http_code} %{time_total}s\n" http://127.0.0.1:18080/v1/completions \
        -H 'Content-Type: application/json' -d "$2" >>"$OUT/http.log" 2>&1
}
for model in openlora-tiny-fortunes startrek computers love; do
    ask "$model" "{\"model\": \"$model\", \"prompt\": \"The meaning of life is\", \"max_tokens\": 32, \"temperature\": 0}"
done
for i in $(seq 1 16); do # concurrent, mixed adapters: batched together on the GPU
    m=$(echo "openlora-tiny-fortunes startrek computers love" | cut -d' ' -f$((i % 4 + 1)))
    ask "mixed-$i" "{\"model\": \"$m\", \"prompt\": \"Q: why $i\", \"max_tokens\": 48, \"temperature\": 0.7, \"seed\": $i}" &
done
wait $(jobs -p | grep -v "^$server$") 2>/dev/null
curl -sN http://127.0.0.1:18080/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "startrek", "prompt": "Captain", "max_tokens": 16, "stream": true}' >"$OUT/http-stream.txt" 2>&1
curl -s http://127.0.0.1:18080/metrics >"$OUT/metrics.txt" 2>&1
kill -TERM "$server" 2>/dev/null
wait "$server" 2>/dev/null
grep -c " 200 " "$OUT/http.log" >"$OUT/http-200-count.txt" 2>/dev/null
"$BIN" ledger verify --ledger "$DATA/ledger.sqlite3" >"$OUT/ledger-verify.log" 2>&1 || status=1

[ "$DEVICE" = cpu ] && exit "$status"
timeout "${OPENLORA_BENCH_TIMEOUT:-270}" "$BIN" bench --device cuda:0 --fixtures tests/fixtures \
    --out "$OUT/openlora_bench.json" 2>&1 | tee "$OUT/openlora_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -f bench/hf_peft_multilora.py ]; then
    OUT="$OUT" PYTHONUNBUFFERED=1 timeout "${PEFT_TIMEOUT:-200}" python3 bench/hf_peft_multilora.py \
        2>&1 | tail -n 40 >"$OUT/peft.log"
fi
exit "$status"
