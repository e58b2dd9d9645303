#!/usr/bin/env bash
# Footprint benchmark: what silt costs per event, on disk and in memory.
# Run by hand (not a test); see bench/footprint/README.md.
#
#   bash bench/footprint/run.sh                               # full run, defaults below
#   HTTP_N=40000 MQTT_N=4000 DRAIN_MIB=64 bash bench/footprint/run.sh   # quick
#   SCENARIOS=mqtt RUNS=3 SILT_BIN=target/release/silt bash bench/footprint/run.sh
#
# Every measurement starts a fresh `silt run` (release build) with an empty
# data_dir, s3s-fs and mosquitto on free 127.0.0.1 ports, and reads, for the
# silt PID over the measured window:
#   events/s     events accepted (HTTP 202 / silt_events_in_total) / seconds
#   CPU us/ev    (utime+stime delta from /proc/PID/stat) / events
#   disk W/B     (write_bytes delta from /proc/PID/io) / payload bytes
#   spool/B      du of data_dir/spool with the S3 sink down / payload bytes held
#   RSS MiB      VmHWM from /proc/PID/status (reset via clear_refs for the drain)
# Scenarios (SCENARIOS, comma-separated):
#   http   HTTP_N events of SIZE bytes, HTTP_BATCH per POST, HTTP_CLIENTS clients,
#          S3 up and S3 down
#   mqtt   MQTT_N QoS 1 messages per measurement, for each broker window in
#          MQTT_WINDOWS: the baseline (the broker delivering the same load to a
#          QoS 1 subscriber), then silt with S3 up and S3 down; "x mosq" is
#          silt's intake rate over the baseline's
#   wasm   the http load with S3 up through the identity WebAssembly plugin
#          (WASM_PLUGIN): the cost of the plugin boundary
#   drain  a DRAIN_MIB MiB backlog over HTTP with S3 down, then S3 starts and
#          the spool drains; rate and peak RSS while draining
# The table (medians over RUNS) goes to stdout, all figures as JSON to OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD

# ------------------------------------------------------------- parameters
SCENARIOS_SET=${SCENARIOS:+1}
SCENARIOS=${SCENARIOS:-http,wasm,mqtt,drain}
RUNS=${RUNS:-1}
SIZE=${SIZE:-256}                      # bytes per event (JSON, exact)
if [[ -n "${N:-}" ]]; then             # shorthand: N for HTTP, N/10 for MQTT
    HTTP_N=${HTTP_N:-$N}; MQTT_N=${MQTT_N:-$(( N / 10 ))}
fi
HTTP_N=${HTTP_N:-400000}
HTTP_BATCH=${HTTP_BATCH:-500}          # events per POST
HTTP_CLIENTS=${HTTP_CLIENTS:-${CLIENTS:-4}}
HTTP_FORMAT=${HTTP_FORMAT:-ndjson}     # ndjson | json (array)
MQTT_N=${MQTT_N:-40000}
MQTT_WINDOWS=${MQTT_WINDOWS:-"20 1000"} # mosquitto max_inflight_messages (20 = its default)
MQTT_PUBLISHERS=${MQTT_PUBLISHERS:-1}  # rumqttc publishers, each waits for every PUBACK
MQTT_PUB_INFLIGHT=${MQTT_PUB_INFLIGHT:-1000}
MQTT_BASELINE=${MQTT_BASELINE:-rumqttc} # rumqttc | mosquitto_sub
DRAIN_MIB=${DRAIN_MIB:-1024}           # backlog size for the drain
DRAIN_N=${DRAIN_N:-$(( DRAIN_MIB * 1048576 / SIZE ))}
BATCH_MAX_AGE=${BATCH_MAX_AGE:-1s}     # sink batch = 10000 records / 8MiB / this
GZIP_LEVEL=${GZIP_LEVEL:-6}            # the sink's compression_level (silt's default is 6)
SPOOL_MAX_BYTES=${SPOOL_MAX_BYTES:-64GiB} # well above the drain backlog
SETTLE=${SETTLE:-2}                    # seconds after the load (S3 down) before reading
BENCH_TIMEOUT=${BENCH_TIMEOUT:-3600}   # per wait
BENCH_TMPDIR=${BENCH_TMPDIR:-/tmp}     # data_dir lives here: put it on the disk you care about
OUT=${OUT:-$ROOT/target/footprint/footprint-$(date -u +%Y%m%dT%H%M%SZ).json}
KEEP=${KEEP:-0}                        # 1: keep the work dir
WASM_PLUGIN=${WASM_PLUGIN:-$ROOT/plugins/target/wasm/identity.wasm}

