#!/usr/bin/env bash
# Memory across broker outages (BENCHMARKS.md, "Memory after an outage"): six units
# polled every 10 ms (servosim answering at once, t3.5 honoured by nothing: a pty), the
# broker killed for OUTAGE seconds every PERIOD seconds, TOTAL seconds in all; servogate's
# RSS sampled every second. Prints the RSS before the first outage, at the end of each
# outage (the backlog at its largest), once each backlog drained, and at the end.
#
#   scripts/bench-outage.sh memory|durable
#
# Environment: OUTAGE (default 10), PERIOD (default 40), TOTAL (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bench-outage.sh memory|durable}
outage=${OUTAGE:-10}; period=${PERIOD:-40}; total=${TOTAL:-200}

. scripts/bench-common.sh   # from the repository root (the cd above)
start_broker
socat pty,raw,echo=0,link="$work/sim.pty" pty,raw,echo=0,link="$work/gw.pty" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do [ -e "$work/gw.pty" ] && [ -e "$work/sim.pty" ] && break; sleep 0.05; done
target/release/servosim modbus-rtu --port "$work/sim.pty" --units 1-6 </dev/null >"$work/sim.out" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do grep -q "servosim ready" "$work/sim.out" 2>/dev/null && break; sleep 0.05; done

{
    printf '[gateway]\nid = "bench"\nlog = "warn"\n[mqtt]\nurl = "mqtt://127.0.0.1:%s"\nreconnect_min = "100ms"\nreconnect_max = "1s"\n' "$port"
    if [ "$mode" = durable ]; then printf '[buffer]\npath = "%s/log"\n' "$work"; fi
    printf '[profiles.p]\nposition = { address = 0x0000, type = "i32", scale = 0.001, unit = "mm" }\nvelocity = { address = 0x0002, type = "i32", scale = 0.001, unit = "mm/s" }\ntorque = { address = 0x0004, type = "i16", scale = 0.1, unit = "%%" }\ncurrent = { address = 0x0005, type = "i16", scale = 0.01, unit = "A" }\ntemperature = { address = 0x0006, type = "i16", scale = 0.1, unit = "degC" }\nstatusword = { address = 0x0007, type = "u16" }\n'
    printf '[[buses]]\nname = "b"\nprotocol = "modbus-rtu"\nport = "%s"\nbaud = 115200\ntimeout = "100ms"\nt35 = "0ms"\n' "$work/gw.pty"
    for u in 1 2 3 4 5 6; do
        printf '[[devices]]\nname = "axis-%s"\nbus = "b"\nunit = %s\nprofile = "p"\npoll = "10ms"\n' "$u" "$u"
    done
} >"$work/bench.toml"
target/release/servogate run --config "$work/bench.toml" 2>"$work/gw.err" & gw=$!; pids+=($gw)
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$gw/status"; }

sleep 5
echo "mode=$mode outage=${outage}s every ${period}s for ${total}s: six units every 10 ms"
echo "start: RSS $(rss) MiB"
t=5; n=0
while [ $t -lt "$total" ]; do
    sleep $((period - outage - 5)); t=$((t + period - outage - 5))
    kill -9 "$broker"; wait "$broker" 2>/dev/null || true
    sleep "$outage"; t=$((t + outage)); n=$((n + 1))
    peak=$(rss)
    start_broker
    sleep 5; t=$((t + 5))
    echo "outage $n: RSS $peak MiB at its end, $(rss) MiB 5 s after the broker came back"
done
echo "end: RSS $(rss) MiB, peak $(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$gw/status") MiB"
if [ "$mode" = durable ]; then echo "log: $(du -sh "$work/log" | cut -f1)"; fi
