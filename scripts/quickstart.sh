#!/usr/bin/env bash
# Usage: scripts/quickstart.sh
#
# Provisions a real image through the real API, end to end, on this machine:
#
#   1. builds the daemon (cargo build --release);
#   2. makes a CA, a server and a client certificate (scripts/make-certs.sh);
#   3. builds a real ext4 filesystem from a directory of real files, turns it
#      into a compressed qcow2 image and writes its .sha256 sidecar;
#   4. serves the image on 127.0.0.1 with python3 -m http.server;
#   5. starts the daemon with mutual TLS and the dir backend;
#   6. provisions two volumes from the image with curl, as in the API guide,
#      polling their progress; the second must be a cache hit;
#   7. checks that each volume holds exactly the filesystem (qemu-img compare).
#
# Everything lives in target/quickstart (or $QUICKSTART_DIR), which is wiped
# at the start and left in place afterwards for a look. The daemon and the
# HTTP server are stopped on exit, whether the run passed or failed. Needs
# cargo, qemu-img, openssl, curl, jq, python3, mkfs.ext4 and sha256sum; no
# root. Exits 0 when every check passed, 1 otherwise.

set -euo pipefail

cd "$(dirname "$0")/.."
repo="$(pwd)"
# mkfs.ext4 lives in /usr/sbin, which is not on a normal user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

work="${QUICKSTART_DIR:-$repo/target/quickstart}"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/libvirt-volume-provisioner"
image_name="rootfs.qcow2"
volume_gb=1
# Seconds to wait for the daemon to answer /health, and for one job.
start_timeout=30
job_timeout=300

daemon_pid=""
http_pid=""
job_id=""

say() { printf '==> %s\n' "$*"; }

die() {
    printf 'quickstart: FAILED: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ -n "$http_pid" ] && kill -0 "$http_pid" 2>/dev/null; then
        kill -TERM "$http_pid" 2>/dev/null || true
        wait "$http_pid" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ]; then
        if [ -s "$work/daemon.log" ]; then
            printf '\n---- daemon log (%s) ----\n' "$work/daemon.log" >&2
            cat "$work/daemon.log" >&2
            printf -- '---- end of daemon log ----\n' >&2
        fi
        if [ -s "$work/http.log" ]; then
            printf '\n---- image server log (%s) ----\n' "$work/http.log" >&2
            tail -n 20 "$work/http.log" >&2
        fi
        printf 'quickstart: exit status %s; files kept in %s\n' "$rc" "$work" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'printf "quickstart: FAILED: command at line %s exited with status %s\n" "$LINENO" "$?" >&2' ERR

for tool in cargo qemu-img openssl curl jq python3 mkfs.ext4 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is required but not on PATH"
done

case "$work" in
    "" | "/" | "$repo" | "$HOME") die "refusing to wipe $work (QUICKSTART_DIR)" ;;
esac

# ---------------------------------------------------------------- build
say "building the daemon (cargo build --release)"
cargo build --release
[ -x "$bin" ] || die "cargo build did not produce $bin"

say "work directory $work (wiped)"
rm -rf "$work"
mkdir -p "$work"/{www,volumes,cache,state,rootfs}
certs="$work/certs"

# ---------------------------------------------------------------- certificates
say "making certificates (scripts/make-certs.sh localhost)"
scripts/make-certs.sh localhost "$certs"

# ---------------------------------------------------------------- image
say "building a real ext4 filesystem and a compressed qcow2 image of it"
rootfs="$work/rootfs"
mkdir -p "$rootfs/etc" "$rootfs/srv/data" "$rootfs/srv/text"
cp /etc/os-release "$rootfs/etc/os-release"
printf 'quickstart-%s\n' "$$" >"$rootfs/etc/hostname"
seq 1 200000 >"$rootfs/srv/text/numbers.txt"
for i in 1 2 3 4 5; do
    {
        printf 'File %s of the libvirt-volume-provisioner quick start.\n' "$i"
        printf 'Made on %s by %s.\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(id -un)"
        seq -f "line %g of file $i" 1 2000
    } >"$rootfs/srv/text/file-$i.txt"
