#!/usr/bin/env bash
# Installs, checks, upgrades, removes and purges a silt .deb on this machine.
# See usage() below.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: dist/deb-test.sh DEB

As root on a Debian machine without silt installed, runs the package's life
cycle and checks each step, printing PASS/FAIL (SKIP where a step cannot run
here); exits 1 if any step failed, 2 if it could not start.

  1. the .deb's control fields and file modes (dpkg-deb)
  2. dpkg -i: files, modes, owners, the silt user and group, /var/lib/silt,
     the env file's statoverride, conffiles, the service NOT enabled;
     systemd-analyze verify of the unit when installed
  3. silt --version; silt check -c /etc/silt as root and as silt; the
     commented-out examples, uncommented, pass silt check too
  4. silt run as user silt on the packaged config (ports moved to free ones):
     an event posted over HTTP ends up in /var/lib/silt/lake
  5. reinstall of the same .deb: an edit to /etc/silt/device.toml is kept,
     without a prompt
  6. upgrade to a copy of the .deb with version +debtest1 and changed
     base.toml and env: unedited conffiles are replaced (env stays
     root:silt 0640), the edited one is kept
  7. dpkg -r: binary and unit gone; config, data, user, enable link kept
  8. dpkg -P: conffiles, data, statoverride, enable link gone; a file the
     operator added to /etc/silt and the user kept
  9. with systemd running: start, restart on upgrade, stop on remove.
     Without it: steps 2-8's systemctl calls are replayed in a private mount
     namespace where /run/systemd/system exists and systemctl is a stub that
     logs its arguments (daemon-reload, try-restart, stop; never enable or
     start).

Whatever happens, the package is purged at the end, and a user silt the test
created is deleted. The test refuses to run when silt is installed or
/etc/silt or /var/lib/silt exist, so it never touches a real installation.
EOF
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
--fake-systemd-phase)
    phase=fake-systemd
    shift
    ;;
*)
    phase=main
    ;;
