#!/bin/bash
# ad-hoc: profile the mount process during cold and hot find (py-spy, all threads)
set -u
cd /work/main
# Needs a finished `python -m bench.run` (bench/work/run) and py-spy:
#   .venv/bin/python -m pip install --target bench/work/tools py-spy
# Run as root from anywhere; it cleans up its origin and mount on exit.
W=bench/work/prof; R=bench/work/run; mkdir -p $W; MP=$W/mnt; C=$W/cache
mkdir -p $MP; rm -rf $C
PORT=18931
.venv/bin/swarm serve $R/store --listen 127.0.0.1:$PORT > $W/origin.log 2>&1 &
OPID=$!
trap 'fusermount3 -u $MP 2>/dev/null; kill $OPID' EXIT
sleep 1.5
.venv/bin/swarm mount tree.bench.local $MP --origin http://127.0.0.1:$PORT/ --trust $R/keys-tree.bench.local/root.json --cache $C --ttl 3600
MPID=$(pgrep -f -- "--cache $(realpath $C)" | head -1)   # lookup only (no kill): the mount we just started
echo mount pid $MPID
sync; echo 3 > /proc/sys/vm/drop_caches
PYTHONPATH=$W/../tools $W/../tools/bin/py-spy record -p $MPID -r 200 --threads --format raw -o $W/cold.raw --nonblocking > $W/pyspy-cold.log 2>&1 &
SPID=$!
sleep 1
/usr/bin/time -f "cold find %e s" find $MP -printf '%s %m %T@\n' > /dev/null
kill -INT $SPID; wait $SPID
/usr/bin/time -f "hot find %e s" find $MP -printf '%s %m %T@\n' > /dev/null
PYTHONPATH=$W/../tools $W/../tools/bin/py-spy record -p $MPID -r 200 --threads --format raw -o $W/hot.raw --nonblocking > $W/pyspy-hot.log 2>&1 &
SPID=$!
sleep 1
/usr/bin/time -f "hot find %e s" find $MP -printf '%s %m %T@\n' > /dev/null
kill -INT $SPID; wait $SPID
strace -c -f -p $MPID -o $W/strace-hot.txt & TPID=$!
sleep 1
/usr/bin/time -f "hot find (strace) %e s" find $MP -printf '%s %m %T@\n' > /dev/null
kill -INT $TPID; wait $TPID
head -20 $W/strace-hot.txt