done
head -c $((6 * 1024 * 1024)) /dev/urandom >"$rootfs/srv/data/random.bin"
(cd "$rootfs" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/MANIFEST"
cp "$work/MANIFEST" "$rootfs/MANIFEST.sha256"

fs_raw="$work/fs.raw"
mkfs.ext4 -q -F -L quickstart -d "$rootfs" "$fs_raw" 256M
qemu-img convert -c -f raw -O qcow2 "$fs_raw" "$work/www/$image_name"
(cd "$work/www" && sha256sum "$image_name" >"$image_name.sha256")
image_sha="$(cut -d' ' -f1 "$work/www/$image_name.sha256")"
printf '    filesystem %s: %s bytes; image %s: %s bytes; sha256 %s\n' \
    "$(basename "$fs_raw")" "$(stat -c %s "$fs_raw")" \
    "$image_name" "$(stat -c %s "$work/www/$image_name")" "$image_sha"

# ---------------------------------------------------------------- image server
say "serving the image with python3 -m http.server on 127.0.0.1"
# Port 0: the kernel picks a free port and the server prints it.
python3 -u -m http.server --bind 127.0.0.1 --directory "$work/www" 0 \
    >"$work/http.log" 2>&1 &
http_pid=$!
http_port=""
for _ in $(seq 1 100); do
    http_port="$(sed -n 's/^Serving HTTP on .* port \([0-9][0-9]*\) .*/\1/p' "$work/http.log" | head -n 1)"
    [ -n "$http_port" ] && break
    kill -0 "$http_pid" 2>/dev/null || die "the image server exited at start"
    sleep 0.1
done
[ -n "$http_port" ] || die "the image server did not report its port"
image_url="http://127.0.0.1:$http_port/$image_name"
curl -sSf -o /dev/null "$image_url.sha256" || die "cannot fetch $image_url.sha256 from the image server"
printf '    %s\n' "$image_url"

# ---------------------------------------------------------------- daemon
# shellcheck source=scripts/lib-daemon.sh
. "$repo/scripts/lib-daemon.sh"
daemon_extra=()
say "starting the daemon (dir backend, mutual TLS)"
start_dir_daemon "$http_port"
[ "$(jq -r .status "$work/health.json")" = "healthy" ] || die "/health did not answer healthy"
printf '    %s/health: %s\n' "$base" "$(jq -c . "$work/health.json")"

# ---------------------------------------------------------------- provisioning
# provision VOLUME CORRELATION_ID: POSTs the request; sets job_id.
provision() {
    local volume="$1" corr="$2" code
    code="$(curl -sS -o "$work/provision-$volume.json" -w '%{http_code}' \
        -X POST "$base/api/v1/provision" \
        --cacert "$certs/ca.crt" \
        --cert "$certs/client.crt" \
        --key "$certs/client.key" \
        -H "Content-Type: application/json" \
        -d "{
          \"image_url\": \"$image_url\",
          \"volume_name\": \"$volume\",
          \"volume_size_gb\": $volume_gb,
          \"image_type\": \"qcow2\",
          \"correlation_id\": \"$corr\"
        }")" || die "POST /api/v1/provision for $volume: curl failed"
    if [ "$code" != "202" ]; then
        printf '%s\n' "$(cat "$work/provision-$volume.json")" >&2 || true
        die "POST /api/v1/provision for $volume answered HTTP $code, expected 202"
    fi
    job_id="$(jq -er .job_id "$work/provision-$volume.json")" \
        || die "the provision answer for $volume has no job_id"
}

# wait_job JOB_ID FILE: polls the status until the job is final; leaves
# the last status JSON in FILE; fails unless it is completed.
wait_job() {
    local job="$1" out="$2" status percent stage line last=""
    local deadline=$((SECONDS + job_timeout))
    while true; do
        curl -sSf -o "$out" "${tls[@]}" "$base/api/v1/status/$job" \
            || die "GET /api/v1/status/$job failed"
        status="$(jq -r .status "$out")"
        percent="$(jq -r .progress.percent "$out")"
        stage="$(jq -r .progress.stage "$out")"
        line="$(printf '    %3s%%  %-16s %s' "$percent" "$stage" "$status")"
        [ "$line" = "$last" ] || printf '%s\n' "$line"
        last="$line"
        case "$status" in
            completed) return 0 ;;
            failed | cancelled)
                jq . "$out" >&2
                die "job $job ended $status: $(jq -r '.error // "no error given"' "$out")"
                ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || die "job $job still $status after ${job_timeout}s"
        sleep 0.1
    done
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# job_secs FILE: seconds from created_at to finished_at in a status JSON,
# as the daemon measured them.
job_secs() {
    elapsed "$(date -d "$(jq -r .created_at "$1")" +%s.%N)" \
        "$(date -d "$(jq -r .finished_at "$1")" +%s.%N)"
}

