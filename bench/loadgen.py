"""A small gevent HTTP/1.1 load generator over raw keep-alive sockets, for TTFT and for
the slow-stream hold test (wrk measures throughput; it cannot see the first token).

    python -m bench.loadgen --port P --path /v1/chat/completions --body '{...}' \
        --conc 64 --duration 3 --tokens 32 --marker '[DONE]'

Each of `conc` greenlets owns one keep-alive connection and sends requests back to back
until `duration` has passed (the request in flight is finished, so every started request
is counted), or until it has sent `--count` requests. A response counts as good when its
status is 200, its body holds exactly `--tokens` tokens of the fake upstream
(tok0, tok1, ...) and, when given, `--marker` in its last 512 bytes.
TTFT is the time until the body holds b"tok0" (the first token's text), so an SSE comment
or an empty role chunk sent ahead of the first token does not count as the first token.

Prints one JSON object on stdout: requests, errors (by kind), elapsed, rps, latency and
TTFT percentiles in ms, and this process's own CPU seconds.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402

perf = time.perf_counter
TOKEN = re.compile(rb"tok\d")   # the fake's tokens; not "prompt_tokens"


class BadResponse(Exception):
    pass


def build_request(host: str, port: int, path: str, body: bytes, headers=()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             "Accept: */*", f"Content-Length: {len(body)}"]
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Conn:
    """One keep-alive connection and a minimal HTTP/1.1 response reader."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _more(self):
        d = self.sock.recv(65536)
        if not d:
            raise BadResponse("eof")
        return d

    def request(self, req: bytes, first_marker: bytes):
        """(status, body, ttft or None, keep_alive)."""
        t0 = perf()
        self.sock.sendall(req)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            buf += self._more()
        head = buf[:end].decode("latin-1")
        buf = buf[end + 4:]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, keep = None, False, True
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "connection" and "close" in v.lower():
                keep = False
        ttft = None
        body = bytearray()
        if chunked:
            while True:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    buf += self._more()
                    continue
                size = int(buf[:nl].split(b";", 1)[0], 16)
                need = nl + 2 + size + 2
                while len(buf) < need:
                    buf += self._more()
                if size == 0:
                    # no trailers expected: the terminating CRLF follows at once
                    buf = buf[need:]
                    break
                start = max(0, len(body) - 8)
                body += buf[nl + 2:nl + 2 + size]
                buf = buf[need:]
                if ttft is None and first_marker in body[start:]:
                    ttft = perf() - t0
        elif length is not None:
            while len(buf) < length:
                buf += self._more()
            body += buf[:length]
            buf = buf[length:]
            if first_marker in body:
                ttft = perf() - t0
        else:
            # read to EOF
            body += buf
            buf = b""
            try:
                while True:
                    d = self.sock.recv(65536)
                    if not d:
                        break
                    body += d
            except OSError:
                pass
            keep = False
            if first_marker in body:
                ttft = perf() - t0
        self.buf = buf
        return status, bytes(body), ttft, keep


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


def run(args) -> dict:
    body = args.body.encode() if not args.body.startswith("@") else open(args.body[1:], "rb").read()
    req = build_request(args.host, args.port, args.path, body, args.header or [])
    marker = args.marker.encode() if args.marker else None
    first = args.first.encode()
    lat, ttfts, errors = [], [], Counter()
    done = [0]
    deadline = [None]
    t_start = perf()
    stop_at = t_start + args.duration if args.duration else None

    def worker(i):
        conn = None
        n = 0
        while True:
            if stop_at is not None and perf() >= stop_at:
                break
            if args.count and n >= args.count:
                break
            n += 1
            t0 = perf()
            try:
                if conn is None:
                    conn = Conn(args.host, args.port, args.timeout)
                status, resp, ttft, keep = conn.request(req, first)
            except (OSError, BadResponse, ValueError, IndexError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                gevent.sleep(0.05)
                continue
            dt = perf() - t0
            if status != 200:
                errors[f"status_{status}"] += 1
            elif args.tokens is not None and len(TOKEN.findall(resp)) != args.tokens:
                errors["tokens"] += 1
                if args.verbose and errors["tokens"] < 3:
                    print(resp[-400:], file=sys.stderr)
            elif marker is not None and marker not in resp[-512:]:
                errors["no_end_marker"] += 1
            else:
                lat.append(dt)
                if ttft is not None:
                    ttfts.append(ttft)
                done[0] += 1
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        deadline[0] = perf()

    # Ramp the connections in over a short time so 1,000 connects don't all land at once.
    greenlets = []
    for i in range(args.conc):
        greenlets.append(gevent.spawn(worker, i))
        if args.ramp and i % 50 == 49:
            gevent.sleep(args.ramp)
    gevent.joinall(greenlets)
    elapsed = perf() - t_start
    cpu = os.times()
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    return {"requests": done[0], "errors": dict(errors), "error_count": sum(errors.values()),
            "elapsed_s": round(elapsed, 3), "rps": round(done[0] / elapsed, 1) if elapsed else 0,
            "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)), "max_ms": ms(max(lat) if lat else None),
            "ttft_p50_ms": ms(pct(ttfts, 50)), "ttft_p99_ms": ms(pct(ttfts, 99)),
            "client_cpu_s": round(cpu.user + cpu.system, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--body", required=True, help="JSON text, or @file")
    ap.add_argument("--header", action="append")
    ap.add_argument("--conc", type=int, default=1)
    ap.add_argument("--duration", type=float, default=0.0)
    ap.add_argument("--count", type=int, default=0, help="requests per connection")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--marker", default="")
    ap.add_argument("--first", default="tok0")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--ramp", type=float, default=0.0, help="sleep after each 50 connections")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if not args.duration and not args.count:
        args.count = 1
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
