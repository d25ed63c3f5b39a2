#!/usr/bin/env bash
# Usage: scripts/bench.sh [--rounds N] [--jobs N] [--only GROUPS] [--smoke] [--direct-io]
#
# Measures the daemon against what an operator would otherwise run, on
# this machine, and prints one table (medians, min–max, ratios); the same
# figures go to target/bench/results.json.
#
#   1. builds the release daemon and the status client
#      (examples/bench_status.rs);
#   2. builds the images: the real Debian ones (raw, qcow2, compressed
#      qcow2, 2 GiB virtual) with ../shared/bench/make-images.sh into
#      target/bench-images (needs root: debootstrap; a few minutes the
#      first time, then reused), or with --smoke a 64 MiB ext4 image made
#      here from generated files (no root, seconds);
#   3. serves them on 127.0.0.1 with a python3 server that counts GETs
#      (with sendfile, at nice 10: it stands for a remote image store);
#   4. starts the daemon (mutual TLS, dir backend, 2 workers) and, for N
#      rounds (default 3; 1 with --smoke), alternating which side runs
#      first:
#      - per image, a cold provision (empty cache) against the naive
#        pipeline (curl -o, sha256sum -c, qemu-img convert, fdatasync) and
#        against download plus durable convert; a warm provision (cache
#        hit) against a durable qemu-img convert of the cache entry;
#        the daemon's peak RSS (VmHWM, reset before each raw provision);
#      - --jobs (default 20) provisions of one uncached image at once:
#        image GETs at the server, and wall time against one download plus
#        as many converts on as many lanes as the daemon has workers;
#      - status requests at 500/s on one keep-alive mutual-TLS connection
#        during a cold provision of the raw image (p50, p99, counted from
#        when each request was due), and full handshakes per second during
#        another.
#
# --only images,many,status runs some of the three groups above (all by
# default), for a quicker look at one of them.
#
# --direct-io starts the daemon with --direct-io (volumes written with
# O_DIRECT); the baselines stay buffered, so the ratios show what direct
# writes cost.
#
# Daemon times run from the POST to the client seeing `completed` (the
# client follows the job with ?wait=). Every step starts after a sync, so
# none pays for the write-back of the one before. Work files live in
# target/bench. Needs cargo, qemu-img, curl, openssl, python3, sha256sum,
# mkfs.ext4. Exits 0 when the run finished (targets missed are reported,
# not fatal), 1 when something failed, including jobs for one image that
# did not share a single download.

set -euo pipefail

cd "$(dirname "$0")/.."
repo="$(pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

rounds=""
jobs=20
smoke=0
only=""
direct_io=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="${2:?--rounds needs a number}"; shift 2 ;;
        --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
        --only) only="${2:?--only needs a list}"; shift 2 ;;
        --smoke) smoke=1; shift ;;
        --direct-io) direct_io=1; shift ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) printf 'bench: unknown argument %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done
[ -n "$rounds" ] || rounds=$([ "$smoke" = 1 ] && echo 1 || echo 3)
case "$rounds$jobs" in *[!0-9]*) printf 'bench: --rounds and --jobs take whole numbers\n' >&2; exit 2 ;; esac

target="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target/release/libvirt-volume-provisioner"
client="$target/release/examples/bench_status"
work="$target/bench"
start_timeout=30
workers=2
daemon_pid=""
http_pid=""

