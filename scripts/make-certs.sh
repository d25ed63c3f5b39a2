#!/usr/bin/env bash
# Usage: scripts/make-certs.sh [--force] HOSTNAME [OUTDIR]
#        scripts/make-certs.sh --ca-dir CADIR [--client-name NAME] [HOSTNAME] OUTDIR
#
# Makes a small private PKI for libvirt-volume-provisioner with openssl:
#
#   OUTDIR/ca.crt, ca.key          a CA that signs both certificates below
#   OUTDIR/server.crt, server.key  the daemon's certificate for HOSTNAME
#                                  (pass to --tls-cert / --tls-key)
#   OUTDIR/client.crt, client.key  a client certificate, CN=provisioner-client
#                                  (for curl --cert / --key)
#
# Give ca.crt to the daemon as --client-ca and to clients as --cacert.
# OUTDIR defaults to ./certs. Keys are EC P-256 and written with mode 0600.
# An existing CA in OUTDIR is never overwritten unless --force is given,
# because every certificate it signed would stop being trusted.
#
# With --ca-dir CADIR, no CA is made: the one in CADIR/ca.crt and
# CADIR/ca.key signs, and CADIR is only read. Into OUTDIR (required, and
# best a directory of its own per host) go
#
#   OUTDIR/server.crt, server.key  for HOSTNAME, when HOSTNAME is given
#   OUTDIR/NAME.crt, NAME.key      a client certificate CN=NAME, with
#                                  --client-name NAME
#   OUTDIR/ca.crt                  a copy of the CA certificate (never the key)
#
# It refuses to replace a certificate or key already in OUTDIR, and an
# OUTDIR/ca.crt from another CA. A second hypervisor, on the admin machine
# that keeps the CA made by the first run:
#
#   scripts/make-certs.sh --ca-dir certs hv2.example.com certs-hv2
#   scripts/make-certs.sh --ca-dir certs --client-name ci-runner certs-ci
#
# Keep ca.key on that admin machine; a hypervisor needs only ca.crt and its
# own server.crt and server.key.
#
# The server certificate carries subjectAltName DNS:HOSTNAME (IP:HOSTNAME
# when HOSTNAME is an IP address); for "localhost" it also carries
# IP:127.0.0.1. Validity is 825 days for the
# leaf certificates and ten years for the CA.

set -euo pipefail

# The comment block at the top of this file, on standard output.
help() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
}

usage() {
    sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

bad_usage() {
    echo "make-certs.sh: $*" >&2
    usage
}

force=0
ca_dir=""
client_name=""
args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --force) force=1; shift ;;
        --ca-dir|--client-name)
            [ "$#" -ge 2 ] && [ -n "$2" ] || bad_usage "$1 needs a value"
            if [ "$1" = --ca-dir ]; then ca_dir="$2"; else client_name="$2"; fi
            shift 2 ;;
        -h|--help) help ;;
        -*) bad_usage "unknown option $1" ;;
        *) args+=("$1"); shift ;;
    esac
done

host=""
if [ -z "$ca_dir" ]; then
    [ -z "$client_name" ] || bad_usage "--client-name goes with --ca-dir"
    [ "${#args[@]}" -ge 1 ] && [ "${#args[@]}" -le 2 ] || usage
    host="${args[0]}"
    outdir="${args[1]:-certs}"
else
    [ "$force" -eq 0 ] || bad_usage "--force makes a new CA; it does not go with --ca-dir"
    case "${#args[@]}" in
        1) outdir="${args[0]}"
           [ -n "$client_name" ] || bad_usage "with --ca-dir, give HOSTNAME, --client-name NAME or both" ;;
        2) host="${args[0]}"; outdir="${args[1]}" ;;
        *) usage ;;
    esac
fi

# A hostname or an IP address; no spaces, commas or slashes that would
# break the subject or the SAN list.
if [ -n "$host" ] && ! [[ "$host" =~ ^[A-Za-z0-9.:-]+$ ]]; then
    echo "make-certs.sh: $host is not a usable host name" >&2
    exit 2
