#!/usr/bin/env bash
# Benchmarks of the Modbus RTU path, recorded in BENCHMARKS.md (a benchmark, not a test).
#
#   scripts/bench.sh faithful N    one unit, servosim timing-faithful at 115200 baud, reads of
#                                  N registers back to back: transactions/s vs the physical limit
#   scripts/bench.sh instant U     U units, servosim answering at once: the most
#                                  transactions/s, CPU time per transaction, peak RSS
#   scripts/bench.sh line U        U units polled every POLL (default 50ms) on a
#                                  timing-faithful line at 115200 baud with t3.5 honoured:
#                                  what a sample costs at a real line's rate (issue 13)
#
# Every mode prints the gateway's CPU per sample: user + system time over the window
# (perf's task-clock, in ns, when perf is there; /proc ticks otherwise) and its context
# switches per sample. INSTR=1 runs the gateway under valgrind's callgrind and prints the
# instructions it executed in the window per sample (zeroed at the start, dumped at the
# end; valgrind slows it about 50-fold, so use it at real rates, not flat out).
# GW_RUNNER=... puts a command in front of the gateway (e.g. scripts/emu-run.sh arm64)
# and GW_BIN names another build of it (e.g. target/aarch64-unknown-linux-gnu/release/servogate).
#
# Both run the release binaries with a real mosquitto on a free loopback port and socat
# between servosim and servogate, for DURATION seconds (default 10). DURABLE=1 runs the
# gateway in durable mode (`[buffer] path`, the event log on disk, sync "batch" 10 ms)
# and also prints the log's bytes per event.
#
# Instant mode also takes CONTRACT=json|sparkplug|both (what the gateway publishes, DESIGN.md
# section 10; default json), MQTT=5 (MQTT 5 instead of 3.1.1), and FIELDS=N (a profile of N
# u16 registers instead of the 8-field drive profile), POLL=DURATION (each device's poll
# interval, default 1us: flat out), BATCH=N (up to N samples of a device per message,
# [mqtt] batch_max): it then prints points/s, a point being one field of one
# sample.
#
# LINK=tcp runs the bus as Modbus TCP (servosim modbus-tcp on a free loopback port,
# IN_FLIGHT=N requests outstanding, default 1), LINK=rtu-tcp as RTU over TCP (servosim
# modbus-rtu-tcp, a serial device server), instead of RTU on a socat pty. TURNAROUND=D
# gives every servosim reply a processing time (a device that takes D to answer; on a
# pty that is timing-faithful mode at 115200 baud with D of turnaround).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bench.sh faithful N | instant UNITS | line UNITS}
arg=${2:?usage: bench.sh faithful N | instant UNITS | line UNITS}
duration=${DURATION:-10}

. scripts/bench-common.sh   # from the repository root (the cd above)
start_broker
link=${LINK:-pty}
if [ "$link" = pty ]; then
    socat pty,raw,echo=0,link="$work/sim.pty" pty,raw,echo=0,link="$work/gw.pty" 2>/dev/null & pids+=($!)
    for _ in $(seq 100); do [ -e "$work/gw.pty" ] && [ -e "$work/sim.pty" ] && break; sleep 0.05; done
fi

if [ "$mode" = faithful ]; then
    units=1; n=$arg; simopts=(--timing-faithful --baud 115200); t35=""
    last=$((n - 1))
    profile="first = { address = 0, type = \"u16\" }
