#!/bin/sh
# The checks of scripts/lvm-vm-test.sh, run inside the VM by its init with
# busybox sh. The real daemon (--backend lvm) runs on a volume group made
# on the VM's empty virtio disk and is driven over mutual TLS by its own
# `client` subcommand; busybox httpd serves the images on 127.0.0.1.
#
# Output contract with the host, one line each on the console:
#   PASS <check>             a check passed
#   FAIL <check>: <why>      a check failed
#   PASS lvm-vm              the last line of a run where nothing failed
#   ----- BEGIN FIXTURE <file> ----- … ----- END FIXTURE <file> -----
#                            real lvm2 output the host saves for unit tests
# Exit status 0 only when every check passed.
#
# The payload disk (/payload, read-only) holds: this script, the daemon
# binary, certs/ (ca, server and client certificates), images/ (src.qcow2,
# src.raw, slow.qcow2, bad.qcow2, each with a .sha256 sidecar) and
# facts.env (image sizes and digests computed on the host).

P=/payload
. "$P/facts.env"
BIN=$P/libvirt-volume-provisioner
VG=lvpvm
PORT=8443
IMAGES=http://127.0.0.1:8000
W=/tmp/lvpvm
mkdir -p "$W"
failures=0
daemon_pid=

now() { cut -d' ' -f1 /proc/uptime; }
step() { echo "[guest $(now)s] $*"; }
pass() { echo "PASS $1"; }
# fail CHECK WHY...: the words of WHY are joined with spaces.
fail() {
    check=$1
    shift
    echo "FAIL $check: $*"
    failures=$((failures + 1))
}

# ------------------------------------------------------------ helpers

lvp() {
    "$BIN" client --url "https://127.0.0.1:$PORT" --ca "$P/certs/ca.crt" \
        --cert "$P/certs/client.crt" --key "$P/certs/client.key" "$@"
}

# provision NAME IMAGE TYPE GIB: follows the job to its end. Leaves the
# final job JSON in $W/job.json, the client's stderr in $W/job.err, and the
# job id in $job; returns the client's exit status.
provision() {
    lvp provision --image-url "$IMAGES/$2" --image-type "$3" --volume-name "$1" \
        --volume-size-gb "$4" --wait >"$W/job.json" 2>"$W/job.err"
    rc=$?
    job=$(sed -n 's/^ *"job_id": "\([^"]*\)".*/\1/p' "$W/job.json")
    return $rc
}

# field NAME FILE: a string field of the pretty JSON the client prints.
field() { sed -n "s/^ *\"$1\": \"\\([^\"]*\\)\".*/\\1/p" "$2" | head -n 1; }

lv_exists() { lvs "$VG/$1" >/dev/null 2>&1; }
lv_field() { lvs --noheadings --nosuffix --units b -o "$2" "$VG/$1" 2>/dev/null | tr -d ' '; }
lv_count() { lvs --noheadings -o lv_name "$VG" 2>/dev/null | wc -l; }

# holds NAME IMAGE FORMAT: the LV starts with the image's disk bytes and
# reads as zeros after them. Two independent looks: the SHA-256 of the
# image-sized prefix against the host's digest of the raw disk, and
# qemu-img compare, which also requires the larger side's extra bytes to
# be zeros. Prints why not, on failure.
holds() {
    dev=/dev/$VG/$1
    case $2 in
        src.qcow2) len=$SRC_QCOW2_DISK_BYTES want=$SRC_QCOW2_DISK_SHA256 ;;
        src.raw) len=$SRC_RAW_BYTES want=$SRC_RAW_SHA256 ;;
        *) echo "holds: no facts for $2"; return 1 ;;
    esac
    echo "[guest $(now)s] holds $1 $2: sha256 of the first $len bytes" >&2
    got=$(head -c "$len" "$dev" | sha256sum | cut -d' ' -f1)
    echo "[guest $(now)s] holds $1 $2: qemu-img compare" >&2
    if [ "$got" != "$want" ]; then
        echo "the first $len bytes of $dev hash to $got, the image's disk to $want"
        return 1
    fi
    if ! out=$(qemu-img compare -f "$3" -F raw "$P/images/$2" "$dev" 2>&1); then
        echo "qemu-img compare: $(echo "$out" | tr '\n' ' ')"
        return 1
    fi
    return 0
}

