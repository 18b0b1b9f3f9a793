#!/usr/bin/env bash
# Ingest benchmark (issue 2): one hub process + its Redis pinned to CPU 0, the
# gateway simulator pinned to CPU 1, all on loopback, bounded in time.
#   W-a  readings/s stored and acked, 1,000 gateways, closed loop (batch 1 and 10)
#   W-b  frame->ack p50/p99 at half the W-a batch-1 rate, open loop
#   W-c  hub RSS per idle gateway connection with N connected (default 10,000)
#   plus hub and Redis CPU per reading (from /proc/<pid>/stat ticks) and a
#   redis-benchmark XADD baseline on the same Redis (its ceiling on CPU 0).
# Prints a markdown report on stdout. Needs a built tree (build/).
#   bench/ingest.sh [--idle N] [--seconds S] [--skip-idle]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-build}                    # build tree (gw-sim, and the hub unless HUB_BIN)
HUB_BIN=${HUB_BIN:-$B/iot-hub}   # another hub binary, for before/after runs
IDLE=10000
SECS=10
SKIP_IDLE=0
while (($#)); do
  case $1 in
    --idle) IDLE=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --skip-idle) SKIP_IDLE=1; shift ;;
    *) echo "usage: $0 [--idle N] [--seconds S] [--skip-idle]" >&2; exit 2 ;;
  esac
done
tmp=$(mktemp -d /tmp/iot-bench-XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
free_port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

openssl rand -hex 32 > "$tmp/secret"
rport=$(free_port)
taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp" --daemonize no --loglevel warning >/dev/null &
redis=$!
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done

start_hub() {
  redis-cli -p "$rport" flushall >/dev/null
  taskset -c 0 "$HUB_BIN" --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$rport" \
    --schemas deploy/device-types --jwt-key "$tmp/secret" --log-level warn \
    --device-rate 0 --gateway-rate 0 --max-devices-per-gateway 100000 2> "$tmp/hub.log" &
  hub=$!
  for _ in $(seq 100); do grep -q "listening on" "$tmp/hub.log" && break; sleep 0.1; done
  port=$(grep -o 'listening on [^ ]*' "$tmp/hub.log" | sed 's/.*://')
}
stop_hub() { kill "$hub"; wait "$hub" || true; }
sim() {  # extra gw-sim args... (exec: a backgrounded sim's pid is gw-sim's)
  exec taskset -c 1 "$B/tools/gw-sim" --url "ws://127.0.0.1:$port/v1/gateway" -q \
    --jwt-secret "$tmp/secret" \
    --json-summary "$@"
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
field() { /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$1"; }

echo "# Ingest benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD), hub $HUB_BIN"
echo
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);"
echo "hub + redis-server on CPU 0, gw-sim on CPU 1; $SECS s per run."
echo

# Redis alone on CPU 0: plain XADD of one reading-sized entry, 50 clients,
# pipelined 16 deep (the hub pipelines too): Redis's own ceiling on this core.
xadd=$(taskset -c 1 redis-benchmark -p "$rport" -c 50 -P 16 -n 1000000 -q \
  XADD iot:bench MAXLEN '~' 100000 '*' ts 1795430000000 data '{"temperature":21.53,"humidity":45.2}' \
  gw gw-0001 seq 1795430000000001 | tr '\r' '\n' | awk '/requests per second/{print $(NF-5)}' | tail -1)
redis-cli -p "$rport" del iot:bench >/dev/null
echo "- Baseline: redis-benchmark XADD (one reading-sized entry, 50 clients, pipeline 16, Redis alone on CPU 0): **${xadd} XADD/s**"

start_hub
for batch in 1 10 100; do
  t0=$(cpu_ticks "$hub"); r0=$(cpu_ticks "$redis")
  # batch 100 x 4 in flight x 1,000 gateways queues ~5 s of work: past
  # redis-timeout-ms (2 s), so the hub would call Redis down. 1 in flight.
  inflight=4; [[ $batch == 100 ]] && inflight=1
  out=$(sim --gateways 1000 --devices 2 --inflight $inflight --batch "$batch" --connect-rate 10000 --duration "$SECS")
  t1=$(cpu_ticks "$hub"); r1=$(cpu_ticks "$redis")
  el=$(field "elapsed_s" <<<"$out")
  rps=$(field "readings_acked/elapsed_s" <<<"$out")
  fps=$(field "frames_acked/elapsed_s" <<<"$out")
  # ticks are 1/100 s; the window is the sim's run plus its connect and drain
  read -r cpu rcpu hus rus <<<"$(/usr/bin/python3 -c "
h=($t1-$t0)/100; r=($r1-$r0)/100; n=$rps*$el
print(round(h/$el*100), round(r/$el*100), round(h/n*1e6,1), round(r/n*1e6,1))")"
  echo "- W-a 1,000 gateways, closed loop, $inflight frame(s) in flight each, batch $batch: **$(printf %.0f "$rps") readings/s** ($(printf %.0f "$fps") frames/s) acked; CPU 0: hub ${cpu}%, Redis ${rcpu}%; per reading: hub ${hus} µs, Redis ${rus} µs; $(field "f\"p50 {latency_us['p50']/1000:.2f} ms, p99 {latency_us['p99']/1000:.2f} ms; gw-sim CPU {cpu_s/elapsed_s*100:.0f}%\"" <<<"$out")"
  [[ $batch == 1 ]] && full=$rps
done

half=$(/usr/bin/python3 -c "print(max(1, int($full/2/1000)))")
t0=$(cpu_ticks "$hub"); r0=$(cpu_ticks "$redis")
out=$(sim --gateways 1000 --devices 2 --rate "$half" --batch 1 --inflight 64 --connect-rate 10000 \
  --warmup 2 --duration "$((SECS + 2))")
t1=$(cpu_ticks "$hub"); r1=$(cpu_ticks "$redis")
el=$(field "elapsed_s" <<<"$out")
echo "- W-b open loop at half that load ($((half * 1000)) readings/s offered, 1 reading/frame, first 2 s not counted): $(printf %.0f "$(field "readings_acked/elapsed_s" <<<"$out")") readings/s acked, frame->ack $(field "f\"p50 {latency_us['p50']/1000:.2f} ms, p90 {latency_us['p90']/1000:.2f} ms, p99 {latency_us['p99']/1000:.2f} ms, p99.9 {latency_us['p99.9']/1000:.2f} ms, max {latency_us['max']/1000:.2f} ms\"" <<<"$out"); CPU 0: hub $(/usr/bin/python3 -c "print(round(($t1-$t0)/$el))")%, Redis $(/usr/bin/python3 -c "print(round(($r1-$r0)/$el))")%; skipped ticks $(field open_loop_ticks_skipped <<<"$out")"
stop_hub
[[ $SKIP_IDLE == 1 ]] && exit 0

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
