#!/usr/bin/env python3
"""The measuring half of scripts/bench.sh (which builds, makes the images
and certificates, and starts the daemon; see its header for usage).

  bench.py serve DIR PORTFILE   the image server: serves DIR on 127.0.0.1,
                                counts GETs per path (GET /__counts)
  bench.py run ARGS...          the measurements; prints the table and
                                writes the JSON (see --help)

Every comparison is made inside one round, daemon and baseline back to
back, with the order flipped from round to round, so that drift on this
noisy machine hits both sides; the table shows medians (and min-max) of
the per-round figures and of the per-round ratios.
"""

import argparse
import datetime
import http.client
import http.server
import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time

# ---------------------------------------------------------------- server


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with sendfile and counts every GET by path."""

    counts = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/__counts":
            with self.lock:
                body = json.dumps(self.counts).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with self.lock:
            self.counts[self.path] = self.counts.get(self.path, 0) + 1
        super().do_GET()

    def copyfile(self, source, outputfile):
        # The kernel copies the file: the server must not be the bottleneck
        # for either side of a comparison.
        outputfile.flush()
        self.connection.sendfile(source)


def serve(directory, portfile):
    os.chdir(directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    server.serve_forever()


# ---------------------------------------------------------------- helpers


def now():
    return time.monotonic()


def run(argv, **kw):
    """Runs argv; raises with its stderr when it fails."""
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    return p.stdout


def fdatasync(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def remove(*paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def settle():
    """Writes back what earlier steps left dirty, so that no step pays for
    the one before it. Not timed."""
    os.sync()
    time.sleep(0.2)


class Api:
    """The daemon's API over mutual TLS, on one kept-alive connection per
    thread (as a client that follows its job with ?wait= would keep it);
    a new connection when the old one was closed."""

    def __init__(self, port, certs):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.crt"))
        self.ctx.load_cert_chain(os.path.join(certs, "client.crt"), os.path.join(certs, "client.key"))
        self.local = threading.local()

    def call(self, method, path, body=None, timeout=600):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection("localhost", self.port, context=self.ctx,
                                                   timeout=timeout)
                self.local.conn = conn
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self.local.conn = None
                return resp.status, (json.loads(raw) if raw else None)
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise

    def provision(self, url, volume, size_gb, image_type):
        body = {"image_url": url, "volume_name": volume, "volume_size_gb": size_gb,
                "image_type": image_type, "correlation_id": f"bench-{volume}"}
        status, reply = self.call("POST", "/api/v1/provision", body)
        if status != 202:
            raise RuntimeError(f"provision {volume}: HTTP {status}: {reply}")
        return reply["job_id"]

    def wait(self, job):
        """Follows the job with ?wait= until it ends; returns its status."""
        while True:
            status, reply = self.call("GET", f"/api/v1/status/{job}?wait=30")
            if status != 200:
                raise RuntimeError(f"status {job}: HTTP {status}: {reply}")
            if reply["status"] in ("completed", "failed", "cancelled"):
                if reply["status"] != "completed":
                    raise RuntimeError(f"job {job} {reply['status']}: {reply.get('error')}")
                return reply

    def purge(self, sha):
        status, reply = self.call("DELETE", f"/api/v1/cache/{sha}")
        if status not in (204, 404):
            raise RuntimeError(f"purge {sha}: HTTP {status}: {reply}")


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/PID/status")


def reset_hwm(pid):
    # Writing 5 to clear_refs resets the peak RSS to the current RSS.
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def gets(server, name):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/__counts")
    counts = json.loads(conn.getresponse().read())
    conn.close()
    return counts.get("/" + name, 0)


# ---------------------------------------------------------------- bench


class Bench:
    def __init__(self, a):
        self.a = a
        self.api = Api(a.port, a.certs)
        self.work = a.work
        self.scratch = os.path.join(a.work, "scratch")
        os.makedirs(self.scratch, exist_ok=True)
        self.samples = {}  # metric -> list of per-round values
        self.gets_seen = []
        self.counter = 0

    def add(self, metric, value):
        self.samples.setdefault(metric, []).append(value)

    def url(self, name):
        return f"http://127.0.0.1:{self.a.server}/{name}"

    def volume(self, name):
        return os.path.join(self.a.volume_dir, name)

    def fresh_volume_name(self, tag):
        self.counter += 1
        return f"bench-{tag}-{self.counter}"

    # ---- one measurement each; every one returns seconds

    def daemon_provision(self, img, cold, hwm=False):
        if cold:
            self.api.purge(img["sha"])
        name = self.fresh_volume_name(img["key"])
        settle()
        if hwm:
            reset_hwm(self.a.daemon_pid)
        t0 = now()
        job = self.api.provision(self.url(img["name"]), name, self.a.volume_gb, img["type"])
        status = self.api.wait(job)
        secs = now() - t0
        if status["cache_hit"] != (not cold):
            raise RuntimeError(f"job {job}: cache_hit {status['cache_hit']}, expected {not cold}")
        if hwm:
            self.add("rss_kib", vm_hwm_kib(self.a.daemon_pid))
        remove(self.volume(name))
        return secs

    def naive(self, img, check):
        dl = os.path.join(self.scratch, "download")
        out = os.path.join(self.scratch, "out")
        remove(dl, out)
        settle()
        t0 = now()
        run(["curl", "-sSf", "-o", dl, self.url(img["name"])])
        if check:
            digest = run(["curl", "-sSf", self.url(img["name"] + ".sha256")]).decode().split()[0]
            run(["sha256sum", "-c", "--quiet", "-"], input=f"{digest}  {dl}\n".encode())
        run(["qemu-img", "convert", "-f", img["type"], "-O", "raw", dl, out])
        fdatasync(out)
        secs = now() - t0
        remove(dl, out)
        return secs

    def convert_alone(self, img):
        entry = os.path.join(self.a.cache_dir, img["sha"] + ".img")
        if not os.path.exists(entry):
            raise RuntimeError(f"no cache entry {entry} for the warm baseline")
        out = os.path.join(self.scratch, "out")
        remove(out)
        settle()
        t0 = now()
        run(["qemu-img", "convert", "-f", img["type"], "-O", "raw", entry, out])
        fdatasync(out)
        secs = now() - t0
        remove(out)
        return secs

    def many_daemon(self, img, jobs):
        self.api.purge(img["sha"])
        names = [self.fresh_volume_name("many") for _ in range(jobs)]
        before = gets(self.a.server, img["name"])
        settle()
        t0 = now()
        ids = [self.api.provision(self.url(img["name"]), n, self.a.volume_gb, img["type"])
               for n in names]
        for job in ids:
            self.api.wait(job)
        secs = now() - t0
        got = gets(self.a.server, img["name"]) - before
        self.gets_seen.append(got)
        for n in names:
            remove(self.volume(n))
        return secs

    def many_baseline(self, img, jobs):
        dl = os.path.join(self.scratch, "download")
        outs = [os.path.join(self.scratch, f"many-{i}") for i in range(jobs)]
        remove(dl, *outs)
        settle()
        t0 = now()
        run(["curl", "-sSf", "-o", dl, self.url(img["name"])])
        queue = list(outs)
        lock = threading.Lock()
        errors = []

        def lane():
            while True:
                with lock:
                    if not queue:
                        return
                    out = queue.pop(0)
                try:
                    run(["qemu-img", "convert", "-f", img["type"], "-O", "raw", dl, out])
                    fdatasync(out)
                except Exception as e:  # reported below, after the lanes end
                    errors.append(e)

        lanes = [threading.Thread(target=lane) for _ in range(self.a.workers)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        secs = now() - t0
        if errors:
            raise errors[0]
        remove(dl, *outs)
        return secs

    def status_client(self, mode, img, rate):
        """Runs the status client during one cold provision of img."""
        self.api.purge(img["sha"])
        name = self.fresh_volume_name("status")
        stop = os.path.join(self.scratch, "stop")
        remove(stop)
        settle()
        job = self.api.provision(self.url(img["name"]), name, self.a.volume_gb, img["type"])
        client = subprocess.Popen(
            [self.a.client, mode, "--addr", f"127.0.0.1:{self.a.port}",
             "--ca", os.path.join(self.a.certs, "ca.crt"),
             "--cert", os.path.join(self.a.certs, "client.crt"),
             "--key", os.path.join(self.a.certs, "client.key"),
             "--path", f"/api/v1/status/{job}", "--rate", str(rate),
             "--until", stop, "--max-secs", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.api.wait(job)
        open(stop, "w").close()
        out, err = client.communicate(timeout=60)
        if client.returncode != 0:
            raise RuntimeError(f"bench_status {mode} failed: {err.decode()[-2000:]}")
        result = json.loads(out)
        if result["errors"] or result["not_ok"]:
            raise RuntimeError(f"bench_status {mode}: failed requests: {result}")
        remove(self.volume(name))
        return result

    def idle_latency(self, rate):
        stop_after = "1" if self.a.smoke else "3"
        out = run([self.a.client, "keepalive", "--addr", f"127.0.0.1:{self.a.port}",
                   "--ca", os.path.join(self.a.certs, "ca.crt"),
                   "--cert", os.path.join(self.a.certs, "client.crt"),
                   "--key", os.path.join(self.a.certs, "client.key"),
                   "--path", "/health", "--rate", str(rate), "--max-secs", stop_after])
        return json.loads(out)

    # ---- rounds

    def round(self, r):
        flip = r % 2 == 1
        only = set(self.a.only.split(",")) if self.a.only else {"images", "many", "status"}
        if "images" in only:
            self.round_images(r, flip)
        if "many" in only:
            self.round_many(r, flip)
        if "status" in only:
            self.round_status(r)

    def round_images(self, r, flip):
        for img in self.a.images:
            k = img["key"]
            cold = [
                ("cold_daemon", lambda: self.daemon_provision(img, True, hwm=img["type"] == "raw")),
                ("cold_naive", lambda: self.naive(img, True)),
                ("cold_dl_convert", lambda: self.naive(img, False)),
            ]
            shift = r % len(cold)
            for metric, fn in cold[shift:] + cold[:shift]:
                secs = fn()
                self.add(f"{k}.{metric}", secs)
                log(f"round {r + 1} {k} {metric}: {secs:.2f}s")
            warm = [
                ("warm_daemon", lambda: self.daemon_provision(img, False, hwm=img["type"] == "raw")),
                ("warm_convert", lambda: self.convert_alone(img)),
            ]
            for metric, fn in (warm[::-1] if flip else warm):
                secs = fn()
                self.add(f"{k}.{metric}", secs)
                log(f"round {r + 1} {k} {metric}: {secs:.2f}s")

    def round_many(self, r, flip):
        many_img = self.a.many_image
        many = [("many_daemon", lambda: self.many_daemon(many_img, self.a.jobs)),
                ("many_baseline", lambda: self.many_baseline(many_img, self.a.jobs))]
        for metric, fn in (many[::-1] if flip else many):
            secs = fn()
            self.add(metric, secs)
            log(f"round {r + 1} {metric} ({self.a.jobs} jobs): {secs:.2f}s")
        log(f"round {r + 1} image GETs for {self.a.jobs} jobs: {self.gets_seen[-1]}")

    def round_status(self, r):
        status_img = self.a.status_image
        settle()
        idle = self.idle_latency(self.a.rate)
        busy = self.status_client("keepalive", status_img, self.a.rate)
        hs = self.status_client("handshakes", status_img, 0)
        self.add("status_idle_p99_ms", idle["p99_ms"])
        self.add("status_p50_ms", busy["p50_ms"])
        self.add("status_p99_ms", busy["p99_ms"])
        self.add("status_max_ms", busy["max_ms"])
        self.add("status_requests", busy["requests"])
        self.add("handshakes_per_sec", hs["per_sec"])
        log(f"round {r + 1} status during a provision: {busy['requests']} requests, "
            f"p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms "
            f"(idle p99 {idle['p99_ms']:.2f} ms); {hs['per_sec']:.0f} handshakes/s")

    def report(self):
        def summary(values):
            return {"median": statistics.median(values), "min": min(values), "max": max(values),
                    "values": values}

        def ratios(a, b):
            return [x / y for x, y in zip(self.samples[a], self.samples[b])]

        rows = []

        def row(label, daemon, baseline, base_label, target=None, unit="s"):
            if not self.samples.get(daemon) or (baseline and not self.samples.get(baseline)):
                return
            entry = {"what": label, "unit": unit, "daemon": summary(self.samples[daemon])}
            if baseline:
                entry["baseline"] = base_label
                entry["baseline_figures"] = summary(self.samples[baseline])
                entry["ratio"] = summary(ratios(daemon, baseline))
            if target is not None:
                entry["target"] = target
            rows.append(entry)

        for img in self.a.images:
            k, t = img["key"], img["type"]
            naive_target = {"raw": 0.35, "qcow2": 0.6}.get(k)
            row(f"{k}: cold vs naive", f"{k}.cold_daemon", f"{k}.cold_naive",
                "curl + sha256sum -c + convert + fdatasync",
                {"ratio_max": naive_target} if naive_target else None)
            row(f"{k}: cold vs download+convert", f"{k}.cold_daemon", f"{k}.cold_dl_convert",
                "curl + convert + fdatasync", {"ratio_max": 1.05} if t == "qcow2" else None)
            row(f"{k}: warm vs convert", f"{k}.warm_daemon", f"{k}.warm_convert",
                "convert of the cache entry + fdatasync", {"ratio_max": 1.05})
        row(f"{self.a.jobs} jobs, one image ({self.a.many_image['key']})", "many_daemon",
            "many_baseline", f"1 download + {self.a.jobs} converts on {self.a.workers} lanes")
        self.samples["image_gets"] = self.gets_seen
        row(f"image GETs for {self.a.jobs} jobs", "image_gets", None, None, {"equals": 1}, "GETs")
        self.samples["rss_mib"] = [v / 1024 for v in self.samples.get("rss_kib", [])]
        row("daemon peak RSS, raw image (VmHWM)", "rss_mib", None, None, {"max": 32}, "MiB")
        row("status p50 during a provision", "status_p50_ms", None, None, None, "ms")
        row("status p99 during a provision", "status_p99_ms", None, None, {"max": 5}, "ms")
        row("status p99 idle (reference)", "status_idle_p99_ms", None, None, None, "ms")
        row("new mTLS handshakes/s during a provision", "handshakes_per_sec", None, None, None, "/s")

        for entry in rows:
            target = entry.get("target")
            if not target or (self.a.smoke and target != {"equals": 1}):
                # A 64 MiB smoke image says nothing about speed; only the
                # shared download is judged there.
                continue
            if "ratio_max" in target:
                entry["met"] = entry["ratio"]["median"] <= target["ratio_max"]
            elif "equals" in target:
                entry["met"] = all(v == target["equals"] for v in entry["daemon"]["values"])
            elif "max" in target:
                key = "max" if entry["unit"] == "MiB" else "median"
                entry["met"] = entry["daemon"][key] <= target["max"]
        return rows


def log(msg):
    print(f"    {msg}", file=sys.stderr, flush=True)


def fmt(v, unit):
    if unit == "s":
        return f"{v:.2f}"
    if unit in ("GETs",):
        return f"{v:.0f}"
    if unit == "/s":
        return f"{v:.0f}"
    return f"{v:.1f}" if unit == "MiB" else f"{v:.2f}"


def spread(s, unit):
    return f"{fmt(s['median'], unit)} [{fmt(s['min'], unit)}–{fmt(s['max'], unit)}]"


def table(rows):
    lines = ["| measurement | daemon | baseline | ratio (per round) | target | met |",
             "|---|---|---|---|---|---|"]
    for e in rows:
        unit = e["unit"]
        daemon = f"{spread(e['daemon'], unit)} {unit}"
        base = f"{spread(e['baseline_figures'], unit)} {unit}" if "baseline" in e else "–"
        ratio = (f"{e['ratio']['median']:.2f} [{e['ratio']['min']:.2f}–{e['ratio']['max']:.2f}]"
                 if "ratio" in e else "–")
        t = e.get("target") or {}
        target = (f"≤ {t['ratio_max']}×" if "ratio_max" in t else
                  f"= {t['equals']}" if "equals" in t else
                  f"≤ {t['max']} {unit}" if "max" in t else "–")
        met = {True: "yes", False: "**no**"}.get(e.get("met"), "–")
        lines.append(f"| {e['what']} | {daemon} | {base} | {ratio} | {target} | {met} |")
    return "\n".join(lines)


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    flags = open("/proc/cpuinfo").read()
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kib / 2**20),
            "sha_ni": " sha_ni" in flags, "kernel": platform.release(),
            "qemu_img": run(["qemu-img", "--version"]).decode().splitlines()[0]}


def main_run(argv):
    p = argparse.ArgumentParser(prog="bench.py run")
    p.add_argument("--port", type=int, required=True, help="the daemon's TLS port")
    p.add_argument("--daemon-pid", type=int, required=True)
    p.add_argument("--server", type=int, required=True, help="the image server's port")
    p.add_argument("--certs", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--volume-dir", required=True)
    p.add_argument("--images", required=True, help="directory with the images and sidecars")
    p.add_argument("--raw", required=True)
    p.add_argument("--qcow2", required=True)
    p.add_argument("--cqcow2", required=True)
    p.add_argument("--client", required=True, help="the bench_status binary")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--volume-gb", type=int, default=2)
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--json", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only", default="", help="comma list of: images, many, status")
    a = p.parse_args(argv)

    def image(key, name, kind):
        with open(os.path.join(a.images, name + ".sha256")) as f:
            sha = f.read().split()[0]
        return {"key": key, "name": name, "type": kind, "sha": sha,
                "bytes": os.path.getsize(os.path.join(a.images, name))}

    a.images = [image("raw", a.raw, "raw"), image("qcow2", a.qcow2, "qcow2"),
                image("qcow2-compressed", a.cqcow2, "qcow2")]
    a.many_image = a.images[1]
    a.status_image = a.images[0]
    bench = Bench(a)
    started = datetime.datetime.now(datetime.timezone.utc)
    for r in range(a.rounds):
        log(f"round {r + 1} of {a.rounds}")
        bench.round(r)
    rows = bench.report()
    result = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "smoke": a.smoke,
        "rounds": a.rounds,
        "machine": machine(),
        "images": a.images,
        "workers": a.workers,
        "jobs": a.jobs,
        "rate_per_sec": a.rate,
        "only": a.only or "all",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    print(table(rows))
    if a.smoke:
        print("\nsmoke run: speed targets are not judged on the tiny image")
    missed = [e["what"] for e in rows if e.get("met") is False]
    print(f"\n{len(missed)} target(s) missed" + (": " + "; ".join(missed) if missed else ""))
    if bench.gets_seen and any(g != 1 for g in bench.gets_seen):
        # One shared download is behaviour, not speed: a failure even in smoke.
        print("bench: jobs for one uncached image did not share one download", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "run":
        sys.exit(main_run(sys.argv[2:]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
