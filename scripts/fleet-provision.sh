#!/usr/bin/env bash
# Usage: scripts/fleet-provision.sh --url URL (--cert FILE --key FILE | --token-file FILE)
#            [--cacert FILE] [--image-url URL] --size-gb N [--image-type qcow2|raw]
#            (--prefix NAME --count N | VOLUME[=IMAGE_URL]...) [--parallel P]
#            [--timeout SECONDS] [--correlation-prefix ID]
#
# Provisions many volumes on one libvirt-volume-provisioner daemon, a few at
# a time, and prints a summary table: volume, job id, status, cache_hit,
# seconds and error. Exits 0 only when every volume completed, 1 when any
# failed (or the daemon cannot be reached), 2 on a usage error.
#
#   --url URL              the daemon, e.g. https://hv1.example.com:8080
#                          (default: $LVP_URL)
#   --cacert FILE          CA that signed the daemon's certificate
#   --cert FILE, --key FILE
#                          client certificate and key (mutual TLS)
#   --token-file FILE      file holding an API token, sent as
#                          "Authorization: Bearer"; it never appears on a
#                          command line (curl reads it from a private file)
#   --image-url URL        the image for every volume without its own
#   --image-type TYPE      qcow2 (default) or raw
#   --size-gb N            size of each volume in GiB
#   --prefix NAME --count N
#                          the volumes NAME-1 ... NAME-N
#   VOLUME[=IMAGE_URL]     or name them; VOLUME=IMAGE_URL gives that one
#                          volume its own image
#   --parallel P           volumes in flight at once (default 4); each holds
#                          one connection, so keep it under the daemon's
#                          --max-connections-per-address (32)
#   --timeout SECONDS      per volume, from its POST (default 1800); a job
#                          still running then is cancelled and counts failed
#   --correlation-prefix ID
#                          correlation_id and Idempotency-Key of each job are
#                          ID-VOLUME (default "fleet")
#
# Each volume is POSTed to /api/v1/provision with an Idempotency-Key, so a
# rerun of the same command (after a crash, a lost connection, Ctrl-C) picks
# up the jobs already started, or reports the ones already done, instead of
# writing the volumes again. To provision the same volumes again on purpose,
# or to retry failed ones, use a new --correlation-prefix (and name only the
# volumes to retry). Each job is then followed with
# GET /api/v1/status/ID?wait=30, which the daemon may hold until the job's
# status or stage changes; an answer that comes back at once is polled with
# a short backoff instead. Progress goes to standard error, the summary to
# standard output. Needs bash 4.3 or later, curl and jq.

set -euo pipefail

# The comment block at the top of this file, on standard output.
help() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
}

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "(see the top of $0 for every option)" >&2
    exit 2
}

bad_usage() {
    printf 'fleet-provision.sh: %s\n' "$*" >&2
    usage
}

die() {
    printf 'fleet-provision.sh: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- options
url="${LVP_URL:-}"
cacert=""
cert=""
key=""
token_file=""
image_url=""
image_type="qcow2"
size_gb=""
prefix=""
count=""
parallel=4
timeout=1800
corr_prefix="fleet"
volumes=()

# need_value OPTION COUNT: the option has a value after it.
need_value() {
    [ "$2" -ge 2 ] || bad_usage "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --url) need_value "$1" "$#"; url="$2"; shift 2 ;;
        --cacert) need_value "$1" "$#"; cacert="$2"; shift 2 ;;
        --cert) need_value "$1" "$#"; cert="$2"; shift 2 ;;
        --key) need_value "$1" "$#"; key="$2"; shift 2 ;;
        --token-file) need_value "$1" "$#"; token_file="$2"; shift 2 ;;
        --image-url) need_value "$1" "$#"; image_url="$2"; shift 2 ;;
        --image-type) need_value "$1" "$#"; image_type="$2"; shift 2 ;;
        --size-gb) need_value "$1" "$#"; size_gb="$2"; shift 2 ;;
        --prefix) need_value "$1" "$#"; prefix="$2"; shift 2 ;;
        --count) need_value "$1" "$#"; count="$2"; shift 2 ;;
        --parallel) need_value "$1" "$#"; parallel="$2"; shift 2 ;;
        --timeout) need_value "$1" "$#"; timeout="$2"; shift 2 ;;
        --correlation-prefix) need_value "$1" "$#"; corr_prefix="$2"; shift 2 ;;
        -h|--help) help ;;
        --) shift; volumes+=("$@"); break ;;
        -*) bad_usage "unknown option $1" ;;
        *) volumes+=("$1"); shift ;;
    esac