say "provisioning vm-root-disk-1 (cache empty: download, verify, convert)"
t0="$(now)"
provision vm-root-disk-1 quickstart-vm-001
job1="$job_id"
printf '    job %s accepted (202)\n' "$job1"
wait_job "$job1" "$work/status-1.json"
t1="$(now)"
first_secs="$(elapsed "$t0" "$t1")"

say "provisioning vm-root-disk-2 from the same image (expect a cache hit)"
t2="$(now)"
provision vm-root-disk-2 quickstart-vm-002
job2="$job_id"
printf '    job %s accepted (202)\n' "$job2"
wait_job "$job2" "$work/status-2.json"
t3="$(now)"
second_secs="$(elapsed "$t2" "$t3")"

say "final status of the first job"
jq . "$work/status-1.json"
say "final status of the second job"
jq . "$work/status-2.json"

# ---------------------------------------------------------------- checks
say "checking the results"
[ "$(jq -r .cache_hit "$work/status-1.json")" = "false" ] \
    || die "the first job reports cache_hit true on an empty cache"
[ "$(jq -r .cache_hit "$work/status-2.json")" = "true" ] \
    || die "the second job is not a cache hit (cache_hit: $(jq -r .cache_hit "$work/status-2.json"))"
printf '    second job: cache_hit true\n'
for n in 1 2; do
    [ "$(jq -r .image_sha256 "$work/status-$n.json")" = "$image_sha" ] \
        || die "job $n reports image_sha256 $(jq -r .image_sha256 "$work/status-$n.json"), expected $image_sha"
    [ "$(jq -r .progress.percent "$work/status-$n.json")" = "100" ] \
        || die "job $n completed below 100 percent"
done
[ -f "$work/cache/$image_sha.img" ] || die "no cache entry $work/cache/$image_sha.img"
cmp -s "$work/cache/$image_sha.img" "$work/www/$image_name" \
    || die "the cache entry differs from the published image"
printf '    cache entry %s matches the published image\n' "cache/$image_sha.img"
for n in 1 2; do
    volume="$work/volumes/vm-root-disk-$n"
    [ -f "$volume" ] || die "volume $volume does not exist"
    [ "$(stat -c %s "$volume")" -eq $((volume_gb << 30)) ] \
        || die "volume $volume is $(stat -c %s "$volume") bytes, expected $((volume_gb << 30))"
    qemu-img compare -f raw -F raw "$fs_raw" "$volume" >/dev/null \
        || die "volume $volume does not hold the filesystem (qemu-img compare -f raw -F raw $fs_raw $volume)"
    printf '    %s: identical to %s (qemu-img compare)\n' "volumes/vm-root-disk-$n" "$(basename "$fs_raw")"
done

say "timing (daemon: created_at to finished_at; client: POST to seeing completed)"
printf '    first provision  (download + verify + convert): daemon %ss, client %ss\n' \
    "$(job_secs "$work/status-1.json")" "$first_secs"
printf '    second provision (cache hit + convert):         daemon %ss, client %ss\n' \
    "$(job_secs "$work/status-2.json")" "$second_secs"

say "stopping the daemon and the image server"
kill -TERM "$daemon_pid" && wait "$daemon_pid" 2>/dev/null || true
daemon_pid=""
kill -TERM "$http_pid" && wait "$http_pid" 2>/dev/null || true
http_pid=""

say "quick start passed; files are in $work"
