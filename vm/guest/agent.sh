#!/bin/sh
# swarm-grid guest agent: the guest side of the Vacuum platform contract
# (docs/VMS.md, "The guest side"). POSIX sh; busybox is enough.
#
# What it does, in order:
#   1. mounts /proc /sys /dev /run if they are not, loads the modules it needs
#      (if modprobe exists; an initramfs may have loaded them already);
#   2. finds its two virtio-serial ports by name in /sys/class/virtio-ports/*/name:
#        org.swarm.vac.host  (host -> guest)   org.swarm.vac.guest (guest -> host)
#   3. sends "HELLO <version>" and reads the host's lines:
#        FILE <relpath> <base64>  -> written atomically to /run/vac/<relpath>
#        READY                    -> the files are complete: user_data may start
#        STOP                     -> stop (as the ACPI power button, or SIGTERM)
#   4. after the first READY: mounts the 9p tag "swarm-software" read-only at /swarm
#      (if the host exports it), runs /run/vac/user_data with MACHINEFEATURES,
#      JOBFEATURES, JOBOUTPUTS and SWARM_SOFTWARE set, and unmounts /swarm when it
#      exits (a guest with 9p mounted cannot be live-migrated);
#   5. about once a second ships every $JOBOUTPUTS file whose size, mtime or inode
#      changed: "FILE joboutputs/<name> <base64>" (vm-heartbeat and
#      shutdown_message are just such files);
#   6. when user_data exits, or on STOP: ships the outputs, sends "DONE", powers off.
#      On STOP it first writes "100 Shutdown as requested by the host" into
#      shutdown_message unless the payload wrote one, and ends the payload
#      (SIGTERM to its process group, SIGKILL after $VAC_STOP_GRACE seconds). It
#      never invents a shutdown_message when user_data exits by itself.
#
# The host may close and reopen its end of the ports at any time (live migration,
# a daemon restart): reading the host port then gives end-of-file, the agent reopens
# it and sends HELLO again; writes block in the kernel while the host is away. What
# was shipped is remembered (size, mtime, inode), so nothing is sent twice unless it
# changed.
#
# Processes: the main loop (this shell: payload, shipping, stopping), the reader
# (a subshell: HELLO and the host's lines) and busybox acpid (power button). They
# talk through flag files in $STATE; whole lines to the guest port are written
# under a mkdir lock, so two writers never interleave.

AGENT_VERSION=1
HOST_PORT_NAME=org.swarm.vac.host
GUEST_PORT_NAME=org.swarm.vac.guest
SOFTWARE_TAG=swarm-software

VAC=/run/vac
MACHINEFEATURES=$VAC/machinefeatures
JOBFEATURES=$VAC/jobfeatures
JOBOUTPUTS=$VAC/joboutputs
SWARM_SOFTWARE=/swarm
STATE=$VAC/.agent                   # flags (ready, stop), the lock, what was shipped
MAX_OUTPUT=786432                   # bytes: base64 of it is 1 MiB, the host's line limit
VAC_STOP_GRACE=${VAC_STOP_GRACE:-10}  # seconds the payload gets after SIGTERM
MODULES="virtio_pci virtio_console virtio_blk 9pnet_virtio 9p button evdev"

log() { echo "vac-agent: $*" >&2; }

# --- the system ---------------------------------------------------------------

mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }

setup_system() {
    [ -e /proc/self ] || mount -t proc proc /proc
    mounted /sys || mount -t sysfs sysfs /sys
    mounted /dev || mount -t devtmpfs devtmpfs /dev
    mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run
    if command -v modprobe >/dev/null 2>&1; then
        for m in $MODULES; do modprobe -q "$m" 2>/dev/null; done
    fi
    mkdir -p "$MACHINEFEATURES" "$JOBFEATURES" "$JOBOUTPUTS" "$STATE/shipped"
}

# The /dev node of the virtio-serial port called $1 (nothing if there is none yet).
find_port() {
    for d in /sys/class/virtio-ports/*; do
        [ -r "$d/name" ] || continue
        if [ "$(cat "$d/name")" = "$1" ] && [ -c "/dev/${d##*/}" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