done

is_count() { [[ "$1" =~ ^[1-9][0-9]{0,5}$ ]]; }

[ -n "$url" ] || bad_usage "--url (or \$LVP_URL) is required"
url="${url%/}"
case "$url" in
    https://*) ;;
    http://*)
        [ -z "$token_file" ] \
            || echo "fleet-provision.sh: warning: $url is plain HTTP; the token crosses the network in clear" >&2
        ;;
    *) bad_usage "--url must start with https:// or http://, not $url" ;;
esac
if [ -n "$cert" ] || [ -n "$key" ]; then
    if [ -z "$cert" ] || [ -z "$key" ]; then
        bad_usage "--cert and --key go together"
    fi
fi
[ -n "$cert" ] || [ -n "$token_file" ] \
    || bad_usage "give --cert and --key (mutual TLS) or --token-file"
for f in "$cacert" "$cert" "$key" "$token_file"; do
    [ -z "$f" ] || [ -r "$f" ] || die "cannot read $f"
done
is_count "$size_gb" || bad_usage "--size-gb must be a whole number of GiB, not '${size_gb}'"
case "$image_type" in
    qcow2|raw) ;;
    *) bad_usage "--image-type must be qcow2 or raw, not $image_type" ;;
esac
is_count "$parallel" || bad_usage "--parallel must be a positive whole number, not $parallel"
is_count "$timeout" || bad_usage "--timeout must be a positive whole number of seconds, not $timeout"
# It becomes part of an HTTP header and of correlation_id: printable, no spaces.
[[ "$corr_prefix" =~ ^[[:graph:]]{1,100}$ ]] \
    || bad_usage "--correlation-prefix must be 1 to 100 printable characters without spaces"

if [ -n "$prefix" ] || [ -n "$count" ]; then
    if [ -z "$prefix" ] || [ -z "$count" ]; then
        bad_usage "--prefix and --count go together"
    fi
    [ "${#volumes[@]}" -eq 0 ] || bad_usage "give either --prefix/--count or volume names, not both"
    is_count "$count" || bad_usage "--count must be a positive whole number, not $count"
    for ((i = 1; i <= count; i++)); do
        volumes+=("$prefix-$i")
    done
fi
[ "${#volumes[@]}" -gt 0 ] || bad_usage "no volumes: give --prefix NAME --count N or volume names"

# Split VOLUME=IMAGE_URL; check the names (the daemon checks them fully,
# but they also name files here) and that none repeats.
names=()
images=()
declare -A seen=()
for v in "${volumes[@]}"; do
    name="${v%%=*}"
    image="$image_url"
    [ "$name" = "$v" ] || image="${v#*=}"
    [[ "$name" =~ ^[A-Za-z0-9+_][A-Za-z0-9+_.-]{0,126}$ ]] \
        || bad_usage "'$name' is not a volume name (letters, digits, + _ . -; up to 127)"
    [ -z "${seen[$name]:-}" ] || bad_usage "volume $name is named twice"
    seen[$name]=1
    [ -n "$image" ] || bad_usage "no image for $name: give --image-url or $name=IMAGE_URL"
    names+=("$name")
    images+=("$image")
done

