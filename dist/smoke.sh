#!/usr/bin/env bash
# Smoke-test a binary built by dist/build.sh:
#
#     dist/smoke.sh TARGET [BINARY]
#
# Runs target/dist/TARGET/silt (or BINARY), under qemu-<arch>-static for a
# foreign TARGET, through:
#   1. silt --version
#   2. silt check -c FILE for every configs/*.toml, and -c configs/fleet
#   3. the README quickstart: `silt run` on a copy of configs/quickstart.toml
#      (data_dir, lake and ports moved into a temp dir), two events POSTed with
#      curl, the file sink's object must hold them, SIGTERM must exit 0
#   4. a WebAssembly plugin: silt plugin test plugins/target/wasm/json-clean.wasm
#      on tests/golden/json-clean (compiled cold, then again from the cache)
# Each step prints PASS or FAIL with its time; exit status 1 if any failed.
# Deadlines scale with SMOKE_SLOW (default 1; 4 under qemu). SMOKE_VERBOSE=1
# prints each step's output, not only a failed one's.
# Missing tools (qemu-user-static, curl, jq) are installed when root.
set -euo pipefail
# One { } group, read whole before it runs: editing this file meanwhile is safe.
{

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

case "${1:-}" in
-h | --help | "")
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ -n "${1:-}" ]] && exit 0 || exit 2
    ;;
