# Sourced by the bench scripts: release binaries built, a work directory removed at exit
# with every process started into `pids`, a free loopback port for mosquitto and its
# config in $work/mosquitto.conf, and `start_broker` (its pid in $broker).
cargo build --release --bins -q
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n' "$port" >"$work/mosquitto.conf"
start_broker() { /usr/sbin/mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 & broker=$!; pids+=($broker); }
