"""`make bench`: the gateway under gunicorn + one gevent worker against the fake upstream,
the same fake measured DIRECT, LiteLLM's proxy against the same fake; writes BENCHMARKS.md.

    .venv/bin/python -m bench.run                 # everything (~8 min), writes BENCHMARKS.md
    .venv/bin/python -m bench.run --quick --no-md # streaming only, shorter runs, no LiteLLM
    .venv/bin/python -m bench.run --scenarios stream0 --conc 1,64 --targets v1 --no-md

Layout (2 cores): the gateway's gunicorn (master + the one worker) and LiteLLM are pinned
to core 0; the fake upstream and the load generators to core 1. Throughput and latency
come from wrk (C, one thread, keep-alive, Lua script bench/wrk/post.lua); TTFT and a
check of every response's content from bench/loadgen.py (gevent, raw sockets), run right
after wrk at the same concurrency. CPU per request is the worker's utime+stime
(/proc/<pid>/stat) over the wrk run divided by the requests wrk completed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import sections  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
OUT = os.path.join(BENCH, "out")
PY = sys.executable
VENV_BIN = os.path.dirname(PY)
LITELLM_VENV = os.path.join(BENCH, ".venv-litellm")
LITELLM_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
TICK = os.sysconf("SC_CLK_TCK")
GW_CORE, LOAD_CORE = "0", "1"

SCENARIOS = {
    # name: (title, model, stream, tokens)
    "stream0": ("Streaming, 32 chunks, 0 ms apart", "chunks-32-0", True, 32),
    "stream10": ("Streaming, 32 chunks, 10 ms apart", "chunks-32-10", True, 32),
    "nonstream": ("Non-streaming (32-token answer)", "chunks-32-0", False, 32),
}
TARGETS = {
    # name: (title, path, kind)
    "direct": ("DIRECT (fake /v1/chat/completions)", "/v1/chat/completions", "sse"),
    "v1": ("gateway /v1/chat/completions (SSE)", "/v1/chat/completions", "sse"),
    "api": ("gateway /api/chat (NDJSON)", "/api/chat", "ndjson"),
    "litellm": ("LiteLLM proxy /v1/chat/completions", "/v1/chat/completions", "sse"),
}
SLOW_MODEL = "chunks-20-200"


# ---- processes ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def http_get(url, timeout=2.0, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_http(url, proc, timeout=60.0, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            http_get(url, 1.0, headers)
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start(cmd, core, log_path, env=None, cwd=ROOT):
    log = open(log_path, "wb")
    return subprocess.Popen(["taskset", "-c", core] + cmd, cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc, timeout=15):
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def children(pid) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def tree(pid) -> list:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
        except OSError:
            pass
    return total / TICK


def rss_mb(pid) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def find_worker(master_pid, timeout=30.0) -> int:
    """gunicorn's gevent worker: the master's only child (task-pinned like the master)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        # master = taskset's exec'd gunicorn (same pid); its child is the worker
        kids = children(master_pid)
        if kids:
            return kids[0]
        time.sleep(0.2)
    raise RuntimeError("no gunicorn worker found")