S3_KEY=footprint-key
S3_SECRET=footprint-secret
BUCKET=footprint

has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
for s in ${SCENARIOS//,/ }; do
    case $s in http|wasm|mqtt|drain) ;; *) echo "unknown scenario '$s' (http, wasm, mqtt, drain)" >&2; exit 2 ;; esac
done

# ------------------------------------------------------------------ tools
SILT_TOOLS=${SILT_TOOLS:-$HOME/.cache/silt/tools}
find_tool() { # ENV_OVERRIDE NAME CANDIDATE...
    local v=${!1:-} c
    if [[ -n "$v" ]]; then echo "$v"; return; fi
    for c in "${@:3}"; do [[ -x "$c" ]] && { echo "$c"; return; }; done
    command -v "$2" || true
}
S3S_FS=$(find_tool SILT_S3S_FS s3s-fs "$SILT_TOOLS/bin/s3s-fs")
[[ -x "$S3S_FS" ]] || { echo "s3s-fs not found: set SILT_S3S_FS or run .ci/run (installs $SILT_TOOLS/bin/s3s-fs)" >&2; exit 2; }
if has wasm && [[ ! -f $WASM_PLUGIN && -z $SCENARIOS_SET ]]; then
    echo "==> skipping the wasm scenario: no plugin at $WASM_PLUGIN (bash plugins/build.sh builds it)"
    SCENARIOS=${SCENARIOS/,wasm/}
elif has wasm && [[ ! -f $WASM_PLUGIN ]]; then
    echo "no plugin at $WASM_PLUGIN: build it with bash plugins/build.sh (or set WASM_PLUGIN)" >&2; exit 2
fi
if has mqtt; then
    MOSQ=$(find_tool SILT_MOSQUITTO mosquitto /usr/sbin/mosquitto)
    [[ -x "$MOSQ" ]] || { echo "mosquitto not found (apt-get install mosquitto)" >&2; exit 2; }
    if [[ $MQTT_BASELINE == mosquitto_sub ]]; then
        command -v mosquitto_sub >/dev/null || { echo "mosquitto_sub not found (apt-get install mosquitto-clients)" >&2; exit 2; }
    fi
fi

SILT_BUILT=0
if [[ -z "${SILT_BIN:-}" ]]; then
    echo "==> building release silt (cargo build --release -p silt-agent --bin silt)"
    cargo build --release -p silt-agent --bin silt
    SILT_BIN=$ROOT/target/release/silt
    SILT_BUILT=1
fi
[[ -x "$SILT_BIN" ]] || { echo "no silt binary at $SILT_BIN" >&2; exit 2; }
if [[ -z "${LOADGEN_BIN:-}" ]]; then
    echo "==> building the load generator (bench/footprint/loadgen)"
    cargo build --release --quiet --manifest-path bench/footprint/loadgen/Cargo.toml \
        --target-dir "$ROOT/target/footprint-loadgen"
    LOADGEN_BIN=$ROOT/target/footprint-loadgen/release/silt-footprint-loadgen
fi
LG=$LOADGEN_BIN
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------- processes, cleanup
WORK=$(mktemp -d "$BENCH_TMPDIR/silt-footprint.XXXXXX")
ROWS=$WORK/rows.ndjson
: > "$ROWS"
PIDS=()

forget() { local p=$1 q keep=(); for q in "${PIDS[@]}"; do [[ $q == "$p" ]] || keep+=("$q"); done; PIDS=("${keep[@]}"); }