say() { printf '==> %s\n' "$*"; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "$daemon_pid" "$http_pid"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [ "$rc" -ne 0 ] && [ -s "$work/daemon.log" ]; then
        printf '\n---- last lines of the daemon log (%s) ----\n' "$work/daemon.log" >&2
        tail -n 30 "$work/daemon.log" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in cargo qemu-img curl openssl python3 sha256sum mkfs.ext4; do
    command -v "$tool" >/dev/null || die "$tool is required but not on PATH"
done

say "building the daemon and the status client (release)"
cargo build --release --quiet --bin libvirt-volume-provisioner --example bench_status

rm -rf "$work"
mkdir -p "$work"/{volumes,cache,state}

# ---------------------------------------------------------------- images
if [ "$smoke" = 1 ]; then
    images="$work/images"
    mkdir -p "$images/tree/etc" "$images/tree/srv"
    say "smoke: building a 64 MiB ext4 image from generated files"
    seq 1 300000 >"$images/tree/srv/numbers.txt"
    head -c $((8 << 20)) /dev/urandom >"$images/tree/srv/random.bin"
    cp /etc/os-release "$images/tree/etc/os-release"
    mkfs.ext4 -q -F -b 4096 -d "$images/tree" "$images/smoke.raw" 64M
    qemu-img convert -f raw -O qcow2 "$images/smoke.raw" "$images/smoke.qcow2"
    qemu-img convert -c -f raw -O qcow2 "$images/smoke.raw" "$images/smoke.c.qcow2"
    for f in smoke.raw smoke.qcow2 smoke.c.qcow2; do
        sha256sum "$images/$f" | cut -d' ' -f1 >"$images/$f.sha256"
    done
    raw=smoke.raw qcow2=smoke.qcow2 cqcow2=smoke.c.qcow2 volume_gb=1
else
    images="$target/bench-images"
    make_images="$repo/../shared/bench/make-images.sh"
    [ -x "$make_images" ] || [ -f "$make_images" ] || die "no $make_images (the shared folder sits beside the checkout)"
    [ "$(id -u)" = 0 ] || die "building the Debian images needs root (debootstrap); run as root, or use --smoke"
    say "building the Debian images with $make_images (reused when up to date)"
    OUT="$images" bash "$make_images" >"$work/make-images.log" 2>&1 \
        || { tail -n 30 "$work/make-images.log" >&2; die "make-images.sh failed"; }
    name="debian-$(sed -n 's/^suite=\([a-z]*\).*/\1/p' "$images/MANIFEST.txt")-minbase"
    raw="$name.raw" qcow2="$name.qcow2" cqcow2="$name.c.qcow2" volume_gb=2
fi
for f in "$raw" "$qcow2" "$cqcow2"; do
    [ -s "$images/$f" ] && [ -s "$images/$f.sha256" ] || die "missing $images/$f or its .sha256"
done

# ---------------------------------------------------------------- server
say "serving $images on 127.0.0.1"
# At nice 10: the server stands for a remote image store, and here it
# shares two CPUs with both sides of every comparison.
nice -n 10 python3 "$repo/scripts/bench.py" serve "$images" "$work/http.port" >"$work/http.log" 2>&1 &
http_pid=$!
for _ in $(seq 1 100); do
    [ -s "$work/http.port" ] && break
    kill -0 "$http_pid" 2>/dev/null || die "the image server exited at start: $(cat "$work/http.log")"
    sleep 0.1
done
[ -s "$work/http.port" ] || die "the image server did not report its port"
http_port="$(cat "$work/http.port")"

# ---------------------------------------------------------------- daemon
certs="$work/certs"
scripts/make-certs.sh localhost "$certs" >/dev/null
# shellcheck source=scripts/lib-daemon.sh
. "$repo/scripts/lib-daemon.sh"
daemon_extra=(--workers "$workers" --log-level info)
if [ "$direct_io" = 1 ]; then
    daemon_extra+=(--direct-io)
    say "the daemon writes volumes with O_DIRECT (--direct-io); the baselines stay buffered"
fi
say "starting the daemon (dir backend, mutual TLS, $workers workers)"
start_dir_daemon "$http_port"

say "measuring: $rounds round(s)"
python3 "$repo/scripts/bench.py" run \
    --port "$port" --daemon-pid "$daemon_pid" --server "$http_port" \
    --certs "$certs" --work "$work" --cache-dir "$work/cache" --volume-dir "$work/volumes" \
    --images "$images" --raw "$raw" --qcow2 "$qcow2" --cqcow2 "$cqcow2" \
    --client "$client" --rounds "$rounds" --jobs "$jobs" --workers "$workers" \
    --volume-gb "$volume_gb" --json "$work/results.json" --only "$only" \
    $([ "$smoke" = 1 ] && echo --smoke)
say "results: $work/results.json"
