#!/usr/bin/env bash
# The store demo: two real memory images captured from running processes, stored, deduplicated,
# verified and restored byte for byte.  usage: demo-store.sh SNAPFORK_BINARY
set -euo pipefail
snapfork="$1"
work="$(mktemp -d /var/tmp/snapfork-demo.XXXXXX)"
trap 'rm -rf "$work"' EXIT
shared="$(cd "$(dirname "$0")/../.." && pwd)/shared"
echo "== capturing two 256 MiB guest-memory images from real processes (mem-b: 'later')"
python3 "$shared/tools/capture-memimg.py" "$work" --size-mib 256 >/dev/null
echo "== checkpoint 1: ingest mem-a"
"$snapfork" ingest "$work/mem-a.raw" --name demo/vm@1
echo "== checkpoint 2: ingest mem-b onto mem-a (shares every unchanged page)"
"$snapfork" ingest "$work/mem-b.raw" --name demo/vm@2 --parent demo/vm@1
echo "== store figures"
"$snapfork" stats demo/
echo "== verify: every page re-read and re-hashed"
"$snapfork" verify
echo "== restore checkpoint 1 and compare"
"$snapfork" cat demo/vm@1 -o "$work/restored.raw"
cmp "$work/restored.raw" "$work/mem-a.raw" && echo "restored image is byte-identical"
