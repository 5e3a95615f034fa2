"""Soak: minutes of mixed traffic on one gunicorn gevent worker; memory and fds must stay flat.

    .venv/bin/python -m bench.soak                  # 10 minutes, writes its BENCHMARKS.md section
    .venv/bin/python -m bench.soak --quick          # 1 minute, no BENCHMARKS.md
    .venv/bin/python -m bench.soak --minutes 3 --clients 24 --no-md

The gateway (core 0) serves remote providers on the fake upstream (core 1) with healthy,
rate-limited, failing and mid-stream-breaking keys, plus tiny local GGUFs that load and
unload. Client greenlets in this process (core 1) loop over a weighted mix of requests and
classify every answer as ok / expected-error / UNEXPECTED. The worker's VmRSS, open fds
and threads are sampled every 5 s. Targets (hardening issue): RSS growth after the warm-up
(first 20 %) under 5 %, fds flat, and nothing UNEXPECTED. Raw data: bench/out/soak.json.
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
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import (GW_CORE, LOAD_CORE, OUT, VENV_BIN, Fake, children, find_worker,  # noqa: E402
                       free_port, git_rev, machine, raise_nofile, start, stop, wait_http)
from bench.sections import write_section  # noqa: E402
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

SAMPLE_S = 5.0
CLIENT_TIMEOUT = 60.0      # generous: the longest healthy answer here takes ~4 s
FD_SLACK = 10              # in-flight sockets make fd counts jitter by a few
RSS_GOAL_PCT = 5.0
SECRET = "soakkey"         # in every configured key: any response or log line holding it leaks one
OK, EXPECTED, UNEXPECTED = "ok", "expected-error", "UNEXPECTED"
DOCUMENTED = (429, 502, 503, 504)


class ClientTimeout(Exception):
    pass


def _keys(*prefixes):
    return [f"{p}-{SECRET}-{i}" for i, p in enumerate(prefixes)]


def gateway_config(fake_url, tmp, models):
    local = {"type": "local", "keep_alive": "20s", "n_threads": 1, "n_ctx": 512,
             "cache_dir": os.path.join(tmp, "cache"),
             "models": {"tiny": {"path": models["tiny"]}, "tiny2": {"path": models["tiny2"]},
                        "tiny-emb": {"path": models["emb"], "embedding": True}}}
    oai = {"type": "openai", "base_url": fake_url + "/v1", "cooldown": 2, "timeout": 30}
    return {"server": {"host": "127.0.0.1", "usage_db": os.path.join(tmp, "usage.sqlite3")},
            "providers": {
                # rl- rests 30 s (Retry-After), err- rests the 2 s cooldown: both keep coming back
                "oai": {**oai, "api_keys": _keys("ok", "rl", "err", "ok"),
                        "models": ["echo", "chunks-16-5", "chunks-200-20"]},
                # every key fails: clients see 502, or 429 while every key rests
                "down": {**oai, "api_keys": _keys("rlnh", "err"), "models": ["echo"]},
                # keys whose streams break after the first bytes: no rest, an error line each time
                "flaky": {**oai, "api_keys": _keys("cut", "trunc", "garbage", "nodone"),
                          "models": ["chunks-8-5"]},
                "gem": {"type": "gemini", "base_url": fake_url + "/v1beta", "cooldown": 2, "timeout": 30,
                        "api_keys": _keys("ok", "rl", "err"),
                        "models": ["gemini-2.5-flash", "text-embedding-004"]},
                "local": local},
            "aliases": {"soak-fast": ["down:echo", "oai:echo"]}}


CONFIG_SUMMARY = (
    "`oai` (openai type): keys ok, rl (429 + Retry-After 30), err (500), ok; cooldown 2 s · "
    "`down` (openai): keys rlnh (429, no Retry-After), err: every request fails (429/502) · "
    "`flaky` (openai): keys cut, trunc, garbage, nodone: streams break after the first bytes · "
    "`gem` (gemini): ok, rl (retryDelay 30 s), err · "
    "`local`: tiny random GGUFs from `tests/tiny_gguf.py` (`tiny`, `tiny2` asked with keep_alive 0 "
    "so it loads and unloads every time, `tiny-emb`), n_threads 1, keep_alive 20s · "
    "alias `soak-fast` = [down:echo, oai:echo] · usage log and access log on")


# ---- the mix: kind -> (weight, expectation, description, builder(rnd) -> (method, path, body, drop))
def _msgs(r):
    return [{"role": "user", "content": f"soak {r.randrange(10000)}"}]


def _chat(path, model, r, stream, **extra):
    return "POST", path, {"model": model, "messages": _msgs(r), "stream": stream, **extra}, None


KINDS = {
    "api_stream": (14, "ok", "/api/chat stream, oai or gem, 16 chunks 5 ms apart",
                   lambda r: _chat("/api/chat", r.choice(["oai:chunks-16-5", "gem:chunks-16-5"]), r, True)),
    "v1_stream": (12, "ok", "/v1/chat/completions stream, oai or gem",
                  lambda r: _chat("/v1/chat/completions", r.choice(["oai:chunks-16-5", "gem:chunks-16-5"]), r,
                                  True, stream_options={"include_usage": r.random() < 0.5})),
    "api_chat": (7, "ok", "/api/chat non-stream, oai or gem",
                 lambda r: _chat("/api/chat", r.choice(["oai:echo", "gem:gemini-2.5-flash"]), r, False)),
    "v1_chat": (7, "ok", "/v1/chat/completions non-stream, oai or gem",
                lambda r: _chat("/v1/chat/completions", r.choice(["oai:echo", "gem:gemini-2.5-flash"]), r, False)),
    "generate": (6, "ok", "/api/generate, gem or oai, stream or not",
                 lambda r: ("POST", "/api/generate", {"model": r.choice(["gem:chunks-8-5", "oai:echo"]),
                                                      "prompt": "soak", "stream": r.random() < 0.5}, None)),
    "embed": (6, "ok", "/api/embed or /v1/embeddings: gem text-embedding-004, local tiny-emb",
              lambda r: r.choice([("POST", "/api/embed", {"model": "gem:text-embedding-004", "input": ["a", "bb"]}, None),
                                  ("POST", "/v1/embeddings", {"model": "gem:text-embedding-004", "input": "soak"}, None),
                                  ("POST", "/api/embed", {"model": "local:tiny-emb", "input": "soak"}, None)])),
    "local_stream": (5, "ok", "local:tiny streamed, 8 tokens (/api/chat or /v1)",
                     lambda r: r.choice([_chat("/api/chat", "local:tiny", r, True, options={"num_predict": 8}),
                                         _chat("/v1/chat/completions", "local:tiny", r, True, max_tokens=8)])),
    "local": (4, "ok", "local:tiny non-stream, 8 tokens (/api/generate or /v1)",
              lambda r: r.choice([("POST", "/api/generate", {"model": "local:tiny", "prompt": "soak", "stream": False,
                                                             "options": {"num_predict": 8}}, None),
                                  _chat("/v1/chat/completions", "local:tiny", r, False, max_tokens=8)])),
    "local_reload": (1, "ok", "local:tiny2 with keep_alive 0: a load and an unload per request",
                     lambda r: ("POST", "/api/generate", {"model": "local:tiny2", "prompt": "soak", "stream": False,
                                                          "keep_alive": 0, "options": {"num_predict": 4}}, None)),
    "alias": (5, "ok", "alias soak-fast (down:echo fails, oai:echo answers), both routes",
              lambda r: _chat(r.choice(["/api/chat", "/v1/chat/completions"]), "soak-fast", r, r.random() < 0.5)),
    "failing": (7, "fail", "down:echo, every key failing: 429/502 with a JSON error",
                lambda r: _chat(r.choice(["/api/chat", "/v1/chat/completions"]), "down:echo", r, r.random() < 0.5)),
    "midstream": (7, "fault", "flaky:chunks-8-5 streamed: cut/trunc/garbage/nodone upstream streams",
                  lambda r: _chat(r.choice(["/api/chat", "/v1/chat/completions"]), "flaky:chunks-8-5", r, True)),
    "disconnect": (7, "drop", "client goes away after 2 chunks (oai, gem, local) or right after sending",
                   lambda r: r.choice([
                       _chat("/api/chat", "oai:chunks-200-20", r, True)[:3] + (2,),
                       _chat("/v1/chat/completions", "gem:chunks-200-20", r, True)[:3] + (2,),
                       _chat("/api/chat", "local:tiny", r, True, options={"num_predict": 64})[:3] + (2,),
                       _chat("/api/chat", "oai:chunks-200-20", r, True)[:3] + (0,)])),
    "ops": (2, "ok", "GET /api/ps, /api/tags, /health/ready, /metrics, /api/usage?group_by=key",
            lambda r: ("GET", r.choice(["/api/ps", "/api/tags", "/health/ready", "/metrics",
                                        "/api/usage?group_by=key"]), None, None)),
}


# ---- the client --------------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection; a response is read whole, or dropped after `drop` chunks."""

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
        """(status, headers, body bytes, dropped?)"""
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
            if reused and not self.buf:   # the server dropped an idle keep-alive: any client retries
                self.close()
                STALE_RETRIES[0] += 1
                return self.exchange(method, path, body, drop)
            raise
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        out, n = bytearray(), 0
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


