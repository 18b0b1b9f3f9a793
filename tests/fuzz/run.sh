#!/bin/sh
# Runs one libFuzzer harness built by tests/fuzz/build.sh for a fixed time, on
# its committed seeds (tests/fuzz/seeds/<name>/, a few small inputs) plus the
# corpus it grew in earlier runs ($FUZZ_OUT/corpus/<name>/, never committed).
# Exits non-zero on a crash, a leak, a timeout or an out-of-memory input and
# prints the reproducer's path; the whole libFuzzer log is kept in
# $FUZZ_OUT/logs/<name>.log.
#
# Usage: tests/fuzz/run.sh <fuzz_name> [seconds]
#   seconds: default $HUB_FUZZ_SECONDS, else 30
#   FUZZ_OUT: where build.sh put the harnesses (default: build-fuzz/)
# CTest runs it as fuzz.<name> (tests/CMakeLists.txt, label fuzz).
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${FUZZ_OUT:-"$root/build-fuzz"}
name=${1:?usage: run.sh <fuzz_name> [seconds]}
secs=${2:-${HUB_FUZZ_SECONDS:-30}}
bin="$out/$name"
seeds="$root/tests/fuzz/seeds/$name"
corpus="$out/corpus/$name"
log="$out/logs/$name.log"

if [ ! -x "$bin" ]; then
	echo "run.sh: $bin is not built (tests/fuzz/build.sh)" >&2
	exit 1
fi
if [ ! -d "$seeds" ]; then
	echo "run.sh: no seeds in $seeds: commit a few small inputs there" >&2
	exit 1
fi
mkdir -p "$corpus" "$out/artifacts" "$out/logs"
rm -f "$out/artifacts/$name-"*

status=0
"$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	-artifact_prefix="$out/artifacts/$name-" "$corpus" "$seeds" >"$log" 2>&1 || status=$?

if [ "$status" -ne 0 ]; then
	tail -n 60 "$log"
	for f in "$out/artifacts/$name-"*; do
		[ -e "$f" ] || continue
		echo "run.sh: $name failed; reproducer: $f"
		echo "run.sh: reproduce with: $bin $f"
	done
	echo "run.sh: $name exited with $status (full log: $log)"
	exit 1
fi
grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
echo "run.sh: $name ran ${secs}s on $(ls "$seeds" | wc -l) seeds + $(ls "$corpus" | wc -l) corpus inputs: no failure"