# fingerprint NAME: the SHA-256 of an LV's first 4 MiB.
fingerprint() { head -c 4194304 "/dev/$VG/$1" | sha256sum | cut -d' ' -f1; }

# mark NAME: fills an LV's first 4 MiB with random bytes, so a write by
# the daemon would show.
mark() { head -c 4194304 /dev/urandom >"/dev/$VG/$1" && sync; }

start_daemon() {
    "$BIN" serve --listen "127.0.0.1:$PORT" \
        --tls-cert "$P/certs/server.crt" --tls-key "$P/certs/server.key" \
        --client-ca "$P/certs/ca.crt" --backend lvm --volume-group "$VG" \
        --cache-dir "$W/cache" --state-dir "$W/state" --workers 2 "$@" \
        >>"$W/daemon.log" 2>&1 &
    daemon_pid=$!
    n=0
    while [ "$n" -lt 120 ]; do
        if lvp jobs >/dev/null 2>&1; then return 0; fi
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.5
        n=$((n + 1))
    done
    echo "FAIL daemon-start: the daemon did not answer (see its log below)"
    failures=$((failures + 1))
    return 1
}

stop_daemon() {
    [ -n "$daemon_pid" ] || return 0
    kill -TERM "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
    daemon_pid=
}

fixture() {
    echo "----- BEGIN FIXTURE $1 -----"
    cat
    echo "----- END FIXTURE $1 -----"
}

finish() {
    stop_daemon
    if [ "$failures" -eq 0 ]; then
        step "all checks passed"
        echo "PASS lvm-vm"
        exit 0
    fi
    echo "----- daemon log -----"
    cat "$W/daemon.log" 2>/dev/null
    echo "----- end of daemon log -----"
    echo "FAIL lvm-vm: $failures check(s) failed"
    exit 1
}

# ------------------------------------------------------------ set-up

step "lvm $(lvm version | sed -n 's/.*LVM version: *//p'), $(qemu-img --version | head -n 1)"
pv=
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = lvpvm-pv ] && pv=/dev/${d##*/}
done
if [ -z "$pv" ] || ! pvcreate -q -y "$pv" || ! vgcreate -q "$VG" "$pv"; then
    fail setup "cannot make volume group $VG on the virtio disk with serial lvpvm-pv ($pv)"
    finish
fi
ip link set lo up
httpd -p 127.0.0.1:8000 -h "$P/images" || { fail setup "busybox httpd did not start"; finish; }

# The host filled the start of the PV with 0xAA bytes. An LV created there
# now would see them, so "the rest of the LV reads as zeros" below is a
# real test of the daemon's zeroing and not of a blank disk. Prove it: the
# first 1 GiB LV's tail must show the junk.
lvcreate -q -y -n probe -L 1g "$VG" >/dev/null
junk=$(dd if="/dev/$VG/probe" bs=1M skip=900 count=1 2>/dev/null | tr -cd '\252' | wc -c)
lvremove -q -y "$VG/probe" >/dev/null
if [ "$junk" -eq 1048576 ]; then
    pass junk-under-new-lvs
else
    fail junk-under-new-lvs "a new LV's tail is not the host's 0xAA fill (only $junk of 1 MiB)"
fi

start_daemon || finish

# ------------------------------------------------------------ plain LVs

step "new LV from qcow2"
if ! provision vm-qcow src.qcow2 qcow2 1; then
    fail qcow2-new "job did not complete: $(cat "$W/job.err")"
elif ! why=$(holds vm-qcow src.qcow2 qcow2); then
    fail qcow2-new "$why"
else
    pass qcow2-new
fi
qcow_job=$job

# has_tags NAME JOB: NAME carries the daemon's tag and JOB's.
has_tags() {
    case ",$(lv_field "$1" lv_tags)," in *,libvirt-volume-provisioner,*) ;; *) return 1 ;; esac
    case ",$(lv_field "$1" lv_tags)," in *",lvp-job-$2,"*) return 0 ;; esac
    return 1
}
if [ -n "$qcow_job" ] && has_tags vm-qcow "$qcow_job"; then
    pass tags
