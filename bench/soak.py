"""Soak: minutes of mixed traffic on one gunicorn gevent worker; memory and fds must stay flat.

    .venv/bin/python -m bench.soak                  # 10 minutes, writes its BENCHMARKS.md section
    .venv/bin/python -m bench.soak --quick          # 1 minute, leaves BENCHMARKS.md alone
    .venv/bin/python -m bench.soak --minutes 3 --only local_reload,embed   # hunt a leak down

The gateway (core 0) serves remote providers on the fake upstream (core 1) with healthy,
rate-limited, failing and mid-stream-breaking keys, plus tiny local GGUFs that load and
unload. Client greenlets in this process (core 1) loop over a weighted mix of requests and
classify every answer as ok / expected-error / UNEXPECTED. The worker's VmRSS, open fds
and threads are sampled every 5 s. Targets (hardening issue): RSS growth after the warm-up
(first 20 %) under 5 %, fds flat, nothing UNEXPECTED. Raw data: bench/out/soak.json.
The environment reaches gunicorn, so allocator settings (MALLOC_ARENA_MAX=2, ...) can be compared.

RSS without a leak: on this stack RSS climbs while the Python heap (gc objects, allocated blocks)
and malloc's in-use bytes (mallinfo2) stay flat. Each llama.cpp context allocates a ~20 MB ggml
scheduler buffer; freeing it raises glibc's dynamic mmap threshold, so later big buffers come
from the arenas (one per native thread) and their freed pages stay resident. Compare a run
with MALLOC_MMAP_THRESHOLD_=131072 in the environment before calling growth a leak.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import (GW_CORE, LOAD_CORE, OUT, VENV_BIN, Fake, children, find_worker,  # noqa: E402
                       free_port, git_rev, machine, raise_nofile, start, stop, wait_http)
from bench.sections import write_section  # noqa: E402
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

SAMPLE_S = 5.0
CLIENT_TIMEOUT = 60.0      # generous: the longest healthy answer here takes ~4 s
FD_SLACK = 5
RSS_GOAL_PCT = 5.0
SECRET = "soakkey"         # part of every configured key: a response or log line holding it leaks one
OK, EXPECTED, UNEXPECTED = "ok", "expected-error", "UNEXPECTED"
DOCUMENTED = (429, 502, 503, 504)


def _keys(*prefixes):
    return [f"{p}-{SECRET}-{i}" for i, p in enumerate(prefixes)]


def gateway_config(fake_url, tmp, models):
    remote = {"type": "openai", "base_url": fake_url + "/v1", "cooldown": 2, "timeout": 30}
    return {"server": {"host": "127.0.0.1", "usage_db": os.path.join(tmp, "usage.sqlite3")},
            "providers": {
                # rl- rests 30 s (Retry-After), err- the 2 s cooldown: both keep coming back
                "oai": {**remote, "api_keys": _keys("ok", "rl", "err", "ok"), "models": ["echo", "chunks-16-5"]},
                "down": {**remote, "api_keys": _keys("rlnh", "err"), "models": ["echo"]},
                # mid-stream failures rest no key: every stream breaks after its first bytes
                "flaky": {**remote, "api_keys": _keys("cut", "trunc", "garbage", "nodone"), "models": ["chunks-8-5"]},
                "gem": {**remote, "type": "gemini", "base_url": fake_url + "/v1beta",
                        "api_keys": _keys("ok", "rl", "err"), "models": ["gemini-2.5-flash", "text-embedding-004"]},
                "local": {"type": "local", "keep_alive": "20s", "n_threads": 1, "n_ctx": 512,
                          "cache_dir": os.path.join(tmp, "cache"),
                          "models": {"tiny": {"path": models["tiny"]}, "tiny2": {"path": models["tiny2"]},
                                     "tiny-emb": {"path": models["emb"], "embedding": True}}}},
            "aliases": {"soak-fast": ["down:echo", "oai:echo"]}}


CONFIG_SUMMARY = (
    "`oai` (openai type): keys ok, rl (429 + Retry-After 30), err (500), ok; cooldown 2 s · "
    "`down` (openai): keys rlnh (429, no Retry-After), err: every request fails (429/502) · "
    "`flaky` (openai): keys cut, trunc, garbage, nodone: streams break after the first bytes · "
    "`gem` (gemini): ok, rl (retryDelay 30 s), err · `local`: tiny random GGUFs from `tests/tiny_gguf.py` "
    "(`tiny`, `tiny2` always asked with keep_alive 0 so it loads and unloads, `tiny-emb`), n_threads 1, "
    "keep_alive 20s · alias `soak-fast` = [down:echo, oai:echo] · usage log and access log on")


# ---- the mix ------------------------------------------------------------------------------------
def _chat(path, model, r, stream, drop=None, **extra):
    return "POST", path, {"model": model, "messages": [{"role": "user", "content": f"soak {r.randrange(9999)}"}],
                          "stream": stream, **extra}, drop


def _either(r):
    return r.choice(["/api/chat", "/v1/chat/completions"])


OAI_GEM_STREAM = ["oai:chunks-16-5", "gem:chunks-16-5"]
OAI_GEM = ["oai:echo", "gem:gemini-2.5-flash"]
# kind: (weight, expectation, what, builder(rnd) -> (method, path, body, drop after N chunks / None))
KINDS = {
    "api_stream": (14, "ok", "/api/chat stream, oai or gem, 16 chunks 5 ms apart",
                   lambda r: _chat("/api/chat", r.choice(OAI_GEM_STREAM), r, True)),
    "v1_stream": (12, "ok", "/v1/chat/completions stream, oai or gem",
                  lambda r: _chat("/v1/chat/completions", r.choice(OAI_GEM_STREAM), r, True,
                                  stream_options={"include_usage": r.random() < 0.5})),
    "api_chat": (7, "ok", "/api/chat non-stream, oai or gem", lambda r: _chat("/api/chat", r.choice(OAI_GEM), r, False)),
    "v1_chat": (7, "ok", "/v1/chat/completions non-stream, oai or gem",
                lambda r: _chat("/v1/chat/completions", r.choice(OAI_GEM), r, False)),
    "generate": (6, "ok", "/api/generate, gem or oai, stream or not",
                 lambda r: ("POST", "/api/generate", {"model": r.choice(["gem:chunks-8-5", "oai:echo"]),
                                                      "prompt": "soak", "stream": r.random() < 0.5}, None)),
    "embed": (6, "ok", "/api/embed, /v1/embeddings: gem text-embedding-004, local tiny-emb",
              lambda r: r.choice([("POST", "/api/embed", {"model": "gem:text-embedding-004", "input": ["a", "bb"]}, None),
                                  ("POST", "/v1/embeddings", {"model": "gem:text-embedding-004", "input": "soak"}, None),
                                  ("POST", "/api/embed", {"model": "local:tiny-emb", "input": "soak"}, None)])),
    "local_stream": (5, "ok", "local:tiny streamed, 8 tokens, /api/chat or /v1",
                     lambda r: r.choice([_chat("/api/chat", "local:tiny", r, True, options={"num_predict": 8}),
                                         _chat("/v1/chat/completions", "local:tiny", r, True, max_tokens=8)])),
    "local": (4, "ok", "local:tiny non-stream, 8 tokens, /api/generate or /v1",
              lambda r: r.choice([("POST", "/api/generate", {"model": "local:tiny", "prompt": "soak", "stream": False,
                                                             "options": {"num_predict": 8}}, None),
                                  _chat("/v1/chat/completions", "local:tiny", r, False, max_tokens=8)])),
    # ~0.5/s at ~500 req/s: a client that unloads after each answer; each load is a ~20 MB buffer
    "local_reload": (0.1, "ok", "local:tiny2 with keep_alive 0: a load and an unload each",
                     lambda r: ("POST", "/api/generate", {"model": "local:tiny2", "prompt": "soak", "stream": False,
                                                          "keep_alive": 0, "options": {"num_predict": 4}}, None)),
    "alias": (5, "ok", "alias soak-fast (down:echo fails over to oai:echo), both routes",
              lambda r: _chat(_either(r), "soak-fast", r, r.random() < 0.5)),
    "failing": (7, "fail", "down:echo, every key failing: 429/502 with a JSON error",
                lambda r: _chat(_either(r), "down:echo", r, r.random() < 0.5)),
    "midstream": (7, "fault", "flaky:chunks-8-5 streamed: cut, trunc, garbage, nodone upstream streams",
                  lambda r: _chat(_either(r), "flaky:chunks-8-5", r, True)),
    "disconnect": (7, "ok", "client leaves after 2 chunks (oai, gem, local) or right after sending",
                   lambda r: r.choice([_chat("/api/chat", "oai:chunks-200-20", r, True, drop=2),
                                       _chat("/v1/chat/completions", "gem:chunks-200-20", r, True, drop=2),
                                       _chat("/api/chat", "local:tiny", r, True, drop=2, options={"num_predict": 64}),
                                       _chat("/api/chat", "oai:chunks-200-20", r, True, drop=0)])),
    "ops": (2, "ok", "GET /api/ps, /api/tags, /health/ready, /metrics, /api/usage?group_by=key",
            lambda r: ("GET", r.choice(["/api/ps", "/api/tags", "/health/ready", "/metrics",
                                        "/api/usage?group_by=key"]), None, None)),
}


# ---- the client ---------------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection: a response is read whole, or dropped after `drop` chunks."""
    stale_retries = 0

    def __init__(self, port):
        self.port, self.sock, self.buf, self.used = port, None, b"", False

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf, self.used = None, b"", False

    def _more(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError("the gateway closed the connection")
        self.buf += d

    def exchange(self, method, path, body, drop):
        """(status, headers, body, dropped?)"""
        reused = self.used
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)
        data = json.dumps(body).encode() if body is not None else b""
        try:
            self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: "
                              f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            self.used = True
            if drop == 0:
                self.close()
                return 0, {}, b"", True
            while b"\r\n\r\n" not in self.buf:
                self._more()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            if reused and not self.buf:   # the server closed an idle keep-alive: every client retries
                self.close()
                Conn.stale_retries += 1
                return self.exchange(method, path, body, drop)
            raise
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        status, out, n = int(lines[0].split()[1]), bytearray(), 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                nl = self.buf.find(b"\r\n")
                size = int(self.buf[:nl].split(b";")[0], 16) if nl >= 0 else -1
                if size < 0 or len(self.buf) < nl + 4 + size:
                    self._more()
                    continue
                out += self.buf[nl + 2:nl + 2 + size]
                self.buf = self.buf[nl + 4 + size:]
                if size == 0:
                    break
                n += 1
                if drop and n >= drop:
                    self.close()
                    return status, headers, bytes(out), True
        elif "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._more()
            out, self.buf = self.buf[:length], self.buf[length:]
        else:
            raise ValueError("a response with neither a length nor chunked encoding")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, bytes(out), False