esac
if [[ $# -ne 1 ]]; then
    usage >&2
    exit 2
fi

abort() {
    echo "deb-test.sh: $*" >&2
    exit 2
}
[[ $(id -u) == 0 ]] || abort "run as root (it installs the package)"
command -v dpkg >/dev/null || abort "dpkg not found: not a Debian system"
[[ -f $1 ]] || abort "$1: no such file"
DEB=$(realpath "$1")
self=$(realpath "${BASH_SOURCE[0]}")

fails=0
pass() { echo "PASS  $*"; }
fail() {
    echo "FAIL  $*"
    fails=$((fails + 1))
}
skip() { echo "SKIP  $*"; }
indent() { sed 's/^/      | /'; }
# check DESCRIPTION COMMAND...: PASS if COMMAND succeeds; else FAIL and its output.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$what"
    else
        fail "$what"
        [[ -z $out ]] || indent <<<"$out"
    fi
}
# expect DESCRIPTION ACTUAL WANTED
expect() {
    if [[ $2 == "$3" ]]; then
        pass "$1"
    else
        fail "$1: got '$2', want '$3'"
    fi
}
status() { dpkg-query -W -f='${db:Status-Abbrev}' silt 2>/dev/null | tr -d ' ' || true; }
# Anything but not-installed: installed, half-installed, config-files, ...
installed() {
    local s
    s=$(status)
    [[ -n $s && ${s:1:1} != n ]]
}
perms() { stat -c '%a %U:%G' "$1" 2>/dev/null || echo missing; }
# dpkg, never waiting for an answer: a conffile prompt fails on stdin's EOF.
dpkg_run() { DEBIAN_FRONTEND=noninteractive dpkg "$@" </dev/null 2>&1; }

pkg_version=$(dpkg-deb -f "$DEB" Version)
crate_version=${pkg_version/\~/-}
systemd_running=no
[[ -d /run/systemd/system ]] && systemd_running=yes

# --------------------------------------------------------------------------
# The systemctl calls, replayed with a stub, where systemd does not run.
# --------------------------------------------------------------------------
if [[ $phase == fake-systemd ]]; then
    # Here: a private mount namespace (unshare --mount), so /run is ours.
    mount -t tmpfs -o mode=755 silt-deb-test /run
    mkdir -p /run/systemd/system
    stub=/run/silt-deb-test
    mkdir -p "$stub/bin"
    log=$stub/systemctl.log
    : >"$log"
    cat >"$stub/bin/systemctl" <<EOF
#!/bin/sh
echo "\$*" >>"$log"
case "\$1" in
is-active) [ -e "$stub/active" ] ;;
*) exit 0 ;;
esac
EOF
    chmod 755 "$stub/bin/systemctl"
    export PATH="$stub/bin:$PATH"
    trap 'if installed; then dpkg_run --purge silt >/dev/null || true; fi' EXIT
    p="[systemd stub]"
    calls() { tr '\n' ';' <"$log"; }
    never_enables() {
        if grep -Eq '^(enable|start|reenable|unmask|preset|restart)( |$)' "$log"; then
            fail "$p $1: enabled or started the service: $(calls)"
        else
            pass "$p $1: never enabled or started it"
        fi
    }

    if out=$(dpkg_run -i "$DEB"); then pass "$p dpkg -i"; else
        fail "$p dpkg -i"
        indent <<<"$out"
    fi
    expect "$p install: systemctl calls" "$(calls)" "daemon-reload;"
    check "$p install: says how to enable" grep -q 'systemctl enable --now silt' <<<"$out"
    never_enables install

    : >"$log"
    touch "$stub/active"
    if out=$(dpkg_run -i "$DEB"); then pass "$p reinstall while active"; else
        fail "$p reinstall while active"
        indent <<<"$out"
    fi
    expect "$p reinstall: systemctl calls" "$(calls)" \
        "daemon-reload;is-active --quiet silt.service;try-restart silt.service;"
    never_enables reinstall

    : >"$log"
    if out=$(dpkg_run -r silt); then pass "$p dpkg -r while active"; else
        fail "$p dpkg -r while active"
        indent <<<"$out"
    fi
    expect "$p remove: systemctl calls" "$(calls)" \
        "is-active --quiet silt.service;stop silt.service;daemon-reload;"

    : >"$log"
    rm -f "$stub/active"
    if out=$(dpkg_run -P silt); then pass "$p dpkg -P"; else
        fail "$p dpkg -P"
        indent <<<"$out"
    fi
    expect "$p purge: systemctl calls" "$(calls)" "daemon-reload;"

    : >"$log"
    dpkg_run -i "$DEB" >/dev/null || true
    if out=$(dpkg_run -r silt); then pass "$p dpkg -r while inactive"; else
        fail "$p dpkg -r while inactive"
        indent <<<"$out"
    fi
    expect "$p install + remove while inactive: systemctl calls" "$(calls)" \
        "daemon-reload;is-active --quiet silt.service;daemon-reload;"
    dpkg_run -P silt >/dev/null || fail "$p final purge"
    exit $((fails > 0))
fi

# --------------------------------------------------------------------------
# Main phase.
# --------------------------------------------------------------------------
[[ $(status) == "" || $(status) == un ]] ||
    abort "silt is installed here ($(status)); purge it first (dpkg -P silt)"
for d in /etc/silt /var/lib/silt; do
    [[ ! -e $d ]] || abort "$d exists: a real installation? The test would delete it"
done

user_existed=no
getent passwd silt >/dev/null && user_existed=yes
group_existed=no
getent group silt >/dev/null && group_existed=yes
tmp=$(mktemp -d /tmp/silt-deb-test.XXXXXX)
chmod 755 "$tmp"
run_pid=
wants_dir=/etc/systemd/system/multi-user.target.wants
made_dirs=()