esac
target="$1"
bin="${2:-$repo/target/dist/$target/silt}"
[[ "$bin" == /* ]] || bin="$PWD/$bin"

log() { echo "smoke.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

case "$target" in
x86_64-unknown-linux-gnu) qemu_arch=x86_64 gnu=x86_64-linux-gnu ;;
aarch64-unknown-linux-gnu) qemu_arch=aarch64 gnu=aarch64-linux-gnu ;;
armv7-unknown-linux-gnueabihf) qemu_arch=arm gnu=arm-linux-gnueabihf ;;
*) die "unsupported target '$target'" ;;
esac
[[ -x "$bin" ]] || die "$bin missing: run dist/build.sh $target first"

need_pkgs=()
command -v curl >/dev/null || need_pkgs+=(curl)
command -v jq >/dev/null || need_pkgs+=(jq)
runner=()
if [[ "$(uname -m)" != "$qemu_arch" ]]; then
    command -v "qemu-$qemu_arch-static" >/dev/null || need_pkgs+=(qemu-user-static)
    runner=("qemu-$qemu_arch-static" -L "/usr/$gnu")
    : "${SMOKE_SLOW:=4}"
fi
: "${SMOKE_SLOW:=1}"
if ((${#need_pkgs[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${need_pkgs[*]}; run as root or: sudo apt-get install -y ${need_pkgs[*]}"
    log "installing ${need_pkgs[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
if ((${#runner[@]})); then
    [[ -d "/usr/$gnu/lib" ]] ||
        die "/usr/$gnu missing (install the libc6-*-cross package; dist/build.sh does)"
fi

silt() { "${runner[@]}" "$bin" "$@"; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/silt-smoke.XXXXXX")"
silt_pid=""
cleanup() {
    [[ -z "$silt_pid" ]] || kill -KILL "$silt_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
# A private plugin compile cache: the plugin step measures a cold compile.
export XDG_CACHE_HOME="$tmp/cache"

failed=0
results=()
now() { date +%s.%N; }
# step NAME COMMAND...: runs COMMAND (a function), prints PASS/FAIL and the time.
step() {
    local name="$1" t0 t1 rc=0
    shift
    t0=$(now)
    "$@" >"$tmp/step.log" 2>&1 || rc=$?
    t1=$(now)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    if ((rc == 0)); then
        echo "PASS  ${secs}s  $name"
        [[ -z "${SMOKE_VERBOSE:-}" ]] || sed 's/^/      /' "$tmp/step.log"
    else
        echo "FAIL  ${secs}s  $name (exit $rc)"
        sed 's/^/      /' "$tmp/step.log" | tail -n 40
        failed=1
    fi
    results+=("$name")
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null && return
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        (: <"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}

# ---------------------------------------------------------------- steps

version() {
    local out
    out="$(silt --version)"
    echo "$out"
    [[ "$out" == silt* ]]
}

check_config() {
    # From the temp dir: a config with relative paths must not litter the checkout.
    (cd "$tmp" && silt check -c "$1")
}

quickstart() {
    local port api_port dir="$tmp/quickstart"
    mkdir -p "$dir"
    port=$(free_port)
    api_port=$(free_port)
    sed -e "s|^data_dir = .*|data_dir = \"$dir/data\"|" \
        -e "s|^listen = \"127.0.0.1:8080\"|listen = \"127.0.0.1:$port\"|" \
        -e "s|^path = \"./lake\"|path = \"$dir/lake\"|" \
        -e 's|max_age = "5s"|max_age = "2s"|' \
        configs/quickstart.toml >"$dir/silt.toml"
    printf '\n[api]\nlisten = "127.0.0.1:%s"\n' "$api_port" >>"$dir/silt.toml"
    grep -q "$dir/data" "$dir/silt.toml" && grep -q ":$port\"" "$dir/silt.toml" &&
        grep -q "$dir/lake" "$dir/silt.toml" || {
        echo "rewriting configs/quickstart.toml failed (did its layout change?):"
        cat "$dir/silt.toml"
        return 1
    }

    (cd "$dir" && exec "${runner[@]}" "$bin" run -c "$dir/silt.toml") >"$dir/silt.log" 2>&1 &
    silt_pid=$!
    echo "silt run pid $silt_pid, http 127.0.0.1:$port, api 127.0.0.1:$api_port"

    local deadline=$((SECONDS + 30 * SMOKE_SLOW)) answer=""
    until answer=$(curl -sS --max-time 10 -X POST -H 'content-type: application/json' \
        -d '[{"device":"t1","temp":21.5},{"device":"t2","temp":19.0}]' \
        "http://127.0.0.1:$port/v1/ingest/readings" 2>/dev/null); do
        kill -0 "$silt_pid" 2>/dev/null || {
            echo "silt exited before listening:"
            cat "$dir/silt.log"
            return 1
        }
        ((SECONDS < deadline)) || {
            echo "HTTP source not up within $((30 * SMOKE_SLOW)) s"
            cat "$dir/silt.log"
            return 1
        }
        sleep 0.2
    done
    echo "POST answered: $answer"
    [[ "$answer" == *'"accepted":2'* ]] || {
        echo "expected {\"accepted\":2}"
        cat "$dir/silt.log"
        return 1
    }

    deadline=$((SECONDS + 30 * SMOKE_SLOW))
    local files=()
    while :; do
        mapfile -t files < <(find "$dir/lake" -type f -name '*.ndjson' 2>/dev/null)
        ((${#files[@]})) && break
        ((SECONDS < deadline)) || {
            echo "no object under $dir/lake within $((30 * SMOKE_SLOW)) s"
            cat "$dir/silt.log"
            return 1
        }
        sleep 0.2
    done
    echo "object: ${files[*]#"$dir/"}"
    cat "${files[@]}"
    # One line per event, the event as `payload`.
    jq -e -s 'map(.payload) | sort_by(.device) == [{"device":"t1","temp":21.5},{"device":"t2","temp":19.0}]' \
        "${files[@]}" >/dev/null || {
        echo "the object does not hold exactly the two events"
        return 1
    }

    kill -TERM "$silt_pid"
    deadline=$((SECONDS + 60 * SMOKE_SLOW))
    while kill -0 "$silt_pid" 2>/dev/null; do
        ((SECONDS < deadline)) || {
            echo "silt still running $((60 * SMOKE_SLOW)) s after SIGTERM"
            cat "$dir/silt.log"
            return 1
        }
        sleep 0.2
    done
    local rc=0
    wait "$silt_pid" || rc=$?
    silt_pid=""
    echo "exit status after SIGTERM: $rc"
    tail -n 5 "$dir/silt.log"
    ((rc == 0)) || {
        cat "$dir/silt.log"
        return 1
    }
}

plugin() {
    local golden=tests/golden/json-clean wasm=plugins/target/wasm/json-clean.wasm
    [[ -f "$wasm" ]] || {
        echo "$wasm missing: run plugins/build.sh"
        return 1
    }
    silt plugin test "$wasm" --config "$(cat "$golden/config.json")" \
        --input "$golden/input.ndjson" >"$tmp/plugin.out" || return 1
    # Compared as JSON values line by line, like tests/plugin_golden.rs.
    diff <(jq -cS . "$golden/expected.ndjson") <(jq -cS . "$tmp/plugin.out") &&
        echo "$(wc -l <"$tmp/plugin.out") lines as expected"
}

# ---------------------------------------------------------------- run

echo "smoke: $bin (${runner[*]:-native})"
step "silt --version" version
for f in configs/*.toml; do
    step "silt check -c $f" check_config "$repo/$f"
done
step "silt check -c configs/fleet" check_config "$repo/configs/fleet"
step "quickstart HTTP -> file, SIGTERM exits 0" quickstart
step "plugin test json-clean.wasm (compile)" plugin
step "plugin test json-clean.wasm (cached)" plugin

if ((failed)); then
    echo "smoke: FAILED ($target)"
    exit 1
fi
echo "smoke: all ${#results[@]} steps passed ($target)"
exit
}
