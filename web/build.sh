#!/bin/sh
# Builds the served console into OUT (normally <build>/web, the directory the
# hub's --web-root points at): the console's own files from web/, plus uPlot
# (uplot.min.js, uplot.css) from npm. The npm packages (web/package.json and
# its lock: uPlot for the page; playwright-core and swagger-parser for
# tests/web) are installed with `npm ci` into NPM_DIR (<build>/web-npm), once
# per lock file. Nothing of it is committed, and the hub itself never needs
# npm. Without npm (or offline) the console is still copied and falls back to
# its built-in canvas charts.
#
#   web/build.sh OUT NPM_DIR
set -eu
src=$(cd "$(dirname "$0")" && pwd)
out=$1
npm_dir=$2
mkdir -p "$out" "$npm_dir"
for f in "$src"/*.html "$src"/*.js "$src"/*.css; do
	cp -p "$f" "$out/"
done
if ! command -v npm >/dev/null 2>&1; then
	echo "web/build.sh: npm not found: uPlot is not installed, the console uses its canvas charts" >&2
	exit 0
fi
if ! cmp -s "$src/package-lock.json" "$npm_dir/package-lock.json" ||
   [ ! -d "$npm_dir/node_modules/uplot" ]; then
	cp "$src/package.json" "$src/package-lock.json" "$npm_dir/"
	if ! (cd "$npm_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
		rm -f "$npm_dir/package-lock.json"
		echo "web/build.sh: npm ci failed: uPlot is not installed, the console uses its canvas charts" >&2
		exit 0
	fi
fi
cp "$npm_dir/node_modules/uplot/dist/uPlot.iife.min.js" "$out/uplot.min.js"
cp "$npm_dir/node_modules/uplot/dist/uPlot.min.css" "$out/uplot.css"
