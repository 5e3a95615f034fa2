"""Hostile-client probes of issue 8 (items 1 and 2), run against a gateway tree under
gunicorn (one gevent worker), before and after the fix. A measurement, not a test.

    .venv/bin/python -m bench.probe_security --tree /tmp/i8sec-before --label before
    .venv/bin/python -m bench.probe_security --tree . --label after
    .venv/bin/python -m bench.probe_security --write      # BENCHMARKS.md section from both

Long names: 4 POSTs to /api/chat whose model is a distinct 9 MB name, then one GET
/metrics: its size, the time it takes and the worker's resident memory.
Slow clients: N connections (default 4000) each send a request head one byte every 2 s
(an attacker that reopens any connection the server closes); meanwhile a normal client
asks GET /api/version every second with a 5 s limit, for `--flood-seconds`.
Both runs use `server.client_header_timeout: 10` (a tree that does not know the key
ignores it) so the effect shows within a short run; the default is 60 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

import requests
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
NAME_BYTES = 9 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tree: str, server: dict):
    d = tempfile.mkdtemp(prefix="probe-sec-")
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "usage_db": "", **server}}
    path = os.path.join(d, "gateway.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    port = free_port()
    env = dict(os.environ, GATEWAY_CONFIG=path, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_WORKERS="1",
               HOME=d, GATEWAY_LOG_LEVEL="warning")
    log = open(os.path.join(d, "gateway.log"), "wb")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                             "gunicorn.conf.py", "wsgi:app"], cwd=os.path.abspath(tree), env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(url + "/api/version", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def worker_rss_mb(master: int) -> float:
    try:
        with open(f"/proc/{master}/task/{master}/children") as fh:
            pids = [int(p) for p in fh.read().split()]
        total = 0
        for pid in pids:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return round(total / 1024, 1)
    except OSError:
        return -1.0


def probe_long_names(tree: str) -> dict:
    proc, url = start(tree, {"max_body_mb": 10})
    try:
        statuses = []
        for i in range(4):
            name = f"nope-{i}:" + "m" * NAME_BYTES
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]})
            statuses.append(requests.post(url + "/api/chat", data=body, timeout=120).status_code)
        t0 = time.perf_counter()
        size = 0
        with requests.get(url + "/metrics", stream=True, timeout=300) as r:
            for part in r.iter_content(1 << 20):
                size += len(part)
        took = time.perf_counter() - t0
        return {"statuses": statuses, "metrics_bytes": size, "metrics_seconds": round(took, 2),
                "worker_rss_mb": worker_rss_mb(proc.pid)}
    finally:
        stop(proc)


class Flood:
    """N connections that send a request head one byte every `every` seconds and are
    reopened whenever the server closes them."""

    HEAD = b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 500

    def __init__(self, port: int, n: int, every: float = 2.0):
        self.port, self.n, self.every = port, n, every
        self.sel = selectors.DefaultSelector()
        self.pos = {}
        self.stop = threading.Event()
        self.reopened = 0
        self.open_now = 0

    def _open(self):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return
        self.pos[s] = 0
        self.sel.register(s, selectors.EVENT_READ)

    def _close(self, s):
        self.sel.unregister(s)
        self.pos.pop(s, None)
        s.close()

    def run(self):
        for _ in range(self.n):
            self._open()
        next_tick = time.monotonic()
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.05):
                try:
                    if key.fileobj.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self._close(key.fileobj)        # the server closed it: the attacker reopens
                self.reopened += 1
                self._open()
            if time.monotonic() >= next_tick:
                next_tick += self.every
                for s in list(self.pos):
                    i = self.pos[s] % len(self.HEAD)
                    try:
                        s.send(self.HEAD[i:i + 1])
                        self.pos[s] += 1
                    except (BlockingIOError, OSError):
                        pass
                self.open_now = len(self.pos)
        for s in list(self.pos):
            self._close(s)


def probe_flood(tree: str, conns: int, seconds: float) -> dict:
    proc, url = start(tree, {"client_header_timeout": 10})
    port = int(url.rsplit(":", 1)[1])
    flood = Flood(port, conns)
    th = threading.Thread(target=flood.run, daemon=True)
    try:
        base = []
        for _ in range(5):
            t0 = time.perf_counter()
            requests.get(url + "/api/version", timeout=5)
            base.append(time.perf_counter() - t0)
        th.start()
        samples = []
        t_start = time.monotonic()
        while time.monotonic() - t_start < seconds:
            t0 = time.perf_counter()
            try:
                ok = requests.get(url + "/api/version", timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            samples.append({"t": round(time.monotonic() - t_start, 1),
                            "ms": round((time.perf_counter() - t0) * 1000, 1) if ok else None})
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
        flood.stop.set()
        th.join(10)
        served = [s["ms"] for s in samples if s["ms"] is not None]
        return {"conns": conns, "seconds": seconds, "idle_ms": round(sorted(base)[2] * 1000, 1),
                "asked": len(samples), "served": len(served),
                "median_ms": round(sorted(served)[len(served) // 2], 1) if served else None,
                "max_ms": max(served) if served else None,
                "first_served_at_s": next((s["t"] for s in samples if s["ms"] is not None), None),
                "flood_reopened": flood.reopened, "samples": samples}
    finally:
        flood.stop.set()
        stop(proc)


def section(results: dict) -> str:
    lines = ["## Hostile-client probes (issue 8, items 1–2)", "",
             "`bench/probe_security.py`: gunicorn with one gevent worker (`worker_connections` 4096); "
             f"*before* is main at {results.get('before', {}).get('commit', '?')}, *after* this branch at "
             f"{results.get('after', {}).get('commit', '?')}. The machine has 2 cores shared with other "
             "sessions' work and the flood client runs on it too, so times are indicative.", ""]
    for label in ("before", "after"):
        r = results.get(label)
        if not r:
            continue
        lines.append(f"- **{label}** ({r['date']}; `{r['command']}`):")
        ln = r.get("long_names")
        if ln:
            lines.append(f"  - 4 requests with 9 MB model names → statuses {ln['statuses']}; the next "
                         f"`/metrics`: {ln['metrics_bytes'] / 1e6:,.3f} MB in {ln['metrics_seconds']} s; "
                         f"worker RSS after: {ln['worker_rss_mb']:,.0f} MB.")
        for f in r.get("floods", []):
            lines.append(_flood_line(f))
    lines += ["", "Reading: a flood below `worker_connections` never filled main's pool, so main served "
              "it; one above it starved every other client for as long as it lasted, deadlines or "
              "not, since the attacker reopens what the server closes. With the fix a worker past 90% "
              "of its places closes the connection that has waited longest for a request head, so "
              "normal requests keep being served; what they pay is the CPU of the attacker's "
              "reconnect storm on this 2-core box (client and server share it)."]
    return "\n".join(lines) + "\n"


def _flood_line(f: dict) -> str:
    med = "—" if f["median_ms"] is None else f"{f['median_ms']} ms"
    first = "—" if f["first_served_at_s"] is None else f"{f['first_served_at_s']} s"
    return (f"  - {f['conns']:,} slow-head connections (one byte per 2 s, reopened when closed; "
            f"`client_header_timeout: 10`) for {f['seconds']:.0f} s: a normal GET /api/version every "
            f"second answered {f['served']}/{f['asked']} times within 5 s (idle {f['idle_ms']} ms; "
            f"median {med}, max {f['max_ms'] or '—'} ms; first at {first}); the server closed "
            f"{f['flood_reopened']:,} flood connections.")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=ROOT)
    ap.add_argument("--label", choices=("before", "after"))
    ap.add_argument("--conns", default="4000,4300",
                    help="flood sizes, comma-separated (gunicorn.conf.py's worker_connections is 4096)")
    ap.add_argument("--flood-seconds", type=float, default=30.0)
    ap.add_argument("--skip-names", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "probe-security.json")
    try:
        with open(path) as fh:
            results = json.load(fh)
    except (OSError, ValueError):
        results = {}
    if args.write:
        from bench.sections import write_section
        write_section("security", section(results))
        print(section(results))
        return 0
    if args.label is None:
        ap.error("--label is required unless --write")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD" if args.label == "after" else "main"],
                            capture_output=True, text=True).stdout.strip()
    r = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
         "command": "python -m bench.probe_security " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.skip_names:
        r["long_names"] = probe_long_names(args.tree)
        print("long names:", json.dumps(r["long_names"]), flush=True)
    r["floods"] = []
    for n in (int(x) for x in args.conns.split(",")):
        f = probe_flood(args.tree, n, args.flood_seconds)
        r["floods"].append(f)
        print("flood:", json.dumps({k: v for k, v in f.items() if k != "samples"}), flush=True)
    results[args.label] = r
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