cleanup() {
    local rc=$?
    if [[ -n $run_pid ]] && kill -0 "$run_pid" 2>/dev/null; then
        kill -KILL "$run_pid" 2>/dev/null || true
    fi
    if installed; then
        echo "deb-test.sh: purging the package left installed"
        dpkg_run --purge silt | indent || true
    fi
    rm -f "$wants_dir/silt.service" 2>/dev/null || true
    for d in "${made_dirs[@]}"; do rmdir "$d" 2>/dev/null || true; done
    rm -f /etc/silt/site/berlin.toml
    rmdir /etc/silt/site /etc/silt 2>/dev/null || true
    if [[ $user_existed == no ]] && getent passwd silt >/dev/null; then
        userdel silt || true
    fi
    if [[ $group_existed == no ]] && getent group silt >/dev/null; then
        groupdel silt || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== $DEB (version $pkg_version; systemd running: $systemd_running)"

# 1. The archive itself.
for field in Package Version Architecture Maintainer Installed-Size Section Priority Description; do
    check "control field $field" test -n "$(dpkg-deb -f "$DEB" "$field")"
done
depends=$(dpkg-deb -f "$DEB" Depends)
if [[ -n $depends ]]; then
    pass "control field Depends: $depends"
else
    skip "control field Depends: none (a static binary?)"
fi
listing=$(dpkg-deb -c "$DEB" | awk '{print $1, $2, $6}')
for want in "-rwxr-xr-x root/root ./usr/bin/silt" \
    "-rw-r--r-- root/root ./lib/systemd/system/silt.service" \
    "-rw-r--r-- root/root ./etc/silt/base.toml" \
    "-rw-r--r-- root/root ./etc/silt/device.toml" \
    "-rw-r----- root/root ./etc/silt/env" \
    "drwxr-xr-x root/root ./etc/silt/site/"; do
    check "archive holds ${want##* } as ${want%% *}" grep -qxF -- "$want" <<<"$listing"
done
check "archive: nothing under /var/lib/silt (postinst makes it)" \
    bash -c "! grep -q 'var/lib/silt' <<<\"\$1\"" _ "$listing"
expect "conffiles" "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles | tr '\n' ' ')" \
    "/etc/silt/base.toml /etc/silt/device.toml /etc/silt/env "

# 2. Install.
if out=$(dpkg_run -i "$DEB"); then pass "dpkg -i"; else fail "dpkg -i"; fi
indent <<<"$out"
expect "status after install" "$(status)" ii
check "install message says how to enable" grep -q 'systemctl enable --now silt' <<<"$out"
if [[ $systemd_running == no ]]; then
    check "install message says systemd is not running" grep -q 'systemd is not running' <<<"$out"
fi
expect "/usr/bin/silt" "$(perms /usr/bin/silt)" "755 root:root"
expect "/lib/systemd/system/silt.service" "$(perms /lib/systemd/system/silt.service)" "644 root:root"
expect "/etc/silt" "$(perms /etc/silt)" "755 root:root"
expect "/etc/silt/site" "$(perms /etc/silt/site)" "755 root:root"
expect "/etc/silt/base.toml" "$(perms /etc/silt/base.toml)" "644 root:root"
expect "/etc/silt/device.toml" "$(perms /etc/silt/device.toml)" "644 root:root"
expect "/etc/silt/env (silt reads, root writes)" "$(perms /etc/silt/env)" "640 root:silt"
expect "/var/lib/silt" "$(perms /var/lib/silt)" "750 silt:silt"
expect "env statoverride" "$(dpkg-statoverride --list /etc/silt/env || true)" "root silt 640 /etc/silt/env"
expect "unit ExecStart" "$(grep '^ExecStart=' /lib/systemd/system/silt.service)" \
    "ExecStart=/usr/bin/silt run -c /etc/silt"
check "unit: no /usr/local left" bash -c '! grep -v "^#" /lib/systemd/system/silt.service | grep -q /usr/local'
if command -v systemd-analyze >/dev/null; then
    v=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify /lib/systemd/system/silt.service 2>&1) && rc=0 || rc=$?
    ours=$(grep silt.service <<<"$v" || true)
    if [[ $rc == 0 && -z $ours ]]; then pass "systemd-analyze verify silt.service"; else
        fail "systemd-analyze verify silt.service (rc $rc)"
        indent <<<"$v"
    fi
else
    skip "systemd-analyze verify (not installed)"