# SIGTERM, up to $2 seconds (default 10), then SIGKILL; by PID only.
stop_pid() {
    local p=$1 grace=${2:-10} i
    [[ -n "$p" ]] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        for ((i = 0; i < grace * 20; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
    forget "$p"
}

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do stop_pid "$p" 5; done
    if [[ $KEEP == 1 || $rc -ne 0 && ${KEEP_ON_FAILURE:-0} == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    [[ $rc -eq 0 ]] || echo "==> footprint benchmark FAILED (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs the load generator in the background (so traps fire at once), its
# stdout (one JSON object) into $1.
lg() {
    local out=$1 p rc=0; shift
    "$LG" "$@" > "$out" & p=$!
    PIDS+=("$p")
    wait "$p" || rc=$?
    forget "$p"
    return "$rc"
}
jget() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" "$1"; } # FILE KEY: a number from loadgen's one-line JSON
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
fmt() { awk "BEGIN { printf \"%.${2:-0}f\", $1 }"; } # EXPR [DECIMALS]
now() { date +%s.%N; }
free_port() { "$LG" free-port; }
wait_port() { # PORT PID
    local i
    for ((i = 0; i < 400; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
tail_log() { echo "----- $1 (last 20 lines)" >&2; tail -n 20 "$1" >&2 || true; }

cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
write_bytes() { awk '/^write_bytes:/ { print $2 }' "/proc/$1/io"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
reset_hwm() { echo 5 > "/proc/$1/clear_refs" 2>/dev/null || echo "    (cannot reset VmHWM of $1: peak RSS is since start)" >&2; }
du_alloc() { du -s -B1 "$1" | cut -f1; }
du_apparent() { du -s -b "$1" | cut -f1; }

# ---------------------------------------------------------------- servers
S3_PID=""
start_s3() { # PORT DIR
    mkdir -p "$2/s3root/$BUCKET"
    RUST_LOG=warn "$S3S_FS" --host 127.0.0.1 --port "$1" --access-key "$S3_KEY" --secret-key "$S3_SECRET" \
        "$2/s3root" >> "$2/s3s-fs.log" 2>&1 & S3_PID=$!
    PIDS+=("$S3_PID")
    wait_port "$1" "$S3_PID" || { tail_log "$2/s3s-fs.log"; echo "s3s-fs did not start" >&2; exit 1; }
}

MQ_PID=""
MQ_PORT=""
start_mosquitto() { # WINDOW DIR
    MQ_PORT=$(free_port)
    mkdir -p "$2"
    # Only the inflight window varies; queues are unbounded (the default
    # max_queued_messages 1000 would drop QoS 1 messages for a slow
    # subscriber), no persistence (we measure silt, not the broker's disk).
    cat > "$2/mosquitto.conf" <<CONF
listener $MQ_PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages $1
max_queued_messages 0
max_queued_bytes 0
set_tcp_nodelay true
log_dest file $2/mosquitto.log
$( [[ $(id -u) -eq 0 ]] && echo "user root" )
CONF
    "$MOSQ" -c "$2/mosquitto.conf" > /dev/null 2>&1 & MQ_PID=$!
    PIDS+=("$MQ_PID")
    wait_port "$MQ_PORT" "$MQ_PID" || { tail_log "$2/mosquitto.log"; echo "mosquitto did not start" >&2; exit 1; }
}

SILT_PID=""
API=""
HTTP_PORT=""
start_silt() { # DIR SOURCE(http|mqtt) S3_PORT [PLUGIN]
    local d=$1 src=$2 s3port=$3 plugin=${4:-} sink_input=in api_port
    api_port=$(free_port)
    HTTP_PORT=$(free_port)
    mkdir -p "$d"
    {
        cat <<CONF
[agent]
id = "footprint"
data_dir = "$d/data"
shutdown_timeout = "2s"

[spool]
max_bytes = "$SPOOL_MAX_BYTES"
when_full = "block"

[api]
listen = "127.0.0.1:$api_port"

CONF
        if [[ $src == http ]]; then
            cat <<CONF
[sources.in]
type = "http"
listen = "127.0.0.1:$HTTP_PORT"
max_body = "64MiB"
CONF
        else
            cat <<CONF
[sources.in]
type = "mqtt"
url = "mqtt://127.0.0.1:$MQ_PORT"
topics = ["footprint/#"]
qos = 1
CONF
        fi
        if [[ -n $plugin ]]; then
            sink_input=plugin
            cat <<CONF

[transforms.plugin]
plugin = "$plugin"
inputs = ["in"]
CONF
        fi
        cat <<CONF

[sinks.lake]
type = "s3"
inputs = ["$sink_input"]
bucket = "$BUCKET"
endpoint = "http://127.0.0.1:$s3port"
region = "us-east-1"
access_key_id = "$S3_KEY"
secret_access_key = "$S3_SECRET"
key = "{sink}/year={yyyy}/month={MM}/day={dd}/hour={HH}/{agent}-{batch}.ndjson.gz"
compression = "gzip"
compression_level = $GZIP_LEVEL
batch = { max_records = 10000, max_bytes = "8MiB", max_age = "$BATCH_MAX_AGE" }
retry_max = "1s"
CONF
    } > "$d/silt.toml"
    SILT_LOG=${SILT_LOG:-info} NO_COLOR=1 "$SILT_BIN" run -c "$d/silt.toml" > "$d/silt.log" 2>&1 & SILT_PID=$!
    PIDS+=("$SILT_PID")
    API=http://127.0.0.1:$api_port/metrics
    wait_port "$api_port" "$SILT_PID" || { tail_log "$d/silt.log"; echo "silt did not start" >&2; exit 1; }
    if [[ $src == http ]]; then
        wait_port "$HTTP_PORT" "$SILT_PID" || { tail_log "$d/silt.log"; echo "silt's HTTP source did not start" >&2; exit 1; }
    else
        local i
        for ((i = 0; i < 400; i++)); do
            grep -q 'mqtt subscribed' "$d/silt.log" && break
            kill -0 "$SILT_PID" 2>/dev/null || break
            sleep 0.05
        done
        grep -q 'mqtt subscribed' "$d/silt.log" || { tail_log "$d/silt.log"; echo "silt did not subscribe" >&2; exit 1; }
    fi
}
metric() { "$LG" metric --url "$API" --metric "$1"; }

# ------------------------------------------------------------- measuring
# Snapshot of the silt process: sets C0/W0 (start) or C1/W1/H1 (end).
snap0() { C0=$(cpu_ticks "$SILT_PID"); W0=$(write_bytes "$SILT_PID"); }
snap1() {
    kill -0 "$SILT_PID" 2>/dev/null || { echo "silt died" >&2; exit 1; }
    C1=$(cpu_ticks "$SILT_PID"); W1=$(write_bytes "$SILT_PID"); H1=$(hwm_kib "$SILT_PID")
}
# row SCENARIO RUN key=value... -> one JSON object in $ROWS (values numeric
# unless quoted by the caller).
row() {
    local s=$1 r=$2 kv out; shift 2
    out="{\"scenario\":\"$s\",\"run\":$r"
    for kv in "$@"; do out+=",\"${kv%%=*}\":${kv#*=}"; done
    echo "$out}" >> "$ROWS"
}
common_fields() { # the process figures of the window snap0..snap1
    echo "cpu_ticks=$(( C1 - C0 ))" "clk_tck=$CLK_TCK" "write_bytes=$(( W1 - W0 ))" "hwm_kib=$H1"
}
say() { printf '    %-22s %s\n' "$1" "$2"; }

# One HTTP measurement: S3 "up" or "down", through PLUGIN if given.
http_once() { # RUN MODE [PLUGIN]
    local run=$1 mode=$2 plugin=${3:-} name=http d s3port ev pb secs e2e out_n held
    [[ -n $plugin ]] && name=http+wasm
    d=$WORK/$name-$mode-$run
    mkdir -p "$d"
    s3port=$(free_port)
    [[ $mode == up ]] && start_s3 "$s3port" "$d"
    start_silt "$d" http "$s3port" "$plugin"
    snap0
    local t0; t0=$(now)
    lg "$d/load.json" http --url "http://127.0.0.1:$HTTP_PORT/v1/ingest/bench" --n "$HTTP_N" --size "$SIZE" \
        --batch "$HTTP_BATCH" --clients "$HTTP_CLIENTS" --format "$HTTP_FORMAT"
    ev=$(jget "$d/load.json" events); pb=$(jget "$d/load.json" payload_bytes); secs=$(jget "$d/load.json" secs)
    if [[ $mode == up ]]; then
        lg "$d/wait.json" wait --url "$API" --metric silt_events_out_total --ge "$ev" --timeout "$BENCH_TIMEOUT"
        e2e=$(calc "$(jget "$d/wait.json" t_end) - $t0")
        snap1
        row "$name s3-up" "$run" "events=$ev" "payload_bytes=$pb" "secs=$secs" "e2e_secs=$e2e" $(common_fields)
        say "$name s3-up" "$(fmt "$ev / $secs") events/s accepted; all in S3 after $(fmt "$e2e" 2)s"
    else
        sleep "$SETTLE"
        snap1
        out_n=$(metric silt_events_out_total)
        held=$(calc "$pb * ($ev - $out_n) / $ev")
        row "http s3-down" "$run" "events=$ev" "payload_bytes=$pb" "secs=$secs" $(common_fields) \
            "held_bytes=$held" "spool_du_bytes=$(du_alloc "$d/data/spool")" \
            "spool_apparent_bytes=$(du_apparent "$d/data/spool")" "spool_metric_bytes=$(metric silt_spool_bytes)"
        say "http s3-down" "$(fmt "$ev / $secs") events/s accepted; spool $(fmt "$(du_alloc "$d/data/spool") / 1048576" 1) MiB on disk for $(fmt "$held / 1048576" 1) MiB held"
    fi
    stop_pid "$SILT_PID"; SILT_PID=""
    [[ -n "$S3_PID" ]] && { stop_pid "$S3_PID"; S3_PID=""; }
    [[ $KEEP == 1 ]] || rm -rf "$d"
}

# The broker alone: the same publish to a QoS 1 subscriber.
mqtt_baseline() { # RUN WINDOW
    local run=$1 w=$2 d secs
    d=$WORK/mqtt-w$w-base-$run
    start_mosquitto "$w" "$d"
    local sub
    if [[ $MQTT_BASELINE == mosquitto_sub ]]; then
        mosquitto_sub -p "$MQ_PORT" -q 1 -t 'footprint/#' -C "$MQTT_N" -i "footprint-sub-$$" > /dev/null & sub=$!
        PIDS+=("$sub")
        sleep 0.5   # SUBACK is not observable from here
    else
        "$LG" sub --port "$MQ_PORT" --filter 'footprint/#' --n "$MQTT_N" --ready-file "$d/sub.ready" \
            --timeout "$BENCH_TIMEOUT" > "$d/sub.json" & sub=$!
        PIDS+=("$sub")
        local i
        for ((i = 0; i < 200; i++)); do [[ -e "$d/sub.ready" ]] && break; kill -0 "$sub" 2>/dev/null || break; sleep 0.05; done
        [[ -e "$d/sub.ready" ]] || { echo "baseline subscriber did not subscribe" >&2; exit 1; }
    fi
    lg "$d/load.json" mqtt --port "$MQ_PORT" --n "$MQTT_N" --size "$SIZE" --topic footprint/data \
        --inflight "$MQTT_PUB_INFLIGHT" --publishers "$MQTT_PUBLISHERS"
    wait "$sub" || { echo "baseline subscriber failed" >&2; exit 1; }
    forget "$sub"
    if [[ $MQTT_BASELINE == mosquitto_sub ]]; then
        secs=$(calc "$(now) - $(jget "$d/load.json" t_start)")
    else
        secs=$(calc "$(jget "$d/sub.json" t_end) - $(jget "$d/load.json" t_start)")
    fi
    row "mqtt w$w baseline" "$run" "events=$MQTT_N" "payload_bytes=$(jget "$d/load.json" payload_bytes)" "secs=$secs"
    say "mqtt w$w baseline" "$(fmt "$MQTT_N / $secs") msg/s delivered by mosquitto ($MQTT_BASELINE subscriber)"
    stop_pid "$MQ_PID"; MQ_PID=""
    [[ $KEEP == 1 ]] || rm -rf "$d"
}

mqtt_once() { # RUN WINDOW MODE
    local run=$1 w=$2 mode=$3 d s3port pb secs t0 e2e out_n held
    d=$WORK/mqtt-w$w-$mode-$run
    start_mosquitto "$w" "$d/mosquitto"
    s3port=$(free_port)
    [[ $mode == up ]] && start_s3 "$s3port" "$d"
    start_silt "$d" mqtt "$s3port"
    snap0
    t0=$(now)
    lg "$d/load.json" mqtt --port "$MQ_PORT" --n "$MQTT_N" --size "$SIZE" --topic footprint/data \
        --inflight "$MQTT_PUB_INFLIGHT" --publishers "$MQTT_PUBLISHERS" \
        --metrics "$API" --metric silt_events_in_total --timeout "$BENCH_TIMEOUT"
    pb=$(jget "$d/load.json" payload_bytes); secs=$(jget "$d/load.json" secs)
    local name="mqtt w$w s3-$mode"
    if [[ $mode == up ]]; then
        lg "$d/wait.json" wait --url "$API" --metric silt_events_out_total --ge "$MQTT_N" --timeout "$BENCH_TIMEOUT"
        e2e=$(calc "$(jget "$d/wait.json" t_end) - $t0")
        snap1
        row "$name" "$run" "events=$MQTT_N" "payload_bytes=$pb" "secs=$secs" "e2e_secs=$e2e" \
            "baseline=\"mqtt w$w baseline\"" $(common_fields)
        say "$name" "$(fmt "$MQTT_N / $secs") msg/s into the spool; all in S3 after $(fmt "$e2e" 2)s"
    else
        sleep "$SETTLE"
        snap1
        out_n=$(metric silt_events_out_total)
        held=$(calc "$pb * ($MQTT_N - $out_n) / $MQTT_N")
        row "$name" "$run" "events=$MQTT_N" "payload_bytes=$pb" "secs=$secs" "baseline=\"mqtt w$w baseline\"" \
            $(common_fields) "held_bytes=$held" "spool_du_bytes=$(du_alloc "$d/data/spool")" \
            "spool_apparent_bytes=$(du_apparent "$d/data/spool")" "spool_metric_bytes=$(metric silt_spool_bytes)"
        say "$name" "$(fmt "$MQTT_N / $secs") msg/s into the spool; spool $(fmt "$(du_alloc "$d/data/spool") / 1048576" 1) MiB on disk"
    fi
    stop_pid "$SILT_PID"; SILT_PID=""
    [[ -n "$S3_PID" ]] && { stop_pid "$S3_PID"; S3_PID=""; }
    stop_pid "$MQ_PID"; MQ_PID=""
    [[ $KEEP == 1 ]] || rm -rf "$d"
}

drain_once() { # RUN
    local run=$1 d s3port ev pb secs t0 t1 held du_after
    d=$WORK/drain-$run
    mkdir -p "$d"
    s3port=$(free_port)
    start_silt "$d" http "$s3port"
    # 1. backlog with S3 down
    snap0
    lg "$d/load.json" http --url "http://127.0.0.1:$HTTP_PORT/v1/ingest/bench" --n "$DRAIN_N" --size "$SIZE" \
        --batch "$HTTP_BATCH" --clients "$HTTP_CLIENTS" --format "$HTTP_FORMAT"
    ev=$(jget "$d/load.json" events); pb=$(jget "$d/load.json" payload_bytes); secs=$(jget "$d/load.json" secs)
    sleep "$SETTLE"
    snap1
    held=$(calc "$pb * ($ev - $(metric silt_events_out_total)) / $ev")
    row "drain backlog" "$run" "events=$ev" "payload_bytes=$pb" "secs=$secs" $(common_fields) \
        "held_bytes=$held" "spool_du_bytes=$(du_alloc "$d/data/spool")" \
        "spool_apparent_bytes=$(du_apparent "$d/data/spool")" "spool_metric_bytes=$(metric silt_spool_bytes)"
    say "drain backlog" "$(fmt "$pb / 1048576") MiB held at $(fmt "$ev / $secs") events/s; spool $(fmt "$(du_alloc "$d/data/spool") / 1048576" 1) MiB on disk"
    # 2. S3 comes up: drain until every event is confirmed and the spool is empty
    reset_hwm "$SILT_PID"
    snap0
    t0=$(now)
    start_s3 "$s3port" "$d"
    lg "$d/wait.json" wait --url "$API" --metric silt_events_out_total --ge "$ev" --timeout "$BENCH_TIMEOUT" --interval-ms 50
    if lg "$d/wait2.json" wait --url "$API" --metric silt_spool_bytes --le 0 --timeout 60 --interval-ms 50; then
        t1=$(jget "$d/wait2.json" t_end)
    else
        echo "    (silt_spool_bytes still $(metric silt_spool_bytes) 60s after the last event went out; timing to that)" >&2
        t1=$(jget "$d/wait.json" t_end)
    fi
    snap1
    du_after=$(du_alloc "$d/data/spool")
    secs=$(calc "$t1 - $t0")
    row "drain" "$run" "events=$ev" "payload_bytes=$pb" "secs=$secs" $(common_fields) \
        "objects=$(metric silt_objects_committed_total)" "uploaded_bytes=$(metric silt_uploaded_bytes_total)" \
        "spool_du_after_bytes=$du_after"
    say "drain" "$(fmt "$ev / $secs") events/s, $(fmt "$pb / 1048576 / $secs" 1) MiB/s in $(fmt "$secs" 1)s; spool $(fmt "$du_after / 1048576" 1) MiB on disk after"
    stop_pid "$SILT_PID"; SILT_PID=""
    stop_pid "$S3_PID"; S3_PID=""
    [[ $KEEP == 1 ]] || rm -rf "$d"
}

# ------------------------------------------------------------------ main
T_START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "==> footprint: scenarios=$SCENARIOS runs=$RUNS size=$SIZE http_n=$HTTP_N x$HTTP_BATCH/POST" \
     "clients=$HTTP_CLIENTS mqtt_n=$MQTT_N windows=[$MQTT_WINDOWS] drain=${DRAIN_N} events"
echo "    silt $("$SILT_BIN" --version 2>/dev/null | head -1), work dir $WORK ($(stat -f -c %T "$WORK")), load $LOAD_BEFORE"
for ((run = 1; run <= RUNS; run++)); do
    echo "==> run $run/$RUNS"
    if has http; then
        http_once "$run" up
        http_once "$run" down
    fi
    if has wasm; then
        http_once "$run" up "$WASM_PLUGIN"
    fi
    if has mqtt; then
        for w in $MQTT_WINDOWS; do
            mqtt_baseline "$run" "$w"
            mqtt_once "$run" "$w" up
            mqtt_once "$run" "$w" down
        done
    fi
    if has drain; then
        drain_once "$run"
    fi
done

mkdir -p "$(dirname "$OUT")"
echo
echo "==> result (medians over $RUNS run(s); $(nproc) cores, load before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg))"
"$LG" report --in "$ROWS" --json "$OUT" \
    --set "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --set "checkout=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- agent 2>/dev/null || echo -dirty)" \
    --set "silt_bin=$SILT_BIN$([[ $SILT_BUILT == 1 ]] && echo ' (built from the checkout)')" \
    --set "silt=$("$SILT_BIN" --version 2>/dev/null | head -1)" \
    --set "host=$(uname -srm), $(nproc) cores, $(free -m | awk '/Mem:/{print $2}') MiB" \
    --set "fs=$(stat -f -c %T "$WORK")" \
    --set "loadavg_before=$LOAD_BEFORE" --set "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)" \
    --set "size=$SIZE" --set "http_n=$HTTP_N" --set "http_batch=$HTTP_BATCH" --set "http_clients=$HTTP_CLIENTS" \
    --set "http_format=$HTTP_FORMAT" --set "mqtt_n=$MQTT_N" --set "mqtt_windows=$MQTT_WINDOWS" \
    --set "mqtt_publishers=$MQTT_PUBLISHERS" --set "mqtt_pub_inflight=$MQTT_PUB_INFLIGHT" \
    --set "mqtt_baseline=$MQTT_BASELINE" --set "drain_n=$DRAIN_N" --set "batch_max_age=$BATCH_MAX_AGE" \
    --set "gzip_level=$GZIP_LEVEL" \
    --set "runs=$RUNS" --set "wall_secs=$(( $(date +%s) - T_START ))"
echo "    (x mosq = silt's intake rate / the broker's own delivery rate; disk W/B = bytes written"
echo "     by silt per payload byte; spool/B = spool on disk per payload byte held, S3 down)"
echo "==> JSON: $OUT   (wall time $(( $(date +%s) - T_START ))s)"
