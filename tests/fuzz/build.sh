#!/bin/sh
# shellcheck disable=SC2086 # flag and file lists are split on purpose
# Builds every tests/fuzz/fuzz_*.c into build-fuzz/ (or $FUZZ_OUT) with
# libFuzzer, ASan and UBSan (clang), the harnesses in parallel.
# Usage: tests/fuzz/build.sh [fuzz_name ...]   (default: all)
#
# Each harness links the pure sources and pkg-config modules listed for it in
# the table below, one line per harness:
#   <harness name> | <sources, relative to the repo root> | <pkg-config modules>
# A harness without a line fails the build: add its line when you add it.
# Run one for S seconds on its seeds (what CTest's fuzz.<name> tests do):
#   tests/fuzz/run.sh fuzz_schema 60
HARNESSES='
fuzz_schema | protocols/schema.c hub/anomaly.c hub/util.c | jansson
fuzz_codec  | protocols/gw_codec.c protocols/jparse.c hub/util.c | jansson
fuzz_auth   | hub/auth.c hub/util.c | jansson libjwt openssl
fuzz_jparse | protocols/jparse.c hub/util.c | jansson
fuzz_sdk_msg   | sdk/c/src/msg.c sdk/c/src/util.c | jansson
fuzz_sdk_spool | sdk/c/src/outbox.c sdk/c/src/util.c | jansson
'

set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${FUZZ_OUT:-"$root/build-fuzz"}
CC=${CC:-clang}
CFLAGS=${CFLAGS:-"-g -O1 -fno-omit-frame-pointer"}
SAN="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"

if ! command -v "$CC" >/dev/null 2>&1; then
	echo "build.sh: $CC not found; on Debian 12:" \
	     "apt-get install -y clang libclang-rt-14-dev" >&2
	exit 1
fi

# Prints field $2 (1-based) of harness $1's table line, trimmed.
field() {
	printf '%s\n' "$HARNESSES" | awk -F'|' -v n="$1" -v f="$2" '
		{ name = $1; gsub(/^[ \t]+|[ \t]+$/, "", name) }
		name == n { v = $f; gsub(/^[ \t]+|[ \t]+$/, "", v); print v; found = 1 }
		END { exit found ? 0 : 1 }'
}

if [ $# -gt 0 ]; then
	names="$*"
else
	names=""
	for f in "$root"/tests/fuzz/fuzz_*.c; do
		[ -e "$f" ] || continue
		f=${f##*/}
		names="$names ${f%.c}"
	done
fi

mkdir -p "$out"
status=0
pids=""
for name in $names; do
	if ! srcs=$(field "$name" 2); then
		echo "build.sh: $name has no line in the HARNESSES table" >&2
		status=1
		continue
	fi
	pkgs=$(field "$name" 3)
	flags=""
	if [ -n "$pkgs" ]; then
		flags=$(pkg-config --cflags --libs $pkgs)
	fi
	files="$root/tests/fuzz/$name.c"
	for s in $srcs; do
		files="$files $root/$s"
	done
	echo "CC $name"
	$CC -std=gnu11 $CFLAGS $SAN -I"$root" $files $flags -lm -o "$out/$name" &
	pids="$pids $!"
	mkdir -p "$out/corpus/$name"
done
for pid in $pids; do
	wait "$pid" || status=1
done
exit $status
