#!/usr/bin/env bash
# Sets up the machine, builds snapfork and runs the demo on the default store (./.snapfork):
# a real gVisor sandbox checkpointed before a risky action, reverted, forked three ways.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "!!! the demo needs root (it runs gVisor sandboxes). Run it as root" >&2
  exit 1
fi
scripts/setup.sh
cargo build --release -p snapfork-cli
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/snapfork" demo "$@"
