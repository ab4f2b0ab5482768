#!/bin/bash
set -u
cd /work/main
# Needs a finished `python -m bench.run` (bench/work/run) and py-spy:
#   .venv/bin/python -m pip install --target bench/work/tools py-spy
# Run as root from anywhere; it cleans up its origin and mount on exit.
W=bench/work/prof; R=bench/work/run; mkdir -p $W; MP=$W/mnt; C=$W/cache-read
mkdir -p $MP; rm -rf $C
PORT=18932
.venv/bin/swarm serve $R/store --listen 127.0.0.1:$PORT > $W/origin.log 2>&1 &
OPID=$!
trap 'fusermount3 -u $MP 2>/dev/null; kill $OPID' EXIT
sleep 1.5
M() { .venv/bin/swarm mount tree.bench.local $MP --origin http://127.0.0.1:$PORT/ --trust $R/keys-tree.bench.local/root.json --cache $C --ttl 3600 >/dev/null; }
M; dd if=$MP/large/big-0.bin of=/dev/null bs=1M 2>&1 | tail -1; fusermount3 -u $MP; sleep 1
M
MPID=$(pgrep -f -- "--cache $(realpath $C)" | head -1)
sync; echo 3 > /proc/sys/vm/drop_caches
PYTHONPATH=$W/../tools $W/../tools/bin/py-spy record -p $MPID -r 500 --threads --format raw -o $W/read-local.raw --nonblocking > /dev/null 2>&1 &
SPID=$!
sleep 1
dd if=$MP/large/big-0.bin of=/dev/null bs=1M 2>&1 | tail -1
kill -INT $SPID; wait $SPID
fusermount3 -u $MP; sleep 1; M
MPID=$(pgrep -f -- "--cache $(realpath $C)" | head -1)
sync; echo 3 > /proc/sys/vm/drop_caches
strace -c -f -p $MPID -o $W/strace-read.txt & TPID=$!
sleep 1
dd if=$MP/large/big-0.bin of=/dev/null bs=1M 2>&1 | tail -1
kill -INT $TPID; wait $TPID
head -12 $W/strace-read.txt