fi
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd silt) || true
check "user silt exists" getent passwd silt
check "group silt exists" getent group silt
check "user silt is a system user (uid $uid < 1000)" test "${uid:-1000}" -lt 1000
expect "user silt's group" "$(id -gn silt 2>/dev/null)" silt
expect "user silt's home" "$home" /var/lib/silt
expect "user silt's shell" "$shell" /usr/sbin/nologin
expect "conffiles registered" \
    "$(dpkg-query -W -f='${Conffiles}\n' silt | awk 'NF {print $1}' | tr '\n' ' ')" \
    "/etc/silt/base.toml /etc/silt/device.toml /etc/silt/env "
links=$(find /etc/systemd/system -name silt.service -path '*.wants/*' 2>/dev/null || true)
expect "service not enabled (no *.wants/silt.service)" "$links" ""
if [[ $systemd_running == yes ]]; then
    expect "systemctl is-enabled silt" "$(systemctl is-enabled silt 2>&1 || true)" disabled
    expect "systemctl is-active silt" "$(systemctl is-active silt 2>&1 || true)" inactive
fi

# 3. The binary and the packaged config.
expect "silt --version" "$(/usr/bin/silt --version 2>&1)" "silt $crate_version"
if out=$(/usr/bin/silt check -c /etc/silt 2>&1); then pass "silt check -c /etc/silt (root)"; else
    fail "silt check -c /etc/silt (root)"
fi
indent <<<"$out"
check "silt check: no warnings" bash -c '! grep -qi warn <<<"$1"' _ "$out"
check "silt check -c /etc/silt (as silt)" runuser -u silt -- /usr/bin/silt check -c /etc/silt
check "env: silt reads it" runuser -u silt -- cat /etc/silt/env
check "env: silt cannot write it" bash -c '! runuser -u silt -- test -w /etc/silt/env'
check "env: others cannot read it" bash -c '! runuser -u nobody -- cat /etc/silt/env 2>/dev/null'
mkdir "$tmp/examples"
for f in base.toml device.toml env; do
    # "#key = value" lines are examples; "# text" lines are prose.
    sed -E 's/^#([^ #])/\1/' "/etc/silt/$f" >"$tmp/examples/$f"
done
if out=$(/usr/bin/silt check -c "$tmp/examples" 2>&1); then
    pass "the commented-out examples pass silt check when uncommented"
    check "... with the mqtt source" grep -q '^source *sensors (mqtt' <<<"$out"
    check "... and the s3 sink" grep -q '^sink *lake (s3' <<<"$out"
else
    fail "the commented-out examples pass silt check when uncommented"
    indent <<<"$out"
fi

# 4. The packaged pipeline, run as silt with data in /var/lib/silt.
free_port() {
    local p
    for _ in $(seq 50); do
        p=$((20000 + RANDOM % 40000))
        if [[ -z $(ss -Hltn "sport = :$p" 2>/dev/null) ]]; then
            echo "$p"
            return
        fi
    done
    echo 0
}
http_port=$(free_port)
api_port=$(free_port)
mkdir "$tmp/run"
sed -e "s/127.0.0.1:8080/127.0.0.1:$http_port/" -e "s/127.0.0.1:8686/127.0.0.1:$api_port/" \
    /etc/silt/base.toml >"$tmp/run/base.toml"
cp /etc/silt/device.toml "$tmp/run/"
install -m 640 -g silt /etc/silt/env "$tmp/run/env"
chmod 755 "$tmp/run"
if grep -q "127.0.0.1:$http_port" "$tmp/run/base.toml" && command -v curl >/dev/null; then
    # setpriv execs silt itself, so SIGTERM reaches it directly (runuser
    # would forward it, then SIGKILL silt 2 s later, mid-shutdown).
    (cd / && exec setpriv --reuid=silt --regid=silt --init-groups \
        /usr/bin/silt run -c "$tmp/run") >"$tmp/run.log" 2>&1 &
    run_pid=$!
    code=000
    for _ in $(seq 120); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
            -d '{"device":"deb-test","temp":21.5}' \
            "http://127.0.0.1:$http_port/v1/ingest/readings" 2>/dev/null) || true
        [[ $code == 000 ]] || break
        kill -0 "$run_pid" 2>/dev/null || break
        sleep 0.5
    done
    expect "silt run as silt: POST /v1/ingest/readings" "$code" 202
    kill -TERM "$run_pid" 2>/dev/null || true
    for _ in $(seq 120); do
        kill -0 "$run_pid" 2>/dev/null || break
        sleep 0.5
    done
    wait "$run_pid" && rc=0 || rc=$?
    run_pid=
    expect "silt run: exit status after SIGTERM" "$rc" 0
    lake=$(find /var/lib/silt/lake -type f -name '*.ndjson.gz' 2>/dev/null | head -n 1)
    if [[ -n $lake ]] && zcat "$lake" | grep -q '"device":"deb-test"'; then
        pass "the event is in $lake"
        expect "... owned by silt" "$(stat -c %U "$lake")" silt
    else
        fail "the event reached /var/lib/silt/lake"
        tail -n 20 "$tmp/run.log" | indent
    fi