fi
# The client name is also a file name in OUTDIR, so it must not be one of
# the files this script writes for other purposes.
if [ -n "$client_name" ]; then
    if ! [[ "$client_name" =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]*$ ]] \
        || [ "$client_name" = ca ] || [ "$client_name" = server ]; then
        echo "make-certs.sh: --client-name $client_name: use letters, digits, . _ - (not ca or server)" >&2
        exit 2
    fi
fi

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }

if [ -z "$ca_dir" ] && { [ -e "$outdir/ca.key" ] || [ -e "$outdir/ca.crt" ]; }; then
    if [ "$force" -ne 1 ]; then
        echo "make-certs.sh: $outdir already holds a CA (ca.crt/ca.key); refusing to replace it." >&2
        echo "make-certs.sh: certificates it signed would no longer verify; pass --force to replace it anyway," >&2
        echo "make-certs.sh: or --ca-dir $outdir to sign new certificates with it." >&2
        exit 1
    fi
fi

if [ -n "$ca_dir" ]; then
    ca_crt="$ca_dir/ca.crt"
    ca_key="$ca_dir/ca.key"
    for f in "$ca_crt" "$ca_key"; do
        [ -r "$f" ] || { echo "make-certs.sh: --ca-dir $ca_dir: cannot read $f" >&2; exit 1; }
    done
    if [ -d "$outdir" ] && [ "$(cd "$outdir" && pwd -P)" = "$(cd "$ca_dir" && pwd -P)" ]; then
        echo "make-certs.sh: OUTDIR is the --ca-dir; the CA directory is only read: give another OUTDIR" >&2
        exit 1
    fi
    if [ -e "$outdir/ca.crt" ] && ! cmp -s "$outdir/ca.crt" "$ca_crt"; then
        echo "make-certs.sh: $outdir/ca.crt is not $ca_crt; refusing to mix two CAs in one directory" >&2
        exit 1
    fi
else
    ca_crt="$outdir/ca.crt"
    ca_key="$outdir/ca.key"
fi

# Never write through an existing file or symbolic link (even a dangling
# one): a key must not replace another or land outside OUTDIR. --force
# without --ca-dir replaces the whole set on purpose.
leaves=()
[ -n "$ca_dir" ] || leaves+=(ca client)
[ -z "$host" ] || leaves+=(server)
[ -z "$client_name" ] || leaves+=("$client_name")
for name in "${leaves[@]}"; do
    for f in "$outdir/$name.key" "$outdir/$name.crt"; do
        if [ -L "$f" ] || { [ -e "$f" ] && [ "$force" -ne 1 ]; }; then
            what="already exists"
            [ -L "$f" ] && what="is a symbolic link"
            echo "make-certs.sh: $f $what; refusing to write it (use another OUTDIR or remove it)" >&2
            exit 1
        fi
    done
done

mkdir -p "$outdir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The SAN list: an IP literal goes in as IP:, a name as DNS:.
if [[ "$host" =~ ^[0-9.]+$ ]] || [[ "$host" == *:* ]]; then
    san="IP:$host"
else
    san="DNS:$host"
fi
if [ "$host" = "localhost" ]; then
    san="DNS:localhost,IP:127.0.0.1"
fi

# quiet CMD...: runs CMD with its chatter kept back; shows it if CMD fails.
quiet() {
    if ! "$@" 2>"$work/stderr"; then
        cat "$work/stderr" >&2
        echo "make-certs.sh: failed: $*" >&2
        return 1
    fi
}

