#!/usr/bin/env bash
# Usage: scripts/bench-journal.sh [JOBS] [RUNNING]
#
# Measures how long the daemon takes to come back after a restart with a
# large job journal, and how big that journal is:
#
#   1. writes <state-dir>/jobs.journal holding JOBS finished provision jobs
#      (default 10000, the --keep-jobs default), one line per state change as
#      the daemon writes them (pending, running, completed: three lines per
#      job), plus RUNNING jobs (default 10) left running as if the daemon had
#      been killed mid-job;
#   2. starts the release binary on that state directory (plain HTTP with a
#      token, dir backend, all under target/bench-journal) and times how long
#      it takes until /healthz answers and until the status of the oldest
#      job answers;
#   3. checks that every finished job is still answered and that each
#      interrupted one is now failed with the restart reason;
#   4. prints the journal's size before and after, and the time taken.
#
# Needs cargo, curl, jq and python3; no root. Exits 0 when every check
# passed. It is a measurement, not part of `cargo test`.

set -euo pipefail

cd "$(dirname "$0")/.."
repo="$(pwd)"
jobs="${1:-10000}"
running="${2:-10}"
work="$repo/target/bench-journal"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/libvirt-volume-provisioner"

say() { printf '==> %s\n' "$*"; }
die() { printf 'bench-journal: %s\n' "$*" >&2; exit 1; }

case "$jobs$running" in *[!0-9]*) die "JOBS and RUNNING must be whole numbers" ;; esac
for tool in curl jq python3; do
    command -v "$tool" >/dev/null || die "$tool is needed"
done

say "building the daemon (cargo build --release)"
cargo build --release --quiet

rm -rf "$work"
mkdir -p "$work"/{state,cache,volumes}
token="$("$bin" token new bench --tokens "$work/tokens" | tail -n 1)"

say "writing a journal of $jobs finished and $running interrupted jobs"
python3 - "$work" "$jobs" "$running" <<'PY'
import json, sys, time, uuid
work, jobs, running = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
now = time.time()
def stamp(t):
    return {"secs_since_epoch": int(t), "nanos_since_epoch": int((t % 1) * 1e9)}
digest = "ab" * 32
ids = []
with open(f"{work}/state/jobs.journal", "w") as out:
    for n in range(jobs + running):
        job_id = str(uuid.uuid4())
        ids.append(job_id)
        t = now - 3600 + n * 0.01
        size = 2147483648
        job = {
            "id": job_id, "seq": 0,
            "request": {"kind": "provision",
                        "image_url": "http://127.0.0.1:9/images/debian-12.qcow2",
                        "volume_name": f"bench-vm-{n}", "volume_size_gb": 20,
                        "image_type": "qcow2", "correlation_id": f"bench-{n}",
                        "image_sha256": None},
            "status": "pending",
            "progress": {"stage": "queued", "percent": 0,
                         "bytes_processed": 0, "bytes_total": None},
            "cache_hit": False, "image_path": None, "image_sha256": None,
            "volume_path": None, "volume_mark": "untouched", "error": None,
            "created_at": stamp(t), "started_at": None, "finished_at": None,
            "idempotency": None,
        }
        out.write(json.dumps(job) + "\n")
        job.update(seq=1, status="running", started_at=stamp(t + 0.001))
        job["progress"] = {"stage": "downloading", "percent": 3,
                           "bytes_processed": 0, "bytes_total": size}
        out.write(json.dumps(job) + "\n")
        if n < jobs:
            job.update(seq=2, status="completed", finished_at=stamp(t + 40),
                       cache_hit=n > 0, image_sha256=digest,
                       image_path=f"{work}/cache/{digest}.img",
                       volume_path=f"{work}/volumes/bench-vm-{n}",
                       volume_mark="created")
            job["progress"] = {"stage": "finalizing", "percent": 100,
                               "bytes_processed": size, "bytes_total": size}
            out.write(json.dumps(job) + "\n")
with open(f"{work}/ids", "w") as f:
    f.write("\n".join(ids) + "\n")
PY
before_bytes=$(stat -c %s "$work/state/jobs.journal")
before_lines=$(wc -l <"$work/state/jobs.journal")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
say "starting the daemon on that state directory"
start_ns=$(date +%s%N)
"$bin" serve --plain-http --tokens "$work/tokens" --listen "127.0.0.1:$port" \
    --backend dir --volume-dir "$work/volumes" --cache-dir "$work/cache" \
    --state-dir "$work/state" --keep-jobs "$((jobs + running))" \
    --log-level warn 2>"$work/daemon.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT

api() { curl -sS -H "Authorization: Bearer $token" "$url$1"; }
until curl -sf -o /dev/null -H "Authorization: Bearer $token" "$url/healthz"; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/daemon.log" >&2; die "the daemon exited"; }
    [ $(( ($(date +%s%N) - start_ns) / 1000000000 )) -lt 60 ] || die "no answer within 60 s"
    sleep 0.01
done
ready_ns=$(date +%s%N)
first=$(head -n 1 "$work/ids")
[ "$(api "/api/v1/status/$first" | jq -r .status)" = completed ] \
    || die "the oldest job is not answered as completed"
answered_ns=$(date +%s%N)

say "checking the finished jobs (a sample of 200) and every interrupted one"
total=$((jobs + running))
bad=0
while read -r id; do
    [ "$(api "/api/v1/status/$id" | jq -r .status)" = completed ] || bad=$((bad + 1))
done < <(head -n "$jobs" "$work/ids" | shuf -n 200)
[ "$bad" -eq 0 ] || die "$bad sampled finished jobs are not answered as completed"
while read -r id; do
    s=$(api "/api/v1/status/$id")
    [ "$(jq -r .status <<<"$s")" = failed ] && jq -r .error <<<"$s" | grep -q restart \
        || die "interrupted job $id is not failed with the restart reason: $s"
done < <(tail -n "$running" "$work/ids")
after_bytes=$(stat -c %s "$work/state/jobs.journal")
after_lines=$(wc -l <"$work/state/jobs.journal")

ms() { echo $(( ($1 - start_ns) / 1000000 )); }
printf '\n%-44s %s\n' "jobs in the journal (finished + interrupted)" "$jobs + $running"
printf '%-44s %s\n' "journal before the restart" "$before_lines lines, $((before_bytes / 1024)) KiB"
printf '%-44s %s\n' "journal after recovery" "$after_lines lines, $((after_bytes / 1024)) KiB"
printf '%-44s %s ms\n' "start to /healthz answering" "$(ms "$ready_ns")"
printf '%-44s %s ms\n' "start to the oldest job's status" "$(ms "$answered_ns")"