last = { address = $last, type = \"u16\" }"
    # A real line: servogate keeps its own t3.5 (1.75 ms at 115200 baud).
else
    units=$arg
    if [ "$mode" = line ]; then
        # Six drives on one RS-485 line as a plant polls them: servosim answers at the
        # line's speed and servogate keeps t3.5 (its default for the baud rate).
        simopts=(--timing-faithful --baud 115200); t35=""; POLL=${POLL:-50ms}
    else
        simopts=(); t35='t35 = "0ms"'
    fi
    if [ -n "${FIELDS:-}" ]; then
        n=$FIELDS
        profile=$(for i in $(seq 0 $((FIELDS - 1))); do printf 'f%s = { address = %s, type = "u16" }\n' "$i" "$i"; done)
    else
        n=10
        profile='position = { address = 0x0000, type = "i32", scale = 0.001, unit = "mm" }
velocity = { address = 0x0002, type = "i32", scale = 0.001, unit = "mm/s" }
torque = { address = 0x0004, type = "i16", scale = 0.1, unit = "%" }
current = { address = 0x0005, type = "i16", scale = 0.01, unit = "A" }
temperature = { address = 0x0006, type = "i16", scale = 0.1, unit = "degC" }
statusword = { address = 0x0007, type = "u16" }
fault_code = { address = 0x0008, type = "u16" }
mode = { address = 0x0009, type = "i16" }'
    fi
fi

mkfifo "$work/sim.in"
exec 3<>"$work/sim.in"
if [ -n "${TURNAROUND:-}" ]; then
    case $link in
        tcp) simopts+=(--turnaround "$TURNAROUND") ;;
        *) [ ${#simopts[@]} -gt 0 ] || simopts=(--timing-faithful --baud 115200)
           simopts+=(--turnaround "$TURNAROUND") ;;
    esac
fi
case $link in
    pty) simcmd=(modbus-rtu --port "$work/sim.pty") ;;
    # Modbus TCP has no baud rate or wire time: only the turnaround stays.
    tcp) simcmd=(modbus-tcp --listen 127.0.0.1:0)
         simopts=($(printf '%s\n' "${simopts[@]}" | grep -v -e '^--timing-faithful$' -e '^--baud$' -e '^115200$' || true)) ;;
    rtu-tcp) simcmd=(modbus-rtu-tcp --listen 127.0.0.1:0) ;;
    *) echo "LINK must be pty, tcp or rtu-tcp" >&2; exit 2 ;;
esac
target/release/servosim "${simcmd[@]}" --units "1-$units" "${simopts[@]}" <&3 >"$work/sim.out" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do grep -q "servosim ready" "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
case $link in
    pty) busdef=$(printf 'protocol = "modbus-rtu"\nport = "%s"\nbaud = 115200\n%s' "$work/gw.pty" "$t35") ;;
    tcp) busdef=$(printf 'protocol = "modbus-tcp"\naddress = "%s"\nmax_in_flight = %s' \
             "$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$work/sim.out" | head -1)" "${IN_FLIGHT:-1}") ;;
    rtu-tcp) busdef=$(printf 'protocol = "modbus-rtu-tcp"\naddress = "%s"\nbaud = 115200\n%s' \
             "$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$work/sim.out" | head -1)" "$t35") ;;
esac

{
    printf '[gateway]\nid = "bench"\nlog = "warn"\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\n' "$port"
    printf 'contract = "%s"\n' "${CONTRACT:-json}"
    if [ "${MQTT:-}" = 5 ]; then printf 'version = 5\n'; fi
    if [ -n "${BATCH:-}" ]; then printf 'batch_max = %s\n' "$BATCH"; fi
    if [ "${CONTRACT:-json}" != json ]; then printf '[sparkplug]\ngroup_id = "bench"\n'; fi
    if [ -n "${DURABLE:-}" ]; then printf '[buffer]\npath = "%s/log"\n' "$work"; fi
    printf '[profiles.p]\n%s\n' "$profile"
    printf '[[buses]]\nname = "b"\n%s\ntimeout = "100ms"\nmax_gap = 125\n' "$busdef"
    for u in $(seq "$units"); do
        printf '[[devices]]\nname = "axis-%s"\nbus = "b"\nunit = %s\nprofile = "p"\npoll = "%s"\nlate_after = "1s"\n' "$u" "$u" "${POLL:-1us}"
    done
} >"$work/bench.toml"
gw_cmd=(${GW_RUNNER:-} "${GW_BIN:-target/release/servogate}")
if [ -n "${INSTR:-}" ]; then
    command -v valgrind >/dev/null || { echo "INSTR=1 needs valgrind (apt-get install valgrind)" >&2; exit 1; }
    # Not instrumented (nor counted) until the window opens (callgrind_control -i on).
    gw_cmd=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.%p" "${gw_cmd[@]}")
fi
"${gw_cmd[@]}" run --config "$work/bench.toml" 2>"$work/gw.err" & gw=$!; pids+=($gw)

