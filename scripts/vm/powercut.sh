#!/usr/bin/env bash
# The power-cut test of the event log (DESIGN.md section 9, issue "the event log on disk"):
# in the qemu VM, with the log on an ext4 virtio disk, servogate logs two units polled
# every 20 ms (sync = "batch", sync_interval 10 ms) while a subscriber in the guest prints
# every event the broker got; the VM is then killed (qemu SIGKILL: the guest's page cache
# is lost, as in a power cut) at a random moment. A second boot mounts the disk (ext4
# replays its journal), and `servogate log` writes what the log recovered to the disk,
# which the host reads out of the image (debugfs).
# tests/examples/powercut_check.rs then checks: every recovered event is whole and in
# order (each device's seq unbroken), and every event published before the cut that the
# log lost is from the last moments before it (the figure is printed).
#
#   scripts/vm/powercut.sh [ROUNDS]     (default 1; each round is about 20 s)
#
# POWERCUT_KEEP=1 keeps the disk image and the logs of a failed round.
# Exit 0 when every round passed.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-1}"

for p in mosquitto mosquitto_sub socat mkfs.ext4 debugfs; do
    command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || {
        echo "powercut: $p is missing (scripts/test.sh installs it)" >&2; exit 2; }
done
cargo build --workspace --bins --locked
cargo build --locked -p servogate-e2e --example powercut_check
target="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
mosq="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

work="$(mktemp -d "${TMPDIR:-/tmp}/servogate-powercut.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cat >"$work/mosquitto.conf" <<'CONF'
listener 1883 127.0.0.1
allow_anonymous true
persistence false
CONF
cat >"$work/servogate.toml" <<'CONF'
[gateway]
id = "pc"
log = "warn"

[mqtt]
url = "mqtt://127.0.0.1:1883"
reconnect_min = "50ms"
reconnect_max = "200ms"

[buffer]
path = "/mnt/log"
sync = "batch"
sync_interval = "10ms"

[profiles.sim]
position    = { address = 0x0000, type = "i32", scale = 0.001, unit = "mm" }
t_ms        = { address = 0x000A, type = "u32", word_order = "low_first", unit = "ms" }

[[buses]]
name = "rs485"
protocol = "modbus-rtu"
port = "/tmp/gw"
baud = 115200
timeout = "100ms"
t35 = "0ms"

[[devices]]
name = "axis-1"
bus = "rs485"
unit = 1
profile = "sim"
poll = "20ms"

[[devices]]
name = "axis-2"
bus = "rs485"
unit = 2
profile = "sim"
poll = "20ms"
CONF

files=(--file "$target/debug/servogate:/usr/bin/servogate" --file "$target/debug/servosim:/usr/bin/servosim"
       --file "$mosq:/usr/sbin/mosquitto" --file "$(command -v mosquitto_sub):/usr/bin/mosquitto_sub"
       --file "$(command -v socat):/usr/bin/socat" --file "$work/mosquitto.conf:/pc/mosquitto.conf"
       --file "$work/servogate.toml:/pc/servogate.toml")

run_round() {
    local round="$1" img="$work/disk.img" delay
    rm -f "$img"
    truncate -s 256M "$img"
    mkfs.ext4 -q -F "$img"
    # Boot 1: events flow until qemu is killed.
    VM_DISK="$img" VM_PIDFILE="$work/qemu.pid" VM_CAN_SETUP=0 VM_TIMEOUT=300 \
        scripts/vm/run.sh "${files[@]}" -- '
set -e
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/log
mosquitto -c /pc/mosquitto.conf -d
socat pty,raw,echo=0,link=/tmp/sim pty,raw,echo=0,link=/tmp/gw &
i=0; while [ ! -e /tmp/gw ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
servosim modbus-rtu --port /tmp/sim --units 1-2 >/dev/null &
mosquitto_sub -h 127.0.0.1 -q 1 -t "servogate/pc/devices/+/telemetry" -F "PUB %t %p" &
sleep 0.5
servogate run --config /pc/servogate.toml 2>/tmp/servogate.log &
sleep 5
echo POWERCUT-ARMED
sleep 200' >"$work/boot1.log" 2>&1 &
    local run=$!
    local waited=0
    until grep -q POWERCUT-ARMED "$work/boot1.log" 2>/dev/null; do
        sleep 0.2; waited=$((waited + 1))
        if [ $waited -gt 600 ] || ! kill -0 "$run" 2>/dev/null; then
            cat "$work/boot1.log" >&2; echo "powercut: the guest never armed" >&2; return 1
        fi
    done
    delay="$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + (r % 1000) / 1000 }')"
    sleep "$delay"
    kill -9 "$(cat "$work/qemu.pid")"
    wait "$run" || true
    # Boot 2: mount (the journal is replayed) and read the log back into a file on the
    # disk itself (not the console, which is no place for a record of every line), which
    # the host then takes out of the image with debugfs.
    VM_DISK="$img" VM_CAN_SETUP=0 VM_TIMEOUT=300 scripts/vm/run.sh \
        --file "$target/debug/servogate:/usr/bin/servogate" -- '
set -e
mount -t ext4 /dev/vda /mnt
servogate log --dir /mnt/log --stream telemetry >/mnt/recovered.jsonl
sync
umount /mnt
echo LOG-END' >"$work/boot2.log" 2>&1 || { cat "$work/boot2.log" >&2; return 1; }
    grep -q LOG-END "$work/boot2.log" || { cat "$work/boot2.log" >&2; return 1; }
    debugfs -R "dump /recovered.jsonl $work/recovered.jsonl" "$img" 2>/dev/null
    echo "powercut: round $round: qemu killed ${delay} s after arming" >&2
    if ! "$target/debug/examples/powercut_check" "$work/boot1.log" "$work/recovered.jsonl"; then
        if [ "${POWERCUT_KEEP:-0}" = 1 ]; then
            keep="$(mktemp -d "${TMPDIR:-/tmp}/servogate-powercut-fail.XXXXXX")"
            cp "$img" "$work/boot1.log" "$work/boot2.log" "$work/recovered.jsonl" "$keep/"
            echo "powercut: the disk image and logs are in $keep" >&2
        fi
        return 1
    fi
}

for r in $(seq "$rounds"); do
    run_round "$r" || { echo "powercut: FAIL (round $r)" >&2; exit 1; }
done
echo "powercut: PASS ($rounds round(s))" >&2