def stream_end(ctype, text):
    """'complete', 'error' (an error line or event), or what is wrong with the body."""
    try:
        if "ndjson" in ctype:
            # split on \n only: str.splitlines() also splits inside JSON strings holding U+2028 or NEL
            objs = [json.loads(ln) for ln in text.split("\n") if ln.strip()]
            if any("error" in o for o in objs):
                return "error"
            return "complete" if objs and objs[-1].get("done") is True else "NDJSON stream without a final done chunk"
        if "event-stream" in ctype:
            data = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
            if any(d != "[DONE]" and "error" in json.loads(d) for d in data):
                return "error"
            return "complete" if data and data[-1] == "[DONE]" else "SSE stream without [DONE]"
        if "json" in ctype:
            return "error" if "error" in json.loads(text) else "complete"
        return "complete"   # /metrics
    except (ValueError, AttributeError, TypeError) as e:
        return f"malformed body ({type(e).__name__})"


def error_shape_ok(path, text):
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if path.startswith("/v1"):
        return isinstance(err, dict) and bool(err.get("message"))
    return isinstance(err, str) and bool(err)


def classify(expect, path, status, headers, body, dropped):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return UNEXPECTED, f"invalid UTF-8 at byte {e.start}"
    if SECRET in text:
        return UNEXPECTED, "an API key in the response"
    if "Traceback" in text:
        return UNEXPECTED, "a traceback in the response"
    if dropped:
        return (OK, "") if status in (0, 200) else (UNEXPECTED, f"HTTP {status} before the client left")
    if status == 200:
        end = stream_end(headers.get("content-type", ""), text)
        if end == "complete":
            return (OK, "") if expect == "ok" else (UNEXPECTED, f"a complete 200 from a '{expect}' route")
        if end == "error":
            return (EXPECTED, "") if expect == "fault" else (UNEXPECTED, "an error line on a healthy route: " + text[-200:])
        return UNEXPECTED, end
    if status in DOCUMENTED and error_shape_ok(path, text):
        if status == 429 and "retry-after" not in headers:
            return UNEXPECTED, "429 without Retry-After"
        return (EXPECTED, "") if expect != "ok" else (UNEXPECTED, f"HTTP {status} on a healthy route: {text[:200]}")
    return UNEXPECTED, f"HTTP {status}: {text[:200]}"


