#!/usr/bin/env bash
# Build the `silt` binary for one target and put it, stripped, at
# target/dist/TARGET/silt, with its debug info (line tables) in silt.debug beside
# it (.gnu_debuglink: gdb, perf and Rust backtraces find it there):
#
#     dist/build.sh TARGET [--smoke]
#
#   TARGET  x86_64-unknown-linux-gnu       (Debian arch amd64)
#           aarch64-unknown-linux-gnu      (arm64: Raspberry Pi 3/4/5, Jetson, ...)
#           armv7-unknown-linux-gnueabihf  (armhf: 32-bit Raspberry Pi OS, ...)
#   --smoke the smoke profile instead of release: fastest to compile, slow to
#           run, not packaged (what CI runs under qemu)
#
# Toolchain, first that works:
#   1. TARGET is the host: plain `cargo build` (rustup's cargo), target/{release,debug}.
#   2. rustup has TARGET installed: `cargo build --target TARGET` with the
#      cross gcc as linker, in target/cross.
#   3. Debian's Rust (rustc-web 1.96, same as plugins/build.sh) building std for
#      TARGET from source (-Zbuild-std, hence RUSTC_BOOTSTRAP), linked by
#      Debian's cross gcc, in target/cross (its own target dir: another rustc
#      would invalidate every artifact of the host builds in target/).
# The C code in the tree (ring, zstd-sys, libdeflate, SQLite, wasmtime's helpers) is
# compiled with the same cross gcc (CC_<target>, AR_<target>).
# Missing Debian packages are installed (apt needs root). Re-running is cheap:
# cargo does nothing when sources are unchanged.
#
# armv7: wasmtime has no 32-bit ARM code generator; it runs plugins with its
# Pulley interpreter there (chosen by wasmtime's build script for hosts
# Cranelift cannot target; plugins run slower than native code).
#
# Afterwards, for release builds, if dist/deb.sh exists:
# dist/deb.sh BINARY DEBIAN_ARCH target/dist/TARGET.
# Prints the path of the binary on stdout.
set -euo pipefail
# One { } group, read whole before it runs: editing this file meanwhile is safe.
{

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

target=""
profile=release
for arg in "$@"; do
    case "$arg" in
    --smoke) profile=smoke ;;
    -h | --help)
        awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "build.sh: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    *)
        [[ -z "$target" ]] || {
            echo "build.sh: only one TARGET, got '$target' and '$arg'" >&2
            exit 2
        }
        target="$arg"
        ;;
    esac
done
[[ -n "$target" ]] || {
    echo "usage: dist/build.sh TARGET [--smoke]   (try --help)" >&2
    exit 2
}

log() { echo "build.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# TARGET -> Debian architecture, GNU triple of the cross gcc, its Debian packages.
case "$target" in
x86_64-unknown-linux-gnu)
    deb_arch=amd64 gnu=x86_64-linux-gnu cross_pkgs=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross)
    ;;
aarch64-unknown-linux-gnu)
    deb_arch=arm64 gnu=aarch64-linux-gnu cross_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    ;;
armv7-unknown-linux-gnueabihf)
    deb_arch=armhf gnu=arm-linux-gnueabihf cross_pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
    ;;
*) die "unsupported target '$target' (x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf)" ;;
esac

out_dir="$repo/target/dist/$target"

source "$repo/dist/debian-pkgs.sh"

host_triple() { rustc -vV 2>/dev/null | sed -n 's/^host: //p'; }

# The environment every cross build needs: the cross gcc links the binary and
# compiles the C code of the -sys crates.
cross_env() {
    local t_up="${target//-/_}"
    t_up="${t_up^^}"
    cross_vars=(
        "CARGO_TARGET_${t_up}_LINKER=$gnu-gcc"
        "CC_${target//-/_}=$gnu-gcc"
        "AR_${target//-/_}=$gnu-ar"
    )
}

