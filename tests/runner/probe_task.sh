#!/bin/sh
# probe_task.sh FIRST COUNT OUTPUT [ALLOC_MB]
# Writes "event N" per event to OUTPUT; prints who and where it runs on
# stdout (the task log). With ALLOC_MB, first holds that many MB in a shell
# variable (to exceed a memory limit).
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME cwd=$(pwd)"
cat /proc/self/cgroup
for fd in /proc/$$/fd/*; do echo "fd $fd -> $(readlink "$fd")"; done
if [ -n "$4" ]; then
    x=$(head -c "$(($4 * 1000000))" /dev/zero | tr '\0' a)
    echo "held ${#x} bytes"
fi
n=$1
end=$(($1 + $2))
while [ "$n" -lt "$end" ]; do
    echo "event $n"
    n=$((n + 1))
done > "$3"