class Results:
    def __init__(self):
        self.by_kind, self.latency, self.reasons, self.samples = defaultdict(Counter), defaultdict(list), Counter(), []
        self.busy = 0   # requests in flight

    def add(self, kind, spec, outcome, why, dt, status, body):
        self.by_kind[kind][outcome] += 1
        self.latency[kind].append(dt)
        if outcome == UNEXPECTED:
            self.reasons[why[:80]] += 1
            if len(self.samples) < 25:   # enough to reproduce each by hand
                self.samples.append({"kind": kind, "method": spec[0], "path": spec[1], "body": spec[2], "status": status,
                                     "why": why, "response_tail": body[-400:].decode("utf-8", "replace")})

    def total(self, outcome=None):
        return sum(sum(c.values()) if outcome is None else c[outcome] for c in self.by_kind.values())


def client(port, seed, state, gate, res, kinds):
    r, conn = random.Random(seed), Conn(port)
    weights = [KINDS[k][0] for k in kinds]
    while True:
        if not gate.is_set():   # the idle worker is measured: hold no connection, as after the run
            conn.close()
            gate.wait()
        if time.monotonic() >= state["stop_at"]:
            break
        kind = r.choices(kinds, weights)[0]
        spec = KINDS[kind][3](r)
        t0, status, body = time.monotonic(), 0, b""
        res.busy += 1
        try:
            with gevent.Timeout(CLIENT_TIMEOUT):
                status, headers, body, dropped = conn.exchange(*spec)
            outcome, why = classify(KINDS[kind][1], spec[1], status, headers, body, dropped)
        except gevent.Timeout:
            conn.close()
            outcome, why = UNEXPECTED, f"no complete answer within {CLIENT_TIMEOUT:.0f} s"
        except (OSError, EOFError, ValueError, IndexError) as e:
            conn.close()
            outcome, why = UNEXPECTED, f"{type(e).__name__}: {e}"
        finally:
            res.busy -= 1
        res.add(kind, spec, outcome, why, time.monotonic() - t0, status, body)
        gevent.sleep(r.uniform(0, 0.02))   # a little think time keeps the clients out of lockstep
    conn.close()


