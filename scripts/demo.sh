#!/usr/bin/env bash
# The README's first command: installs the build dependencies, builds moeflux, converts the bundled
# demo model (models/demo: a 12M-parameter qwen3_moe trained on Debian's fortunes) into a q4 pack and
# generates from it with every routed expert streamed from disk (no expert cache).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build="${MOEFLUX_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --target moeflux_cli
pack="$build/demo-pack-q4"
"$build/moeflux" convert models/demo "$pack" --quant q4 --force
echo
"$build/moeflux" run --model "$pack" --chat --prompt "Tell me a fortune about computers." -n 120 --expert-cache 0