else
    skip "silt run (no free port or no curl)"
fi

if [[ $systemd_running == yes ]]; then
    # Not run where this script was written (no systemd there).
    check "systemctl start silt (Type=notify: returns after READY=1)" systemctl start silt
    expect "systemctl is-active silt" "$(systemctl is-active silt 2>&1 || true)" active
    started_pid=$(systemctl show -p MainPID --value silt)
fi

# 5. Reinstall the same .deb: an operator's edit survives, without a prompt.
printf '\n# added by deb-test.sh\n[agent]\nid = "deb-test-edit"\n' >>/etc/silt/device.toml
edited=$(sha256sum </etc/silt/device.toml)
if out=$(dpkg_run -i "$DEB"); then pass "reinstall (dpkg -i, same version)"; else
    fail "reinstall (dpkg -i, same version)"
fi
indent <<<"$out"
check "reinstall: no conffile prompt" bash -c '! grep -q "Configuration file" <<<"$1"' _ "$out"
expect "reinstall: device.toml edit kept" "$(sha256sum </etc/silt/device.toml)" "$edited"
expect "reinstall: no *.dpkg-* files" "$(find /etc/silt -name '*.dpkg-*')" ""
expect "reinstall: env still" "$(perms /etc/silt/env)" "640 root:silt"
check "reinstall: the edit is in effect (check --print)" \
    grep -q 'id = "deb-test-edit" *# device.toml' <<<"$(/usr/bin/silt check -c /etc/silt --print 2>&1)"
if [[ $systemd_running == yes ]]; then
    expect "reinstall: service still active" "$(systemctl is-active silt 2>&1 || true)" active
    check "reinstall: service restarted (new MainPID)" \
        test "$(systemctl show -p MainPID --value silt)" != "$started_pid"
fi

# 6. Upgrade to a newer version whose base.toml and env changed.
new_version="${pkg_version}+debtest1"
mkdir "$tmp/deb"
dpkg-deb -R "$DEB" "$tmp/deb/root"
sed -i "s/^Version: .*/Version: $new_version/" "$tmp/deb/root/DEBIAN/control"
echo "# changed by deb-test.sh" >>"$tmp/deb/root/etc/silt/base.toml"
echo "# changed by deb-test.sh" >>"$tmp/deb/root/etc/silt/env"
dpkg-deb --build --root-owner-group -Znone "$tmp/deb/root" "$tmp/deb/new.deb" >/dev/null
if out=$(dpkg_run -i "$tmp/deb/new.deb"); then pass "upgrade to $new_version"; else
    fail "upgrade to $new_version"
fi
indent <<<"$out"
expect "upgrade: version" "$(dpkg-query -W -f='${Version}' silt)" "$new_version"
check "upgrade: no conffile prompt" bash -c '! grep -q "Configuration file" <<<"$1"' _ "$out"
expect "upgrade: edited device.toml kept" "$(sha256sum </etc/silt/device.toml)" "$edited"
check "upgrade: unedited base.toml replaced" grep -q 'changed by deb-test.sh' /etc/silt/base.toml
check "upgrade: unedited env replaced" grep -q 'changed by deb-test.sh' /etc/silt/env
expect "upgrade: env (statoverride applied to the new file)" "$(perms /etc/silt/env)" "640 root:silt"
expect "upgrade: /var/lib/silt" "$(perms /var/lib/silt)" "750 silt:silt"
check "upgrade: silt check -c /etc/silt (as silt)" runuser -u silt -- /usr/bin/silt check -c /etc/silt

