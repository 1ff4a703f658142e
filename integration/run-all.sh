#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it needs (as root,
# non-interactively), then the Rust tests (unit, protocol, classifier data, daemon)
# and the real-Postfix end-to-end tests. Exits non-zero on the first failing part.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    integration/install-deps.sh
else
    sudo -n integration/install-deps.sh
fi

echo "== cargo test"
cargo test --locked 2>&1

echo "== real-Postfix end-to-end tests"
# The Postfix tests use the binary cargo just built.
cargo build --locked --bin mxpace 2>&1
python3 -m pytest -q integration/postfix 2>&1
