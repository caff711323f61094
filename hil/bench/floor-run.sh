#!/usr/bin/env bash
# Runs hil/bench/floor (floor.c) in servogate's place under scripts/bench.sh, so the rig
# and the counting are the gateway's own: it takes servogate's `run --config FILE`, reads
# the serial port, units, poll interval, t3.5 and broker port from the file bench.sh
# wrote, and execs floor with them (same pid: perf counts floor).
#
#   GW_BIN=hil/bench/floor-run.sh FLOOR_MQTT=lazy POLL=50ms scripts/bench.sh line 6
#
# FLOOR_MQTT: none (the bus alone), lazy (PUBACKs read when the next sample goes out),
# prompt (a wake-up for every PUBACK) or threads (servogate's shape: the bus on a thread
# of its own, a publishing thread woken for each sample and its PUBACK). Default prompt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${FLOOR_BIN:-$here/../../target/floor}
if [ ! -x "$bin" ] || [ "$here/floor.c" -nt "$bin" ]; then
    mkdir -p "$(dirname "$bin")"; cc -O2 -Wall -pthread -o "$bin" "$here/floor.c"
fi
[ "${1:-}" = run ] && [ "${2:-}" = --config ] || { echo "usage: floor-run.sh run --config FILE" >&2; exit 2; }
cfg=$3
port=$(sed -n 's/^port = "\(.*\)"/\1/p' "$cfg" | head -1)
[ -n "$port" ] || { echo "floor-run.sh: only the RTU pty link (LINK=pty)" >&2; exit 2; }
units=$(grep -c '^\[\[devices\]\]' "$cfg")
mqtt_port=$(sed -n 's|^url = "mqtt://127.0.0.1:\([0-9]*\)"|\1|p' "$cfg")
us() { # a servogate duration (1us, 10ms, 50ms, 0ms) in microseconds
    case $1 in *us) echo "${1%us}" ;; *ms) echo $(( ${1%ms} * 1000 )) ;; *s) echo $(( ${1%s} * 1000000 )) ;; esac
}
poll=$(us "$(sed -n 's/^poll = "\(.*\)"/\1/p' "$cfg" | head -1)")
t35=1750 # servogate's default at 115200 baud
if grep -q '^t35 = "0ms"' "$cfg"; then t35=0; fi
case ${FLOOR_MQTT:-prompt} in
    none) exec "$bin" "$port" "$units" "$poll" "$t35" ;;
    lazy|prompt|threads) exec "$bin" "$port" "$units" "$poll" "$t35" "$mqtt_port" "${FLOOR_MQTT:-prompt}" ;;
    *) echo "FLOOR_MQTT must be none, lazy, prompt or threads" >&2; exit 2 ;;
esac
