#!/usr/bin/env bash
# Builds the Debian package of silt for one architecture from a built binary.
# See usage() below, and dist/INSTALL.md for what the package does on a device.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: dist/deb.sh BINARY ARCH OUTDIR

Builds OUTDIR/silt_<version>_<ARCH>.deb from BINARY (a silt built for ARCH)
with `dpkg-deb --build --root-owner-group`; needs no root and nothing beyond
dpkg-deb and readelf (binutils). Writes nothing to stdout; progress and the
.deb's path go to stderr.

  BINARY   the silt executable, e.g. target/aarch64-unknown-linux-gnu/release/silt
  ARCH     Debian architecture of BINARY: amd64, arm64, armhf (also i386,
           armel, riscv64); checked against the ELF header
  OUTDIR   created if missing

The version is [workspace.package] version of Cargo.toml (the agent crate has
version.workspace = true): BINARY may be foreign, so `BINARY --version` is
only compared when it runs. A semver pre-release "-rc.1" becomes "~rc.1", so
that it sorts before the release.

Package contents:
  /usr/bin/silt                        BINARY, as it is (not stripped)
  /lib/systemd/system/silt.service     configs/silt.service, ExecStart=/usr/bin/silt
  /etc/silt/{base,device}.toml, env    dist/debian/etc/, conffiles (env: 0640 root:silt)
  /etc/silt/site/                      empty, for site overlays
  /usr/share/doc/silt/copyright
  maintainer scripts                   dist/debian/{postinst,prerm,postrm}

Depends is computed from BINARY's dynamic section: libc6 (>= the newest
GLIBC_x.y symbol version it needs), libgcc-s1 when it links libgcc_s; none for
a static binary. Another library is an error.

Environment:
  SILT_DEB_DEPENDS     use this Depends instead of computing it ("" for none)
  SILT_DEB_MAINTAINER  Maintainer field (default: the silt maintainers)
  SILT_DEB_COMPRESS    dpkg-deb -Z: xz (default), gzip, zstd (needs dpkg >= 1.21.18
                       on the device), none
EOF
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
esac
if [[ $# -ne 3 ]]; then
    usage >&2
    exit 2
fi
BINARY=$1
ARCH=$2
OUTDIR=$3

die() {
    echo "deb.sh: $*" >&2
    exit 1
}
note() { echo "deb.sh: $*" >&2; }

umask 022
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
data=$here/debian
unit_src=$repo/configs/silt.service

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian package dpkg)"
[[ -f $BINARY && -x $BINARY ]] || die "$BINARY: not an executable file"
for f in "$unit_src" "$data/postinst" "$data/prerm" "$data/postrm" "$data/copyright" \
    "$data/etc/base.toml" "$data/etc/device.toml" "$data/etc/env"; do
    [[ -f $f ]] || die "$f is missing"
done

# --- version: [package] version of agent/Cargo.toml, or the workspace's -----

# Prints the raw value of KEY (a regex) in [SECTION] of a TOML file.
toml_value() {
    awk -v sect="[$2]" -v key="$3" '
        /^[[:space:]]*\[/ { s = $0; gsub(/[[:space:]]/, "", s); insect = (s == sect); next }
        insect && match($0, "^[[:space:]]*" key "[[:space:]]*=") {
            v = substr($0, RLENGTH + 1)
            sub(/[[:space:]]*#.*$/, "", v)
            gsub(/^[[:space:]]+|[[:space:]]+$/, "", v)
            print v
            exit
        }' "$1"
}

crate_version=$(toml_value "$repo/agent/Cargo.toml" package 'version')
if [[ -z $crate_version || $crate_version =~ ^\{[[:space:]]*workspace[[:space:]]*=[[:space:]]*true[[:space:]]*\}$ ]]; then
    if [[ -z $crate_version && $(toml_value "$repo/agent/Cargo.toml" package 'version\.workspace') != true ]]; then
        die "agent/Cargo.toml: no version and no version.workspace = true in [package]"
    fi
    crate_version=$(toml_value "$repo/Cargo.toml" workspace.package 'version')
fi
crate_version=${crate_version#\"}
crate_version=${crate_version%\"}
[[ $crate_version =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.+-]*)?$ ]] ||
    die "version '$crate_version' from Cargo.toml is not semver"
# Semver pre-release (1.2.0-rc.1) sorts before the release; in Debian "~" does.
version=$crate_version
if [[ $version == *-* ]]; then
    version=${version/-/\~}
fi

# A binary of the host's architecture (or run by qemu-user) can say its version.
if reported=$(timeout 10 "$BINARY" --version 2>/dev/null); then
    [[ $reported == "silt $crate_version" ]] ||
        die "$BINARY --version says '$reported', Cargo.toml says $crate_version: stale binary?"
fi

# --- the binary must be for ARCH ----------------------------------------------

command -v readelf >/dev/null || die "readelf not found (Debian package binutils)"
header=$(LC_ALL=C readelf -h "$BINARY") || die "$BINARY: not an ELF file"
field() { sed -n "s/^ *$1: *//p" <<<"$header"; }
class=$(field Class)
machine=$(field Machine)
flags=$(field Flags)
case "$ARCH" in
amd64) want="ELF64/Advanced Micro Devices X86-64" ;;
arm64) want="ELF64/AArch64" ;;
armhf | armel) want="ELF32/ARM" ;;
i386) want="ELF32/Intel 80386" ;;
riscv64) want="ELF64/RISC-V" ;;
*) die "ARCH '$ARCH': expected one of amd64, arm64, armhf, armel, i386, riscv64" ;;
esac
[[ "$class/$machine" == "$want" ]] ||
    die "$BINARY is $class $machine, not a binary for $ARCH ($want)"