else
    fail tags "vm-qcow carries tags '$(lv_field vm-qcow lv_tags)', wanted" \
        "libvirt-volume-provisioner and lvp-job-$qcow_job"
fi

step "new LV from raw"
if ! provision vm-raw src.raw raw 1; then
    fail raw-new "job did not complete: $(cat "$W/job.err")"
elif ! why=$(holds vm-raw src.raw raw); then
    fail raw-new "$why"
else
    pass raw-new
fi

step "reprovision: the same LV, other content"
uuid=$(lv_field vm-qcow lv_uuid)
if ! provision vm-qcow src.raw raw 1; then
    fail reprovision "job did not complete: $(cat "$W/job.err")"
elif [ "$(lv_field vm-qcow lv_uuid)" != "$uuid" ]; then
    fail reprovision "vm-qcow was replaced, not reused (uuid $uuid became $(lv_field vm-qcow lv_uuid))"
elif ! why=$(holds vm-qcow src.raw raw); then
    fail reprovision "$why"
else
    pass reprovision
fi

step "reuse within the 5% tolerance"
lvcreate -q -y -n vm-near -L 1000m "$VG" >/dev/null
mark vm-near
if ! provision vm-near src.qcow2 qcow2 1; then
    fail reuse-within-tolerance "a 1000 MiB LV for a 1 GiB request: $(cat "$W/job.err")"
elif [ "$(lv_field vm-near lv_size)" != 1048576000 ]; then
    fail reuse-within-tolerance "vm-near changed size to $(lv_field vm-near lv_size)"
elif ! why=$(holds vm-near src.qcow2 qcow2); then
    fail reuse-within-tolerance "$why"
else
    pass reuse-within-tolerance
fi

step "wrong size"
lvcreate -q -y -n vm-small -L 512m "$VG" >/dev/null
mark vm-small
before=$(fingerprint vm-small)
if provision vm-small src.qcow2 qcow2 1; then
    fail wrong-size-refused "a 512 MiB LV was accepted for a 1 GiB request"
elif ! grep -q "more than 5% away" "$W/job.err"; then
    fail wrong-size-refused "unclear error: $(cat "$W/job.err")"
elif [ "$(lv_field vm-small lv_size)" != 536870912 ] ||
    [ "$(fingerprint vm-small)" != "$before" ]; then
    fail wrong-size-refused "vm-small was changed"
else
    pass wrong-size-refused
fi

step "an LV held open"
lvcreate -q -y -n vm-open -L 1g "$VG" >/dev/null
mark vm-open
before=$(fingerprint vm-open)
# As a running VM would: a process keeps the device open.
sleep 600 3<"/dev/$VG/vm-open" &
holder=$!
sleep 0.3
attr=$(lv_field vm-open lv_attr)
lvs --reportformat json --units b --nosuffix \
    -o lv_name,vg_name,lv_size,lv_attr,lv_tags "$VG" | fixture lvs-open-real.json
case $attr in
    ?????o*)
        if provision vm-open src.qcow2 qcow2 1; then
            fail open-lv-refused "the daemon wrote an open LV"
        elif ! grep -q "is open" "$W/job.err"; then
            fail open-lv-refused "unclear error: $(cat "$W/job.err")"
        elif ! lv_exists vm-open || [ "$(fingerprint vm-open)" != "$before" ]; then
            fail open-lv-refused "vm-open was changed or removed"
        else
            pass open-lv-refused
        fi
        ;;
    *) fail open-lv-refused "lvs does not show vm-open as open (attr $attr): cannot test" ;;
esac
kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null

step "a job that fails while writing"
if provision vm-fail bad.qcow2 qcow2 1; then
    fail failed-job-removes-its-lv "the damaged image was written without error"
elif [ "$(field status "$W/job.json")" != failed ]; then
    fail failed-job-removes-its-lv "job ended $(field status "$W/job.json"), not failed"
elif ! grep -q "created logical volume $VG/vm-fail" "$W/daemon.log"; then
    fail failed-job-removes-its-lv "the job failed before it created vm-fail: $(cat "$W/job.err")"
elif lv_exists vm-fail; then
    fail failed-job-removes-its-lv "vm-fail is still there"
else
    pass failed-job-removes-its-lv
