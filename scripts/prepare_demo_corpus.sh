#!/usr/bin/env bash
# Builds the demo model's training corpus from Debian's fortune-cookie collections (packages fortunes
# and fortunes-min, BSD-licensed; see /usr/share/doc/fortunes*/copyright): every plain fortune file,
# one "%"-separated fortune per document, each prefixed by "#topic <file name>". Usage: DEST_FILE
set -euo pipefail
dest="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download fortunes fortunes-min >/dev/null 2>&1)
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
mkdir -p "$(dirname "$dest")"
: > "$dest"
for f in "$work"/x/usr/share/games/fortunes/*; do
  case "$f" in *.dat|*.u8|*ascii-art*) continue ;; esac
  [ -f "$f" ] || continue
  topic=$(basename "$f")
  # Fortune files separate entries with a line holding only "%".
  awk -v topic="$topic" 'BEGIN { print "#topic " topic } /^%$/ { print "%"; print "#topic " topic; next } { print }' "$f" >> "$dest"
  echo "%" >> "$dest"
done
dpkg-deb -f "$work"/fortunes_*.deb Package Version | tr '\n' ' ' >&2
echo "→ $dest ($(wc -c < "$dest") bytes)" >&2