class Fake:
    def __init__(self, logdir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start([PY, "-m", "bench.fake_server", "--port", str(self.port)], LOAD_CORE,
                          os.path.join(logdir, "fake.log"))
        wait_http(self.url + "/_stats", self.proc)

    def stats(self):
        return json.loads(http_get(self.url + "/_stats"))

    def requests_for(self, key):
        return int(self.stats()["requests"].get(key, 0))

    def cpu(self):
        return cpu_seconds([self.proc.pid])

    def close(self):
        stop(self.proc)


class Gateway:
    key = "ok-gateway"

    def __init__(self, fake, logdir, root=ROOT, extra_env=None, workers=1):
        import yaml
        self.dir = tempfile.mkdtemp(prefix="gw-bench-", dir=logdir)
        # production defaults (access log, metrics, usage log on); the usage log in the temp dir
        cfg = {"server": {"host": "127.0.0.1", "port": 0,
                          "usage_db": os.path.join(self.dir, "usage.sqlite3")},
               "providers": {"fake": {"type": "openai", "base_url": fake.url + "/v1",
                                      "api_keys": [self.key], "timeout": 30,
                                      "models": ["chunks-32-0", "chunks-32-10", SLOW_MODEL]}}}
        path = os.path.join(self.dir, "gateway.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({"GATEWAY_CONFIG": path, "GATEWAY_BIND": f"127.0.0.1:{self.port}",
                    "GATEWAY_WORKERS": str(workers), "HOME": self.dir, "PYTHONUNBUFFERED": "1"})
        env.update(extra_env or {})
        self.proc = start([os.path.join(VENV_BIN, "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                          GW_CORE, os.path.join(logdir, "gateway.log"), env=env, cwd=root)
        wait_http(self.url + "/api/version", self.proc)
        self.worker = find_worker(self.proc.pid)
        self.model_prefix = "fake:"
        self.auth = ""

    def cpu(self):
        return cpu_seconds([self.worker])

    def rss(self):
        return rss_mb(self.worker)

    def close(self):
        stop(self.proc)


class LiteLLM:
    def __init__(self, fake, logdir):
        import yaml
        self.dir = tempfile.mkdtemp(prefix="litellm-bench-", dir=logdir)
        models = [{"model_name": m, "litellm_params": {"model": "openai/" + m, "api_base": fake.url + "/v1",
                                                      "api_key": "ok-litellm"}}
                  for m in ("chunks-32-0", "chunks-32-10")]
        cfg = {"model_list": models, "general_settings": {"master_key": LITELLM_KEY},
               "litellm_settings": {"telemetry": False}}
        path = os.path.join(self.dir, "litellm.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
                    "HOME": self.dir, "PYTHONUNBUFFERED": "1"})
        exe = os.path.join(LITELLM_VENV, "bin", "litellm")
        self.proc = start([exe, "--config", path, "--host", "127.0.0.1", "--port", str(self.port),
                           "--num_workers", "1"], GW_CORE, os.path.join(logdir, "litellm.log"),
                          env=env, cwd=self.dir)
        wait_http(self.url + "/health/liveliness", self.proc, timeout=180)
        self.model_prefix = ""
        self.auth = LITELLM_KEY

    def cpu(self):
        return cpu_seconds(tree(self.proc.pid))

    def rss(self):
        return sum(rss_mb(p) for p in tree(self.proc.pid))

    def close(self):
        stop(self.proc)


def litellm_version():
    try:
        out = subprocess.run([os.path.join(LITELLM_VENV, "bin", "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except OSError:
        return None


def ensure_litellm(log):
    """bench/.venv-litellm with litellm[proxy]; (ok, why-not)."""
    exe = os.path.join(LITELLM_VENV, "bin", "litellm")
    if os.path.exists(exe):
        return True, ""
    log("creating bench/.venv-litellm (pip install 'litellm[proxy]', a few minutes) ...")
    try:
        subprocess.run(["python3", "-m", "venv", LITELLM_VENV], check=True, capture_output=True, timeout=300)
        pip = os.path.join(LITELLM_VENV, "bin", "pip")
        r = subprocess.run([pip, "install", "-q", "litellm[proxy]"], capture_output=True, text=True,
                           timeout=1200)
        if r.returncode != 0:
            return False, "pip install 'litellm[proxy]' failed: " + (r.stderr or r.stdout).strip()[-400:]
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"could not create the venv: {e}"
    return os.path.exists(exe), "" if os.path.exists(exe) else "litellm entry point missing after install"


# ---- load --------------------------------------------------------------------------------
def body_for(target, scenario, prefix=""):
    _, model, stream, _ = SCENARIOS[scenario]
    body = {"model": prefix + model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if target == "direct" and stream:
        # what the gateway itself asks upstream: the fake then sends the same events (the
        # usage event is one more 10 ms step on the 10 ms scenario)
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def run_wrk(port, path, body, auth, conc, duration):
    env = dict(os.environ, BENCH_BODY=body, BENCH_AUTH=auth or "")
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
           "-s", os.path.join(BENCH, "wrk", "post.lua"), f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 120)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            r = json.loads(line[len("BENCHJSON "):])
            dur = r["duration_us"] / 1e6
            errs = {k: v for k, v in r["errors"].items() if v}
            return {"requests": r["requests"], "rps": round(r["requests"] / dur, 1) if dur else 0,
                    "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
                    "errors": errs, "error_count": sum(errs.values()), "tool": "wrk"}
    raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def run_loadgen(port, path, body, auth, conc, duration=0.0, tokens=None, marker="", count=0, ramp=0.0):
    cmd = ["taskset", "-c", LOAD_CORE, PY, "-m", "bench.loadgen", "--port", str(port), "--path", path,
           "--body", body, "--conc", str(conc), "--marker", marker]
    if duration:
        cmd += ["--duration", str(duration)]
    if count:
        cmd += ["--count", str(count)]
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    if auth:
        cmd += ["--header", f"Authorization: Bearer {auth}"]
    if ramp:
        cmd += ["--ramp", str(ramp)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(duration, 10) + 300)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"loadgen failed: {out.stdout[-500:]} {out.stderr[-1500:]}")


def marker_for(target, scenario):
    if not SCENARIOS[scenario][2]:
        return ""
    return '"done":true' if TARGETS[target][2] == "ndjson" else "[DONE]"


def measure(server, fake, target, scenario, conc, args, log):
    """One cell: wrk for throughput/latency/CPU, then loadgen for TTFT and checks."""
    title, model, stream, tokens = SCENARIOS[scenario]
    path = TARGETS[target][1]
    prefix = getattr(server, "model_prefix", "")
    auth = getattr(server, "auth", "") if server is not None else "ok-direct"
    port = server.port if server is not None else fake.port
    body = body_for(target, scenario, prefix)
    key = Gateway.key if target in ("v1", "api") else ("ok-litellm" if target == "litellm" else "ok-direct")
    n0, c0, f0 = fake.requests_for(key), (server.cpu() if server else 0.0), fake.cpu()
    if args.wrk:
        w = run_wrk(port, path, body, auth, conc, args.duration)
    else:
        w = run_loadgen(port, path, body, auth, conc, args.duration, tokens, marker_for(target, scenario))
        w["tool"] = "loadgen"
    time.sleep(0.3)   # let requests cut by wrk's stop unwind before reading the clocks
    n1, c1, f1 = fake.requests_for(key), (server.cpu() if server else 0.0), fake.cpu()
    done = max(1, w["requests"])
    row = {"target": target, "scenario": scenario, "conc": conc, **w,
           "upstream_requests": n1 - n0,
           "cpu_ms_per_req": round((c1 - c0) * 1000 / done, 3) if server else None,
           "fake_cpu_ms_per_req": round((f1 - f0) * 1000 / done, 3)}
    if args.ttft_duration:
        lg = run_loadgen(port, path, body, auth, conc, args.ttft_duration, tokens, marker_for(target, scenario))
        row.update({"ttft_p50_ms": lg["ttft_p50_ms"] if stream else None,
                    "ttft_p99_ms": lg["ttft_p99_ms"] if stream else None,
                    "check_requests": lg["requests"], "check_errors": lg["errors"],
                    "check_rps": lg["rps"], "check_p50_ms": lg["p50_ms"]})
        row["error_count"] = row["error_count"] + lg["error_count"]
    log(f"  {target:8s} {scenario:9s} c={conc:<4d} rps={row['rps']:8.1f} p50={row['p50_ms']:8.2f}ms "
        f"p99={row['p99_ms']:8.2f}ms ttft50={row.get('ttft_p50_ms')} cpu/req={row['cpu_ms_per_req']}ms "
        f"errors={row['error_count']}")
    return row


def slow_streams(gw, fake, args, log):
    """`args.slow` concurrent chunks-20-200 streams held by the one worker."""
    body = json.dumps({"model": "fake:" + SLOW_MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}, separators=(",", ":"))
    samples = {"rss": [], "open": []}
    stop_flag = threading.Event()

    def sampler():
        while not stop_flag.is_set():
            samples["rss"].append(gw.rss())
            try:
                samples["open"].append(fake.stats()["open_streams"])
            except Exception:
                pass
            stop_flag.wait(0.5)
    rss0 = gw.rss()
    c0 = gw.cpu()
    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    r = run_loadgen(gw.port, "/v1/chat/completions", body, "", args.slow, args.slow_duration, 20, "[DONE]",
                    ramp=0.05)
    stop_flag.set()
    t.join()
    c1 = gw.cpu()
    row = {"conc": args.slow, "model": SLOW_MODEL, **r, "rss_before_mb": round(rss0, 1),
           "rss_peak_mb": round(max(samples["rss"] or [0]), 1),
           "max_open_upstream_streams": max(samples["open"] or [0]),
           "cpu_ms_per_req": round((c1 - c0) * 1000 / max(1, r["requests"]), 3)}
    log(f"  slow streams: {row['conc']} x {SLOW_MODEL}: requests={row['requests']} errors={row['error_count']} "
        f"p99={row['p99_ms']}ms rss {row['rss_before_mb']}->{row['rss_peak_mb']} MB "
        f"open upstream={row['max_open_upstream_streams']}")
    return row


def slow_direct(fake, args, log):
    """The same slow-stream load straight at the fake: what the fake and the load
    generator (both on the load core) add by themselves."""
    body = json.dumps({"model": SLOW_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "stream_options": {"include_usage": True}}, separators=(",", ":"))
    r = run_loadgen(fake.port, "/v1/chat/completions", body, "ok-direct", args.slow, args.slow_duration, 20,
                    "[DONE]", ramp=0.05)
    log(f"  slow streams DIRECT: requests={r['requests']} errors={r['error_count']} p99={r['p99_ms']}ms")
    return r


# ---- report ------------------------------------------------------------------------------
def versions():
    import importlib.metadata as md
    v = {"python": platform.python_version()}
    for pkg in ("flask", "werkzeug", "gevent", "greenlet", "gunicorn", "requests", "urllib3"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    try:
        v["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    except (OSError, IndexError):
        v["wrk"] = None
    return v


def machine():
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release()}


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render(results) -> str:
    rows = results["rows"]
    by = {(r["target"], r["scenario"], r["conc"]): r for r in rows}
    m, v = results["machine"], results["versions"]
    L = []
    a = L.append
    a("# Benchmarks")
    a("")
    a("Generated by `make bench` (`.venv/bin/python -m bench.run`); do not edit by hand except the")
    a("section that `bench/OPTIMISATIONS.md` supplies. Raw numbers: `bench/out/results.json`.")
    a("")
    a(f"- **Command:** `{results['command']}` ({results['wall_s']:.0f} s)")
    a(f"- **Date:** {results['date']}  ·  **commit:** {results['git']}")
    a(f"- **Machine:** {m['nproc']} cores, {m['cpu']}, {m['ram_gib']} GiB RAM, Linux {m['kernel']}")
    a("- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
      + (f", litellm {results['litellm']['version']}" if results.get("litellm", {}).get("version") else ""))
    a(f"- **Layout:** gunicorn (`-c gunicorn.conf.py wsgi:app`, 1 gevent worker) pinned to core {GW_CORE}; "
      f"the fake upstream (`tests/fake_upstream.py`'s app via `bench/fake_server.py`) and the load generators "
      f"pinned to core {LOAD_CORE}. DIRECT = load generator → fake, no gateway, same run.")
    a(f"- **Load generator:** {'`wrk` (C, 1 thread, keep-alive, `bench/wrk/post.lua`)' if results['wrk'] else '`bench/loadgen.py` (wrk not installed)'} "
      f"for rps and latency, {results['duration']} s per cell; then `bench/loadgen.py` (gevent, raw keep-alive "
      f"sockets) for {results['ttft_duration']} s at the same concurrency for TTFT and to check every "
      "response (status 200, all 32 tokens, end marker). Errors = wrk's socket/status errors + failed checks.")
    a("- **CPU ms/req:** the gateway worker's (or LiteLLM's process tree's) utime+stime from "
      "`/proc/<pid>/stat` across the wrk run ÷ requests wrk completed (conservative: requests cut by "
      "wrk's stop are in the CPU but not the count). `fake ms/req` is the fake's own, on the load core.")
    a("- **TTFT:** time until the body holds the first token's text (`tok0`): an SSE comment or an empty "
      "role chunk does not count.")
    w = m.get("wakeup")
    if w:
        a(f"- **Wake-up cost of this VM:** a TCP ping-pong between the two cores takes {w['busy_rtt_us']:.0f} µs "
          f"back to back but {w['idle_rtt_us']:.0f} µs when the cores idle 10 ms between pings (`bench/pingpong.py`). "
          "Every idle→busy transition is paid in CPU time and latency, so CPU ms/req at c=1 and on the 10 ms "
          "scenario at low concurrency is mostly wake-ups (a plain blocking-socket reader of the same "
          "`chunks-32-10` stream costs ~5 ms of CPU per stream here); compare CPU figures under load (c ≥ 64).")
    a("- **DIRECT fairness:** the fake is served with TCP_NODELAY (`bench/fake_server.py`: without it Nagle + "
      "delayed ACK add 40 ms per keep-alive stream and DIRECT would be the slow one) and DIRECT's streamed "
      "requests ask `stream_options.include_usage` like the gateway's upstream requests do (one more event). "
      "Non-streaming DIRECT is the fake's one JSON answer, while the gateway always streams upstream and "
      "gathers (so a slow model never hits the first-byte timeout): its DIRECT ratio compares two different "
      "upstream exchanges.")
    a("- **Ratios above 1× / negative added latency** (10 ms scenario): the load generator shares core 1 with "
      "the fake. Through the gateway it gets the chunks of a burst in one write (coalescing), so it takes less "
      "of core 1 than when it reads the fake directly and the fake runs a little faster; at c=1 the spread is "
      "the jitter of the fake's 35 gevent sleeps of 10 ms.")
    a("")
    # targets
    t = results.get("targets_check")
    if t:
        a("## Targets")
        a("")
        a("| target | goal | measured | met |")
        a("|---|---|---|---|")
        for row in t:
            a(f"| {row['what']} | {row['goal']} | {row['measured']} | {'yes' if row['ok'] else '**no**'} |")
        a("")
    for sc, (title, model, stream, tokens) in SCENARIOS.items():
        sc_rows = [r for r in rows if r["scenario"] == sc]
        if not sc_rows:
            continue
        a(f"## {title} (`{model}`{'' if stream else ', stream:false'})")
        a("")
        a("| target | c | rps | × DIRECT rps | p50 ms | p99 ms | + p50 vs DIRECT | TTFT p50 | TTFT p99 | "
          "CPU ms/req | fake ms/req | errors |")
        a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tg in TARGETS:
            for c in results["concs"]:
                r = by.get((tg, sc, c))
                if r is None:
                    continue
                d = by.get(("direct", sc, c))
                ratio = f"{r['rps'] / d['rps']:.2f}" if d and d["rps"] and tg != "direct" else "–"
                add = fmt(r["p50_ms"] - d["p50_ms"], 2) if d and tg != "direct" else "–"
                a(f"| {TARGETS[tg][0]} | {c} | {fmt(r['rps'])} | {ratio} | {fmt(r['p50_ms'], 2)} | "
                  f"{fmt(r['p99_ms'], 2)} | {add} | {fmt(r.get('ttft_p50_ms'), 2)} | {fmt(r.get('ttft_p99_ms'), 2)} | "
                  f"{fmt(r['cpu_ms_per_req'], 2)} | {fmt(r['fake_cpu_ms_per_req'], 2)} | {r['error_count']} |")
        a("")
    s = results.get("slow")
    if s:
        a(f"## {s['conc']} concurrent slow streams (`{s['model']}`: 20 chunks 200 ms apart) on one worker")
        a("")
        a("| path | streams | requests | errors | p50 ms | p99 ms | TTFT p99 ms | upstream streams open (max) | "
          "worker RSS before → peak MB | CPU ms/req |")
        a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        a(f"| gateway /v1 | {s['conc']} | {s['requests']} | {s['error_count']} {s['errors'] or ''} | {fmt(s['p50_ms'], 1)} | "
          f"{fmt(s['p99_ms'], 1)} | {fmt(s['ttft_p99_ms'], 1)} | {s['max_open_upstream_streams']} | "
          f"{s['rss_before_mb']} → {s['rss_peak_mb']} | {fmt(s['cpu_ms_per_req'], 2)} |")
        d = results.get("slow_direct")
        if d:
            a(f"| DIRECT | {s['conc']} | {d['requests']} | {d['error_count']} {d['errors'] or ''} | {fmt(d['p50_ms'], 1)} | "
              f"{fmt(d['p99_ms'], 1)} | {fmt(d['ttft_p99_ms'], 1)} | – | – | – |")
        a("")
        a("The nominal stream is 23 gaps × 200 ms = 4.6 s (comment, 20 tokens, finish, usage, [DONE]); the "
          "DIRECT row shows what the fake and the 1,000-connection load generator, sharing core 1, add by themselves.")
        a("")
    lt = results.get("litellm") or {}
    a("## LiteLLM proxy, same fake, same layout")
    a("")
    if lt.get("error"):
        a(f"Not measured: {lt['error']}")
    else:
        a(f"`litellm --config … --num_workers 1` (litellm {lt.get('version')}, uvicorn, its default logging; "
          "a master key is required to start) in `bench/.venv-litellm`, pinned to core 0; one "
          "`openai/<model>` deployment per model with `api_base` = the fake's /v1. Rows are in the scenario "
          "tables above; the gateway against it:")
        a("")
        a("| scenario | c | LiteLLM rps | gateway /v1 rps | gateway ÷ LiteLLM rps | LiteLLM CPU ms/req | "
          "gateway CPU ms/req | LiteLLM ÷ gateway CPU | LiteLLM p50 ms | gateway p50 ms |")
        a("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for sc in SCENARIOS:
            for c in results["concs"]:
                r, g = by.get(("litellm", sc, c)), by.get(("v1", sc, c))
                if not r or not g:
                    continue
                a(f"| {sc} | {c} | {fmt(r['rps'])} | {fmt(g['rps'])} | {r['rps'] and g['rps'] / r['rps']:.1f}× | "
                  f"{fmt(r['cpu_ms_per_req'], 2)} | {fmt(g['cpu_ms_per_req'], 2)} | "
                  f"{(r['cpu_ms_per_req'] or 0) / max(g['cpu_ms_per_req'] or 1e-9, 1e-9):.0f}× | "
                  f"{fmt(r['p50_ms'], 2)} | {fmt(g['p50_ms'], 2)} |")
    a("")
    opt = os.path.join(BENCH, "OPTIMISATIONS.md")
    if os.path.exists(opt):
        with open(opt) as fh:
            a(fh.read().rstrip())
        a("")
    return "\n".join(L) + "\n"


def check_targets(results):
    by = {(r["target"], r["scenario"], r["conc"]): r for r in results["rows"]}
    out = []
    cpus = [(by[k]["cpu_ms_per_req"], k) for k in by if k[0] in ("v1", "api") and k[1] == "stream0"]
    if cpus:
        worst = max(cpus)
        at64 = [by[k]["cpu_ms_per_req"] for k in by if k[0] in ("v1", "api") and k[1] == "stream0" and k[2] == 64]
        out.append({"what": "gateway CPU per streamed 32-chunk request (32×0 ms; worst of /v1 and /api/chat "
                    + ("at c=64)" if at64 else "in any cell)"),
                    "goal": "≤ 2 ms", "measured": f"{max(at64):.2f} ms (worst cell, any c: {worst[0]:.2f} ms)"
                    if at64 else f"{worst[0]:.2f} ms", "ok": (max(at64) if at64 else worst[0]) <= 2.0})
    for tg in ("v1", "api"):
        g, d = by.get((tg, "stream10", 256)), by.get(("direct", "stream10", 256))
        if g and d and d["rps"]:
            ratio = g["rps"] / d["rps"]
            out.append({"what": f"streaming 10 ms/chunk, c=256, {TARGETS[tg][0]}", "goal": "≥ 0.8× DIRECT rps",
                        "measured": f"{ratio:.2f}× ({g['rps']:.0f} vs {d['rps']:.0f} rps)", "ok": ratio >= 0.8})
    for tg in ("v1", "api"):
        for sc in ("stream0", "stream10", "nonstream"):
            g, d = by.get((tg, sc, 1)), by.get(("direct", sc, 1))
            if g and d:
                add = g["p50_ms"] - d["p50_ms"]
                out.append({"what": f"c=1 added p50 latency, {sc}, {TARGETS[tg][0]}", "goal": "≤ 2 ms",
                            "measured": f"{add:.2f} ms", "ok": add <= 2.0})
    s = results.get("slow")
    if s:
        out.append({"what": f"{s['conc']} concurrent slow streams on one worker", "goal": "zero errors",
                    "measured": f"{s['error_count']} errors in {s['requests']} streams, p99 {s['p99_ms']:.0f} ms, "
                    f"RSS {s['rss_peak_mb']:.0f} MB", "ok": s["error_count"] == 0 and s["requests"] > 0})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per cell")
    ap.add_argument("--ttft-duration", type=float, default=2.0, help="seconds of loadgen per cell (0: skip)")
    ap.add_argument("--conc", default="1,16,64,256")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--targets", default="direct,v1,api")
    ap.add_argument("--litellm-conc", default="1,64")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--slow", type=int, default=1000, help="concurrent slow streams (0: skip)")
    ap.add_argument("--slow-duration", type=float, default=8.0)
    ap.add_argument("--quick", action="store_true", help="stream0/stream10, 3 s cells, no LiteLLM, no slow test")
    ap.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs in bench/out/bench-*/")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite BENCHMARKS.md from --out's results (no measuring)")
    ap.add_argument("--out", default=os.path.join(OUT, "results.json"))
    ap.add_argument("--gateway-root", default=ROOT,
                    help="run the gateway from this copy of the tree (A/B against a snapshot)")
    ap.add_argument("--profile", type=float, default=0.0,
                    help="py-spy record the worker for this many seconds under load (see below)")
    ap.add_argument("--profile-scenario", default="stream0")
    ap.add_argument("--profile-conc", type=int, default=64)
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.ttft_duration = 3.0, 1.5
        args.scenarios = "stream0,stream10" if args.scenarios == ",".join(SCENARIOS) else args.scenarios
        args.no_litellm, args.slow = True, 0
    if args.render_only:
        with open(args.out) as fh:
            results = json.load(fh)
        kept = sections.kept_sections()
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as fh:
            fh.write(render(results) + ("\n" + kept if kept else ""))
        print("wrote BENCHMARKS.md from", args.out)
        return 0
    args.wrk = shutil.which("wrk") is not None
    concs = [int(c) for c in args.conc.split(",") if c]
    scenarios = [s for s in args.scenarios.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    os.makedirs(OUT, exist_ok=True)
    raise_nofile()
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    if not args.wrk:
        log("wrk not found (apt-get install wrk): bench/loadgen.py measures throughput instead")
    logdir = tempfile.mkdtemp(prefix="bench-", dir=OUT)
    results = {"command": " ".join(["python -m bench.run"] + (argv if argv is not None else sys.argv[1:])),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "versions": versions(), "git": git_rev(), "wrk": args.wrk,
               "duration": args.duration, "ttft_duration": args.ttft_duration, "concs": concs, "rows": []}
    try:
        from bench import pingpong
        results["machine"]["wakeup"] = pingpong.measure(GW_CORE, LOAD_CORE)
    except Exception as e:   # context only
        log(f"ping-pong probe failed: {e}")
    fake = Fake(logdir)
    gw = None
    try:
        gw = Gateway(fake, logdir, os.path.abspath(args.gateway_root))
        log(f"fake upstream :{fake.port} (core {LOAD_CORE}), gateway :{gw.port} worker pid {gw.worker} "
            f"(core {GW_CORE}); logs in {logdir}")
        # warm up: imports, upstream pool, first-request paths
        for tg in [t for t in targets if t != "direct"]:
            run_loadgen(gw.port, TARGETS[tg][1], body_for(tg, "stream0", "fake:"), "", 64, 1.0)
        for sc in scenarios:
            log(SCENARIOS[sc][0])
            for c in concs:
                for tg in targets:
                    server = None if tg == "direct" else gw
                    results["rows"].append(measure(server, fake, tg, sc, c, args, log))
        if args.profile:
            profile(gw, args, logdir, log)
        if args.slow:
            results["slow"] = slow_streams(gw, fake, args, log)
            results["slow_direct"] = slow_direct(fake, args, log)
        results["gateway_rss_end_mb"] = round(gw.rss(), 1)
    finally:
        if gw is not None:
            gw.close()
    if not args.no_litellm:
        ok, why = ensure_litellm(log)
        lt = None
        results["litellm"] = {"version": litellm_version() if ok else None}
        if not ok:
            results["litellm"]["error"] = why
            log("LiteLLM not measured: " + why)
        else:
            try:
                lt = LiteLLM(fake, logdir)
                log(f"LiteLLM :{lt.port} (core {GW_CORE})")
                run_loadgen(lt.port, "/v1/chat/completions", body_for("litellm", "stream0"), LITELLM_KEY, 4, 1.0)
                lconcs = [int(c) for c in args.litellm_conc.split(",") if c]
                for sc in scenarios:
                    for c in lconcs:
                        results["rows"].append(measure(lt, fake, "litellm", sc, c, args, log))
                results["litellm"]["rss_mb"] = round(lt.rss(), 1)
            except Exception as e:   # record why and carry on
                results["litellm"]["error"] = f"{type(e).__name__}: {e}"[:500]
                log("LiteLLM failed: " + results["litellm"]["error"])
            finally:
                if lt is not None:
                    lt.close()
    fake.close()
    if not args.keep_logs:
        shutil.rmtree(logdir, ignore_errors=True)   # access logs of ~100k requests: tens of MB
    results["wall_s"] = time.time() - t_start
    results["targets_check"] = check_targets(results)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    for t in results["targets_check"]:
        log(f"{'OK ' if t['ok'] else 'MISS'} {t['what']}: {t['measured']} (goal {t['goal']})")
    if not args.no_md:
        kept = sections.kept_sections()
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as fh:
            fh.write(render(results) + ("\n" + kept if kept else ""))
        log("wrote BENCHMARKS.md")
    log(f"results: {args.out} ({results['wall_s']:.0f} s)")
    return 0


def profile(gw, args, logdir, log):
    """py-spy (pinned to the load core) records the worker while wrk drives
    --profile-scenario at --profile-conc; writes collapsed stacks to
    bench/out/profile-<target>-<scenario>-c<conc>.txt and a summary to stdout."""
    spy = shutil.which("py-spy") or os.path.join(VENV_BIN, "py-spy")
    if not os.path.exists(spy):
        log("py-spy not installed (pip install py-spy): no profile")
        return
    for tg in ("v1", "api"):
        body = body_for(tg, args.profile_scenario, "fake:")
        out = os.path.join(OUT, f"profile-{tg}-{args.profile_scenario}-c{args.profile_conc}.txt")
        rec = subprocess.Popen(["taskset", "-c", LOAD_CORE, spy, "record", "-p", str(gw.worker),
                                "-d", str(int(args.profile)), "-r", "250", "-f", "raw", "-o", out,
                                "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        run_wrk(gw.port, TARGETS[tg][1], body, "", args.profile_conc, args.profile)
        rec.wait()
        log(f"  profile of {tg}: {out}")
        subprocess.run([PY, "-m", "bench.stacks", out, "--top", "30"])


if __name__ == "__main__":
    sys.exit(main())
