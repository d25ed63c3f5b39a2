#!/usr/bin/env bash
# Usage: scripts/install.sh [--prefix DIR] [--root DIR] [--uninstall] [--no-build]
#
# Installs libvirt-volume-provisioner on this host:
#
#   $ROOT$PREFIX/bin/libvirt-volume-provisioner           the daemon (0755)
#   $ROOT$PREFIX/share/man/man8/libvirt-volume-provisioner.8  its man page (0644)
#   $ROOT/etc/systemd/system/libvirt-volume-provisioner.service  the unit (0644)
#   $ROOT/etc/default/libvirt-volume-provisioner          the options (0644),
#       only when it does not exist yet; otherwise the new example goes
#       beside it as libvirt-volume-provisioner.dist and yours is left alone
#   $ROOT/var/lib/libvirt-volume-provisioner              state dir (0750)
#   $ROOT/etc/libvirt-volume-provisioner                  certificates, tokens (0750)
#
# PREFIX defaults to /usr/local and ROOT to /; --root installs into another
# tree (a package build, a test). The unit's ExecStart= names
# $PREFIX/bin/libvirt-volume-provisioner.
#
# The binary is built with cargo build --release first, unless --no-build is
# given and target/release/libvirt-volume-provisioner exists. LVP_BINARY=path
# installs that binary instead, without building.
#
# Running it again changes only what differs from what it would install, so
# it is safe to rerun after an upgrade. Existing directories keep their mode.
# --uninstall removes the binary, the man page, the unit and the .dist file;
# it keeps the options file, the state dir and the config dir, and says so.
#
# systemctl daemon-reload runs only when ROOT is / and systemd is running;
# the service is never enabled or started for you: the next steps are printed.
# Exits 0 on success, 1 on a failure, 2 on a usage error.

set -euo pipefail

name="libvirt-volume-provisioner"

# The comment block at the top of this file, on standard output.
help() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
}

usage() {
    sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

say() { printf '%s\n' "$*"; }

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

prefix="/usr/local"
root="/"
uninstall=0
build=1
while [ "$#" -gt 0 ]; do
    case "$1" in
        --prefix)
            [ "$#" -ge 2 ] || usage
            prefix="$2"
            shift 2
            ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --root)
            [ "$#" -ge 2 ] || usage
            root="$2"
            shift 2
            ;;
        --root=*) root="${1#--root=}"; shift ;;
        --uninstall) uninstall=1; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) help ;;
        *) echo "install.sh: unknown argument $1" >&2; usage ;;
    esac
done

