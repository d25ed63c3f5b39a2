#!/usr/bin/env bash
# Usage: scripts/lvm-vm-test.sh
#
# Runs the real daemon with --backend lvm against real LVM, inside a small
# qemu VM, because this machine's kernel has no device-mapper (issue 7).
#
#   1. installs what the host lacks with apt-get: lvm2,
#      thin-provisioning-tools, e2fsprogs, qemu-utils, openssl;
#   2. downloads (never installs) Debian's current kernel, busybox-static,
#      and qemu-system-x86 with the dependencies the host lacks, and
#      unpacks them under the work directory. Installing qemu-system-x86
#      would remove a newer qemu-utils, so it is only extracted;
#   3. takes the daemon from target/release (cargo build --release when it
#      is missing);
#   4. makes the images (a qcow2 that is mostly one large zero region, a
#      raw image, a slow-to-convert compressed qcow2 for cancelling, and a
#      qcow2 whose compressed data is damaged so that it passes inspection
#      and fails while writing), their .sha256 sidecars, and certificates
#      for 127.0.0.1 (scripts/make-certs.sh);
#   5. builds an initramfs (busybox, the host's lvm2, dmsetup,
#      thin_check and qemu-img with their libraries, the kernel's
#      device-mapper and virtio modules, tests/lvm-vm/init and lvm.conf)
#      and an ext4 payload disk (the daemon, images, certificates and
#      tests/lvm-vm/guest-test.sh);
#   6. boots it under qemu's software emulation (TCG), without network,
#      next to an empty 8 GiB disk for the volume group, and reads the
#      verdict from the serial console.
#
# The run passes only when the console shows a PASS line for every check
# this script expects (see EXPECTED below), no FAIL line, the final
# "PASS lvm-vm", no kernel panic, and qemu ends before the timeout. On a
# failure the console log is printed again (the daemon's log is in it).
# Real `lvs --reportformat json` output the guest prints is saved under
# $work/fixtures for the unit tests in src/volume/lvm.rs.
#
# If the packages for the VM cannot be fetched, the script says so loudly
# and exits 1 when CI=true, 0 (skipped) otherwise.
#
# Environment: LVM_VM_DIR (work directory, default target/lvm-vm; downloads
# are kept there between runs), LVM_VM_TIMEOUT (seconds for the VM,
# default 600), LVM_VM_MEM (MiB, default 1536), LVM_VM_SMP (default 2),
# LVM_VM_APPEND (more kernel command line words, e.g. loglevel=7).
# Needs root (apt-get, and the host's lvm2 binaries are copied as they
# are). Exit status: 0 all checks passed (or skipped outside CI), 1 a check
# failed or the VM did not finish, 2 a set-up step failed.

set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
export PATH="$PATH:/usr/sbin:/sbin"
work=${LVM_VM_DIR:-$repo/target/lvm-vm}
vm_timeout=${LVM_VM_TIMEOUT:-600}
vm_mem=${LVM_VM_MEM:-1536}
vm_smp=${LVM_VM_SMP:-2}
vm_append=${LVM_VM_APPEND:-}
bin=${CARGO_TARGET_DIR:-$repo/target}/release/libvirt-volume-provisioner
guest_src=$repo/tests/lvm-vm

# Every check guest-test.sh runs; a check that never reports fails the run.
EXPECTED="junk-under-new-lvs qcow2-new tags raw-new reprovision reuse-within-tolerance
wrong-size-refused open-lv-refused failed-job-removes-its-lv failed-job-keeps-other-lv
cancel-removes-its-lv cancel-keeps-other-lv reserved-names-refused
thin-pool-checked-at-start check-judges-thin-pool thin-stays-sparse thin-tags thin-raw-stays-sparse
thin-failed-job-removes-its-lv restart-removes-half-written-lv
thin-nonzeroing-pool-written-in-full"

started=$(date +%s)
say() { printf '==> lvm-vm [%ss] %s\n' "$(($(date +%s) - started))" "$*"; }
die() {
    printf 'lvm-vm-test: ERROR: %s\n' "$*" >&2
    exit 2
}

