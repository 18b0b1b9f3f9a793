#!/usr/bin/env bash
# The PostgreSQL sink (docs/sink.md), bounded (~1-2 min), loopback only:
#   S-a  the same feed written by iot-sink twice into PostgreSQL 15:
#        COPY batches (--write-mode copy) versus one INSERT per reading
#        (--write-mode insert), each to its own table and group, readings/s
#   S-b  the sink's lag while gw-sim drives W2 with batch 100 (100 gateways,
#        1 frame in flight, 100 readings per frame, closed loop): the group's
#        unacknowledged frames sampled every 0.5 s, and how long the sink
#        takes to catch up once the load stops
# hub + redis-server on CPU 0, gw-sim on CPU 1; iot-sink and PostgreSQL are
# not pinned. Prints a markdown report. Needs a built tree (build/) and
# PostgreSQL 15 (deploy/install-deps.sh). Run it as root (initdb runs as the
# postgres user through runuser) or as a user that may run initdb.
#   bench/sink.sh [--frames F] [--load-s S]   (F frames per gateway in S-a, 20)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-build}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
FRAMES=20
LOAD=20
while (($#)); do
  case $1 in
    --frames) FRAMES=$2; shift 2 ;;
    --load-s) LOAD=$2; shift 2 ;;
    *) echo "usage: $0 [--frames F] [--load-s S]" >&2; exit 2 ;;
  esac
done
tmp=$(mktemp -d /tmp/iot-sink-bench-XXXXXX)
chmod 755 "$tmp"
as_pg=()
pguser=$(id -un)
if [[ $(id -u) == 0 ]]; then as_pg=(runuser -u postgres --); pguser=postgres; chown postgres: "$tmp"; fi
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$tmp/pg" -m immediate stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
field() { /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, d))' "$1"; }
now() { date +%s.%N; }

# PostgreSQL 15, durable commits (fsync on: what a real sink pays)
pgport=$(free_port)
"${as_pg[@]}" "$PGBIN/initdb" -D "$tmp/pg" -A trust -U "$pguser" -E UTF8 --no-sync >/dev/null
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$tmp/pg" -w -l "$tmp/pg.log" \
  -o "-c listen_addresses=127.0.0.1 -c port=$pgport -c unix_socket_directories=$tmp" start >/dev/null
PG="host=127.0.0.1 port=$pgport user=$pguser dbname=postgres"
sql() { psql -X -q -A -t -h 127.0.0.1 -p "$pgport" -U "$pguser" -d postgres -c "$1"; }

openssl rand -hex 32 > "$tmp/secret"
rport=$(free_port)
taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp" --daemonize no --loglevel warning >/dev/null &
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS="redis://127.0.0.1:$rport"
taskset -c 0 "$B/iot-hub" --listen 127.0.0.1:0 --redis "$REDIS" \
  --schemas deploy/device-types --jwt-key "$tmp/secret" --log-level warn \
  --device-rate 0 --gateway-rate 0 --max-devices-per-gateway 100000 2> "$tmp/hub.log" &
for _ in $(seq 100); do grep -q "listening on" "$tmp/hub.log" && break; sleep 0.1; done
port=$(grep -o 'listening on [^ ]*' "$tmp/hub.log" | sed 's/.*://')
sim() {
  taskset -c 1 "$B/tools/gw-sim" --url "ws://127.0.0.1:$port/v1/gateway" -q \
    --jwt-secret "$tmp/secret" --json-summary "$@"
}
sink() {  # group/table, extra args...
  local g=$1; shift
  "$B/sink/iot-sink" --redis "$REDIS" --pg "$PG" --group "$g" --table "$g" --consumer b \
    --metrics-listen 127.0.0.1:0 --read-count 100 --batch-max-rows 20000 "$@"
}
sink_bg() {  # the same, backgrounded: exec, so that $! is iot-sink's pid
  local g=$1; shift
  exec "$B/sink/iot-sink" --redis "$REDIS" --pg "$PG" --group "$g" --table "$g" --consumer b \
    --metrics-listen 127.0.0.1:0 --read-count 100 --batch-max-rows 20000 "$@"
}
metric() {  # port name: the sum of its samples
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 {s += $2} END {print s + 0}'
}