case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path, not $prefix" >&2; exit 2 ;;
esac
case "$root" in
    /*) ;;
    *) root="$(pwd)/$root" ;;
esac
# ROOT without its trailing slashes, so "$root$path" has no "//"; / becomes "".
root="${root%/}"
while [ "${root%/}" != "$root" ]; do root="${root%/}"; done
prefix="${prefix%/}"
[ -n "$prefix" ] || prefix="/"

cd "$(dirname "$0")/.."
repo="$(pwd)"

bin_dst="$root$prefix/bin/$name"
man_dst="$root$prefix/share/man/man8/$name.8"
unit_dst="$root/etc/systemd/system/$name.service"
opts_dst="$root/etc/default/$name"
state_dir="$root/var/lib/$name"
config_dir="$root/etc/$name"

# The live system, as opposed to a tree under --root.
live=0
[ -z "$root" ] && live=1
if [ "$live" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "installing into / needs root; run it with sudo, or give --root DIR"
fi

# systemd_running: whether this is the live system and systemd manages it.
systemd_running() {
    [ "$live" -eq 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

changed=0

# put SRC DST MODE: installs SRC as DST with MODE unless DST already has
# those bytes; then only fixes the mode if it differs. Reports what it did.
put() {
    local src="$1" dst="$2" mode="$3"
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        if [ "$(stat -c %a "$dst")" != "${mode#0}" ]; then
            chmod "$mode" "$dst"
            say "  mode $mode  $dst"
            changed=1
        else
            say "  unchanged  $dst"
        fi
        return 0
    fi
    # Parent directories as a package would make them, whatever our umask.
    (umask 022 && mkdir -p "$(dirname "$dst")")
    # Into a temporary name beside it, then renamed over: a running daemon
    # keeps its old binary, and nobody ever sees half a file.
    local tmp
    tmp="$(dirname "$dst")/.$(basename "$dst").install-$$"
    install -m "$mode" "$src" "$tmp"
    mv -f "$tmp" "$dst"
    say "  installed  $dst"
    changed=1
}

# make_dir DIR: creates DIR with mode 0750 if missing; an existing one is
# left as it is, with a note when its mode differs.
make_dir() {
    local dir="$1" mode
    if [ -d "$dir" ]; then
        mode="$(stat -c %a "$dir")"
        if [ "$mode" = "750" ]; then
            say "  exists     $dir"
        else
            say "  exists     $dir (mode 0$mode, not 0750; left as it is)"
        fi
        return 0
    fi
    (umask 022 && mkdir -p "$(dirname "$dir")")
    install -d -m 0750 "$dir"
    say "  created    $dir"
    changed=1
}

# remove FILE: removes FILE if it exists and reports it.
remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -f "$1"
        say "  removed    $1"
        changed=1
    else
        say "  absent     $1"
    fi
}

# ---------------------------------------------------------------- uninstall
if [ "$uninstall" -eq 1 ]; then
    say "uninstalling $name from ${root:-/}"
    if systemd_running && systemctl is-active --quiet "$name.service"; then
        # SIGTERM: running jobs get their --shutdown-grace to finish.
        say "  stopping   $name.service (running jobs get their grace period)"
        systemctl stop "$name.service"
    fi
    if systemd_running && systemctl is-enabled --quiet "$name.service" 2>/dev/null; then
        systemctl disable --quiet "$name.service"
        say "  disabled   $name.service"
    fi
    remove "$bin_dst"
    remove "$man_dst"
    remove "$unit_dst"
    remove "$opts_dst.dist"
    if systemd_running; then
        systemctl daemon-reload
        say "  ran        systemctl daemon-reload"
    fi
    say "kept, with whatever they hold (remove them yourself if you mean to):"
    for kept in "$opts_dst" "$state_dir" "$config_dir"; do
        if [ -e "$kept" ]; then
            say "  kept       $kept"
        fi
    done
    exit 0
fi

# ---------------------------------------------------------------- binary
if [ -n "${LVP_BINARY:-}" ]; then
    bin_src="$LVP_BINARY"
    if ! [ -f "$bin_src" ] || ! [ -x "$bin_src" ]; then
        die "LVP_BINARY=$bin_src is not an executable file"
    fi
else
    bin_src="${CARGO_TARGET_DIR:-$repo/target}/release/$name"
    if [ "$build" -eq 1 ] || [ ! -x "$bin_src" ]; then
        [ "$build" -eq 1 ] || say "$bin_src does not exist; building it despite --no-build"
        command -v cargo >/dev/null || die "cargo is needed to build $name (or set LVP_BINARY)"
        say "building $name (cargo build --release)"
        cargo build --release
        [ -x "$bin_src" ] || die "cargo build did not produce $bin_src"
    fi
fi
"$bin_src" --help >/dev/null 2>&1 || die "$bin_src does not run (--help failed)"

# ---------------------------------------------------------------- install
say "installing $name into ${root:-/} (prefix $prefix)"

put "$bin_src" "$bin_dst" 0755
put "$repo/man/$name.8" "$man_dst" 0644

# The unit names the binary by its installed path.
unit_src="$work/$name.service"
sed "s|^ExecStart=/usr/local/bin/$name |ExecStart=$prefix/bin/$name |" \
    "$repo/scripts/$name.service" >"$unit_src"
grep -q "^ExecStart=$prefix/bin/$name serve " "$unit_src" \
    || die "could not set ExecStart= in the unit to $prefix/bin/$name"
put "$unit_src" "$unit_dst" 0644

# The options file is the operator's once it exists.
opts_src="$repo/scripts/$name.default"
opts_note=""
if [ ! -e "$opts_dst" ]; then
    put "$opts_src" "$opts_dst" 0644
elif cmp -s "$opts_src" "$opts_dst"; then
    say "  unchanged  $opts_dst"
    # A .dist left by an earlier run says nothing new now.
    if [ -e "$opts_dst.dist" ]; then
        remove "$opts_dst.dist"
    fi
else
    say "  kept       $opts_dst (yours; not overwritten)"
    put "$opts_src" "$opts_dst.dist" 0644
    opts_note="compare your $opts_dst with the new example $opts_dst.dist"
fi

make_dir "$state_dir"
make_dir "$config_dir"

if [ "$changed" -eq 0 ]; then
    say "nothing to change: everything was already installed"
fi

if systemd_running; then
    systemctl daemon-reload
    say "  ran        systemctl daemon-reload"
fi

# ---------------------------------------------------------------- next steps
say ""
say "next steps:"
if [ "$live" -eq 0 ]; then
    say "  (installed under $root; on the target host, paths are without that prefix)"
fi
[ -z "$opts_note" ] || say "  - $opts_note"
say "  - certificates: scripts/make-certs.sh \$(hostname -f) /etc/$name"
say "  - options: edit /etc/default/$name (LVP_OPTS); see man $name"
say "  - check them: ( . /etc/default/$name && $prefix/bin/$name check -- \$LVP_OPTS )"
if ! systemd_running; then
    say "  - systemctl daemon-reload"
fi
say "  - systemctl enable --now $name"
say "  - journalctl -u $name -f"