# The VM's packages could not be had: loud, and fatal in CI.
unavailable() {
    {
        echo
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        echo "!!! LVM VM TEST NOT RUN: $*"
        echo "!!! The LVM backend was NOT tested against real LVM."
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    } >&2
    if [ "${CI:-}" = true ]; then
        echo "lvm-vm-test: CI=true, so this is a failure" >&2
        exit 1
    fi
    echo "lvm-vm-test: skipped (set CI=true to make this a failure)" >&2
    exit 0
}

[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages with apt-get"
mkdir -p "$work"

# ---------------------------------------------------------------- host tools
apt_fresh=0
apt_refresh() {
    if [ "$apt_fresh" -eq 0 ]; then
        apt-get update -qq || return 1
        apt_fresh=1
    fi
}
declare -A tool_pkg=([lvm]=lvm2 [pdata_tools]=thin-provisioning-tools [mkfs.ext4]=e2fsprogs
    [qemu-img]=qemu-utils [openssl]=openssl [dpkg-deb]=dpkg)
missing=()
for tool in "${!tool_pkg[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${tool_pkg[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_refresh || unavailable "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || unavailable "apt-get install ${missing[*]} failed"
fi

# ------------------------------------------------- VM packages (not installed)
debs=$work/debs
mkdir -p "$debs"
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ && !k { k = $2 } END { print k }'
}
# (`|| true`: under pipefail a failing apt would end the script here,
# before it could say why.)
kpkg=$(kernel_pkg) || true
if [ -z "$kpkg" ]; then
    apt_refresh || unavailable "apt-get update failed"
    kpkg=$(kernel_pkg) || true
fi
[ -n "$kpkg" ] || unavailable "apt cannot resolve linux-image-amd64 to a kernel package"
# What installing qemu-system-x86 would add to this host; only downloaded.
qpkgs=$(apt-get install -s --no-install-recommends qemu-system-x86 2>/dev/null |
    awk '/^Inst / { print $2 }') || true
[ -n "$qpkgs" ] || qpkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios"
# (read -d '': the whole list, one package a line or not; it ends at EOF.)
read -r -d '' -a want_pkgs <<<"$kpkg busybox-static $qpkgs" || true
# The .deb file names apt would fetch now; downloads already here are kept.
# (apt-get download --print-uris prints 'URI' FILE SIZE HASH, one a line,
# and nothing for a file already in the current directory: so it runs in
# an empty one.)
uris() {
    mkdir -p "$work/empty"
    (cd "$work/empty" && apt-get download --print-uris "${want_pkgs[@]}" 2>/dev/null)
}
want_files=$(uris | awk '{ print $2 }') || true
if [ -z "$want_files" ]; then
    apt_refresh || unavailable "apt-get update failed"
    want_files=$(uris | awk '{ print $2 }') || true
fi
[ -n "$want_files" ] || unavailable "apt cannot find the packages ${want_pkgs[*]}"
fetch=()
for f in $want_files; do
    [ -s "$debs/$f" ] || fetch+=("$f")
done
if [ "${#fetch[@]}" -gt 0 ]; then
    say "downloading ${#fetch[@]} packages for the VM (kernel $kpkg, busybox, qemu)"
    if ! (cd "$debs" && apt-get download -q "${want_pkgs[@]}" >/dev/null 2>&1); then
        apt_refresh || unavailable "apt-get update failed"
        (cd "$debs" && apt-get download -q "${want_pkgs[@]}" >/dev/null 2>&1) \
            || unavailable "apt-get download ${want_pkgs[*]} failed"
    fi
fi
for f in $want_files; do
    [ -s "$debs/$f" ] || unavailable "package file $f is missing after download"
done

# Unpacked trees are reused while the package set is the same.
stamp=$(echo "$want_files" | sort | sha256sum | cut -c1-16)
if [ "$(cat "$work/unpacked.stamp" 2>/dev/null)" != "$stamp" ]; then
    say "unpacking the kernel, busybox and qemu"
    rm -rf "$work/kroot" "$work/qroot" "$work/unpacked.stamp"
    mkdir -p "$work/kroot" "$work/qroot"
    for f in $want_files; do
        case $f in
            linux-image-*) dpkg-deb -x "$debs/$f" "$work/kroot" ;;
            *) dpkg-deb -x "$debs/$f" "$work/qroot" ;;
        esac
    done
    busybox_bin=$work/qroot/bin/busybox
    kver=$(basename "$(ls "$work"/kroot/boot/vmlinuz-*)" | sed 's/^vmlinuz-//')
    # The .deb ships no modules.dep (depmod runs at install time), and the
    # host may have no kmod: busybox's depmod writes it.
    "$busybox_bin" depmod -b "$work/kroot" "$kver"
    echo "$stamp" >"$work/unpacked.stamp"
