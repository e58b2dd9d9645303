#!/usr/bin/env bash
# Throughput benchmark: MQTT QoS 1 -> silt (spool -> file sink) vs mosquitto alone.
#
#   bash bench/mqtt_to_file.sh            # N=50000 messages of 256 bytes
#   N=20000 SILT_BIN=target/debug/silt bash bench/mqtt_to_file.sh
#
# (a) mosquitto alone: mosquitto_pub -q 1 -l  ->  mosquitto_sub -q 1 > /dev/null;
#     events/s = N / (time until the subscriber has all N).
# (b) through silt: the same publish into `silt run` (MQTT source, QoS 1,
#     persistent session) -> spool -> file sink (no compression);
#     events/s = N / (time until all N lines are in the lake files);
#     peak RSS of silt = VmHWM from /proc/PID/status.
# N stays <= 50k: mosquitto_pub -l at QoS 1 loses messages past ~65,535
# outstanding (packet-id wrap), see shared INFRA-NOTES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
N=${N:-50000}
SIZE=${SIZE:-256}
P=${P:-4}   # parallel mosquitto_pub processes (same for (a) and (b))
if (( N > 50000 )); then echo "N must be <= 50000 (mosquitto_pub packet-id wrap)" >&2; exit 2; fi

MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
for t in "$MOSQ" mosquitto_pub mosquitto_sub; do
    command -v "$t" >/dev/null || { echo "missing $t (apt-get install mosquitto mosquitto-clients)" >&2; exit 2; }
done

if [[ -z "${SILT_BIN:-}" ]]; then
    echo "==> building release silt (cargo build --release -p silt-agent)"
    cargo build --release -p silt-agent --bin silt
    SILT_BIN=$ROOT/target/release/silt
fi
[[ -x "$SILT_BIN" ]] || { echo "no silt binary at $SILT_BIN" >&2; exit 2; }

WORK=$(mktemp -d /tmp/silt-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ "${KEEP:-0}" == 1 ]] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000)); }
now() { date +%s.%N; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# N JSON lines of ~SIZE bytes each.
echo "==> generating $N messages of ~$SIZE bytes"
awk -v n="$N" -v size="$SIZE" 'BEGIN {
    pad = ""; for (i = 0; i < size; i++) pad = pad "x";
    for (i = 0; i < n; i++) {
        line = sprintf("{\"id\":\"b-%d\",\"seq\":%d,\"temp\":21.5,\"site\":\"bench\",\"pad\":\"", i, i);
        print line substr(pad, 1, size - length(line) - 2) "\"}";
    }
}' > "$WORK/msgs.ndjson"
echo "    $(wc -l < "$WORK/msgs.ndjson") lines, $(wc -c < "$WORK/msgs.ndjson") bytes, $P publishers"
split -n "l/$P" -d "$WORK/msgs.ndjson" "$WORK/part."

# Publishes all parts in parallel to TOPIC and waits for every publisher.
publish_all() {
    local topic=$1 pids=() f
    for f in "$WORK"/part.*; do
        mosquitto_pub -p "$PORT" -q 1 -t "$topic" -i "pub-$(basename "$f")-$RANDOM" -l < "$f" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
}

PORT=$(free_port)
mkdir -p "$WORK/mosq"
cat > "$WORK/mosq/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 0
set_tcp_nodelay true
log_dest file $WORK/mosq/mosquitto.log
$( [[ $(id -u) -eq 0 ]] && echo "user root" )
CONF
"$MOSQ" -c "$WORK/mosq/mosquitto.conf" & PIDS+=($!)
wait_port "$PORT" || { echo "mosquitto did not start" >&2; exit 1; }

