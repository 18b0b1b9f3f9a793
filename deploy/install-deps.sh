#!/usr/bin/env bash
# Installs what iot-hub needs to build, run and test on Debian 12 (bookworm).
# Idempotent: only calls apt-get when a package is missing. Needs root (or sudo).
#
#   deploy/install-deps.sh           everything: build, run, test (CI, dev-run)
#   deploy/install-deps.sh --build   only what building the hub and its .deb
#                                    needs (deploy/docker/Dockerfile)
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config
  libwebsockets-dev libwebsockets-evlib-ev libjansson-dev libhiredis-dev
  libjwt-dev libssl-dev
  libpq-dev                  # iot-sink (sink/): PostgreSQL's client library
  dpkg-dev file              # tools/make-deb (dpkg-shlibdeps; CPack's DEB generator runs file)
)
if [[ ${1:-} != --build ]]; then pkgs+=(
  libcmocka-dev
  redis-server redis-tools
  postgresql-15              # ctest -L sink: a real PostgreSQL (initdb, pg_ctl)
  python3-websockets curl openssl
  clang libclang-rt-14-dev   # the fuzz tests (tests/fuzz, ctest -L fuzz)
  python3-yaml prometheus    # ctest -L deploy: manifests, promtool, a real Prometheus
  strace                     # ctest -L package: the installed hub's calls against the unit's filter
  chromium                   # the browser tests (tests/web, ctest -L web; driven by
                             # playwright-core from npm)
); fi
# The console's build step and the browser tests need Node.js >= 18 and npm:
# Debian 12's, unless a node is on PATH already.
if [[ ${1:-} != --build ]] && ! command -v node >/dev/null; then pkgs+=(nodejs npm); fi

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