fi
busybox_bin=$work/qroot/bin/busybox
qemu=$work/qroot/usr/bin/qemu-system-x86_64
vmlinuz=$(find "$work/kroot/boot" -name 'vmlinuz-*' -print -quit 2>/dev/null)
[ -x "$busybox_bin" ] || die "busybox-static did not unpack to $busybox_bin"
[ -x "$qemu" ] || die "qemu-system-x86 did not unpack to $qemu"
[ -n "$vmlinuz" ] || die "no kernel under $work/kroot/boot"
kver=$(basename "$vmlinuz" | sed 's/^vmlinuz-//')
kmods=$work/kroot/lib/modules/$kver

# ------------------------------------------------------------------- daemon
if [ ! -x "$bin" ]; then
    say "building the daemon (cargo build --release)"
    cargo build --release || die "cargo build --release failed"
fi

# ------------------------------------------------------------------- images
say "making images and certificates"
run_dir=$work/run
rm -rf "$run_dir"
payload=$run_dir/payload
mkdir -p "$payload/images" "$payload/certs"
img=$payload/images
mib=$((1 << 20))
# src: 4 MiB of random data, a 56 MiB zero region, 4 MiB of random data.
# As qcow2 the zero region is unallocated: a thin LV written from it must
# stay sparse. (Small, because busybox sha256sum in the VM is slow.)
src_disk=$run_dir/src-disk.raw
head -c $((4 * mib)) /dev/urandom >"$src_disk"
truncate -s $((60 * mib)) "$src_disk"
head -c $((4 * mib)) /dev/urandom >>"$src_disk"
qemu-img convert -q -f raw -O qcow2 "$src_disk" "$img/src.qcow2"
# A raw image with a 40 MiB zero region between 4 MiB of data at each end.
# Shorter than src: reprovisioning an LV that held src must zero the rest.
head -c $((4 * mib)) /dev/urandom >"$img/src.raw"
truncate -s $((44 * mib)) "$img/src.raw"
head -c $((4 * mib)) /dev/urandom >>"$img/src.raw"
# slow: about 194 MiB of random base64 text, compressed. Inflating it under
# software emulation takes long enough to cancel the job mid-write.
head -c $((144 * mib)) /dev/urandom | base64 -w 76 >"$run_dir/slow.raw"
qemu-img convert -q -c -f raw -O qcow2 "$run_dir/slow.raw" "$img/slow.qcow2"
rm -f "$run_dir/slow.raw"
# bad: a compressed qcow2 whose first compressed cluster is damaged.
# Headers, tables and `qemu-img check` are all fine, so the job passes
# inspecting, creates its LV and fails in converting.
bad=$img/bad.qcow2
{ yes "line of easily compressed text" || true; } | head -c $((4 * mib)) >"$run_dir/bad.raw"
qemu-img convert -q -c -f raw -O qcow2 "$run_dir/bad.raw" "$bad"
be64() { od -An -t u8 --endian=big -j "$1" -N 8 "$bad" | tr -d ' '; }
l1=$(be64 40)
l2=$(($(be64 "$l1") & 0x00fffffffffffe00))
entry=$(be64 "$l2")
(((entry >> 62) & 1)) || die "bad.qcow2: the first cluster is not compressed"
# With 64 KiB clusters, a compressed entry's host offset is its low 54 bits.
host_off=$((entry & ((1 << 54) - 1)))
head -c 64 /dev/zero | tr '\0' '\377' | dd of="$bad" bs=1 seek="$host_off" conv=notrunc status=none
qemu-img check -q -f qcow2 "$bad" || die "bad.qcow2 no longer passes qemu-img check"
for f in "$img"/*; do
    sha256sum "$f" | cut -d' ' -f1 >"$f.sha256"
done
# What the guest compares the LVs against; thin LVs may use the image's
# 8 MiB of data plus 4 MiB for chunk rounding, far below the virtual sizes.
cat >"$payload/facts.env" <<EOF
SRC_QCOW2_DISK_BYTES=$(stat -c %s "$src_disk")
SRC_QCOW2_DISK_SHA256=$(sha256sum "$src_disk" | cut -d' ' -f1)
SRC_QCOW2_MAX_THIN_BYTES=$((12 * mib))
SRC_RAW_BYTES=$(stat -c %s "$img/src.raw")
SRC_RAW_SHA256=$(cut -d' ' -f1 "$img/src.raw.sha256")
SRC_RAW_MAX_THIN_BYTES=$((12 * mib))
EOF
rm -f "$src_disk" "$run_dir/bad.raw"
scripts/make-certs.sh localhost "$payload/certs" >/dev/null
install -m 0755 "$bin" "$payload/libvirt-volume-provisioner"
install -m 0755 "$guest_src/guest-test.sh" "$payload/guest-test.sh"

# ---------------------------------------------------------------- initramfs
say "building the initramfs (kernel $kver)"
root=$run_dir/initramfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/lvm,proc,sys,dev,run,tmp,payload}
cp "$busybox_bin" "$root/bin/busybox"
install -m 0755 "$guest_src/init" "$root/init"
cp "$guest_src/lvm.conf" "$root/etc/lvm/lvm.conf"
# libs_of FILE: the shared libraries ldd lists for FILE, at the same paths.
libs_of() {
    local f=$1 lib
    for lib in $(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
# with_libs FILE: FILE itself too.
with_libs() {
    mkdir -p "$root$(dirname "$1")"
    cp -L "$1" "$root$1"
    libs_of "$1"
}
lvm_bin=$(command -v lvm)
with_libs "$lvm_bin"
for name in lvs vgs pvs lvcreate lvremove lvchange vgcreate pvcreate vgchange lvextend; do
    ln -sf "$(basename "$lvm_bin")" "$root$(dirname "$lvm_bin")/$name"
done
with_libs "$(command -v dmsetup)"
pdata=$(command -v pdata_tools)
with_libs "$pdata"
for name in thin_check thin_dump thin_repair thin_restore; do
    ln -sf pdata_tools "$root$(dirname "$pdata")/$name"
done
qemu_img=$(readlink -f "$(command -v qemu-img)")
with_libs "$qemu_img"
[ -e "$root/usr/bin/qemu-img" ] || ln -sf "$qemu_img" "$root/usr/bin/qemu-img"
# The daemon itself travels on the payload disk.
libs_of "$bin"
# glibc loads libgcc_s at run time (thread cancellation, unwinding).
# (awk reads to the end: a reader that quits early gets ldconfig killed by
# SIGPIPE, which pipefail and set -e turn into a silent exit 141.)
libgcc=$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ && !l { l = $NF } END { print l }')
[ -n "$libgcc" ] && { mkdir -p "$root$(dirname "$libgcc")"; cp -L "$libgcc" "$root$libgcc"; }
# Kernel modules and everything they depend on, from modules.dep.
declare -A have_mod=()
todo=()
for m in virtio_pci virtio_blk crc32c_generic dm-mod dm-thin-pool ext4; do
    p=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$kmods/modules.dep" | cut -d: -f1)
    [ -n "$p" ] || die "module $m is not in $kmods/modules.dep"
    todo+=("$p")
done
while [ "${#todo[@]}" -gt 0 ]; do
    p=${todo[0]}
    todo=("${todo[@]:1}")
    [ -z "${have_mod[$p]:-}" ] || continue
    have_mod[$p]=1
    mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
    cp "$kmods/$p" "$root/lib/modules/$kver/$p"
    read -r -a deps <<<"$(grep -E "^$p:" "$kmods/modules.dep" | cut -d: -f2-)"
    todo+=("${deps[@]}")
done
cp "$kmods"/modules.{dep,alias,symbols,builtin,order} "$root/lib/modules/$kver/"
(cd "$root" && find . | "$busybox_bin" cpio -o -H newc 2>/dev/null) | gzip -1 >"$run_dir/initramfs.gz"

# ------------------------------------------------------------------- disks
# The payload as an ext4 image built from the directory (no loop device).
payload_mb=$(($(du -sm "$payload" | cut -f1) + 64))
truncate -s "${payload_mb}M" "$run_dir/payload.img"
mkfs.ext4 -q -F -L lvpvm-payload -d "$payload" -E root_owner=0:0 "$run_dir/payload.img"
# The PV: 8 GiB, sparse, except 2.1 GiB of 0xAA from 1 MiB on, where the
# first LVs land, so that only the daemon's zeroing makes them read as zeros.
truncate -s 8G "$run_dir/pv.img"
head -c $((2150 * mib)) /dev/zero | tr '\0' '\252' |
    dd of="$run_dir/pv.img" bs=1M seek=1 conv=notrunc iflag=fullblock status=none

# ----------------------------------------------------------------------- VM
console=$run_dir/console.log
say "booting the VM (TCG, ${vm_smp} CPUs, ${vm_mem} MiB, timeout ${vm_timeout}s)"
vm_started=$(date +%s)
set +e
LD_LIBRARY_PATH=$work/qroot/usr/lib/x86_64-linux-gnu:$work/qroot/lib/x86_64-linux-gnu \
    timeout -k 10 "$vm_timeout" "$qemu" -L "$work/qroot/usr/share/qemu" \
    -accel tcg -smp "$vm_smp" -m "$vm_mem" -nodefaults -no-reboot -display none \
    -nic none -monitor none -serial stdio \
    -kernel "$vmlinuz" -initrd "$run_dir/initramfs.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 $vm_append" \
    -drive "file=$run_dir/pv.img,format=raw,if=none,id=pv,cache=unsafe,discard=unmap" \
    -device virtio-blk-pci,drive=pv,serial=lvpvm-pv \
    -drive "file=$run_dir/payload.img,format=raw,if=none,id=payload,readonly=on" \
    -device virtio-blk-pci,drive=payload,serial=lvpvm-payload \
    </dev/null 2>&1 | tee "$console.raw"
qemu_rc=${PIPESTATUS[0]}
set -e
# The guest's tty ends lines with CR LF; tee, unlike tr, does not buffer
# a pipe, so the CRs are dropped only now.
tr -d '\r' <"$console.raw" >"$console"
vm_secs=$(($(date +%s) - vm_started))

# ------------------------------------------------------------------ verdict
mkdir -p "$work/fixtures"
awk -v dir="$work/fixtures" '
    /^----- BEGIN FIXTURE / { file = dir "/" $4; printf "" > file; next }
    /^----- END FIXTURE /   { close(file); file = ""; next }
    file != ""              { print >> file }
' "$console"

problems=()
[ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ] && problems+=("the VM did not finish within ${vm_timeout}s")
[ "$qemu_rc" -ne 0 ] && [ "$qemu_rc" -ne 124 ] && [ "$qemu_rc" -ne 137 ] \
    && problems+=("qemu exited with status $qemu_rc")
grep -q 'Kernel panic' "$console" && problems+=("the guest kernel panicked")
fails=$(grep -c '^FAIL ' "$console" || true)
[ "$fails" -gt 0 ] && problems+=("$fails FAIL line(s)")
for check in $EXPECTED; do
    grep -qx "PASS $check" "$console" || problems+=("no PASS line for $check")
done
grep -qx 'PASS lvm-vm' "$console" || problems+=("no final 'PASS lvm-vm' line")

say "VM ran ${vm_secs}s; whole run $(($(date +%s) - started))s; fixtures in $work/fixtures"
if [ "${#problems[@]}" -eq 0 ]; then
    say "PASS: $(grep -c '^PASS ' "$console") PASS lines, every expected check passed"
    exit 0
fi
echo
echo "==================== guest console log ($console) ===================="
cat "$console"
echo "==================== end of guest console log ===================="
for p in "${problems[@]}"; do echo "lvm-vm-test: FAIL: $p" >&2; done
grep '^FAIL ' "$console" >&2 || true
exit 1
