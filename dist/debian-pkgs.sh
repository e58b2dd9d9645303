# Sourced by dist/build.sh and plugins/build.sh, which define `log` and `die`:
# the Debian packages and the rustup target their toolchains are chosen by.

# The packages among "$@" that dpkg does not have installed, one per line.
missing_debian_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
    done
}

# Installs the packages among "$@" that are missing (apt; needs root).
ensure_debian_pkgs() {
    local missing=()
    mapfile -t missing < <(missing_debian_pkgs "$@")
    ((${#missing[@]})) || return 0
    [[ $(id -u) -eq 0 ]] || die "missing Debian packages ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"
    log "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# True when rustup has target $1 installed.
have_rustup_target() {
    command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -qx "$1"
}