# armhf and armel differ in the float ABI: told by the dynamic loader the
# binary asks for, else (static) by the ELF flags when the linker set them.
if [[ $ARCH == armhf || $ARCH == armel ]]; then
    interp=$(LC_ALL=C readelf -l "$BINARY" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
    case "$ARCH/$interp" in
    armhf/*ld-linux-armhf.so.3 | armel/*ld-linux.so.3) ;;
    armhf/ | armel/)
        if [[ $ARCH == armhf && $flags == *soft-float* ]] || [[ $ARCH == armel && $flags == *hard-float* ]]; then
            die "$BINARY's float ABI does not match $ARCH (Flags: $flags)"
        fi
        ;;
    *) die "$BINARY uses the loader $interp: not an $ARCH binary" ;;
    esac
fi

# --- Depends ----------------------------------------------------------------

compute_depends() {
    local needed lib glibc deps=() libc=no gcc=no unknown=()
    needed=$(LC_ALL=C readelf -d "$BINARY" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')
    for lib in $needed; do
        case "$lib" in
        libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libutil.so.1 | ld-linux*.so.*)
            libc=yes ;;
        libgcc_s.so.1) gcc=yes ;;
        *) unknown+=("$lib") ;;
        esac
    done
    if ((${#unknown[@]})); then
        die "$BINARY needs ${unknown[*]}: deb.sh does not know their packages; set SILT_DEB_DEPENDS"
    fi
    if [[ $libc == yes ]]; then
        glibc=$(LC_ALL=C readelf -V -W "$BINARY" | grep -o 'GLIBC_[0-9][0-9.]*' |
            sed 's/^GLIBC_//' | sort -uV | tail -n 1)
        [[ -n $glibc ]] || die "$BINARY links libc but needs no GLIBC_ version: not glibc?"
        deps+=("libc6 (>= $glibc)")
    fi
    if [[ $gcc == yes ]]; then
        # libgcc-s1 since Debian 11; libgcc1 before. Any of them has the
        # GCC_3.0 ... GCC_4.2.0 versions Rust's unwinder uses.
        deps+=("libgcc-s1 | libgcc1")
    fi
    local IFS=,
    echo "${deps[*]}" | sed 's/,/, /g'
}

if [[ -n ${SILT_DEB_DEPENDS+set} ]]; then
    depends=$SILT_DEB_DEPENDS
else
    depends=$(compute_depends)
fi

# --- the package tree ---------------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/silt-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkg=$work/root

install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
    "$pkg/etc/silt" "$pkg/etc/silt/site" "$pkg/usr/share/doc/silt"
install -m 0755 "$BINARY" "$pkg/usr/bin/silt"
install -m 0644 "$data/etc/base.toml" "$pkg/etc/silt/base.toml"
install -m 0644 "$data/etc/device.toml" "$pkg/etc/silt/device.toml"
# root:root 0640 in the archive; postinst's statoverride makes it root:silt,
# so it is never readable by others, not even between unpack and configure.
install -m 0640 "$data/etc/env" "$pkg/etc/silt/env"
install -m 0644 "$data/copyright" "$pkg/usr/share/doc/silt/copyright"

# The unit: configs/silt.service with the packaged binary's path, and a header
# that fits a packaged unit instead of the hand-install steps.
unit=$pkg/lib/systemd/system/silt.service
{
    cat <<'EOF'
# systemd unit for silt, installed by the silt package from configs/silt.service.
# The package does not enable it: systemctl enable --now silt
# Upgrades replace this file: change it with `systemctl edit silt` (a drop-in
# in /etc/systemd/system/silt.service.d/), not here.
# Config: /etc/silt (fleet layout: base.toml, site/*.toml, device.toml, env);
# data: /var/lib/silt. Logs: journalctl -u silt.

EOF
    sed -n '/^\[/,$p' "$unit_src" | sed 's|/usr/local/bin/silt|/usr/bin/silt|g'
} >"$unit"
chmod 0644 "$unit"
# What postinst and the config files assume about the unit.
unit_check() { grep -Eq "$1" "$unit" || die "configs/silt.service: $2"; }
[[ $(grep -c '^ExecStart=' "$unit") == 1 ]] || die "configs/silt.service: expected one ExecStart="
unit_check '^ExecStart=/usr/bin/silt run( .*)? -c /etc/silt( |$)' \
    "ExecStart is not '/usr/local/bin/silt run -c /etc/silt' (or /usr/bin/silt): adapt deb.sh"
unit_check '^User=silt$' "User is not silt, the user postinst creates"
unit_check '^Group=silt$' "Group is not silt, the group postinst creates"
unit_check '^(StateDirectory=silt|ReadWritePaths=.*/var/lib/silt)' \
    "neither StateDirectory=silt nor ReadWritePaths=/var/lib/silt: data_dir would be read-only"
