#!/usr/bin/env python3
"""Reply-to-broker latency from a `perf trace -e read,writev` of the gateway (issue 13).

    HOOK='(perf trace -e read,writev -p $gw -o /tmp/trace.txt -- sleep 5 >/dev/null 2>&1 &)' \
        POLL=50ms DURATION=6 scripts/bench.sh line 6
    hil/bench/reply-to-publish.py /tmp/trace.txt [REPLY_BYTES]

Pairs each read on the bus thread that returned a whole reply (REPLY_BYTES, default 25:
ten registers) with the next writev of the main thread (the PUBLISH reaching the
broker's socket) and prints p50 / p99 / max of the time between the end of the one and
the end of the other. perf trace slows every traced call (50-60 us each here), so the
figures are an upper bound. At rates where several replies come before one PUBLISH
(flat out) the pairing means nothing: use it at real line rates.
"""
import re
import sys

reply_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else 25
line_re = re.compile(r"\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/\d+ (\w+)\(.*\)\s+= (-?\d+)")
latencies, replied = [], None
for line in open(sys.argv[1]):
    m = line_re.match(line)
    if not m:
        continue
    start, took, comm, call, ret = float(m[1]), float(m[2]), m[3], m[4], int(m[5])
    if call == "read" and comm.startswith("bus-") and ret == reply_bytes:
        replied = start + took
    elif call == "writev" and replied is not None:
        latencies.append(start + took - replied)
        replied = None
if not latencies:
    sys.exit("no reply followed by a PUBLISH in the trace")
latencies.sort()


def q(p):
    return latencies[min(len(latencies) - 1, int(p * len(latencies)))]


print(f"{len(latencies)} samples: reply read -> PUBLISH written "
      f"p50 {q(0.5):.3f} ms, p99 {q(0.99):.3f} ms, max {latencies[-1]:.3f} ms")
