#!/usr/bin/env bash
# Benchmark of CAN ingest, recorded in BENCHMARKS.md (a benchmark, not a test): inside the
# qemu VM (scripts/vm/run.sh, TCG), `servosim canopen` runs NODES drives sending TPDO1-3
# every PERIOD (3 x NODES frames per PERIOD), and the release servogate takes them in,
# merges each node's cycle into one telemetry event and publishes it to a mosquitto in the
# guest at QoS 1. Reported from the guest:
#   - frames/s the gateway received (its CAN counters over the measured window),
#   - frames lost in its socket buffer (SO_RXQ_OVFL) and events dropped by the ring,
#   - events/s pushed and acknowledged, and servogate's CPU time per frame.
#
#   scripts/vm/bench-can.sh [NODES...]        default: 30 (9,000 TPDO frames/s at 10 ms)
#   GEN=cangen scripts/vm/bench-can.sh [NODES...]
#       the same frames from can-utils' cangen (one process per TPDO COB-ID, a frame every
#       GAP ms, default 1: 3 x NODES x 1000 frames/s) instead of servosim, with the mappings
#       given in the config and no heartbeat: what the gateway alone can take, without
#       servosim's share of the guest's CPU.
#
# Environment: PERIOD (default 10ms), DURATION seconds measured (default 10), WARMUP (3);
#   GW_BINS="PATH..." servogate builds to compare, each run in turn for every configuration
#       in the same VM (default target/release/servogate); REPEAT=N the whole set N times;
#   PROFILE=1 a perf profile of the window (perf copied into the guest); VM_SMP, VM_APPEND
#       and the rest of scripts/vm/run.sh's settings pass through.
# Each run ends with a `bench: RESULT` line: frames/s in the window, frames lost in the
# socket buffer (SO_RXQ_OVFL, whole run), ring drops, the gateway's cores and CPU time
# per frame (all threads, the CAN bus thread, the rest) and context switches per second.
# The 1 Mbit/s line rate of 8-byte frames is 9,009 frames/s (111 bits each, stuffing aside).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- 30
period=${PERIOD:-10ms}
gen=${GEN:-servosim}
# UNMAPPED=1 (cangen only): the configured drives are nodes 101.., so every frame is read
# and decoded but none becomes an event: the cost of ingest alone.
unmapped=${UNMAPPED:-0}
gap=${GAP:-1}
duration=${DURATION:-10}
warmup=${WARMUP:-3}
# PROFILE=1: a system-wide perf profile (cpu-clock samples) of the measured window, top
# symbols per process (it costs the guest CPU: not for the figures).
profile=${PROFILE:-0}

cargo build --release --locked -p servogate -p servosim -q
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for nodes in "$@"; do
    cfg="$work/bench-$nodes.toml"
    {
        printf '[gateway]\nid = "bench"\nlog = "warn,servogate_socketcan=info,servogate::app=info"\n'
        printf '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n[buffer]\ncapacity = 200000\n'
        printf '[[buses]]\nname = "can-a"\nprotocol = "canopen"\ninterface = "vcan0"\nsdo_timeout = "1s"\n'
        for n in $(seq 1 "$nodes"); do
            node=$n
            [ "$unmapped" = 1 ] && node=$((n + 100))
            printf '[[devices]]\nname = "drive-%s"\nbus = "can-a"\nnode = %s\nprofile = "cia402"\n' "$n" "$node"
            printf 'objects = [{ name = "position", scale = 0.001, unit = "mm" }, { name = "temperature", index = 0x2010, type = "i16", scale = 0.1 }]\n'
            if [ "$gen" = cangen ]; then
                printf 'heartbeat = "0s"\nconfigure_heartbeat = false\n'
                printf 'tpdos = [{ number = 1, map = [0x60410010, 0x60640020, 0x60770010] }, { number = 2, map = [0x606C0020, 0x60780010, 0x20100010] }, { number = 3, map = [0x20000020, 0x603F0010, 0x60610010] }]\n'
            else
                printf 'heartbeat = "1s"\n'
            fi
        done
    } >"$cfg"
done
cp target/release/servosim "$work/"
# GW_BINS: servogate binaries to compare (host paths, default the release build), run one
# after the other for every configuration and repetition (REPEAT, default 1), in the same
# VM, so that they share the host's load as evenly as the host allows.
mkdir -p "$work/gw"
k=0
for b in ${GW_BINS:-target/release/servogate}; do
    k=$((k + 1))
    cp "$b" "$work/gw/$k-$(basename "$(dirname "$b")")-$(basename "$b")"
done
repeat=${REPEAT:-1}
perf_file=""
[ "$profile" = 1 ] && perf_file="--file $(command -v perf)"

