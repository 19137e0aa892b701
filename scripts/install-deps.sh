#!/usr/bin/env bash
# Installs the Debian 12 packages moeflux builds with. Idempotent; needs root (or sudo).
set -euo pipefail
packages=(build-essential cmake ninja-build pkg-config
          nlohmann-json3-dev libcli11-dev libfmt-dev libxxhash-dev libpcre2-dev libutf8proc-dev
          libgtest-dev libgmock-dev libbenchmark-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
