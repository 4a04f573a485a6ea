#!/usr/bin/env bash
# Calls a running `openlora serve` (default http://127.0.0.1:8080) with curl: list models, a
# completion with an adapter, a streamed chat, and the billing each response carries.
set -euo pipefail
URL="${OPENLORA_URL:-http://127.0.0.1:8080}"
AUTH=()
if [ -n "${OPENLORA_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $OPENLORA_API_KEY"); fi

echo "# models: the base model and every adapter"
curl -sf "${AUTH[@]}" "$URL/v1/models"
echo

echo "# a completion with the startrek adapter (the response's billing says who is paid what)"
curl -sf "${AUTH[@]}" "$URL/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "startrek", "prompt": "Captain", "max_tokens": 24, "temperature": 0}'
echo

echo "# a streamed chat with the base model; the last chunks carry usage and billing"
curl -sfN "${AUTH[@]}" "$URL/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "openlora-tiny-fortunes", "messages": [{"role": "user", "content": "Tell me a fortune"}],
       "max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}}'
