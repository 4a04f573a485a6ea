#!/usr/bin/env bash
# Runs every openlora test from a fresh clone. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The toolchain and the wasm32-wasip2 target are pinned by rust-toolchain.toml; make sure
# they are installed (rustup fetches them on first use, this just makes it explicit).
rustup show active-toolchain >/dev/null
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

# The end-to-end HTTP tests use the official `openai` Python client, in a private venv.
venv=target/e2e-venv
if ! "$venv/bin/python" -c "import openai, httpx, pytest" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi

# Tests unpack the embedded model and write their data under a throwaway home.
export OPENLORA_HOME="${OPENLORA_HOME:-$(mktemp -d)}"

cargo fmt --all --check
# Unit tests, end-to-end tests in tests/, and every criterion benchmark run once in test mode.
cargo test --workspace --all-targets --locked
# The HTTP API through real sockets and the real `openai` client, against the binary that
# `cargo test` built for the CLI tests (a separate `cargo build` would recompile for other features).
test -x target/debug/openlora
OPENLORA_BIN="$PWD/target/debug/openlora" "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider
