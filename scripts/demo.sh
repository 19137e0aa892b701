#!/usr/bin/env bash
# The README's first command: installs the build dependencies, builds moeflux, converts the bundled
# tiny qwen3_moe checkpoint into a q4 pack and evaluates a prompt on it with every expert streamed
# from disk (no expert cache). Until the trained demo model lands, the bundled model is a random
# parity fixture: the output is logits and I/O statistics, not text.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build="${MOEFLUX_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" --target moeflux_cli
model=tests/fixtures/parity/wide_mha
pack="$build/demo-pack-q4"
"$build/moeflux" convert "$model" "$pack" --quant q4 --force
echo
"$build/moeflux" inspect "$pack"
echo
tokens=$(tr -d '[] \n' < "$model/tokens.json")
"$build/moeflux" logits --model "$pack" --tokens "$tokens" --out "$build/demo-logits.npy" --expert-cache 0
