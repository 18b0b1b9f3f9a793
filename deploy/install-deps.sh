#!/usr/bin/env bash
# Installs what iot-hub needs to build, run and test on Debian 12 (bookworm).
# Idempotent: only calls apt-get when a package is missing. Needs root (or sudo).
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config
  libwebsockets-dev libwebsockets-evlib-ev libjansson-dev libhiredis-dev
  libjwt-dev libssl-dev libcmocka-dev
  redis-server redis-tools
  python3-websockets curl openssl
  clang libclang-rt-14-dev   # the fuzz tests (tests/fuzz, ctest -L fuzz)
  chromium                   # the browser tests (tests/web, ctest -L web; driven by
                             # playwright-core from npm: Node.js >= 18 and npm must be
                             # on PATH for the web build step and those tests)
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