# An operator's site overlay and an enabled service, as systemctl enable leaves it.
printf '[sinks.local]\nbatch = { max_age = "5s" }\n' >/etc/silt/site/berlin.toml
check "a site/*.toml overlay is merged (check --print)" \
    grep -q 'max_age = "5s" *# site/berlin.toml' <<<"$(/usr/bin/silt check -c /etc/silt --print 2>&1)"
if [[ $systemd_running == yes ]]; then
    systemctl enable silt >/dev/null 2>&1 || fail "systemctl enable silt"
else
    for d in "$wants_dir" /etc/systemd/system /etc/systemd; do
        [[ -d $d ]] || made_dirs+=("$d")
    done
    mkdir -p "$wants_dir"
    ln -sf /lib/systemd/system/silt.service "$wants_dir/silt.service"
fi

# 7. Remove: program gone, config and data kept.
if out=$(dpkg_run -r silt); then pass "dpkg -r silt"; else fail "dpkg -r silt"; fi
indent <<<"$out"
expect "status after remove" "$(status)" rc
if [[ $systemd_running == yes ]]; then
    expect "remove: service stopped" "$(systemctl is-active silt 2>&1 || true)" inactive
fi
check "remove: /usr/bin/silt gone" test ! -e /usr/bin/silt
check "remove: unit gone" test ! -e /lib/systemd/system/silt.service
for f in base.toml device.toml env; do
    check "remove: /etc/silt/$f kept" test -f "/etc/silt/$f"
done
expect "remove: device.toml edit kept" "$(sha256sum </etc/silt/device.toml)" "$edited"
expect "remove: env" "$(perms /etc/silt/env)" "640 root:silt"
expect "remove: /var/lib/silt kept" "$(perms /var/lib/silt)" "750 silt:silt"
if [[ -n ${lake:-} ]]; then
    check "remove: data kept ($lake)" test -f "$lake"
fi
check "remove: user silt kept" getent passwd silt
check "remove: enable link kept" test -L "$wants_dir/silt.service"
check "remove: env statoverride kept" dpkg-statoverride --list /etc/silt/env

# 8. Purge: what the package made is gone; the operator's own file and the user stay.
if out=$(dpkg_run -P silt); then pass "dpkg -P silt"; else fail "dpkg -P silt"; fi
indent <<<"$out"
check "status after purge: not installed" bash -c '! dpkg-query -W -f="\${db:Status-Abbrev}" silt 2>/dev/null | grep -q "^.[^n]"'
for f in base.toml device.toml env; do
    check "purge: /etc/silt/$f gone" test ! -e "/etc/silt/$f"
done
expect "purge: what is left in /etc/silt" "$(cd /etc/silt 2>/dev/null && find . -mindepth 1 | sort | tr '\n' ' ')" \
    "./site ./site/berlin.toml "
check "purge: /var/lib/silt gone" test ! -e /var/lib/silt
check "purge: env statoverride gone" bash -c '! dpkg-statoverride --list /etc/silt/env'
check "purge: enable link gone" test ! -L "$wants_dir/silt.service"
check "purge: user silt kept" getent passwd silt
check "purge: group silt kept" getent group silt
rm -f /etc/silt/site/berlin.toml
rmdir /etc/silt/site /etc/silt

# 9. The systemctl calls where systemd does not run.
if [[ $systemd_running == no ]]; then
    if unshare --mount --propagation private true 2>/dev/null; then
        echo "== systemd stub (private mount namespace)"
        unshare --mount --propagation private -- bash "$self" --fake-systemd-phase "$DEB" ||
            fails=$((fails + 1))
    else
        skip "systemd stub: unshare --mount is not allowed here"
    fi
fi

echo
if ((fails)); then
    echo "deb-test.sh: $fails step(s) FAILED"
    exit 1
fi
echo "deb-test.sh: all steps passed"