start=$SECONDS
cargo_args=(build -p silt-agent --bin silt --locked --profile "$profile")

if [[ "$target" == "$(host_triple)" ]]; then
    log "toolchain: $(rustc --version) (host), profile $profile"
    cargo "${cargo_args[@]}"
    built="${CARGO_TARGET_DIR:-$repo/target}/$profile/silt"
else
    ensure_debian_pkgs "${cross_pkgs[@]}"
    command -v "$gnu-gcc" >/dev/null || die "$gnu-gcc not found after installing ${cross_pkgs[*]}"
    cross_env
    cross_dir="${SILT_CROSS_TARGET_DIR:-$repo/target/cross}"
    if have_rustup_target "$target"; then
        log "toolchain: $(rustc --version) with rustup's $target, profile $profile"
        env "${cross_vars[@]}" \
            cargo "${cargo_args[@]}" --target "$target" --target-dir "$cross_dir/rustup"
        built="$cross_dir/rustup/$target/$profile/silt"
    else
        ensure_debian_pkgs rustc-web cargo-web rust-web-src
        [[ -d /usr/lib/rustlib/src/rust/library ]] || die "rust-web-src is installed but /usr/lib/rustlib/src/rust/library is missing"
        log "toolchain: Debian rustc $(/usr/bin/rustc --version | cut -d' ' -f2) with -Zbuild-std for $target, profile $profile"
        # RUSTC_BOOTSTRAP: -Zbuild-std is nightly-only. Debian's std sources only
        # build with Debian's compiler, so RUSTC (and cargo) must be Debian's.
        env "${cross_vars[@]}" \
            RUSTC=/usr/bin/rustc \
            RUSTDOC=/usr/bin/rustdoc \
            RUSTC_BOOTSTRAP=1 \
            /usr/bin/cargo "${cargo_args[@]}" --target "$target" --target-dir "$cross_dir" \
            -Zbuild-std=std,panic_abort
        built="$cross_dir/$target/$profile/silt"
    fi
fi

[[ -f "$built" ]] || die "cargo succeeded but $built is missing"
mkdir -p "$out_dir"
# Ship the binary stripped; its debug info (line tables: panic locations,
# perf) goes to silt.debug beside it, found through .gnu_debuglink by gdb,
# perf and Rust's backtraces. Built in temp files, then renamed: a smoke test
# starting meanwhile never runs half a file.
objcopy="$gnu-objcopy"
command -v "$objcopy" >/dev/null || objcopy=objcopy
command -v "$objcopy" >/dev/null || die "no objcopy for $target (binutils)"
tmp_bin="$out_dir/silt.tmp.$$"
tmp_dbg="$out_dir/silt.debug.tmp.$$"
trap 'rm -f "$tmp_bin" "$tmp_dbg"' EXIT
"$objcopy" --only-keep-debug "$built" "$tmp_dbg"
# The debuglink names the file as it will be called (silt.debug); objcopy
# reads it from the path given, so link from the final name's directory.
(
    cd "$out_dir"
    mv -f "$(basename "$tmp_dbg")" silt.debug
    "$objcopy" --strip-all --add-gnu-debuglink=silt.debug "$built" "$(basename "$tmp_bin")"
)
mv -f "$tmp_bin" "$out_dir/silt"
log "built $out_dir/silt ($profile, $(stat -c %s "$out_dir/silt") bytes stripped; $(stat -c %s "$built") as built, debug info in silt.debug) in $((SECONDS - start)) s"

# Debian package step (dist/deb.sh, when present); a smoke build is for
# testing only.
if [[ $profile == release && -f "$repo/dist/deb.sh" ]]; then
    log "packaging: dist/deb.sh target/dist/$target/silt $deb_arch target/dist/$target"
    bash dist/deb.sh "target/dist/$target/silt" "$deb_arch" "target/dist/$target"
fi

echo "$out_dir/silt"
exit
}
