#!/usr/bin/env bash
# Ingest benchmark (issue 2): one hub process + its Redis pinned to CPU 0, the
# gateway simulator pinned to CPU 1, all on loopback, bounded in time.
#   W-a  readings/s stored and acked, 1,000 gateways, closed loop (batch 1 and 10)
#   W-b  frame->ack p50/p99 at half the W-a batch-1 rate, open loop
#   W-c  hub RSS per idle gateway connection with N connected (default 10,000)
# Prints a markdown report on stdout. Needs a built tree (build/).
#   bench/ingest.sh [--idle N] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
B=build
IDLE=10000
SECS=10
while (($#)); do
  case $1 in
    --idle) IDLE=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    *) echo "usage: $0 [--idle N] [--seconds S]" >&2; exit 2 ;;
  esac
done
tmp=$(mktemp -d /tmp/iot-bench-XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
free_port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

openssl rand -hex 32 > "$tmp/secret"
rport=$(free_port)
taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp" --daemonize no --loglevel warning >/dev/null &
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done

start_hub() {
  redis-cli -p "$rport" flushall >/dev/null
  taskset -c 0 "$B/iot-hub" --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$rport" \
    --schemas deploy/device-types --jwt-key "$tmp/secret" --log-level warn \
    --device-rate 0 --gateway-rate 0 --max-devices-per-gateway 100000 2> "$tmp/hub.log" &
  hub=$!
  for _ in $(seq 100); do grep -q "listening on" "$tmp/hub.log" && break; sleep 0.1; done
  port=$(grep -o 'listening on [^ ]*' "$tmp/hub.log" | sed 's/.*://')
}
stop_hub() { kill "$hub"; wait "$hub" || true; }
sim() {  # extra gw-sim args...
  taskset -c 1 "$B/tools/gw-sim" --url "ws://127.0.0.1:$port/v1/gateway" -q \
    --jwt-secret "$tmp/secret" \
    --json-summary "$@"
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
field() { /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$1"; }

echo "# Ingest benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
echo
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);"
echo "hub + redis-server on CPU 0, gw-sim on CPU 1; $SECS s per run."
echo

start_hub
for batch in 1 10 100; do
  t0=$(cpu_ticks "$hub")
  out=$(sim --gateways 1000 --devices 2 --inflight 4 --batch "$batch" --duration "$SECS")
  t1=$(cpu_ticks "$hub")
  rps=$(field "readings_acked/elapsed_s" <<<"$out")
  fps=$(field "frames_acked/elapsed_s" <<<"$out")
  cpu=$(/usr/bin/python3 -c "print(round(($t1-$t0)/100/$SECS*100))")
  echo "- W-a 1,000 gateways, closed loop, 4 frames in flight each, batch $batch: **$(printf %.0f "$rps") readings/s** ($(printf %.0f "$fps") frames/s) acked; hub CPU ${cpu}% of one core; $(field "f\"p50 {latency_us['p50']/1000:.2f} ms, p99 {latency_us['p99']/1000:.2f} ms\"" <<<"$out")"
  [[ $batch == 1 ]] && full=$rps
done

half=$(/usr/bin/python3 -c "print(max(1, int($full/2/1000)))")
out=$(sim --gateways 1000 --devices 2 --rate "$half" --batch 1 --inflight 64 --duration "$SECS")
echo "- W-b open loop at half that load ($((half * 1000)) readings/s offered, 1 reading/frame): $(printf %.0f "$(field "readings_acked/elapsed_s" <<<"$out")") readings/s acked, frame->ack $(field "f\"p50 {latency_us['p50']/1000:.2f} ms, p90 {latency_us['p90']/1000:.2f} ms, p99 {latency_us['p99']/1000:.2f} ms, p99.9 {latency_us['p99.9']/1000:.2f} ms\"" <<<"$out")"
stop_hub

start_hub
rss0=$(awk '/VmRSS/{print $2}' "/proc/$hub/status")
sim --gateways "$IDLE" --devices 1 --idle --connect-rate 5000 --duration 180 > "$tmp/idle.json" &
simpid=$!
for _ in $(seq 1200); do
  n=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^iot_hub_connections\{kind="gateway"\}/{print $2}')
  [[ ${n:-0} -ge $IDLE ]] && break
  sleep 0.1
done
sleep 1
rss1=$(awk '/VmRSS/{print $2}' "/proc/$hub/status")
echo "- W-c $n idle gateway connections (each announced 1 device): hub RSS $((rss0)) KiB -> $((rss1)) KiB, **$(( (rss1 - rss0) * 1024 / n )) bytes per connection**"
kill "$simpid" 2>/dev/null; wait "$simpid" 2>/dev/null || true
stop_hub
