#!/usr/bin/env bash
# Builds the CUDA stand-in (libcuda.so, libnvrtc.so, libcublas.so and its self-test) from source
# with the system C++ compiler. Prints, as its last line, the folder to put first on
# LD_LIBRARY_PATH so that cudarc loads the stand-in instead of NVIDIA's libraries.
#   bash tests/cuda-standin/build.sh [OUT_DIR]   (default: target/cuda-standin)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/cuda-standin}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cxx="${CXX:-c++}"
if ! command -v "$cxx" >/dev/null; then  # a fresh machine: Debian's C++ compiler
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
flags=(-std=c++17 -O2 -g1 -fPIC -Wall -Wno-unused-function -fvisibility=hidden -I"$here/src")

# Rebuild only when a source changed.
stamp="$(cat "$here"/src/* "$here"/selftest/* "$here/build.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$stamp" ]; then
    cp "$here/src/simt.h" "$out/simt.h"
    rm -rf "$out/cache"
    "$cxx" "${flags[@]}" -shared -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so" \
        "$here/src/driver.cpp" "$here/src/device.cpp" "$here/src/memory.cpp" "$here/src/compile.cpp" -ldl -lpthread
    "$cxx" "${flags[@]}" -shared -Wl,-soname,libnvrtc.so -o "$out/libnvrtc.so" \
        "$here/src/nvrtc.cpp" "$here/src/compile.cpp" -ldl -lpthread
    "$cxx" "${flags[@]}" -shared -Wl,-soname,libcublas.so -o "$out/libcublas.so" \
        "$here/src/cublas.cpp" -L"$out" -l:libcuda.so -Wl,-rpath,'$ORIGIN'
    # The names cudarc may try, after the plain ones.
    for lib in cuda nvrtc cublas; do
        for v in 1 12 13; do ln -sf "lib$lib.so" "$out/lib$lib.so.$v"; done
    done
    "$cxx" -std=c++17 -O1 -g -Wall -I"$here/src" -o "$out/selftest" "$here/selftest/selftest.cpp" \
        -L"$out" -l:libcuda.so -l:libnvrtc.so -l:libcublas.so -Wl,-rpath,"$out" -ldl -lpthread
    echo "$stamp" > "$out/.stamp"
fi
echo "$out"