command -v curl >/dev/null || die "curl is required"
command -v jq >/dev/null || die "jq is required"

# ---------------------------------------------------------------- set-up
tmp="$(umask 077 && mktemp -d)"

cleanup() {
    local rc=$? pids
    trap - EXIT INT TERM
    pids="$(jobs -p)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086 # one pid per word
        kill $pids 2>/dev/null || true
        wait 2>/dev/null || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
interrupted() {
    echo "fleet-provision.sh: interrupted; jobs already started go on in the daemon." >&2
    echo "fleet-provision.sh: rerun the same command to follow them (same Idempotency-Keys)." >&2
    exit 130
}
trap interrupted INT TERM

curl_auth=(--connect-timeout 10)
[ -z "$cacert" ] || curl_auth+=(--cacert "$cacert")
[ -z "$cert" ] || curl_auth+=(--cert "$cert" --key "$key")
if [ -n "$token_file" ]; then
    # The token goes into a header file only we can read, which curl reads
    # with -H @file: it never becomes an argument of any process.
    token=""
    IFS= read -r token <"$token_file" || true
    token="${token%$'\r'}"
    [[ "$token" =~ ^[[:graph:]]+$ ]] || die "$token_file does not hold a token on its first line"
    printf 'Authorization: Bearer %s\n' "$token" >"$tmp/auth-header"
    unset token
    curl_auth+=(-H "@$tmp/auth-header")
fi

# api METHOD PATH OUT [CURL_ARGS...]: one request; the body goes to OUT and
# the status to $http_code. Returns 1 (with $curl_err) when curl itself
# failed: no connection, TLS, timeout.
http_code=""
curl_err=""
api() {
    local method="$1" path="$2" out="$3" rc=0
    shift 3
    http_code="$(curl -sS -o "$out" -w '%{http_code}' -X "$method" \
        "${curl_auth[@]}" "$@" "$url$path" 2>"$out.err")" || rc=$?
    curl_err=""
    if [ "$rc" -ne 0 ]; then
        curl_err="$(<"$out.err")"
        curl_err="${curl_err//$'\n'/ }"
        [ -n "$curl_err" ] || curl_err="curl exited with status $rc"
        return 1
    fi
}

# api_error FILE: "code: details" of an API error body, else its start.
api_error() {
    jq -r '"\(.error // "error"): \(.details // "")"' "$1" 2>/dev/null \
        || head -c 200 "$1" | tr -d '\r\n'
}

log() { printf '[%s] %s\n' "$1" "$2" >&2; }

# now_us: microseconds since the epoch.
now_us() {
    local t="${EPOCHREALTIME:-}"
    if [ -n "$t" ]; then
        echo "${t//[^0-9]/}"
    else
        date +%s%6N
    fi
}

# sleep_ms N
sleep_ms() {
    local s
    printf -v s '%d.%03d' $(($1 / 1000)) $(($1 % 1000))
    sleep "$s"
}

# ---------------------------------------------------------------- one volume
# provision_one INDEX VOLUME IMAGE_URL: runs in the background; writes one
# tab-separated line to $tmp/result.INDEX: volume, job id, status,
# cache_hit, seconds, error.
provision_one() {
    local idx="$1" volume="$2" image="$3"
    local f="$tmp/vol.$idx" start deadline
    local ikey="$corr_prefix-$volume" job_id="-" status="" cache_hit="-" error=""
    start="$(now_us)"
    deadline=$((start + timeout * 1000000))

    # record: writes the result line; the worker is done after it.
    record() {
        local us secs
        us=$(($(now_us) - start))
        printf -v secs '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
        error="${error//[$'\t\r\n']/ }"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$volume" "$job_id" "$status" "$cache_hit" \
            "$secs" "${error:--}" >"$tmp/result.$idx"
        log "$volume" "$status${error:+: $error}"
    }

    jq -n --arg url "$image" --arg vol "$volume" --argjson size "$size_gb" \
        --arg type "$image_type" --arg corr "$ikey" \
        '{image_url: $url, volume_name: $vol, volume_size_gb: $size,
          image_type: $type, correlation_id: $corr}' >"$f.body"

    # POST, retried on a transport failure or a 5xx (a full queue, a daemon
    # restarting): the Idempotency-Key makes a retry safe even when the
    # first attempt did reach the daemon.
    local delay=1
    while true; do
        if api POST /api/v1/provision "$f.post" --max-time 60 \
            -H 'Content-Type: application/json' -H "Idempotency-Key: $ikey" \
            --data-binary "@$f.body"; then
            case "$http_code" in
                200 | 202)
                    job_id="$(jq -r '.job_id // empty' "$f.post" 2>/dev/null || true)"
                    if [ -z "$job_id" ]; then
                        job_id="-" status="rejected" error="HTTP $http_code without a job_id"
                        record
                        return 0
                    fi
                    if [ "$http_code" = 200 ]; then
                        log "$volume" "job $job_id (started by an earlier run with the same Idempotency-Key)"
                    else
                        log "$volume" "job $job_id accepted"
                    fi
                    break
                    ;;
                5*) error="HTTP $http_code: $(api_error "$f.post")" ;;
                *)
                    status="rejected" error="HTTP $http_code: $(api_error "$f.post")"
                    record
                    return 0
                    ;;
            esac
        else
            error="$curl_err"
        fi
        if [ $(($(now_us) + delay * 1000000)) -ge "$deadline" ]; then
            status="timed-out" error="no job started within ${timeout}s; last: $error"
            record
            return 0
        fi
        log "$volume" "provision request failed ($error); retrying in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2 > 30 ? 30 : delay * 2))
    done
    error=""

    # Follow the job. The daemon holds ?wait= answers until the status or
    # stage changes (at most 30 s); one that answers at once is polled
    # with a backoff from 0.2 s to 2 s.
    local last="" now_state="" stage="" percent="" left hold t0 poll_ms=200
    while true; do
        # Whole seconds left, rounded up.
        left=$(((deadline - $(now_us) + 999999) / 1000000))
        if [ "$left" -le 0 ]; then
            cancel_after_timeout
            return 0
        fi
        hold=$((left < 30 ? left : 30))
        t0="$(now_us)"
        if api GET "/api/v1/status/$job_id?wait=$hold" "$f.status" --max-time $((hold + 15)); then
            case "$http_code" in
                200)
                    IFS=$'\t' read -r status stage percent cache_hit < <(jq -r \
                        '[.status, (.progress.stage // "-"), (.progress.percent // "-" | tostring),
                          (if .cache_hit == null then "-" else .cache_hit | tostring end)]
                          | @tsv' "$f.status")
                    case "$status" in
                        completed | failed | cancelled)
                            error="$(jq -r '.error // empty
                                | if type == "string" then . else tojson end' "$f.status")"
                            record
                            return 0
                            ;;
                    esac
                    now_state="$status $stage"
                    if [ "$now_state" != "$last" ]; then
                        log "$volume" "$status, $stage, ${percent}%"
                        last="$now_state"
                        poll_ms=200
                        continue
                    fi
                    ;;
                404)
                    status="failed" error="job $job_id is gone (HTTP 404: $(api_error "$f.status"))"
                    record
                    return 0
                    ;;
                5* | 429) log "$volume" "status answered HTTP $http_code: $(api_error "$f.status"); retrying" ;;
                *)
                    status="failed" error="status answered HTTP $http_code: $(api_error "$f.status")"
                    record
                    return 0
                    ;;
            esac
        else
            log "$volume" "status request failed ($curl_err); retrying"
            poll_ms=1000
        fi
        # Nothing changed. An answer held by the daemon needs no pause; one
        # that came back at once (no ?wait support, or an error) does.
        if [ $(($(now_us) - t0)) -lt 1000000 ]; then
            sleep_ms "$poll_ms"
            poll_ms=$((poll_ms * 2 > 2000 ? 2000 : poll_ms * 2))
        fi
    done
}

