#!/usr/bin/env bash
# Fan-out benchmark (issue 3): gw-sim ingests on hub A, dash-sub subscribers read
# /v1/stream on hub B; both hubs share one Redis. Redis and both hubs are pinned
# to CPU 0, gw-sim and dash-sub to CPU 1; loopback only, bounded in time.
#
# Every reading carries data.sent_us = gw-sim's wall clock (µs) when it generated
# it (gw-sim --stamp-field, device type bench/device-types/bench.json); dash-sub
# takes now - sent_us at receipt. Cases (1,000 gateways x 10 devices):
#   slice  R readings/s (--rates), N subscribers (--subs), subscriber i watches
#          1/N of the gateways (filter.devices ["gw-0<i>*"]): every reading is
#          delivered exactly once, so deliveries/s = R whatever N is, and hub B
#          CPU per delivery shows what each extra subscriber costs
#   all    --all-rate readings/s, N subscribers with no filter: each sees every
#          reading, deliveries/s = rate x N
#   base   at the highest --rates: 1 subscriber seeing everything (same
#          deliveries/s as the slice cases, no fan-out); 1 subscriber whose
#          filter matches nothing (hub B's cost of receiving the feed alone); the
#          largest slice case with subscribers on hub A itself (no second
#          instance between ingest and delivery)
# Hub A, hub B, Redis and gw-sim CPU are read from /proc/<pid>/stat by dash-sub
# (--cpu-pids) at the start and end of its measured window (after --warmup).
#
# Writes a markdown report to bench/results/<UTC date>-fanout.md (--out FILE;
# "-" = stdout only) and the raw JSON lines next to it (.raw, git-ignored).
#   bench/fanout.sh [--seconds S] [--warmup S] [--rates "1000 10000"]
#                   [--subs "10 100 1000"] [--all-rate R] [--batch B]
#                   [--devices M] [--skip-all] [--skip-base] [--out FILE]
# --devices M: devices per gateway (default 10, so 10,000 devices); the same
# readings/s over fewer devices (--devices 1) separates per-device costs
# (the hub's once-a-second aggregate flush) from per-reading ones.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-build}
HUB_BIN=${HUB_BIN:-$B/iot-hub}
SECS=10
WARM=3
RATES="1000 10000"
SUBS="10 100 1000"
ALL_RATE=100
BATCH=10
SKIP_ALL=0
SKIP_BASE=0
OUT=bench/results/$(date -u +%Y-%m-%d)-fanout.md
GWS=1000          # gateway ids gw-0000..gw-0999: "gw-0<i>*" slices them by 10s
DEVS=10
while (($#)); do
  case $1 in
    --seconds) SECS=$2; shift 2 ;;
    --warmup) WARM=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --subs) SUBS=$2; shift 2 ;;
    --all-rate) ALL_RATE=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --devices) DEVS=$2; shift 2 ;;
    --skip-all) SKIP_ALL=1; shift ;;
    --skip-base) SKIP_BASE=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds S] [--warmup S] [--rates 'R ...'] [--subs 'N ...'] [--all-rate R] [--batch B] [--devices M] [--skip-all] [--skip-base] [--out FILE|-]" >&2; exit 2 ;;
  esac
done
for n in $SUBS; do
  case $n in 1|10|100|1000) ;; *) echo "$0: --subs: 1, 10, 100 or 1000 (slices of $GWS gateways)" >&2; exit 2 ;; esac
done
for x in "$HUB_BIN" "$B/tools/gw-sim" "$B/tools/dash-sub" "$B/tools/iot-token"; do
  [[ -x $x ]] || { echo "$0: $x missing: cmake --build $B -j2" >&2; exit 1; }
done