if grep -v '^#' "$unit" | grep -q /usr/local; then
    die "configs/silt.service still refers to /usr/local after the path change"
fi

install -m 0755 "$data/postinst" "$data/prerm" "$data/postrm" "$pkg/DEBIAN/"
printf '%s\n' /etc/silt/base.toml /etc/silt/device.toml /etc/silt/env >"$pkg/DEBIAN/conffiles"
chmod 0644 "$pkg/DEBIAN/conffiles"

installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
maintainer=${SILT_DEB_MAINTAINER:-silt maintainers <maintainers@users.noreply.r-seed-0ff68e3b.example>}
{
    echo "Package: silt"
    echo "Version: $version"
    echo "Architecture: $ARCH"
    echo "Maintainer: $maintainer"
    echo "Installed-Size: $installed_size"
    if [[ -n $depends ]]; then
        echo "Depends: $depends"
    fi
    echo "Section: net"
    echo "Priority: optional"
    cat <<'EOF'
Description: edge agent: MQTT/HTTP in, WebAssembly transforms, spool, S3 out
 silt collects sensor readings and media over MQTT and HTTP, runs
 WebAssembly transform plugins on them, keeps everything in a local spool
 while the network is down, and uploads batched objects (NDJSON or
 Parquet) to S3 or a local directory.
 .
 This package installs /usr/bin/silt, a hardened systemd unit (neither
 enabled nor started), an example configuration in /etc/silt (an HTTP
 source on 127.0.0.1:8080 writing files under /var/lib/silt) and the
 system user silt.
EOF
} >"$pkg/DEBIAN/control"
chmod 0644 "$pkg/DEBIAN/control"

mkdir -p "$OUTDIR"
deb=$OUTDIR/silt_${version}_${ARCH}.deb
compress=${SILT_DEB_COMPRESS:-xz}
note "building $deb (Depends: ${depends:-none}, Installed-Size: $installed_size KiB, -Z$compress)"
# Built next to its final name and renamed: OUTDIR never holds half a .deb.
partial=$OUTDIR/.${deb##*/}.partial.$$
trap 'rm -rf "$work" "$partial"' EXIT
dpkg-deb --build --root-owner-group "-Z$compress" "$pkg" "$partial" >/dev/null
mv -f "$partial" "$deb"
# stdout stays empty: dist/build.sh prints its binary's path there.
note "built $deb"
