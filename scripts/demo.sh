#!/usr/bin/env bash
# Sets up the machine, builds snapfork and runs the demo on the default store (./.snapfork).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "!!! the demo needs root (it captures real process memory and runs sandboxes). Run: sudo $0" >&2
  exit 1
fi
scripts/setup.sh
cargo build --release -p snapfork-cli
target="${CARGO_TARGET_DIR:-target}"
exec scripts/demo-store.sh "$target/release/snapfork"