STALE_RETRIES = [0]


def stream_end(ctype, text):
    """'complete', 'error' (an error line/event), or what is wrong with the body."""
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
    return isinstance(err, dict) and bool(err.get("message")) if path.startswith("/v1") else \
        isinstance(err, str) and bool(err)


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
            return (UNEXPECTED, f"200 complete from a {expect} route") if expect in ("fail", "fault") else (OK, "")
        if end == "error":
            return (EXPECTED, "") if expect == "fault" else (UNEXPECTED, "error line on a healthy route: " + text[-200:])
        return UNEXPECTED, end
    if status in DOCUMENTED and error_shape_ok(path, text):
        if status == 429 and "retry-after" not in headers:
            return UNEXPECTED, "429 without Retry-After"
        if expect in ("fail", "fault"):
            return EXPECTED, ""
        return UNEXPECTED, f"HTTP {status} on a healthy route: {text[:200]}"
    return UNEXPECTED, f"HTTP {status}: {text[:200]}"


class Results:
    def __init__(self):
        self.by_kind = defaultdict(Counter)
        self.latency = defaultdict(list)
        self.reasons = Counter()
        self.samples = []       # the first UNEXPECTED answers, in full enough to reproduce

    def add(self, kind, spec, outcome, why, dt, status, body):
        self.by_kind[kind][outcome] += 1
        self.latency[kind].append(dt)
        if outcome == UNEXPECTED:
            self.reasons[why[:80]] += 1
            if len(self.samples) < 25:
                self.samples.append({"kind": kind, "method": spec[0], "path": spec[1], "body": spec[2],
                                     "status": status, "why": why, "response_tail": body[-400:].decode("utf-8", "replace")})