echo "# Sink benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
echo
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);"
echo "hub + redis-server on CPU 0, gw-sim on CPU 1, iot-sink and PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') unpinned (fsync on)."
echo

# S-a: a feed of W2 batch-100 frames, then each write mode drains it alone.
# The groups exist before the load (start new): both read the same frames.
for g in s_copy s_insert; do
  redis-cli -p "$rport" xgroup create 'iot:feed:{i0}' "$g" '$' mkstream >/dev/null
done
out=$(sim --gateways 100 --devices 10 --batch 100 --inflight 1 --connect-rate 10000 --frames "$FRAMES" 2>/dev/null)
acked=$(field "readings_acked" <<<"$out")
frames=$(redis-cli -p "$rport" xlen 'iot:feed:{i0}')
echo "- Feed: $acked readings in $frames frames (W2 batch 100, $FRAMES frames per gateway: $(printf %.0f "$(field "readings_acked/elapsed_s" <<<"$out")") readings/s acked)"
declare -A rate
for mode in copy insert; do
  g=s_$mode
  t0=$(now)
  sink "$g" --write-mode "$mode" --batch-interval-ms 1000 --exit-when-idle 2> "$tmp/sink-$mode.log"
  t1=$(now)
  n=$(sql "SELECT count(*) FROM $g")
  # the setup (connect, schema, partitions) is in the time: small next to the run
  rate[$mode]=$(/usr/bin/python3 -c "print(round($n / ($t1 - $t0)))")
  echo "- S-a $mode: $n readings in $(/usr/bin/python3 -c "print(round($t1 - $t0, 2))") s: **${rate[$mode]} readings/s**"
done
echo "- S-a COPY / INSERT: **$(/usr/bin/python3 -c "print(round(${rate[copy]} / ${rate[insert]}, 1))")x**"

# S-b: lag under W2 batch 100
sink_bg s_lag --start new --batch-interval-ms 1000 2> "$tmp/sink-lag.log" &
sinkpid=$!
for _ in $(seq 100); do grep -q "reading 1 feed shard" "$tmp/sink-lag.log" && break; sleep 0.1; done
mport=$(grep -o 'metrics listening on [^ ]*' "$tmp/sink-lag.log" | sed 's/.*://')
sim --gateways 100 --devices 10 --batch 100 --inflight 1 --connect-rate 10000 --duration "$LOAD" > "$tmp/load.json" 2>/dev/null &
simpid=$!
: > "$tmp/lag"
while kill -0 "$simpid" 2>/dev/null; do
  metric "$mport" iot_sink_lag_frames >> "$tmp/lag"
  sleep 0.5
done
wait "$simpid" || true
tstop=$(now)
acked=$(field "readings_acked" <"$tmp/load.json")
while (( $(metric "$mport" iot_sink_lag_frames) != 0 )); do sleep 0.1; done
tcaught=$(now)
written=$(metric "$mport" iot_sink_rows_written_total)
batches=$(metric "$mport" iot_sink_batch_rows_count)
rows_sum=$(metric "$mport" iot_sink_batch_rows_sum)
kill -TERM "$sinkpid"; wait "$sinkpid" || true
read -r p50 p99 max <<<"$(/usr/bin/python3 -c "
v=sorted(float(x) for x in open('$tmp/lag') if x.strip())
q=lambda p: v[min(len(v)-1, int(p*len(v)))] if v else 0
print(int(q(0.5)), int(q(0.99)), int(v[-1]) if v else 0)")"
echo "- S-b W2 batch 100 for $LOAD s: $(printf %.0f "$(field "readings_acked/elapsed_s" <"$tmp/load.json")") readings/s acked ($(printf %.0f "$(field "frames_acked/elapsed_s" <"$tmp/load.json")") frames/s); sink lag sampled every 0.5 s: **p50 $p50 frames, p99 $p99, max $max** (1 frame = 100 readings); caught up $(/usr/bin/python3 -c "print(round($tcaught - $tstop, 2))") s after the load stopped; $written of $acked readings written in $batches batches (mean $(/usr/bin/python3 -c "print(round($rows_sum / max($batches, 1)))") readings)"