# what is measured: HEAD and the hub binary's build time when the hubs start
# (a rebuild during the run does not change the running hubs)
head_at_start=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- hub protocols || echo ' + uncommitted hub/protocols changes')
hub_built=$(date -u -r "$HUB_BIN" +%Y-%m-%dT%H:%M:%SZ)
tmp=$(mktemp -d /tmp/iot-fanout-XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
showcmd() {  # a command line for the report, quoted only where needed
  local a out=
  for a; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'$a' "; fi
  done
  printf '%s' "${out% }"
}
free_port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
if [[ $OUT == - ]]; then raw=$tmp/fanout.raw; else raw=${OUT%.md}.raw; : > "$raw"; fi
rows=$tmp/rows.tsv
cmds=$tmp/cmds.txt
: > "$rows"; : > "$cmds"

# a gateway JWT secret for gw-sim, an API key (telemetry:read, all devices) for dash-sub
openssl rand -hex 32 > "$tmp/secret"
key=$("$B/tools/iot-token" new-key --name bench --scopes telemetry:read 2> "$tmp/key-entry")
echo "[$(cat "$tmp/key-entry")]" > "$tmp/api-keys.json"

rport=$(free_port)
taskset -c 0 redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$tmp" --daemonize no --loglevel warning >/dev/null &
redis=$!
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done

start_hub() {  # name -> sets hub_<name> (pid) and port_<name>
  local name=$1 pid port
  taskset -c 0 "$HUB_BIN" --listen 127.0.0.1:0 --redis "redis://127.0.0.1:$rport" \
    --instance-id "bench-$name" --schemas bench/device-types --jwt-key "$tmp/secret" \
    --api-keys "$tmp/api-keys.json" --log-level warn \
    --device-rate 0 --gateway-rate 0 2> "$tmp/hub-$name.log" &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$tmp/hub-$name.log" && break; sleep 0.1; done
  port=$(grep -o 'listening on [^ ]*' "$tmp/hub-$name.log" | sed 's/.*://')
  [[ -n $port ]] || { echo "$0: hub $name did not start:" >&2; cat "$tmp/hub-$name.log" >&2; exit 1; }
  printf -v "hub_$name" %s "$pid"
  printf -v "port_$name" %s "$port"
}
start_hub a
start_hub b

# one case: label, readings/s, readings per frame, subscribers, hub (a|b),
# dash-sub filter args...
run_case() {
  local label=$1 rate=$2 batch=$3 nsub=$4 on=$5; shift 5
  local sport gwrate simdur=$((WARM + SECS + 2)) sim simout dsout
  [[ $on == a ]] && sport=$port_a || sport=$port_b
  gwrate=$(/usr/bin/python3 -c "print($rate/$GWS)")
  local simcmd=(taskset -c 1 "$B/tools/gw-sim" --url "ws://127.0.0.1:$port_a/v1/gateway" -q
    --jwt-secret "$tmp/secret" --gateways $GWS --devices $DEVS --device-type bench
    --stamp-field sent_us --rate "$gwrate" --batch "$batch" --inflight 8
    --connect-rate 10000 --warmup "$WARM" --duration "$simdur" --json-summary)
  "${simcmd[@]}" > "$tmp/sim.json" 2> "$tmp/sim.err" &
  sim=$!
  sleep 1   # gateways connected and announced before the subscribers' clock starts
  local subcmd=(taskset -c 1 "$B/tools/dash-sub" --url "ws://127.0.0.1:$sport/v1/stream" -q
    --token "$key" --connections "$nsub" --connect-rate 5000 "$@"
    --warmup "$WARM" --duration "$((WARM + SECS))"
    --cpu-pids "$hub_a,$hub_b,$redis,$sim")
  dsout=$("${subcmd[@]}")
  wait "$sim" || true
  simout=$(tr -d '\n' < "$tmp/sim.json")
  printf '%s\t%s\t%s\t%s\n' "$label" "$rate" "$nsub" "$on" >> "$rows"
  printf '%s\n%s\n' "$dsout" "$simout" >> "$rows"
  printf '{"case":"%s","dash_sub":%s,"gw_sim":%s}\n' "$label" "$dsout" "$simout" >> "$raw"
  # the exact commands, with this run's temporary paths, ports and pids as symbols
  { printf '%s\n' "- $label:"
    printf '  `%s`\n' "$(showcmd "${simcmd[@]}" | sed "s#$tmp#\$TMP#g; s#:$port_a/#:\$PORT_A/#")"
    printf '  `%s`\n' "$(showcmd "${subcmd[@]}" | sed "s#$tmp#\$TMP#g; s#$key#\$KEY#; s#:$port_a/#:\$PORT_A/#; s#:$port_b/#:\$PORT_B/#; s#$hub_a,$hub_b,$redis,$sim#\$HUB_A,\$HUB_B,\$REDIS,\$GW_SIM#")"
  } >> "$cmds"
  echo "fanout.sh: $label done" >&2
}

for r in $RATES; do
  for n in $SUBS; do
    # 'gw-0{i}*': {i} has as many digits as n-1 (n=1: one slice, 'gw-*')
    pat='gw-0{i}*'; [[ $n == 1 ]] && pat='gw-*'
    run_case "slice R=$r N=$n" "$r" "$BATCH" "$n" b --devices "$pat" --slices "$n"
  done
done
if [[ $SKIP_ALL == 0 ]]; then
  for n in $SUBS; do
    # 1 reading per frame: at 0.1 readings/s per gateway, frames of 10 would
    # come once per 100 s per gateway, in bursts
    run_case "all R=$ALL_RATE N=$n" "$ALL_RATE" 1 "$n" b
  done
fi
if [[ $SKIP_BASE == 0 ]]; then
  top=$(tr ' ' '\n' <<<"$RATES" | sort -n | tail -1)
  big=$(tr ' ' '\n' <<<"$SUBS" | sort -n | tail -1)
  run_case "base: 1 sub sees all, R=$top" "$top" "$BATCH" 1 b
  run_case "base: 1 sub matches nothing, R=$top" "$top" "$BATCH" 1 b --devices 'nomatch-*'
  run_case "base: slice on hub A, R=$top N=$big" "$top" "$BATCH" "$big" a --devices 'gw-0{i}*' --slices "$big"
fi
metrics_b=$(curl -s "http://127.0.0.1:$port_b/metrics" | grep -E '^(iot_)?hub_(stream|aggregate|redis_pubsub|dashboard)' | head -40 || true)

report() {
echo "# Fan-out benchmark, $(date -u +%Y-%m-%dT%H:%MZ), commit $head_at_start, hub $HUB_BIN (built $hub_built)"
echo
echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
echo "CPU 0: redis-server + hub A (ingest) + hub B (subscribers); CPU 1: gw-sim + dash-sub."
echo "$GWS gateways x $DEVS devices (type \`bench\`), open loop, $BATCH readings per frame (the"
echo "all-see-everything cases: 1 per frame);"
echo "$WARM s warm-up, then $SECS s measured. Latency = dash-sub's wall clock at receipt"
echo "minus gw-sim's wall clock when it generated the reading (data.sent_us)."
echo
/usr/bin/python3 - "$rows" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
print("| case | hub | readings/s acked | delivered msgs/s | deliveries per reading | gaps (dropped) | p50 ms | p99 ms | p99.9 ms | max ms | hub B CPU % | hub B µs/delivery | hub A CPU % | Redis CPU % | gw-sim CPU % | dash-sub CPU % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
notes = []
for i in range(0, len(lines), 3):
    label, rate, nsub, on = lines[i].split("\t")
    d = json.loads(lines[i + 1]); s = json.loads(lines[i + 2])
    w = d["window_s"]
    pc = list(d.get("pid_cpu_s", {}).values())
    ha, hb, rd, gs = [(x if x is not None else float("nan")) for x in pc]
    acked = s["readings_acked"] / s["elapsed_s"]
    lat = d["latency_ms"]
    msgs = d["messages"]
    # hub B's CPU when it serves the subscribers; hub A's when they are on A
    hubcpu = hb if on == "b" else ha
    per = hubcpu / msgs * 1e6 if msgs else float("nan")
    print(f"| {label} | {on.upper()} | {acked:,.0f} | {d['msgs_per_s']:,.0f} | {d['msgs_per_s']/acked if acked else 0:.2f} "
          f"| {d['gaps']} ({d['dropped']}) | {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p99.9']:.2f} | {lat['max']:.2f} "
          f"| {hb/w*100:.0f} | {per:.1f} | {ha/w*100:.0f} | {rd/w*100:.0f} | {gs/w*100:.0f} | {d['window_cpu_s']/w*100:.0f} |")
    bad = []
    if d["failed"] or d["disconnects"] or d["subscribe_failed"] or d["errors"]:
        bad.append(f"dash-sub: {d['failed']} failed, {d['disconnects']} disconnects {d['close_codes']}, "
                   f"{d['subscribe_failed']} subscribe errors, errors {d['error_codes']}")
    if d["subscribed_at_window_start"] != d["connections"]:
        bad.append(f"only {d['subscribed_at_window_start']} of {d['connections']} subscribed when the window started")
    if s["errors"] or s["open_loop_ticks_skipped"] or s["readings_rejected"]:
        bad.append(f"gw-sim: errors {s['errors']}, skipped ticks {s['open_loop_ticks_skipped']}, rejected {s['readings_rejected']}")
    if lat["negative"] or lat["no_stamp"] or lat["from_ts"]:
        bad.append(f"latency: {lat['negative']} negative (clock), {lat['no_stamp']} without stamp, {lat['from_ts']} from ts")
    pcm = d["per_conn_messages"]
    notes.append(f"- {label}: per-subscriber messages min/mean/max {pcm['min']}/{pcm['mean']:.0f}/{pcm['max']}; "
                 f"gw-sim frame->ack p50 {s['latency_us']['p50']/1000:.2f} ms, p99 {s['latency_us']['p99']/1000:.2f} ms"
                 + ("; " + "; ".join(bad) if bad else ""))
print()
print("hub B µs/delivery = hub B CPU seconds in the window ÷ readings dash-sub received (for the")
print("hub-A baseline, hub A's CPU, which then also includes ingest). CPU % = share of one core.")
print()
print("\n".join(notes))
EOF
echo
echo "## Commands"
echo
echo "\`bench/fanout.sh --seconds $SECS --warmup $WARM --rates \"$RATES\" --subs \"$SUBS\" --all-rate $ALL_RATE --batch $BATCH --devices $DEVS\`"
echo "runs, per case (hubs: \`$HUB_BIN --listen 127.0.0.1:0 --redis redis://127.0.0.1:\$REDIS_PORT"
echo "--instance-id bench-a|bench-b --schemas bench/device-types --jwt-key \$TMP/secret --api-keys"
echo "\$TMP/api-keys.json --log-level warn --device-rate 0 --gateway-rate 0\`, pinned with \`taskset -c 0\`):"
echo
cat "$cmds"
if [[ -n $metrics_b ]]; then
  echo
  echo "## Hub B stream metrics at the end"
  echo
  echo '```'
  echo "$metrics_b"
  echo '```'
fi
}

if [[ $OUT == - ]]; then report; else report | tee "$OUT"; fi
