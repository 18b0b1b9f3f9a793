#!/usr/bin/env bash
# Runs every test: unit (cmocka) and integration (real redis-server, the real
# iot-hub, Python websockets and curl), first on a normal build, then on an
# ASan+UBSan build. With CI=true warnings are errors.
#
#   tests/run.sh            all of it
#   tests/run.sh --quick    the normal build only
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ ${1:-} == --quick ]] && quick=1

./deploy/install-deps.sh

werror=OFF
[[ ${CI:-} == true ]] && werror=ON
jobs=$(nproc)

run_suite() {  # name, cmake args...
  local dir=$1; shift
  echo "== build $dir ($*)"
  cmake -S . -B "$dir" -DHUB_WERROR="$werror" "$@" >/dev/null
  cmake --build "$dir" -j"$jobs" >/dev/null
  echo "== test $dir"
  (cd "$dir" && ctest -j2 --output-on-failure --timeout 300)
}

run_suite build -DCMAKE_BUILD_TYPE=RelWithDebInfo
if ((quick == 0)); then
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-asan -DCMAKE_BUILD_TYPE=Debug -DHUB_SANITIZE=ON
fi