# Wait (up to 60 s: devices appear while modules load) for both ports.
find_ports() {
    i=0
    while [ $i -lt 600 ]; do
        HOST_PORT=$(find_port "$HOST_PORT_NAME") && GUEST_PORT=$(find_port "$GUEST_PORT_NAME") &&
            return 0
        sleep 0.1
        i=$((i + 1))
    done
    log "no virtio-serial ports named $HOST_PORT_NAME and $GUEST_PORT_NAME"
    return 1
}

power_off() {
    sync
    # Our own initramfs runs us from a shell PID 1 that cannot handle poweroff's
    # signal: it asks for the direct system call. Under a real init, shut down cleanly.
    if [ "${VAC_POWEROFF:-}" = force ]; then poweroff -f; else poweroff; fi
}

# --- talking to the host -------------------------------------------------------

lock() { until mkdir "$STATE/lock" 2>/dev/null; do sleep 0.05; done; }
unlock() { rmdir "$STATE/lock"; }

# send LINE: one line to the host (blocks while the host is not connected).
send() {
    lock
    printf '%s\n' "$1" >"$GUEST_PORT"
    rc=$?
    unlock
    return $rc
}

# send_file RELPATH FILE: "FILE RELPATH <base64 of FILE>".
send_file() {
    lock
    { printf 'FILE %s ' "$1" && base64 -w 0 <"$2" && printf '\n'; } >"$GUEST_PORT"
    rc=$?
    unlock
    return $rc
}

# A relpath the host may write: machinefeatures/KEY, jobfeatures/KEY, user_data.
valid_relpath() {
    case $1 in
        user_data) return 0 ;;
        machinefeatures/* | jobfeatures/*)
            key=${1#*/}
            case $key in '' | *[!a-z0-9_]*) return 1 ;; esac
            [ ${#key} -le 64 ]
            ;;
        *) return 1 ;;
    esac
}

# One line from the host. Reads nothing from stdin (stdin is the host port).
handle_line() {
    case $1 in
        "FILE "*)
            rest=${1#FILE }
            rel=${rest%% *}
            data=${rest#* }
            if [ "$data" = "$rest" ] || ! valid_relpath "$rel"; then
                log "refused a FILE line for '$rel'"
                return
            fi
            tmp=$VAC/.incoming.$$
            if printf '%s' "$data" | base64 -d >"$tmp" 2>/dev/null; then
                mv -f "$tmp" "$VAC/$rel" # atomic: readers see the old or the new file
            else
                rm -f "$tmp"
                log "refused $rel: bad base64"
            fi
            ;;
        READY) : >"$STATE/ready" ;;
        STOP) : >"$STATE/stop" ;;
        *) log "ignored a line from the host: $(printf '%.40s' "$1")" ;;
    esac
}

# The reader: HELLO, then the host's lines until end-of-file (the host closed its
# end, or has not opened it yet), then again. The host port stays open while
# reading: the kernel drops what it buffered for a port when the port is closed.
reader() {
    while :; do
        {
            send "HELLO $AGENT_VERSION" || log "HELLO not sent"
            while IFS= read -r line; do handle_line "$line"; done
        } <"$HOST_PORT"
        log "end of file on the host port: reopening it"
        sleep 1
    done
}

# --- outputs -------------------------------------------------------------------