fi
lvcreate -q -y -n vm-keep -L 1g "$VG" >/dev/null
if provision vm-keep bad.qcow2 qcow2 1; then
    fail failed-job-keeps-other-lv "the damaged image was written without error"
elif ! lv_exists vm-keep; then
    fail failed-job-keeps-other-lv "the daemon removed vm-keep, which it did not create"
elif [ -n "$(lv_field vm-keep lv_tags)" ]; then
    fail failed-job-keeps-other-lv "vm-keep got tags $(lv_field vm-keep lv_tags)"
else
    pass failed-job-keeps-other-lv
fi

# start_slow_job NAME: submits slow.qcow2 into NAME and returns once the
# job is converting (so its LV exists); the job id is left in $job. Prints
# why not, on failure.
start_slow_job() {
    job=$(lvp provision --image-url "$IMAGES/slow.qcow2" --image-type qcow2 \
        --volume-name "$1" --volume-size-gb 1 2>"$W/job.err")
    [ -n "$job" ] || { echo "submission failed: $(cat "$W/job.err")"; return 1; }
    n=0
    stage=
    while [ "$n" -lt 600 ]; do
        lvp status "$job" >"$W/job.json" 2>/dev/null
        stage=$(field stage "$W/job.json")
        [ "$stage" = converting ] && return 0
        case $(field status "$W/job.json") in completed | failed | cancelled) break ;; esac
        sleep 0.2
        n=$((n + 1))
    done
    echo "the job never showed stage converting (status $(field status "$W/job.json")," \
        "stage $stage)"
    return 1
}

# cancel_while_writing NAME: starts slow.qcow2 into NAME, cancels it once
# it is converting, and leaves the job's last status in $W/job.json.
cancel_while_writing() {
    start_slow_job "$1" || return 1
    lvp cancel "$job" 2>"$W/job.err" || { echo "cancel refused: $(cat "$W/job.err")"; return 1; }
    lvp status "$job" --wait >"$W/job.json" 2>"$W/job.err"
    if [ "$(field status "$W/job.json")" != cancelled ]; then
        echo "the job ended $(field status "$W/job.json"), not cancelled (make slow.qcow2 slower?)"
        return 1
    fi
    return 0
}

step "a job cancelled while it writes"
if ! why=$(cancel_while_writing vm-cancel); then
    fail cancel-removes-its-lv "$why"
elif ! grep -q "created logical volume $VG/vm-cancel" "$W/daemon.log"; then
    fail cancel-removes-its-lv "the job never created vm-cancel"
elif lv_exists vm-cancel; then
    fail cancel-removes-its-lv "vm-cancel is still there"
else
    pass cancel-removes-its-lv
fi
lvcreate -q -y -n vm-keep2 -L 1g "$VG" >/dev/null
if ! why=$(cancel_while_writing vm-keep2); then
    fail cancel-keeps-other-lv "$why"
elif ! lv_exists vm-keep2; then
    fail cancel-keeps-other-lv "the daemon removed vm-keep2, which it did not create"
else
    pass cancel-keeps-other-lv
fi

step "names LVM reserves or rejects"
count=$(lv_count)
jobs_before=$(lvp jobs | wc -l)
log_before=$(wc -l <"$W/daemon.log")
bad_names=
for name in snapshot1 x_tmeta pvmove0 -bad lvol_rimage_0 .hidden; do
    if lvp provision --image-url "$IMAGES/src.qcow2" --volume-name "$name" \
        --volume-size-gb 1 >/dev/null 2>"$W/job.err"; then
        bad_names="$bad_names $name(accepted)"
    elif ! grep -q "invalid_request" "$W/job.err"; then
        bad_names="$bad_names $name($(cat "$W/job.err"))"
    fi
done
if [ -n "$bad_names" ]; then
    fail reserved-names-refused "not refused with 400 invalid_request:$bad_names"
elif [ "$(lv_count)" != "$count" ] || [ "$(lvp jobs | wc -l)" != "$jobs_before" ]; then
    fail reserved-names-refused "a job or an LV appeared"
elif tail -n "+$((log_before + 1))" "$W/daemon.log" | grep -q "logical volume $VG/"; then
    fail reserved-names-refused "the daemon tried lvcreate"
else
    pass reserved-names-refused
fi
stop_daemon

# ------------------------------------------------------------ thin pool

