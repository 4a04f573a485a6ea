# syntax=docker/dockerfile:1
# openlora: one image for CPU and GPU nodes. The CUDA driver, NVRTC and cuBLAS are loaded at run
# time (cudarc), so the same binary serves on a CPU node, or on a GPU node whose container
# runtime (the NVIDIA container toolkit) mounts the driver; NVRTC and cuBLAS come with the base
# image. The build stage's glibc (Debian 12) is older than the run stage's (Ubuntu 24.04).
# Build: docker build -t openlora .

# --- build: the release binary, with the toolchain rust-toolchain.toml pins -------------------
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p openlora \
    && install -m 0755 target/release/openlora /usr/local/bin/openlora

# --- run: the binary, with the CUDA runtime libraries it loads on a GPU (NVRTC, cuBLAS; the
# driver comes from the node), as a user without privileges. On a CPU node they stay unused.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/openlora --create-home openlora
COPY --from=build /usr/local/bin/openlora /usr/local/bin/openlora
USER 10001:10001
ENV OPENLORA_HOME=/var/lib/openlora \
    OPENLORA_LOG_FORMAT=json
WORKDIR /var/lib/openlora
# The port the Kubernetes gateways (and AIBrix's adapter controller) call, as vLLM's.
EXPOSE 8000
# tini forwards SIGTERM, so the server drains (30 s) before the pod's grace period ends.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/openlora"]
CMD ["serve", "--config", "/etc/openlora/openlora.toml"]
