#!/usr/bin/env bash
# Installs the build dependencies, builds moeflux and runs the whole test suite (the README's test
# command; .ci/run calls it). Extra arguments go to ctest. MOEFLUX_BUILD_DIR chooses the build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build="${MOEFLUX_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${MOEFLUX_CMAKE_ARGS:-}
cmake --build "$build"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
