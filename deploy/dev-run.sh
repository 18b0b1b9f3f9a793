#!/usr/bin/env bash
# One command for a fresh Debian 12 machine: install dependencies, build, and
# run the hub on its embedded defaults (a private redis-server on a free
# loopback port keeping its data in .dev/iot-hub-data, git-ignored, so a
# restart keeps it; the repo's example device types, an ephemeral JWT secret (--dev)
# and a printed dev token). With --sim it also starts the gateway simulator so data
# flows at once. Extra arguments go to iot-hub.
#
#   ./deploy/dev-run.sh [--sim] [iot-hub flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

sim=0
if [[ ${1:-} == --sim ]]; then sim=1; shift; fi

./deploy/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null

# A dev API key (telemetry:read + commands:write) for the browser dashboard
# served at / and for the HTTP API; kept in .dev/ (git-ignored).
mkdir -p .dev
if [[ ! -s .dev/dashboard.key || ! -s .dev/api-keys.json ]]; then
  ./build/tools/iot-token new-key --name dev --scopes telemetry:read,commands:write \
    > .dev/dashboard.key 2> .dev/api-key-entry.json
  echo "[$(cat .dev/api-key-entry.json)]" > .dev/api-keys.json
fi
echo "dev-run: dashboard at http://<listen address>/ - API key: $(cat .dev/dashboard.key)" >&2
# The console as built (web/ plus uPlot, the `web` target); web/ itself
# when npm was not available (canvas charts).
web_root=build/web
[[ -f build/web/index.html ]] || web_root=web
common=(--schemas deploy/device-types --api-keys .dev/api-keys.json --web-root "$web_root"
        --data-dir .dev/iot-hub-data)

if ((sim == 0)); then
  exec ./build/iot-hub --dev "${common[@]}" "$@"
fi

# With the simulator: a dev secret in .dev/ so both sides agree.
[[ -s .dev/jwt-hs256.secret ]] || openssl rand -hex 32 > .dev/jwt-hs256.secret
./build/iot-hub "${common[@]}" --jwt-key .dev/jwt-hs256.secret "$@" \
  2> >(tee .dev/hub.log >&2) &
hub=$!
trap 'kill $hub 2>/dev/null; wait $hub 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  grep -q "listening on" .dev/hub.log 2>/dev/null && break
  sleep 0.1
done
addr=$(grep -o "listening on [^ ]*" .dev/hub.log | awk '{print $3}')
echo "dev-run: hub on $addr; starting 5 simulated gateways x 10 devices (Ctrl-C stops)" >&2
./build/tools/gw-sim --url "ws://$addr/v1/gateway" \
  --token-cmd "./build/tools/iot-token jwt --alg HS256 --key .dev/jwt-hs256.secret --sub {sub} --devices '*' --ttl 86400" \
  --gateways 5 --devices 10 --rate 20 --stats-interval 5
