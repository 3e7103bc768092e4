#!/usr/bin/env bash
# Installs every Debian package snapfork needs to build, test and demo.
# Idempotent; run as root (CI does). Nothing else is installed by hand.
set -euo pipefail
PKGS=(
  clang libclang-dev            # bindgen for userfaultfd-sys and librocksdb-sys
  librocksdb-dev libzstd-dev    # the RocksDB the index links against (see ARCHITECTURE.md)
  xfsprogs btrfs-progs          # reflink filesystems for fsfork tests
  runsc                         # gVisor, for the engine's gvisor driver
  busybox-static                # a static /bin/sh for the engine's demo and test sandboxes
  sqlite3 zstd util-linux e2fsprogs
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
