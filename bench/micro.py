"""Micro-benchmarks behind the small optimisations (µs per call, one process, gevent
monkey-patched like the worker). Not part of `make bench`; run on an idle machine:

    .venv/bin/python -m bench.micro
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def us(fn, number=20000, repeat=5):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def cpu_us_per_call(fn, n):
    t = os.times()
    c0 = t.user + t.system
    for _ in range(n):
        fn()
    t = os.times()
    return (t.user + t.system - c0) / n * 1e6


def row(name, before, after):
    print(f"{name:58s} {before:9.2f} µs -> {after:8.2f} µs  ({before / after:4.1f}×)")


def main():
    import gevent
    import gevent.event

    from gateway.durations import rfc3339
    from gateway.http import ollama_wire
    from gateway.http.ollama_api import now_rfc3339
    from gateway.http.openai_api import encode_str
    from providers.transport import json_loads as _json_loads

    print("per call (best of 5):")
    row("created_at timestamp: rfc3339() -> now_rfc3339()", us(rfc3339), us(now_rfc3339))
    text = "tok7 "
    row('content delta: dumps({"content": s}) -> \'{"content":\'+encode_str(s)',
        us(lambda: ollama_wire.dumps({"content": text})), us(lambda: '{"content":' + encode_str(text) + "}"))
    ev = (b'{"id":"x","object":"chat.completion.chunk","created":1,"model":"chunks-32-0",'
          b'"choices":[{"index":0,"delta":{"content":"tok7 "},"finish_reason":null}]}')
    row("SSE event JSON: json.loads(ev.decode()) -> _json_loads(ev)",
        us(lambda: json.loads(ev.decode("utf-8", "replace"))), us(lambda: _json_loads(ev)))

    def with_thread():
        done = threading.Event()
        t = threading.Thread(target=done.set, daemon=True)
        t.start()
        done.wait(10)

    def with_greenlet():
        done = gevent.event.Event()
        gevent.spawn(done.set)
        done.wait(10)
    row("first-chunk helper: patched Thread+Event -> gevent.spawn+Event",
        us(with_thread, 5000), us(with_greenlet, 5000))

    # werkzeug's per-chunk wrappers (str -> bytes re-encoding, ClosingIterator) vs passthrough
    from werkzeug.wrappers import Response
    environ = {"REQUEST_METHOD": "POST"}
    chunks_s = ["data: " + "x" * 150 + "\n\n"] * 34
    chunks_b = [c.encode() for c in chunks_s]

    def via_werkzeug():
        for _ in Response(iter(chunks_s)).get_app_iter(environ):
            pass

    def passthrough():
        for _ in Response((c.encode() for c in chunks_s), direct_passthrough=True).get_app_iter(environ):
            pass
    row("34-chunk body: str via werkzeug iter_encoded -> bytes passthrough",
        us(via_werkzeug, 2000), us(passthrough, 2000))
    del chunks_b

    # one upstream call: requests.Session vs Transport, against the fake (CPU per call)
    port = 18000 + os.getpid() % 900 + 50
    fake = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m", "bench.fake_server", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests
        from requests.adapters import HTTPAdapter

        from providers.transport import Transport
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/_stats", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
        hdr = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": "Bearer ok-m"}
        s = requests.Session()
        s.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=2048, max_retries=0))
        s.trust_env = False

        def via_requests():
            s.request("POST", url, data=body, headers=hdr, stream=False, timeout=(10, 30),
                      allow_redirects=False).close()
        t = Transport.for_url(f"http://127.0.0.1:{port}/v1")
        target = t.target("/chat/completions", None)

        def via_transport():
            t.request("POST", target, hdr, body, stream=False, connect_timeout=10, read_timeout=30).close()
        for f in (via_requests, via_transport):
            for _ in range(100):
                f()
        row("upstream call, small JSON answer (CPU): requests -> Transport",
            cpu_us_per_call(via_requests, 2000), cpu_us_per_call(via_transport, 2000))
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