step "thin pools"
# Room for two pools: the LVs only the checks above needed go.
lvremove -q -y "$VG/vm-near" "$VG/vm-small" "$VG/vm-open" "$VG/vm-keep" "$VG/vm-keep2" >/dev/null
lvcreate -q -y --type thin-pool -L 1g -n pool "$VG" >/dev/null
lvcreate -q -y --type thin-pool -L 1200m --zero n -n pool-nz "$VG" >/dev/null
# The exact report LvmBackend reads at start (pool_report_argv).
lvs --reportformat json --units b --nosuffix -o lv_name,segtype,zero "$VG" |
    fixture lvs-pools.json

# --thin-pool must name an existing thin pool; serve refuses at start.
refused=0
for pool in nosuch vm-raw; do
    out=$(timeout 60 "$BIN" serve --listen "127.0.0.1:$PORT" \
        --tls-cert "$P/certs/server.crt" --tls-key "$P/certs/server.key" \
        --client-ca "$P/certs/ca.crt" --backend lvm --volume-group "$VG" \
        --cache-dir "$W/cache" --state-dir "$W/state" --thin-pool "$pool" 2>&1)
    rc=$?
    case "$rc:$pool:$out" in
        "2:nosuch:"*"--thin-pool nosuch: volume group $VG has no logical volume nosuch"*)
            refused=$((refused + 1)) ;;
        "2:vm-raw:"*"--thin-pool vm-raw: $VG/vm-raw is a linear logical volume, not a thin pool"*)
            refused=$((refused + 1)) ;;
        *) fail thin-pool-checked-at-start "--thin-pool $pool: exit $rc: $out" ;;
    esac
done
[ "$refused" -eq 2 ] && pass thin-pool-checked-at-start

# `check` judges the pool the same way, and warns about one that does not
# zero new chunks (a new thin LV in it would be written in full).
check_thin() {
    "$BIN" check -- --listen "127.0.0.1:$PORT" \
        --tls-cert "$P/certs/server.crt" --tls-key "$P/certs/server.key" \
        --client-ca "$P/certs/ca.crt" --backend lvm --volume-group "$VG" \
        --cache-dir "$W/cache" --state-dir "$W/state" --thin-pool "$1" >"$W/check.out" 2>&1
}
if ! check_thin pool || ! grep -qx "ok: --thin-pool pool is a thin pool that zeroes new chunks" "$W/check.out"; then
    fail check-judges-thin-pool "check --thin-pool pool: $(cat "$W/check.out")"
elif ! check_thin pool-nz || ! grep -q "^warn: --thin-pool pool-nz: $VG/pool-nz does not zero new chunks" "$W/check.out"; then
    fail check-judges-thin-pool "check --thin-pool pool-nz: $(cat "$W/check.out")"
elif check_thin vm-raw || ! grep -q "^error: --thin-pool vm-raw: .* not a thin pool" "$W/check.out"; then
    fail check-judges-thin-pool "check --thin-pool vm-raw: $(cat "$W/check.out")"
else
    pass check-judges-thin-pool
fi

start_daemon --thin-pool pool || finish

step "thin LV from a qcow2 with a large zero region"
# sparse_ok NAME MAXBYTES: the thin LV uses at most MAXBYTES of the pool.
sparse_ok() {
    pct=$(lv_field "$1" data_percent)
    size=$(lv_field "$1" lv_size)
    if [ -z "$pct" ] || [ -z "$size" ]; then
        echo "$1: lvs shows no data_percent or size"
        return 1
    fi
    used=$(awk -v p="$pct" -v s="$size" 'BEGIN { printf "%d", p * s / 100 }')
    echo "$1: $pct% of $size bytes = $used bytes in the pool (at most $2 allowed)"
    [ "$used" -le "$2" ]
}
if ! provision vm-thin src.qcow2 qcow2 2; then
    fail thin-stays-sparse "job did not complete: $(cat "$W/job.err")"
elif [ "$(lv_field vm-thin segtype)" != thin ] || [ "$(lv_field vm-thin pool_lv)" != pool ]; then
    fail thin-stays-sparse "vm-thin is $(lv_field vm-thin segtype) in '$(lv_field vm-thin pool_lv)', not thin in pool"
