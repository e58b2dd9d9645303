#!/usr/bin/env bash
# Build every plugin in this workspace to a WebAssembly component:
#
#     plugins/build.sh           # build; prints the output directory
#     plugins/build.sh --test    # also run the SDK's and plugins' host unit tests
#     plugins/build.sh DIR       # build only the standalone plugin crate in DIR
#                                # (made by `silt plugin new --dir`); --test works too
#     plugins/build.sh --check   # exit 0 if a toolchain is ready, installing nothing
#
# Output: plugins/target/wasm/<plugin>.wasm (stable path; tests and CI use it),
# or DIR/target/wasm/<plugin>.wasm (cargo's target dir: $CARGO_TARGET_DIR or DIR/target).
#
# Toolchain, first that works:
#   1. rustup with the wasm32-wasip2 target installed: plain cargo.
#   2. Debian's Rust (rustc-web, 1.96) building std from source for
#      wasm32-wasip2 against Debian's wasi-libc, linked by wasm-component-ld
#      (installed with cargo into $SILT_TOOLS) driving lld-22's wasm-ld.
#      Needed because rustup here cannot download targets.
# Missing pieces are installed (apt needs root). Re-running is cheap: cargo
# does nothing when sources are unchanged (~1 s).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
caller_dir="$PWD"
cd "$here"
out_dir="$here/target/wasm"
target=wasm32-wasip2
tools="${SILT_TOOLS:-$HOME/.cache/silt/tools}"
run_tests=0
check_only=0
crate_dir=""
for arg in "$@"; do
    case "$arg" in
    --test) run_tests=1 ;;
    --check) check_only=1 ;;
    -h | --help)
        sed -n '2,20p' "$here/build.sh"
        exit 0
        ;;
    -*)
        echo "build.sh: unknown argument '$arg' (try --help)" >&2
        exit 2
        ;;
    *)
        [[ -z "$crate_dir" ]] || {
            echo "build.sh: only one crate directory, got '$crate_dir' and '$arg'" >&2
            exit 2
        }
        crate_dir="$arg"
        ;;
    esac
done

log() { echo "build.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

source "$here/../dist/debian-pkgs.sh"

debian_pkgs=(rustc-web cargo-web rust-web-src wasi-libc lld-22)

# True when a build needs no installs (what --check reports).
toolchain_ready() {
    have_rustup_target "$target" && return 0
    [[ -z "$(missing_debian_pkgs "${debian_pkgs[@]}")" && -x /usr/lib/llvm-22/bin/wasm-ld &&
        -d /usr/lib/wasm32-wasi && -x "$tools/bin/wasm-component-ld" ]]
}

ensure_debian_toolchain() {
    ensure_debian_pkgs "${debian_pkgs[@]}"
    [[ -x /usr/lib/llvm-22/bin/wasm-ld ]] || die "lld-22 is installed but /usr/lib/llvm-22/bin/wasm-ld is missing"
    [[ -d /usr/lib/wasm32-wasi ]] || die "wasi-libc is installed but /usr/lib/wasm32-wasi is missing"

    if [[ ! -x "$tools/bin/wasm-component-ld" ]]; then
        log "installing wasm-component-ld into $tools (cargo install, ~1 min)"
        # Host cargo (rustup's if present): this is a native tool.
        cargo install --quiet --locked --root "$tools" wasm-component-ld ||
            die "cargo install wasm-component-ld failed; check access to crates.io"
    fi
}

# Extra arguments go to cargo build (e.g. --target-dir).
build_rustup() {
    log "toolchain: rustup ($target installed)"
    cargo build --release --target "$target" "$@"
}

build_debian() {
    ensure_debian_toolchain
    log "toolchain: Debian rustc $(/usr/bin/rustc --version | cut -d' ' -f2) with -Zbuild-std"
    # Debian's std sources only build with Debian's compiler, and build-std is
    # nightly-only, hence RUSTC_BOOTSTRAP. The linker flags point rustc at the
    # system wasi-libc instead of the self-contained copy Debian doesn't ship.
    env PATH="/usr/lib/llvm-22/bin:$tools/bin:$PATH" \
        RUSTC=/usr/bin/rustc \
        RUSTDOC=/usr/bin/rustdoc \
        RUSTC_BOOTSTRAP=1 \
        CARGO_TARGET_WASM32_WASIP2_LINKER=wasm-component-ld \
        RUSTFLAGS="-L/usr/lib/wasm32-wasi -Clink-self-contained=no" \
        /usr/bin/cargo build --release --target "$target" -Zbuild-std=std,panic_abort "$@"
}

build() {
    if have_rustup_target "$target"; then
        build_rustup "$@"
    else
        build_debian "$@"
    fi
}

if ((check_only)); then
    if toolchain_ready; then
        log "toolchain ready"
        exit 0
    fi
    log "toolchain not ready (a build would install it)"
    exit 1
fi

start=$SECONDS

# A standalone crate (own [workspace], e.g. from `silt plugin new --dir`).
if [[ -n "$crate_dir" ]]; then
    resolved="$(cd "$caller_dir" && cd "$crate_dir" 2>/dev/null && pwd)" || die "no such directory: $crate_dir"
    crate_dir="$resolved"
    manifest="$crate_dir/Cargo.toml"
    [[ -f "$manifest" ]] || die "$manifest not found"
    grep -q '^\[workspace\]' "$manifest" ||
        die "$manifest has no [workspace] table; members of plugins/ are built by plain plugins/build.sh"
    grep -q '"cdylib"' "$manifest" || die "$manifest does not build a cdylib (crate-type = [\"cdylib\", \"rlib\"])"
    name="$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$manifest" | head -n 1)"
    [[ -n "$name" ]] || die "no package name in $manifest"
    cargo_target="${CARGO_TARGET_DIR:-$crate_dir/target}"
    [[ "$cargo_target" == /* ]] || cargo_target="$caller_dir/$cargo_target"
    cd "$crate_dir"
    build --target-dir "$cargo_target"
    src="$cargo_target/$target/release/${name//-/_}.wasm"
    [[ -f "$src" ]] || die "cargo succeeded but $src is missing"
    out_dir="$crate_dir/target/wasm"
    mkdir -p "$out_dir"
    dst="$out_dir/$name.wasm"
    if ! cmp -s "$src" "$dst"; then
        cp "$src" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
    fi
    log "built $name in $((SECONDS - start)) s"
    if ((run_tests)); then
        log "host unit tests: $name"
        cargo test --quiet --target-dir "$cargo_target"
    fi
    echo "$out_dir"
    exit 0
fi

build

# Plugins are the members that build a cdylib; cargo names the file after the
# crate with '-' turned into '_', we publish it under the package name.
mkdir -p "$out_dir"
built=()
for manifest in */Cargo.toml; do
    grep -q '"cdylib"' "$manifest" || continue
    name="$(dirname "$manifest")"
    src="target/$target/release/${name//-/_}.wasm"
    [[ -f "$src" ]] || die "cargo succeeded but $src is missing"
    dst="$out_dir/$name.wasm"
    if ! cmp -s "$src" "$dst"; then
        # Copy then rename so a concurrently starting test never loads half a file.
        cp "$src" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
    fi
    built+=("$name")
done
log "built ${#built[@]} plugins in $((SECONDS - start)) s: ${built[*]}"

if ((run_tests)); then
    log "host unit tests: sdk"
    (cd "$here/../sdk" && cargo test --quiet)
    log "host unit tests: plugins"
    cargo test --quiet
fi

echo "$out_dir"