# ---------------------------------------------------------------- (a)
echo "==> (a) mosquitto alone: mosquitto_pub -q 1 -l -> mosquitto_sub -q 1"
mosquitto_sub -p "$PORT" -q 1 -t 'bench/a/#' -C "$N" -i bench-sub > /dev/null & SUB=$!
sleep 0.5   # let the subscription settle (not a condition wait: SUBACK is not observable here)
T0=$(now)
publish_all bench/a/data
T_PUB=$(now)
wait "$SUB"
T1=$(now)
A_SECS=$(echo "$T1 - $T0" | bc -l)
A_RATE=$(echo "$N / $A_SECS" | bc -l)
printf '    publish done in %.2fs, subscriber got all %d in %.2fs: %.0f events/s\n' \
    "$(echo "$T_PUB - $T0" | bc -l)" "$N" "$A_SECS" "$A_RATE"

# ---------------------------------------------------------------- (b)
echo "==> (b) through silt: MQTT QoS 1 -> spool -> file sink"
mkdir -p "$WORK/silt" "$WORK/lake"
cat > "$WORK/silt/silt.toml" <<CONF
[agent]
id = "bench"
data_dir = "$WORK/silt/data"

[sources.mqtt]
type = "mqtt"
url = "mqtt://127.0.0.1:$PORT"
topics = ["bench/b/#"]
qos = 1

[sinks.files]
type = "file"
inputs = ["mqtt"]
path = "$WORK/lake"
key = "{sink}/{agent}-{batch}.ndjson"
compression = "none"
batch = { max_records = 10000, max_bytes = "8MiB", max_age = "1s" }
CONF
SILT_LOG=${SILT_LOG:-info} NO_COLOR=1 "$SILT_BIN" run -c "$WORK/silt/silt.toml" > "$WORK/silt/silt.log" 2>&1 & SILT=$!
PIDS+=($SILT)
for _ in $(seq 600); do grep -q 'mqtt subscribed' "$WORK/silt/silt.log" && break; sleep 0.05; done
grep -q 'mqtt subscribed' "$WORK/silt/silt.log" || { echo "silt did not subscribe:"; tail -20 "$WORK/silt/silt.log"; exit 1; }
count_lines() { find "$WORK/lake" -type f ! -name '.*' ! -name '*.tmp' -print0 | xargs -0r cat | wc -l; }
T0=$(now)
publish_all bench/b/data
T_PUB=$(now)
DEADLINE=$(( $(date +%s) + ${BENCH_TIMEOUT:-300} ))
while :; do
    C=$(count_lines)
    (( C >= N )) && break
    if (( $(date +%s) > DEADLINE )); then echo "timeout: only $C of $N events in the lake" >&2; tail -20 "$WORK/silt/silt.log"; exit 1; fi
    kill -0 "$SILT" 2>/dev/null || { echo "silt died:"; tail -20 "$WORK/silt/silt.log"; exit 1; }
    sleep 0.1
done
T1=$(now)
HWM_KB=$(awk '/VmHWM/{print $2}' "/proc/$SILT/status")
kill -TERM "$SILT"; wait "$SILT" || true
B_SECS=$(echo "$T1 - $T0" | bc -l)
B_RATE=$(echo "$N / $B_SECS" | bc -l)
printf '    publish done in %.2fs, all %d in the lake after %.2fs: %.0f events/s (incl. up to 1s max_age)\n' \
    "$(echo "$T_PUB - $T0" | bc -l)" "$N" "$B_SECS" "$B_RATE"
printf '    silt peak RSS (VmHWM): %.1f MiB\n' "$(echo "$HWM_KB / 1024" | bc -l)"

echo
echo "==> result (N=$N, ${SIZE}-byte JSON, QoS 1, $P publishers)"
printf '    mosquitto alone : %8.0f events/s\n' "$A_RATE"
printf '    through silt    : %8.0f events/s\n' "$B_RATE"
printf '    ratio silt/mosq : %8.2f\n' "$(echo "$B_RATE / $A_RATE" | bc -l)"
printf '    silt peak RSS   : %8.1f MiB\n' "$(echo "$HWM_KB / 1024" | bc -l)"