# cancel_after_timeout: the volume ran out of time; cancel its job. If the
# job ended meanwhile (409), its own final status is what counts.
cancel_after_timeout() {
    local was="$status${stage:+ ($stage)}"
    if api DELETE "/api/v1/cancel/$job_id" "$f.cancel" --max-time 30; then
        case "$http_code" in
            204)
                status="timed-out" error="still $was after ${timeout}s; job cancelled"
                ;;
            409)
                if api GET "/api/v1/status/$job_id" "$f.status" --max-time 30 \
                    && [ "$http_code" = 200 ]; then
                    status="$(jq -r .status "$f.status")"
                    cache_hit="$(jq -r 'if .cache_hit == null then "-" else .cache_hit | tostring end' "$f.status")"
                    error="$(jq -r '.error // empty | if type == "string" then . else tojson end' "$f.status")"
                else
                    status="timed-out" error="still $was after ${timeout}s; it ended as it was cancelled"
                fi
                ;;
            *)
                status="timed-out"
                error="still $was after ${timeout}s; cancel answered HTTP $http_code: $(api_error "$f.cancel")"
                ;;
        esac
    else
        status="timed-out" error="still $was after ${timeout}s; cancel failed: $curl_err"
    fi
    record
}

# ---------------------------------------------------------------- run
# One request first, so that a wrong URL, certificate or token fails once
# here instead of once per volume.
if ! api GET /health "$tmp/health" --max-time 30; then
    die "cannot reach $url/health: $curl_err"