# new_key FILE: an EC P-256 private key that only its owner can read.
new_key() {
    (umask 077 && quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
    chmod 0600 "$1"
}

# sign NAME SUBJECT EXTENSIONS: a key, a request and a certificate signed by the CA.
sign() {
    local name="$1" subject="$2" extensions="$3"
    new_key "$outdir/$name.key"
    quiet openssl req -new -key "$outdir/$name.key" -subj "$subject" -out "$work/$name.csr"
    printf '%s\n' "$extensions" >"$work/$name.ext"
    quiet openssl x509 -req -in "$work/$name.csr" -CA "$ca_crt" -CAkey "$ca_key" \
        -CAcreateserial -CAserial "$work/ca.srl" -days 825 -sha256 \
        -extfile "$work/$name.ext" -out "$outdir/$name.crt"
}

# make_ca: a new CA, self-signed, allowed to sign leaf certificates only.
make_ca() {
    new_key "$outdir/ca.key"
    # Each CA gets a name of its own: clients and servers pick the issuer of a
    # certificate by name, so two CAs with one name (made for two hosts, say)
    # would turn a mixed-up certificate into a baffling "bad signature" instead
    # of "unknown CA".
    local ca_name
    ca_name="libvirt-volume-provisioner CA $host $(openssl rand -hex 4)"
    cat >"$work/ca.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[dn]
CN = $ca_name
[ca_ext]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    quiet openssl req -new -x509 -config "$work/ca.cnf" -key "$outdir/ca.key" \
        -days 3650 -sha256 -out "$outdir/ca.crt"
}

# check_ca: the CA in --ca-dir is a CA, and ca.key is the key of ca.crt (a
# mismatch would only show later, as certificates that never verify).
check_ca() {
    quiet openssl x509 -in "$ca_crt" -noout -pubkey >"$work/ca-crt.pub"
    quiet openssl pkey -in "$ca_key" -pubout >"$work/ca-key.pub"
    if ! cmp -s "$work/ca-crt.pub" "$work/ca-key.pub"; then
        echo "make-certs.sh: $ca_key is not the key of $ca_crt" >&2
        exit 1
    fi
    if ! openssl x509 -in "$ca_crt" -noout -text | grep -q 'CA:TRUE'; then
        echo "make-certs.sh: $ca_crt is not a CA certificate" >&2
        exit 1
    fi
}

# client_cert FILE CN: a client certificate CN=CN in FILE.crt and FILE.key.
client_cert() {
    sign "$1" "/CN=$2" "basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash"
}

if [ -z "$ca_dir" ]; then
    make_ca
else
    check_ca
    # The hypervisor needs the CA certificate beside its own (--client-ca).
    if [ ! -e "$outdir/ca.crt" ]; then
        cp "$ca_crt" "$outdir/ca.crt"
    fi
fi
made=("ca.crt")

# The daemon's certificate.
if [ -n "$host" ]; then
    sign server "/CN=$host" "basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash"
    made+=("server.crt")
fi

# The client's certificate.
if [ -z "$ca_dir" ]; then
    client_cert client provisioner-client
    made+=("client.crt")
elif [ -n "$client_name" ]; then
    client_cert "$client_name" "$client_name"
    made+=("$client_name.crt")
fi

(cd "$outdir" && chmod 0644 "${made[@]}")
for crt in "${made[@]:1}"; do
    quiet openssl verify -CAfile "$ca_crt" "$outdir/$crt" >/dev/null
done

echo "made in $outdir:"
if [ -z "$ca_dir" ]; then
    echo "  ca.crt ca.key          CA (daemon: --client-ca ca.crt; clients: --cacert ca.crt)"
else
    echo "  ca.crt                 copy of $ca_crt (daemon: --client-ca ca.crt; clients: --cacert ca.crt)"
fi
[ -z "$host" ] || echo "  server.crt server.key  server for $host ($san)"
if [ -z "$ca_dir" ]; then
    echo "  client.crt client.key  client CN=provisioner-client"
elif [ -n "$client_name" ]; then
    printf '  %-22s client CN=%s\n' "$client_name.crt $client_name.key" "$client_name"
fi
