#!/usr/bin/env bash
# The README's quick path on a fresh clone in a new virtual environment, each step timed:
#   scripts/quick_path.sh [REPO (default: this checkout)] [WORKDIR (default: a new temporary folder)]
# Prints one "TIME <seconds> s: <command>" line per step (also in WORKDIR/times.txt).
set -eu
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=${2:-$(mktemp -d)}
export LONGROPE_CACHE="$work/cache"
git clone -q "$repo" "$work/longrope" && cd "$work/longrope"
: > "$work/times.txt"
t() { local s; s=$(date +%s.%N); "$@"; echo "TIME $(python3 -c "print(f'{$(date +%s.%N) - $s:.0f}')") s: $*" | tee -a "$work/times.txt"; }
t python3 -m venv .venv
. .venv/bin/activate
t pip install -q torch==2.13.0
t pip install -q -e ".[plot]"
t longrope search --config configs/tiny.yaml
t longrope eval runs/tiny-8x --lengths 1x,8x,16x --needle
t longrope plot runs/tiny-8x
t longrope export runs/tiny-8x --out models/tiny-8x
t python scripts/needle_demo.py models/tiny-8x