fi
[ "$http_code" = 200 ] || die "$url/health answered HTTP $http_code: $(api_error "$tmp/health")"

total="${#names[@]}"
printf 'provisioning %d volume(s) on %s, %d at a time\n' "$total" "$url" "$parallel" >&2
for ((i = 0; i < total; i++)); do
    # At most $parallel workers: wait for one to end before starting more.
    while true; do
        mapfile -t running < <(jobs -rp)
        [ "${#running[@]}" -ge "$parallel" ] || break
        wait -n || true
    done
    provision_one "$i" "${names[$i]}" "${images[$i]}" &
done
wait || true

# ---------------------------------------------------------------- summary
rows=()
failed=()
w_vol=6
w_status=6
for ((i = 0; i < total; i++)); do
    row=""
    if [ -s "$tmp/result.$i" ]; then
        row="$(<"$tmp/result.$i")"
    else
        row="$(printf '%s\t-\terror\t-\t-\tthe worker for this volume died without a result' "${names[$i]}")"
    fi
    rows+=("$row")
    IFS=$'\t' read -r vol _ st _ _ _ <<<"$row"
    [ "${#vol}" -le "$w_vol" ] || w_vol="${#vol}"
    [ "${#st}" -le "$w_status" ] || w_status="${#st}"
    [ "$st" = "completed" ] || failed+=("$vol")
done

fmt="%-${w_vol}s  %-36s  %-${w_status}s  %-9s  %7s  %s\n"
# shellcheck disable=SC2059 # the format is built above
printf "$fmt" VOLUME JOB_ID STATUS CACHE_HIT SECONDS ERROR
for row in "${rows[@]}"; do
    IFS=$'\t' read -r vol job st hit secs err <<<"$row"
    # shellcheck disable=SC2059
    printf "$fmt" "$vol" "$job" "$st" "$hit" "$secs" "$err"
done

if [ "${#failed[@]}" -gt 0 ]; then
    printf '%d of %d volume(s) failed: %s\n' "${#failed[@]}" "$total" "${failed[*]}"
    printf 'to retry only those, rerun with a new --correlation-prefix and their names\n'
    exit 1
fi
printf 'all %d volume(s) completed\n' "$total"