# ---- sampling and checks ------------------------------------------------------------------------
def proc_figures(pid):
    out = {"rss_mb": None, "threads": None, "fds": None}
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        out["rss_mb"] = round(int(fields["VmRSS"].split()[0]) / 1024, 1)
        out["threads"] = int(fields["Threads"])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:   # the worker is gone: the 'survives' target says so
        pass
    return out


def upstream_conns(pid, port):
    """The worker's TCP sockets to the fake: its keep-alive pools, whose size is the highest
    concurrency seen so far per provider (bounded by the clients), so they are counted apart."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1])   # "socket:[12345]"
            except OSError:   # closed since the listing
                pass
        with open(f"/proc/{pid}/net/tcp") as fh:
            rows = [ln.split() for ln in fh.readlines()[1:]]
    except OSError:
        return None
    return sum(1 for r in rows if int(r[2].rsplit(":", 1)[1], 16) == port and r[9] in inodes)


def upstream_streams(fake):
    try:
        return fake.stats()["open_streams"]
    except Exception:   # context only
        return None


def sample(t0, worker, fake, res, phase):
    return {"t": round(time.monotonic() - t0, 1), "phase": phase, **proc_figures(worker), "requests": res.total(),
            "upstream_conns": upstream_conns(worker, fake.port), "upstream_open_streams": upstream_streams(fake),
            "fake_fds": proc_figures(fake.proc.pid)["fds"]}


def idle_sample(t0, worker, fake, res, phase):
    """The load paused: wait until no request and no upstream stream is open, then sample. Idle
    vs idle is what shows a leak; under load the fd count follows the sockets in flight."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (res.busy or upstream_streams(fake)):
        gevent.sleep(0.2)
    gevent.sleep(2.0)   # what the gateway closes after an answer gets time to go
    return sample(t0, worker, fake, res, phase)


