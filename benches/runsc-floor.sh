#!/usr/bin/env bash
# What bounds a durable gVisor checkpoint on this machine, without snapfork: plain
# `runsc checkpoint` of a python3 process holding 100 MiB of random heap (as bench_gvisor), then
#   1. the same with one CPU hog at SCHED_IDLE beside it (runsc's CPU sensitivity),
#   2. the same followed by an fdatasync of the image (the least a durable store must wait for),
#   3. as 2, with the image's pages handed to the disk every 4 MiB while runsc writes it.
# Usage (root, runsc, python3): benches/runsc-floor.sh [ROUNDS]
set -euo pipefail
rounds=${1:-3}
dir=$(mktemp -d /var/tmp/sf-runsc-floor-XXXXXX)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir"/rootfs/{proc,dev,sys,tmp,workspace,usr,etc} "$dir"/ws "$dir"/root
for l in bin:usr/bin lib:usr/lib lib64:usr/lib64 sbin:usr/sbin; do ln -s "${l#*:}" "$dir/rootfs/${l%%:*}"; done
cat > "$dir/config.json" <<EOF
{"ociVersion":"1.0.0","process":{"terminal":false,"user":{"uid":0,"gid":0},
 "args":["/usr/bin/python3","-c","import os,time\nheap=bytearray(os.urandom(100<<20))\ni=0\nwhile True:\n    i+=1\n    heap[(i*4096)%len(heap)]=i%256\n    open('/workspace/c.log','a').write('%d\\\\n'%i)\n    time.sleep(0.1)\n"],
 "env":["PATH=/usr/bin:/bin"],"cwd":"/","noNewPrivileges":true},
 "root":{"path":"$dir/rootfs","readonly":true},"hostname":"x",
 "mounts":[{"destination":"/proc","type":"proc","source":"proc"},{"destination":"/dev","type":"tmpfs","source":"tmpfs"},
  {"destination":"/tmp","type":"tmpfs","source":"tmpfs"},{"destination":"/usr","type":"bind","source":"/usr","options":["rbind","ro"]},
  {"destination":"/workspace","type":"bind","source":"$dir/ws","options":["rbind","rw"]}],
 "linux":{"namespaces":[{"type":"pid"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"mount"}]}}
EOF
# Waits for the image to appear, hands its new pages to the disk every 4 MiB (argument 1) or
# not (0) until runsc is done, then fdatasyncs it; prints the fdatasync's milliseconds.
cat > "$dir/sync.py" <<'EOF'
import ctypes, os, sys, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
img, done, kick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
fd, start = None, 0
while not os.path.exists(done):
    if fd is None and os.path.exists(img):
        fd = os.open(img, os.O_RDONLY)
    if fd is not None and kick:
        size = os.fstat(fd).st_size
        if size - start >= 4 << 20:
            libc.sync_file_range(fd, start, size - start, 2)  # SYNC_FILE_RANGE_WRITE
            start = size
    time.sleep(0.005)
t = time.time()
os.fdatasync(os.open(img, os.O_RDONLY))
print(round((time.time() - t) * 1000))
EOF
R="runsc --root=$dir/root --network=none"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
one() { # $1 = mode: plain | hog | sync | kick
  rm -f "$dir/ws/c.log" "$dir/done"; touch "$dir/ws/c.log"; rm -rf "$dir/img"; mkdir "$dir/img"
  local id=floor-$$-$RANDOM
  $R run -detach -bundle "$dir" "$id" >/dev/null 2>&1 </dev/null
  while [ "$(wc -l < "$dir/ws/c.log")" -lt 5 ]; do sleep 0.05; done
  sync; sleep 0.3
  local out="$dir/sync.out"
  case $1 in
    hog) (timeout 1.5 chrt -i 0 sh -c 'while :; do :; done' &) ;;
    sync) python3 "$dir/sync.py" "$dir/img/checkpoint.img" "$dir/done" 0 > "$out" & sleep 0.1 ;;
    kick) python3 "$dir/sync.py" "$dir/img/checkpoint.img" "$dir/done" 1 > "$out" & sleep 0.1 ;;
  esac
  local s; s=$(date +%s%N)
  $R checkpoint --image-path="$dir/img" "$id"
  local ck; ck=$(ms "$s"); touch "$dir/done"; wait
  case $1 in
    sync|kick) echo "$1: runsc checkpoint $ck ms, then fdatasync $(cat "$out") ms, durable after $(( ck + $(cat "$out") )) ms" ;;
    *) echo "$1: runsc checkpoint $ck ms" ;;
  esac
  $R delete -force "$id" >/dev/null 2>&1 || true
  sleep 1.6
}
for _ in $(seq "$rounds"); do
  for mode in plain hog sync kick; do one $mode; done
done
