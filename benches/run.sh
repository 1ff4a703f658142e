#!/usr/bin/env bash
# Every benchmark side by side, in one command: builds release, measures mxpace's
# daemon (policy, delivery reports, socketmap, JSON lines), its engine and classifier,
# and the references on the same machine — postfwd1 (policy), Sisimai (classification)
# and a do-nothing server (the machine's ceiling) — then writes benches/RESULTS.md.
#
#   benches/run.sh                      # RUNS=3 DURATION=5 WARMUP=1 DOMAINS=1000
#   RUNS=5 DURATION=10 benches/run.sh   # longer, steadier
#   CALLGRIND=0 benches/run.sh          # skip the instruction counts
#
# Installs the references with apt-get when they are missing and we are root
# (postfwd, libsisimai-perl, valgrind). Needs python3 and perl.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v postfwd1 >/dev/null || missing+=(postfwd)
perl -MSisimai -e 1 2>/dev/null || missing+=(libsisimai-perl)
command -v valgrind >/dev/null || missing+=(valgrind)
if ((${#missing[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[bench] installing ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release --bins
exec python3 benches/ref/bench.py