elif ! why=$(holds vm-thin src.qcow2 qcow2); then
    fail thin-stays-sparse "$why"
elif ! why=$(sparse_ok vm-thin "$SRC_QCOW2_MAX_THIN_BYTES"); then
    fail thin-stays-sparse "$why"
else
    step "$why"
    pass thin-stays-sparse
fi
thin_job=$job
if [ -n "$thin_job" ] && has_tags vm-thin "$thin_job"; then
    pass thin-tags
else
    fail thin-tags "vm-thin carries tags '$(lv_field vm-thin lv_tags)', wanted ours and lvp-job-$thin_job"
fi
if ! provision vm-thin-raw src.raw raw 1; then
    fail thin-raw-stays-sparse "job did not complete: $(cat "$W/job.err")"
elif ! why=$(holds vm-thin-raw src.raw raw); then
    fail thin-raw-stays-sparse "$why"
elif ! why=$(sparse_ok vm-thin-raw "$SRC_RAW_MAX_THIN_BYTES"); then
    fail thin-raw-stays-sparse "$why"
else
    step "$why"
    pass thin-raw-stays-sparse
fi
if provision vm-thin-fail bad.qcow2 qcow2 1; then
    fail thin-failed-job-removes-its-lv "the damaged image was written without error"
elif ! grep -q "created logical volume $VG/vm-thin-fail" "$W/daemon.log"; then
    fail thin-failed-job-removes-its-lv "the job failed before it created vm-thin-fail: $(cat "$W/job.err")"
elif lv_exists vm-thin-fail; then
    fail thin-failed-job-removes-its-lv "vm-thin-fail is still there"
else
    pass thin-failed-job-removes-its-lv
fi
# A daemon killed mid-write (a crash, an OOM kill): after the restart the
# journal marks the job failed, and the LV it created, which carries its
# job tag, is removed before the daemon serves again.
step "a daemon killed while it writes, then restarted"
if ! start_slow_job vm-crash >"$W/why"; then
    fail restart-removes-half-written-lv "$(cat "$W/why")"
else
    kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null
    daemon_pid=
    if ! lv_exists vm-crash; then
        fail restart-removes-half-written-lv "vm-crash did not exist when the daemon was killed"
    elif start_daemon --thin-pool pool; then
        lvp status "$job" >"$W/job.json" 2>"$W/job.err"
        if [ "$(field status "$W/job.json")" != failed ]; then
            fail restart-removes-half-written-lv \
                "after the restart job $job is '$(field status "$W/job.json")', not failed"
        elif lv_exists vm-crash; then
            fail restart-removes-half-written-lv "vm-crash is still there after the restart"
        else
            pass restart-removes-half-written-lv
        fi
    fi
fi

stop_daemon

# A pool that does not zero new chunks: a fresh thin LV in it must not be
# taken to read as zeros, so the daemon writes the image's zeros and the
# tail itself. The content must be right, and the LV fully provisioned.
step "thin LV in a pool without zeroing"
if start_daemon --thin-pool pool-nz; then
    if ! provision vm-nz src.qcow2 qcow2 1; then
        fail thin-nonzeroing-pool-written-in-full "job did not complete: $(cat "$W/job.err")"
    elif ! why=$(holds vm-nz src.qcow2 qcow2); then
        fail thin-nonzeroing-pool-written-in-full "$why"
    else
        pct=$(lv_field vm-nz data_percent)
        step "vm-nz: $pct% of the thin LV provisioned"
        if awk -v p="$pct" 'BEGIN { exit !(p >= 99) }'; then
            pass thin-nonzeroing-pool-written-in-full
        else
            fail thin-nonzeroing-pool-written-in-full "only $pct% provisioned: zeros were skipped"
        fi
    fi
fi

# The exact report LvmBackend::find reads (lvs_argv), with thin LVs in it,
# and the pool's fill for the record.
lvs --reportformat json --units b --nosuffix \
    -o lv_name,vg_name,lv_size,lv_attr,lv_tags "$VG" | fixture lvs-thin.json
lvs --reportformat json --units b --nosuffix \
    -o lv_name,segtype,pool_lv,lv_size,data_percent,zero "$VG" | fixture lvs-thin-usage.json
lvm version | fixture lvm-version.txt

finish