def client(port, seed, stop_at, res, only):
    r = random.Random(seed)
    names = [k for k in KINDS if k in only] if only else list(KINDS)
    weights = [KINDS[k][0] for k in names]
    conn = Conn(port)
    while time.monotonic() < stop_at:
        kind = r.choices(names, weights)[0]
        spec = KINDS[kind][3](r)
        t0 = time.monotonic()
        status, body = 0, b""
        try:
            with gevent.Timeout(CLIENT_TIMEOUT, ClientTimeout):
                status, headers, body, dropped = conn.exchange(*spec)
            outcome, why = classify(KINDS[kind][1], spec[1], status, headers, body, dropped)
        except ClientTimeout:
            conn.close()
            outcome, why = UNEXPECTED, f"no complete answer within {CLIENT_TIMEOUT:.0f} s"
        except (OSError, EOFError, ValueError, IndexError) as e:
            conn.close()
            outcome, why = UNEXPECTED, f"{type(e).__name__}: {e}"
        res.add(kind, spec, outcome, why, time.monotonic() - t0, status, body)
        gevent.sleep(r.uniform(0, 0.02))   # a little think time keeps the mix from running in lockstep
    conn.close()


# ---- sampling ----------------------------------------------------------------------------------
def proc_sample(pid):
    out = {"rss_mb": None, "threads": None, "fds": None}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = round(int(line.split()[1]) / 1024.0, 1)
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def sample(t0, worker, fake, res, phase):
    s = {"t": round(time.monotonic() - t0, 1), "phase": phase, **proc_sample(worker),
         "requests": sum(sum(c.values()) for c in res.by_kind.values())}
    try:
        s["upstream_open_streams"] = fake.stats()["open_streams"]
    except Exception:   # context only
        s["upstream_open_streams"] = None
    s["fake_fds"] = proc_sample(fake.proc.pid)["fds"]
    return s


def median3(series, key):
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


def pct(vals, p):
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))] if vals else None