served() { # total replies servosim sent so far
    echo stats >&3
    for _ in $(seq 100); do
        line=$(grep '^ok stats' "$work/sim.out" | tail -n1 || true)
        [ -n "$line" ] && [ "$line" != "${last_stats:-}" ] && break; sleep 0.01
    done
    last_stats=$line
    echo "$line" | sed 's/.*served=//; s/ .*//' | tr ',' '\n' | awk -F: '{s+=$2} END {print s+0}'
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$gw/stat"; }

sleep "${WARMUP:-2}" # warm-up: connect, first polls
if [ -n "${HOOK:-}" ]; then eval "$HOOK"; fi # e.g. a profiler attached to $gw
perf_ok=""
if command -v perf >/dev/null && perf stat -e task-clock true >/dev/null 2>&1; then perf_ok=1; fi
if [ -n "${INSTR:-}" ]; then callgrind_control -i on "$gw" >/dev/null; fi
s0=$(served); c0=$(cpu_ticks); t0=$(date +%s.%N)
if [ -n "$perf_ok" ]; then
    perf stat -x, -e task-clock,context-switches -p "$gw" -o "$work/perf.csv" -- sleep "$duration"
else
    sleep "$duration"
fi
s1=$(served); c1=$(cpu_ticks); t1=$(date +%s.%N)
instr=0
if [ -n "${INSTR:-}" ]; then
    callgrind_control -d "$gw" >/dev/null
    # The dump is written when valgrind next looks at its commands: wait for it.
    for _ in $(seq 100); do compgen -G "$work/cg.*.*" >/dev/null && break; sleep 0.1; done
    sleep 0.5
    instr=$(cat "$work"/cg.*.* | awk '/^summary:/ {s+=$2} END {print s+0}')
    # INSTR_KEEP=DIR keeps the profile for callgrind_annotate.
    if [ -n "${INSTR_KEEP:-}" ]; then mkdir -p "$INSTR_KEEP" && cp "$work"/cg.*.* "$INSTR_KEEP"/; fi
fi
task_ms=0; switches=0
if [ -n "$perf_ok" ]; then
    task_ms=$(awk -F, '$3 == "task-clock" {print $1}' "$work/perf.csv")
    switches=$(awk -F, '$3 == "context-switches" {print $1}' "$work/perf.csv")
fi
hz=$(getconf CLK_TCK)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
fields=$(printf '%s\n' "$profile" | grep -c '=')
LINK_NAME="$link${IN_FLIGHT:+ in_flight=$IN_FLIGHT}${TURNAROUND:+ turnaround=$TURNAROUND}" python3 - "$mode" "$n" "$units" "$s0" "$s1" "$t0" "$t1" "$c0" "$c1" "$hz" "$rss" "$fields" "${CONTRACT:-json}" "$task_ms" "$switches" "$instr" <<'PY'
import os, sys
link = os.environ["LINK_NAME"]
mode, n, units = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s0, s1, t0, t1, c0, c1, hz, rss, fields = map(float, sys.argv[4:13])
contract = sys.argv[13]
task_ms, switches, instr = (float(x or 0) for x in sys.argv[14:17])
tx = s1 - s0; secs = t1 - t0; rate = tx / secs
# perf's task-clock (ns resolution) over the same window when it ran; /proc ticks else.
cpu_ms = task_ms if task_ms > 0 else (c1 - c0) / hz * 1000
print(f"mode={mode} link={link} units={units} registers={n} transactions={tx:.0f} seconds={secs:.2f}")
print(f"transactions/s = {rate:.1f}")
if mode == "faithful":
    baud = 115200; t35 = 0.00175
    limit = 1 / ((8 + 5 + 2 * n) * 11 / baud + 2 * t35)
    print(f"physical limit = {limit:.1f}/s; achieved {100 * rate / limit:.1f} %")
print(f"servogate CPU = {cpu_ms:.0f} ms over {secs:.1f} s = {cpu_ms / max(tx, 1) * 1000:.1f} us per transaction")
print(f"servogate peak RSS = {rss / 1024:.1f} MiB")
print(f"replies served since start = {s1:.0f}")
if task_ms > 0:
    print(f"context switches = {switches / max(tx, 1):.2f} per sample")
if instr > 0:
    print(f"instructions = {instr / max(tx, 1):,.0f} per sample (callgrind, {instr:,.0f} in the window)")
if mode == "instant":
    print(f"contract {contract}: {fields:.0f} points per sample, {rate * fields:,.0f} points/s, "
          f"{cpu_ms / 1000 / secs:.3f} cores, {cpu_ms / max(tx * fields, 1) * 1000:.2f} us per point")
PY
if [ -n "${DURABLE:-}" ]; then
    bytes=$(cat "$work"/log/*.log | wc -c)
    events=$(target/release/servogate log --dir "$work/log" 2>&1 >/dev/null | sed -n 's/.* of \([0-9]*\) events.*/\1/p')
    echo "event log: $bytes bytes, $events events, $((bytes / (events > 0 ? events : 1))) bytes per event"
fi