# Ship every output file that is new or changed since it was last shipped.
ship_outputs() {
    for f in "$JOBOUTPUTS"/*; do
        [ -f "$f" ] || continue
        name=${f##*/}
        case $name in *[!A-Za-z0-9._-]*) continue ;; esac
        [ ${#name} -le 64 ] || continue
        sig=$(stat -c '%s %y %i' "$f" 2>/dev/null) || continue
        [ "$sig" = "$(cat "$STATE/shipped/$name" 2>/dev/null)" ] && continue
        if [ "${sig%% *}" -gt $MAX_OUTPUT ]; then
            log "not shipping $name: ${sig%% *} bytes is over $MAX_OUTPUT"
        elif ! send_file "joboutputs/$name" "$f"; then
            log "shipping $name failed; retrying"
            continue
        fi
        printf '%s' "$sig" >"$STATE/shipped/$name"
    done
}

# --- the payload ---------------------------------------------------------------

software_tag_present() {
    for t in /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag; do
        [ -r "$t" ] && [ "$(tr -d '\000' <"$t")" = "$SOFTWARE_TAG" ] && return 0
    done
    return 1
}

mount_software() {
    software_tag_present || return 0
    mkdir -p "$SWARM_SOFTWARE" &&
        mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 \
            "$SOFTWARE_TAG" "$SWARM_SOFTWARE" ||
        log "could not mount $SOFTWARE_TAG at $SWARM_SOFTWARE"
}

umount_software() {
    mounted "$SWARM_SOFTWARE" || return 0
    umount "$SWARM_SOFTWARE" || umount -l "$SWARM_SOFTWARE" || log "could not unmount $SWARM_SOFTWARE"
}

# Start user_data as the leader of its own process group (so STOP ends all of it).
start_payload() {
    (
        cd /tmp || cd /
        exec env MACHINEFEATURES="$MACHINEFEATURES" JOBFEATURES="$JOBFEATURES" \
            JOBOUTPUTS="$JOBOUTPUTS" SWARM_SOFTWARE="$SWARM_SOFTWARE" \
            setsid sh "$VAC/user_data" </dev/null
    ) &
    PAYLOAD=$!
    log "user_data started (pid $PAYLOAD)"
}

payload_running() { [ -n "${PAYLOAD:-}" ] && kill -0 "$PAYLOAD" 2>/dev/null; }

stop_payload() {
    [ -e "$JOBOUTPUTS/shutdown_message" ] ||
        echo "100 Shutdown as requested by the host" >"$JOBOUTPUTS/shutdown_message"
    payload_running || return 0
    kill -TERM -"$PAYLOAD" 2>/dev/null || kill -TERM "$PAYLOAD" 2>/dev/null
    i=0
    while payload_running && [ $i -lt $((VAC_STOP_GRACE * 10)) ]; do
        sleep 0.1
        i=$((i + 1))
    done
    payload_running && { kill -KILL -"$PAYLOAD" 2>/dev/null || kill -KILL "$PAYLOAD"; }
}

# --- main ----------------------------------------------------------------------

main() {
    setup_system
    find_ports || return 1
    log "version $AGENT_VERSION: ports $HOST_PORT (host) $GUEST_PORT (guest)"
    rm -f "$STATE/ready" "$STATE/stop"
    rmdir "$STATE/lock" 2>/dev/null

    # STOP by other means than the port: SIGTERM (a real init shutting down) and the
    # ACPI power button (busybox acpid runs <confdir>/PWRF/00000080 for it).
    trap ': >"$STATE/stop"' TERM INT
    if command -v acpid >/dev/null 2>&1; then
        mkdir -p "$STATE/acpi/PWRF"
        printf '#!/bin/sh\n: >%s/stop\n' "$STATE" >"$STATE/acpi/PWRF/00000080"
        chmod +x "$STATE/acpi/PWRF/00000080"
        acpid -c "$STATE/acpi" -l /dev/null -p "$STATE/acpid.pid" ||
            log "acpid did not start: the power button is not handled"
    else
        log "no acpid: the power button is not handled"
    fi

    reader &
    READER=$!

    until [ -e "$STATE/ready" ] || [ -e "$STATE/stop" ]; do sleep 0.1; done
    if [ ! -e "$STATE/stop" ]; then
        mount_software
        start_payload
    fi
    while :; do
        ship_outputs
        if [ -e "$STATE/stop" ]; then
            log "stopping as requested"
            stop_payload
            break
        fi
        payload_running || break
        sleep 1
    done
    if [ -n "${PAYLOAD:-}" ]; then
        wait "$PAYLOAD"
        log "user_data exited with status $?"
    fi
    umount_software
    ship_outputs
    send DONE
    log "done"
    kill "$READER" 2>/dev/null
    [ -r "$STATE/acpid.pid" ] && kill "$(cat "$STATE/acpid.pid")" 2>/dev/null
    power_off
}

main "$@"
