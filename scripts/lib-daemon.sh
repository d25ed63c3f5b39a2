# Sourced by scripts/quickstart.sh and scripts/bench.sh: start the release
# daemon on the dir backend with mutual TLS, on a free loopback port.
#
# The caller sets, before calling start_dir_daemon:
#   bin            the daemon binary
#   work           a directory holding volumes/, cache/ and state/
#   certs          a directory made by scripts/make-certs.sh localhost
#   start_timeout  seconds to wait for /health
#   daemon_extra   (array, may be empty) more `serve` flags
# and gets back: daemon_pid, port, base (https://127.0.0.1:PORT), tls (the
# curl flags for the client certificate), and $work/health.json. The daemon
# logs to $work/daemon.log. die() must be defined by the caller.

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# start_dir_daemon [AVOID_PORT]: starts the daemon and waits until /health
# answers; retries twice when another process took the chosen port
# meanwhile (exit status 3, "cannot listen"). Dies on any other failure.
start_dir_daemon() {
    local avoid="${1:-}" attempt=1 rc
    tls=(--cacert "$certs/ca.crt" --cert "$certs/client.crt" --key "$certs/client.key")
    while true; do
        rc=0
        start_dir_daemon_once "$avoid" || rc=$?
        [ "$rc" -eq 0 ] && return 0
        daemon_pid=""
        if [ "$rc" -eq 3 ] && grep -q 'cannot listen' "$work/daemon.log" && [ "$attempt" -lt 3 ]; then
            attempt=$((attempt + 1))
            printf '    port %s was taken meanwhile; trying another\n' "$port"
            continue
        fi
        die "the daemon exited at start with status $rc"
    done
}

start_dir_daemon_once() {
    port="$(free_port)"
    [ "$port" != "$1" ] || port="$(free_port)"
    base="https://127.0.0.1:$port"
    "$bin" serve \
        --backend dir \
        --volume-dir "$work/volumes" \
        --cache-dir "$work/cache" \
        --state-dir "$work/state" \
        --tls-cert "$certs/server.crt" \
        --tls-key "$certs/server.key" \
        --client-ca "$certs/ca.crt" \
        --listen "127.0.0.1:$port" \
        ${daemon_extra[@]+"${daemon_extra[@]}"} \
        >"$work/daemon.log" 2>&1 &
    daemon_pid=$!
    local deadline=$((SECONDS + start_timeout))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            wait "$daemon_pid" && return 2 || return $?
        fi
        if curl -sSf -o "$work/health.json" "${tls[@]}" "$base/health" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    die "the daemon did not answer $base/health within ${start_timeout}s"
}