cmds='set -e
cd /tmp
printf "listener 1883 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n" > mq.conf
mosquitto -c mq.conf -d; sleep 0.5
echo "bench: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource)), $(nproc) CPUs"
ticks() { awk "{print \$14 + \$15}" /proc/$1/stat; }
for r in $(seq 1 '"$repeat"'); do
for cfg in /opt/bench/bench-*.toml; do
for gwbin in /opt/bench/gw/*; do
    bin=${gwbin##*/}
    nodes=$(grep -c "^\[\[devices\]\]" "$cfg")
    rm -f simin; mkfifo simin
    gens=""
    if [ '"$gen"' = cangen ]; then
        : >sim.out; exec 3>/dev/null; sim=""
        for n in $(seq 1 $nodes); do
            for base in 180 280 380; do
                id=$(printf "%X" $((0x$base + n)))
                cangen vcan0 -g '"$gap"' -I $id -L 8 -D i -p 10 &
                gens="$gens $!"
            done
        done
    else
        servosim canopen --interface vcan0 --nodes 1-$nodes --heartbeat 1s --period '"$period"' <simin >sim.out 2>sim.err &
        sim=$!
        exec 3>simin
        while ! grep -q ready sim.out; do sleep 0.1; done
    fi
    $gwbin run --config "$cfg" >gw.log 2>&1 &
    gw=$!
    sleep '"$warmup"'
    rx0=$(cat /sys/class/net/vcan0/statistics/rx_packets); c0=$(ticks $gw)
    for t in /proc/$gw/task/*; do echo "$(cat $t/comm) $(ticks $gw/task/${t##*/}) $(awk "/ctxt_switches/ { n += \$2 } END { print n }" $t/status)"; done >threads0
    if [ '"$profile"' = 1 ]; then
        perf record -q -e cpu-clock -F 499 -a -o perf.data -- sleep '"$duration"' 2>/dev/null
    else
        sleep '"$duration"'
    fi
    rx1=$(cat /sys/class/net/vcan0/statistics/rx_packets); c1=$(ticks $gw)
    for t in /proc/$gw/task/*; do echo "$(cat $t/comm) $(ticks $gw/task/${t##*/}) $(awk "/ctxt_switches/ { n += \$2 } END { print n }" $t/status)"; done >threads1
    kill -TERM $gw; wait $gw || true
    if [ -n "$sim" ]; then echo stats >&3; sleep 0.5; kill -TERM $sim; wait $sim || true; fi
    for g in $gens; do kill $g 2>/dev/null || true; done; wait 2>/dev/null || true
    exec 3>&-
    echo "bench: gen='"$gen"' unmapped='"$unmapped"' nodes=$nodes period='"$period"' gap='"$gap"'ms window='"$duration"'s vcan_frames=$((rx1 - rx0)) gw_cpu_ticks=$((c1 - c0)) clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)"
    echo "bench:   servogate threads (CPU ticks/context switches in the window): $(awk "NR==FNR { a[FNR] = \$2; c[FNR] = \$3; next } { printf \"%s=%d/%d \", \$1, \$2 - a[FNR], \$3 - c[FNR] }" threads0 threads1)"
    if [ '"$profile"' = 1 ]; then
        rep() { perf report -i perf.data --stdio "$@" 2>/dev/null | grep -v "^#" | grep -v "^$"; }
        rep --sort comm | head -8 | sed "s/^/bench:   perf /"
        for c in bus-can-a servogate; do
            rep --comm $c --sort dso | head -4 | sed "s/^/bench:   perf $c /"
            rep --comm $c --sort dso,sym | head -30 | sed "s/^/bench:   perf $c /"
        done
    fi
    grep -o "CAN bus stopped.*" gw.log | sed "s/^/bench:   /"
    grep -o "servogate stopped.*" gw.log | sed "s/^/bench:   /"
    grep "^ok stats" sim.out | sed "s/^/bench:   sim /"
    awk -v bin=$bin -v nodes=$nodes -v frames=$((rx1 - rx0)) -v dur='"$duration"' -v hz=$(getconf CLK_TCK 2>/dev/null || echo 100) \
        -v lost="$(grep -o "rx_lost=[0-9]*" gw.log | cut -d= -f2)" -v ring="$(grep -o " dropped=[0-9]*" gw.log | cut -d= -f2)" \
        "NR==FNR { a[FNR] = \$2; c[FNR] = \$3; next } { d = \$2 - a[FNR]; all += d; w = \$3 - c[FNR]; cs += w; if (\$1 ~ /^bus-/) { bus += d; bcs += w } }
         END { us = 1e6 / hz; printf \"bench: RESULT bin=%s nodes=%d frames_per_s=%d lost=%s ring_dropped=%s gw_cores=%.2f gw_us_per_frame=%.1f bus_us_per_frame=%.1f rest_us_per_frame=%.1f switches_per_s=%d bus_switches_per_s=%d\\n\", bin, nodes, frames / dur, lost, ring, all / hz / dur, all * us / frames, bus * us / frames, (all - bus) * us / frames, cs / dur, bcs / dur }" threads0 threads1
done
done
done'
VM_TIMEOUT=${VM_TIMEOUT:-900} scripts/vm/run.sh \
    --file "$work/servosim:/usr/local/bin/servosim" --file /usr/sbin/mosquitto \
    --file "$work:/opt/bench" --file /usr/bin/cangen $perf_file -- "$cmds" 2>&1 | grep -E '^bench:|vm-run' | sed 's/\x1b\[[0-9;]*m//g'
