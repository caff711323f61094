"""A Sparkplug B host written with pysparkplug (not our code): it subscribes to a group,
decodes every NBIRTH, DBIRTH and DDATA the gateway publishes (aliases resolved from the
births, as pysparkplug does), and prints what it read as one JSON object.

    pysparkplug_host.py PORT GROUP DEVICES SAMPLES

Prints "ready" once connected; exits 0 after SAMPLES DDATA of each of DEVICES devices,
1 after 30 s without them, 2 when pysparkplug could not decode a message.
"""

import json
import sys
import threading

import pysparkplug as spb

port, group, devices, samples = (
    int(sys.argv[1]),
    sys.argv[2],
    int(sys.argv[3]),
    int(sys.argv[4]),
)
lock = threading.Lock()
done = threading.Event()
failed = []
out = {"nbirth": None, "devices": {}}


def value(metric):
    v = metric.value
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def on_message(_client, message):
    try:
        topic = message.topic
        kind = topic.message_type
        metrics = message.payload.metrics
        with lock:
            if kind == spb.MessageType.NBIRTH:
                out["nbirth"] = {
                    "seq": message.payload.seq,
                    "metrics": {m.name: m.datatype.name for m in metrics},
                }
            elif kind == spb.MessageType.DBIRTH:
                out["devices"][topic.device_id] = {
                    "types": {m.name: m.datatype.name for m in metrics},
                    "data": [],
                }
            elif kind == spb.MessageType.DDATA:
                dev = out["devices"][topic.device_id]
                dev["data"].append({m.name: value(m) for m in metrics})
            ready = out["nbirth"] is not None and len(out["devices"]) >= devices
            if ready and all(len(d["data"]) >= samples for d in out["devices"].values()):
                done.set()
    except Exception as e:  # pysparkplug could not read it: the test fails with why
        failed.append(f"{message.topic}: {e!r}")
        done.set()


client = spb.Client(client_id="interop-pysparkplug")
connected = threading.Event()
client.subscribe(
    spb.Topic(group_id=group, message_type=spb.MULTI_LEVEL_WILDCARD),
    spb.QoS.AT_MOST_ONCE,
    on_message,
)
client.connect("127.0.0.1", port=port, blocking=False, callback=lambda _c: connected.set())
if not connected.wait(30):
    print("cannot connect", file=sys.stderr)
    sys.exit(1)
print("ready", flush=True)
ok = done.wait(30)
with lock:
    print(json.dumps({"failed": failed, **out}), flush=True)
sys.exit(2 if failed else 0 if ok else 1)
