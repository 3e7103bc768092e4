#!/usr/bin/env bash
# Runs the whole test suite: what CI runs. Tests mount loop filesystems, open /dev/userfaultfd
# and /dev/kvm and run gVisor, so they need root; they never skip silently.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "!!! snapfork's tests need root (loop mounts, userfaultfd, KVM, runsc). Run it as root" >&2
  exit 1
fi
scripts/setup.sh
cargo fmt --all -- --check
cargo nextest run --workspace --release "$@"