def median3(series, key):
    """At a point in time: the median of the 3 samples ending there (one sample is noisy)."""
    vals = sorted(x[key] for x in series[-3:] if x[key] is not None)
    return vals[len(vals) // 2] if vals else None


def scan_log(path):
    """Tracebacks (counted by their exception line) and key leaks in the gateway's own log."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().splitlines()
    exc, in_tb = Counter(), False
    for ln in lines:
        if ln.startswith("Traceback (most recent call last)"):
            in_tb = True
        elif in_tb and ln and not ln.startswith(" "):
            exc[ln[:160]] += 1
            in_tb = False
    return {"lines": len(lines), "tracebacks": sum(exc.values()), "exceptions": dict(exc.most_common(10)),
            "key_leaks": sum(SECRET in ln for ln in lines)}


def pct_ms(vals, p):
    vals = sorted(vals)
    return round(vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))] * 1000, 1) if vals else None


# ---- the run ------------------------------------------------------------------------------------
def run(args, log):
    tmp = tempfile.mkdtemp(prefix="gw-soak-")
    models = {"tiny": write_tiny_gguf(os.path.join(tmp, "tiny.gguf")),
              "tiny2": write_tiny_gguf(os.path.join(tmp, "tiny2.gguf"), seed=1),
              "emb": write_tiny_gguf(os.path.join(tmp, "emb.gguf"), embedding=True, seed=3)}
    kinds = [k for k in KINDS if not args.only or k in args.only]
    fake = gw = None
    duration = args.minutes * 60.0
    try:
        fake = Fake(tmp)
        cfg_path, gw_log, port = os.path.join(tmp, "gateway.yaml"), os.path.join(tmp, "gateway.log"), free_port()
        with open(cfg_path, "w") as fh:
            yaml.safe_dump(gateway_config(fake.url, tmp, models), fh)
        env = dict(os.environ, GATEWAY_CONFIG=cfg_path, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_WORKERS="1",
                   HOME=tmp, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")
        gw = start([os.path.join(VENV_BIN, "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], GW_CORE, gw_log, env=env)
        wait_http(f"http://127.0.0.1:{port}/api/version", gw, timeout=60)
        worker = find_worker(gw.pid)
        log(f"fake :{fake.port}, gateway :{port} worker {worker}; {args.clients} clients, {args.minutes:g} min; {tmp}")
        res, t0, gate, paused = Results(), time.monotonic(), gevent.event.Event(), 0.0
        gate.set()
        series, state, idle_warm = [sample(t0, worker, fake, res, "before")], {"stop_at": t0 + duration}, None
        clients = [gevent.spawn(client, port, i, state, gate, res, kinds) for i in range(args.clients)]
        while time.monotonic() < state["stop_at"]:
            gevent.sleep(min(SAMPLE_S, max(0.0, state["stop_at"] - time.monotonic())))
            if idle_warm is None and time.monotonic() - t0 >= 0.2 * duration:
                gate.clear()   # the warm-up is over: measure the idle worker, then carry on
                p0 = time.monotonic()
                idle_warm = idle_sample(t0, worker, fake, res, "warm-up idle")
                series.append(idle_warm)
                paused += time.monotonic() - p0
                state["stop_at"] += time.monotonic() - p0
                gate.set()
                continue
            series.append(sample(t0, worker, fake, res, "warm-up" if idle_warm is None else "load"))
            if len(series) % 12 == 0:
                s = series[-1]
                log(f"  {s['t']:5.0f} s {s['requests']:7d} req  rss {s['rss_mb']} MB  fds {s['fds']}  "
                    f"threads {s['threads']}  UNEXPECTED {res.total(UNEXPECTED)}")
        gevent.joinall(clients, timeout=CLIENT_TIMEOUT + 5)
        t_load = time.monotonic() - t0 - paused
        after = idle_sample(t0, worker, fake, res, "after idle")
        series.append(after)
        alive = worker in children(gw.pid) and after["fds"] is not None
    finally:
        if gw is not None:
            stop(gw)
        if fake is not None:
            fake.close()
    logscan = scan_log(gw_log)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)   # the access log of ~300k requests: ~100 MB
    warm = [x for x in series if x["phase"] == "warm-up"] or series[:1]
    load = [x for x in series if x["phase"] == "load"] or series[-1:]
    idle_warm = idle_warm or series[-1]
    rss_warm, rss_end, rss_max = median3(warm, "rss_mb"), median3(load, "rss_mb"), max(x["rss_mb"] or 0 for x in series)
    fd_warm, fd_end, fd_max = median3(warm, "fds"), median3(load, "fds"), max(x["fds"] or 0 for x in series)
    inf = float("inf")
    rss_a, rss_b = idle_warm["rss_mb"], after["rss_mb"]
    growth = round((rss_b - rss_a) / rss_a * 100, 2) if rss_a and rss_b else inf
    fd_a, fd_b = idle_warm["fds"] or 0, after["fds"] if after["fds"] is not None else inf
    pool_a, pool_b = idle_warm["upstream_conns"] or 0, after["upstream_conns"] or 0
    total, unexpected = res.total(), res.total(UNEXPECTED)
    targets = [
        (f"RSS growth after warm-up < {RSS_GOAL_PCT:g} % (idle vs idle)", f"{growth:+.2f} % ({rss_a} → {rss_b} MB); "
         f"under load {rss_warm} → {rss_end} MB, max {rss_max}", growth < RSS_GOAL_PCT),
        (f"open fds flat: idle, upstream pool sockets apart, within {FD_SLACK} of the warm-up's",
         f"{fd_a - pool_a} → {fd_b - pool_b} (pools {pool_a} → {pool_b}); under load {fd_warm} → {fd_end}, "
         f"max {fd_max}", (fd_b - pool_b) - (fd_a - pool_a) <= FD_SLACK),
        ("no upstream stream left open after the load", f"{after['upstream_open_streams']} open",
         after["upstream_open_streams"] == 0),
        ("no UNEXPECTED answer", f"{unexpected} of {total}", unexpected == 0),
        ("no traceback or API key in the gateway log", f"{logscan['tracebacks']} tracebacks, {logscan['key_leaks']} "
         f"key leaks in {logscan['lines']} lines", logscan["tracebacks"] == 0 and logscan["key_leaks"] == 0),
        ("the one worker survives", "alive" if alive else "died or restarted", alive)]
    kind_rows = {k: {**res.by_kind[k], "requests": sum(res.by_kind[k].values()), "p50_ms": pct_ms(res.latency[k], 50),
                     "p99_ms": pct_ms(res.latency[k], 99), "max_ms": pct_ms(res.latency[k], 100)} for k in kinds}
    return {"minutes": args.minutes, "clients": args.clients, "only": args.only, "load_s": round(t_load, 1),
            "requests": total, "rps": round(total / t_load, 1), "kinds": kind_rows,
            "unexpected_reasons": dict(res.reasons), "unexpected_samples": res.samples,
            "stale_keepalive_retries": Conn.stale_retries, "rss_idle_warm_mb": rss_a, "rss_idle_end_mb": rss_b,
            "rss_growth_pct": growth, "rss_load_warm_mb": rss_warm, "rss_load_end_mb": rss_end, "rss_max_mb": rss_max,
            "fds_before": series[0]["fds"], "fds_idle_warm": fd_a, "fds_idle_end": after["fds"],
            "upstream_pool_idle_warm": pool_a, "upstream_pool_idle_end": pool_b, "fds_load_warm": fd_warm, "fds_load_end": fd_end, "fds_max": fd_max,
            "threads_idle_warm": idle_warm["threads"], "threads_idle_end": after["threads"],
            "gateway_log": logscan, "targets": [{"goal": g, "measured": m, "met": ok} for g, m, ok in targets],
            "series": series}


def render(r):
    m = r["machine"]
    out = ["## Soak: 10 minutes of mixed traffic on one worker", "",
           f"- **Command:** `{r['command']}` ({r['wall_s']:.0f} s)",
           f"- **Date:** {r['date']}  ·  **commit:** {r['git']}",
           f"- **Machine:** {m['nproc']} cores, {m['cpu']}, {m['ram_gib']} GiB RAM, Linux {m['kernel']}",
           f"- **Layout:** gunicorn, 1 gevent worker, pinned to core {GW_CORE}; the fake upstream and {r['clients']} "
           f"client greenlets (keep-alive sockets, 0-20 ms think time) on core {LOAD_CORE}; {r['minutes']:g} min of "
           f"load, warm-up = the first 20 %; the worker's VmRSS, open fds and threads sampled every {SAMPLE_S:g} s. "
           "Idle figures: the load paused at the end of the warm-up and after the run, once no request and no "
           "upstream stream is open (+2 s); under-load figures: the median of the 3 samples ending there",
           f"- **Config:** {CONFIG_SUMMARY}",
           f"- **Load:** {r['requests']} requests, {r['rps']} req/s; a 200 stream counts as ok only with its final "
           "chunk (`done: true` / `[DONE]`); expected-error = the documented status with a JSON error body, or a "
           f"stream ending in an error line; stale keep-alive retries: {r['stale_keepalive_retries']}", "",
           "| goal | measured | met |", "|---|---|---|"]
    out += [f"| {t['goal']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    out += ["", "| kind | what | requests | ok | expected-error | UNEXPECTED | p50 ms | p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {k} | {KINDS[k][2]} | {v['requests']} | {v.get(OK, 0)} | {v.get(EXPECTED, 0)} | "
            f"{v.get(UNEXPECTED, 0)} | {v['p50_ms']} | {v['p99_ms']} |" for k, v in r["kinds"].items()]
    if r["unexpected_reasons"]:
        out += ["", "UNEXPECTED: " + "; ".join(f"{n}× {w}" for w, n in r["unexpected_reasons"].items())]
    out += ["", "| t (s) | phase | requests | RSS MB | fds | of which upstream sockets | threads | "
            "upstream open streams |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    s = r["series"]
    step = max(1, len(s) // 12)
    picked = [x for i, x in enumerate(s) if i % step == 0 or "idle" in x["phase"]]
    out += [f"| {x['t']:.0f} | {x['phase']} | {x['requests']} | {x['rss_mb']} | {x['fds']} | {x['upstream_conns']} | "
            f"{x['threads']} | {x['upstream_open_streams']} |" for x in picked]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="1 minute; BENCHMARKS.md is left alone")
    ap.add_argument("--no-md", action="store_true", help="do not write the BENCHMARKS.md section")
    ap.add_argument("--only", type=lambda v: v.split(","), metavar="KIND,...",
                    help="only these kinds (to find which one a leak follows); implies --no-md")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, gateway log)")
    ap.add_argument("--out", default=os.path.join(OUT, "soak.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes = 1.0
    if args.only and set(args.only) - set(KINDS):
        ap.error(f"unknown kinds {sorted(set(args.only) - set(KINDS))}; choose from {', '.join(KINDS)}")

    def log(msg):
        print(f"[soak] {msg}", file=sys.stderr, flush=True)
    raise_nofile()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(LOAD_CORE)})   # the clients share core 1 with the fake, as in bench.run
    t = time.time()
    r = run(args, log)
    r.update({"command": " ".join(["python -m bench.soak"] + argv), "wall_s": round(time.time() - t, 1),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "git": git_rev()})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(r, fh, indent=1)
    for tg in r["targets"]:
        log(f"{'OK  ' if tg['met'] else 'MISS'} {tg['goal']}: {tg['measured']}")
    for k, v in r["kinds"].items():
        log(f"  {k:13s} {v['requests']:7d}  ok {v.get(OK, 0):6d}  expected {v.get(EXPECTED, 0):6d}  "
            f"UNEXPECTED {v.get(UNEXPECTED, 0)}")
    for w, n in r["unexpected_reasons"].items():
        log(f"  UNEXPECTED {n}× {w}")
    if not (args.quick or args.no_md or args.only):
        write_section("soak", render(r))
        log("wrote the soak section of BENCHMARKS.md")
    log(f"results: {args.out} ({r['wall_s']:.0f} s)")
    return 0 if all(tg["met"] for tg in r["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
