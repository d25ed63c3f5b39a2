#!/usr/bin/env bash
# Usage: scripts/make-certs.sh [--force] HOSTNAME [OUTDIR]
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

force=0
args=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) help ;;
        -*) echo "make-certs.sh: unknown option $arg" >&2; usage ;;
        *) args+=("$arg") ;;
    esac
done
[ "${#args[@]}" -ge 1 ] && [ "${#args[@]}" -le 2 ] || usage

host="${args[0]}"
outdir="${args[1]:-certs}"

# A hostname or an IP address; no spaces, commas or slashes that would
# break the subject or the SAN list.
if ! [[ "$host" =~ ^[A-Za-z0-9.:-]+$ ]]; then
    echo "make-certs.sh: $host is not a usable host name" >&2
    exit 2
fi

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }

if [ -e "$outdir/ca.key" ] || [ -e "$outdir/ca.crt" ]; then
    if [ "$force" -ne 1 ]; then
        echo "make-certs.sh: $outdir already holds a CA (ca.crt/ca.key); refusing to replace it." >&2
        echo "make-certs.sh: certificates it signed would no longer verify; pass --force to replace it anyway." >&2
        exit 1
    fi
fi

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
    quiet openssl x509 -req -in "$work/$name.csr" -CA "$outdir/ca.crt" -CAkey "$outdir/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -days 825 -sha256 \
        -extfile "$work/$name.ext" -out "$outdir/$name.crt"
}

# The CA: self-signed, allowed to sign leaf certificates only.
new_key "$outdir/ca.key"
# Each CA gets a name of its own: clients and servers pick the issuer of a
# certificate by name, so two CAs with one name (made for two hosts, say)
# would turn a mixed-up certificate into a baffling "bad signature" instead
# of "unknown CA".
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

# The daemon's certificate.
sign server "/CN=$host" "basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash"

# The client's certificate.
sign client "/CN=provisioner-client" "basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash"

chmod 0644 "$outdir/ca.crt" "$outdir/server.crt" "$outdir/client.crt"
quiet openssl verify -CAfile "$outdir/ca.crt" "$outdir/server.crt" "$outdir/client.crt" >/dev/null

echo "made in $outdir:"
echo "  ca.crt ca.key          CA (daemon: --client-ca ca.crt; clients: --cacert ca.crt)"
echo "  server.crt server.key  server for $host ($san)"
echo "  client.crt client.key  client CN=provisioner-client"