# ---- the run -----------------------------------------------------------------------------------
def run(args, log):
    tmp = tempfile.mkdtemp(prefix="gw-soak-")
    models = {"tiny": write_tiny_gguf(os.path.join(tmp, "tiny.gguf")),
              "tiny2": write_tiny_gguf(os.path.join(tmp, "tiny2.gguf"), seed=1),
              "emb": write_tiny_gguf(os.path.join(tmp, "emb.gguf"), embedding=True, seed=3)}
    fake = gw = None
    duration = args.minutes * 60.0
    try:
        fake = Fake(tmp)
        cfg_path = os.path.join(tmp, "gateway.yaml")
        with open(cfg_path, "w") as fh:
            yaml.safe_dump(gateway_config(fake.url, tmp, models), fh)
        port = free_port()
        env = dict(os.environ, GATEWAY_CONFIG=cfg_path, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_WORKERS="1",
                   HOME=tmp, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")
        gw_log = os.path.join(tmp, "gateway.log")
        gw = start([os.path.join(VENV_BIN, "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], GW_CORE,
                   gw_log, env=env)
        wait_http(f"http://127.0.0.1:{port}/api/version", gw, timeout=60)
        worker = find_worker(gw.pid)
        log(f"fake :{fake.port}, gateway :{port} worker {worker}; {args.clients} clients for "
            f"{args.minutes:g} min; files in {tmp}")
        res, series = Results(), []
        t0 = time.monotonic()
        series.append(sample(t0, worker, fake, res, "before"))
        stop_at, warm_at = t0 + duration, t0 + 0.2 * duration
        clients = [gevent.spawn(client, port, i, stop_at, res, args.only) for i in range(args.clients)]
        warm_series = None
        while time.monotonic() < stop_at:
            gevent.sleep(min(SAMPLE_S, max(0.0, stop_at - time.monotonic())))
            phase = "warm-up" if time.monotonic() <= warm_at + 0.5 else "load"
            series.append(sample(t0, worker, fake, res, phase))
            if phase == "load" and warm_series is None:
                warm_series = [s for s in series if s["phase"] == "warm-up"]
            if len(series) % 12 == 0:
                s = series[-1]
                log(f"  {s['t']:6.0f} s  {s['requests']:7d} req  rss {s['rss_mb']} MB  fds {s['fds']}  "
                    f"threads {s['threads']}  UNEXPECTED {sum(c[UNEXPECTED] for c in res.by_kind.values())}")
        gevent.joinall(clients, timeout=CLIENT_TIMEOUT + 5)
        t_load = time.monotonic() - t0
        load_series = [s for s in series if s["phase"] == "load"]
        warm_series = warm_series or series[:-1]
        # the load is over: the fds held for clients and upstream streams must go again
        fd_warm = median3(warm_series, "fds")
        settle_start = time.monotonic()
        while True:
            gevent.sleep(1.0)
            series.append(sample(t0, worker, fake, res, "after"))
            after = series[-1]
            if (after["fds"] <= fd_warm and not after["upstream_open_streams"]) or \
                    time.monotonic() - settle_start > 20:
                break
        settle_s = round(time.monotonic() - settle_start, 1)
        alive = worker in children(gw.pid) and os.path.exists(f"/proc/{worker}")
    finally:
        if gw is not None:
            stop(gw)
        if fake is not None:
            fake.close()
    logscan = scan_log(gw_log)
    rss_warm, rss_end = median3(warm_series, "rss_mb"), median3(load_series, "rss_mb")
    rss_max = max(s["rss_mb"] for s in series if s["rss_mb"] is not None)
    growth = round((rss_end - rss_warm) / rss_warm * 100, 2)
    fd_end = median3(load_series, "fds")
    fd_max = max(s["fds"] for s in load_series)
    total = sum(sum(c.values()) for c in res.by_kind.values())
    unexpected = sum(c[UNEXPECTED] for c in res.by_kind.values())
    targets = [
        {"goal": f"RSS growth after warm-up < {RSS_GOAL_PCT:g} %", "measured": f"{growth:+.2f} % "
         f"({rss_warm} → {rss_end} MB, max {rss_max} MB)", "met": growth < RSS_GOAL_PCT},
        {"goal": f"open fds flat: end within {FD_SLACK} of warm-up", "measured": f"{fd_warm} → {fd_end} "
         f"(max {fd_max})", "met": fd_end - fd_warm <= FD_SLACK},
        {"goal": "fds back to the warm-up level after the load", "measured": f"{after['fds']} after "
         f"{settle_s} s idle (warm-up {fd_warm})", "met": after["fds"] <= fd_warm},
        {"goal": "no upstream stream left open after the load", "measured":
         f"{after['upstream_open_streams']} open", "met": after["upstream_open_streams"] == 0},
        {"goal": "no UNEXPECTED answer", "measured": f"{unexpected} of {total}", "met": unexpected == 0},
        {"goal": "no traceback or API key in the gateway log", "measured":
         f"{logscan['tracebacks']} tracebacks, {logscan['key_leaks']} key leaks in {logscan['lines']} lines",
         "met": logscan["tracebacks"] == 0 and logscan["key_leaks"] == 0},
        {"goal": "the one worker survives", "measured": "alive" if alive else "died/restarted", "met": alive},
    ]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    kinds = {k: {**res.by_kind[k], "requests": sum(res.by_kind[k].values()),
                 "p50_ms": round(pct(res.latency[k], 50) * 1000, 1) if res.latency[k] else None,
                 "p99_ms": round(pct(res.latency[k], 99) * 1000, 1) if res.latency[k] else None,
                 "max_ms": round(max(res.latency[k]) * 1000, 1) if res.latency[k] else None}
             for k in KINDS}
    return {"minutes": args.minutes, "clients": args.clients, "load_s": round(t_load, 1), "requests": total,
            "rps": round(total / t_load, 1), "kinds": kinds, "unexpected_reasons": dict(res.reasons),
            "unexpected_samples": res.samples, "stale_keepalive_retries": STALE_RETRIES[0],
            "rss_warm_mb": rss_warm, "rss_end_mb": rss_end, "rss_max_mb": rss_max, "rss_growth_pct": growth,
            "fds_before": series[0]["fds"], "fds_warm": fd_warm, "fds_end": fd_end, "fds_max": fd_max,
            "fds_after": after["fds"], "settle_s": settle_s, "threads_warm": median3(warm_series, "threads"),
            "threads_end": median3(load_series, "threads"), "threads_after": after["threads"],
            "gateway_log": logscan, "targets": targets, "series": series}


def render(r):
    out = ["## Soak: 10 minutes of mixed traffic on one worker", "",
           f"- **Command:** `{r['command']}` ({r['wall_s']:.0f} s)",
           f"- **Date:** {r['date']}  ·  **commit:** {r['git']}",
           f"- **Machine:** {r['machine']['nproc']} cores, {r['machine']['cpu']}, {r['machine']['ram_gib']} GiB RAM",
           f"- **Layout:** gunicorn, 1 gevent worker, pinned to core {GW_CORE}; the fake upstream and "
           f"{r['clients']} client greenlets (keep-alive sockets, 0-20 ms think time) on core {LOAD_CORE}; "
           f"{r['minutes']:g} min of load, warm-up = first 20 %; VmRSS, open fds and threads of the "
           f"worker sampled every {SAMPLE_S:g} s (figures below: median of the 3 samples ending there)",
           f"- **Config:** {CONFIG_SUMMARY}",
           f"- **Load:** {r['requests']} requests, {r['rps']} req/s; stale keep-alive retries: "
           f"{r['stale_keepalive_retries']}", "",
           "| goal | measured | met |", "|---|---|---|"]
    out += [f"| {t['goal']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    out += ["", "| kind | what | requests | ok | expected-error | UNEXPECTED | p50 ms | p99 ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in r["kinds"].items():
        out.append(f"| {k} | {KINDS[k][2]} | {v['requests']} | {v.get(OK, 0)} | {v.get(EXPECTED, 0)} | "
                   f"{v.get(UNEXPECTED, 0)} | {v['p50_ms']} | {v['p99_ms']} |")
    if r["unexpected_reasons"]:
        out += ["", "UNEXPECTED answers: " + "; ".join(f"{n}× {w}" for w, n in r["unexpected_reasons"].items())]
    out += ["", "| t (s) | phase | requests | RSS MB | fds | threads | upstream open streams |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    s = r["series"]
    step = max(1, len(s) // 12)
    picked = s[::step] + ([s[-1]] if (len(s) - 1) % step else [])
    out += [f"| {x['t']:.0f} | {x['phase']} | {x['requests']} | {x['rss_mb']} | {x['fds']} | {x['threads']} | "
            f"{x['upstream_open_streams']} |" for x in picked]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="1 minute, and BENCHMARKS.md is left alone")
    ap.add_argument("--no-md", action="store_true", help="do not write the BENCHMARKS.md section")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, gateway log)")
    ap.add_argument("--out", default=os.path.join(OUT, "soak.json"))
    ap.add_argument("--only", type=lambda v: v.split(","), default=None, metavar="KIND,...",
                    help="run only these kinds (to find which one a leak follows); implies --no-md")
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
