"""providers.transport.Transport and Body, the lean HTTP/1.1 client on the hot path:
chunked/gzip/Content-Length framing, cut bodies, SSE events split at any byte, keep-alive
reuse, timeouts, refused connects and header injection, against in-memory sockets and the
real fake upstream. (The adapter unit tests reach it too, with in-memory connections:
tests/upstream_stub.py.)"""
from __future__ import annotations

import gzip
import io
import json
import random

import requests
from requests.structures import CaseInsensitiveDict

from providers.transport import Body, Transport, read_error_body, sse_events


def iter_sse_data(resp):
    """Each event's data as text: the SSE reader with no per-event decoding."""
    return sse_events(resp, lambda b: b.decode("utf-8", "replace"))


class FakeSock:
    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.closed = data, step, False

    def recv(self, n):
        d, self.data = self.data[:self.step], self.data[self.step:]
        return d

    def settimeout(self, t):
        pass

    def close(self):
        self.closed = True


class FakeTransport:
    def __init__(self):
        self.pooled = []

    def checkin(self, sock):
        self.pooled.append(sock)


def chunked(data: bytes, rng) -> bytes:
    out, i = b"", 0
    while i < len(data):
        n = rng.randint(1, 80)
        part = data[i:i + n]
        i += n
        ext = b";x=1" if rng.random() < 0.1 else b""
        out += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
    trailer = b"X-T: 1\r\n" if rng.random() < 0.3 else b""
    return out + b"0\r\n" + trailer + b"\r\n"


def test_chunked_gzip_and_cut_bodies_and_sse_split_anywhere():
    rng = random.Random(7)
    payload = b"".join(b'data: {"i": %d, "s": "%s"}\r\n\r\n' % (i, b"x" * rng.randint(0, 40))
                       for i in range(60))
    for trial in range(300):
        t = FakeTransport()
        sock = FakeSock(chunked(payload, rng), rng.randint(1, 120))
        b = Body(t, sock, b"", CaseInsensitiveDict({"Transfer-Encoding": "chunked"}), "POST", 200, "HTTP/1.1")
        assert b.read() == payload, trial
        assert b.done and t.pooled == [sock], "a finished body gives its connection back"
    # Content-Length, gzip, and a cut body
    gz = gzip.compress(payload)
    t = FakeTransport()
    b = Body(t, FakeSock(gz, 33), b"", CaseInsensitiveDict({"Content-Length": str(len(gz)), "Content-Encoding": "gzip"}),
             "POST", 200, "HTTP/1.1")
    assert b.read() == payload and t.pooled
    b = Body(FakeTransport(), FakeSock(b"5\r\nabc", 3), b"", CaseInsensitiveDict({"Transfer-Encoding": "chunked"}),
             "POST", 200, "HTTP/1.1")
    try:
        b.read()
        raise AssertionError("a cut chunked body must raise")
    except requests.exceptions.ChunkedEncodingError:
        pass
    # SSE events split at every possible byte
    class R:
        pass
    for step in (1, 2, 3, 7, 64):
        r = R()
        r.raw = Body(FakeTransport(), FakeSock(chunked(payload, rng), step), b"",
                     CaseInsensitiveDict({"Transfer-Encoding": "chunked"}), "POST", 200, "HTTP/1.1")
        events = list(iter_sse_data(r))
        assert [json.loads(e)["i"] for e in events] == list(range(60)), step


def test_transport_against_the_fake_upstream(fake_upstream):
    t = Transport.for_url(fake_upstream + "/v1")
    hdr = {"Content-Type": "application/json", "Accept": "application/json"}

    def post(key, body, stream=True, read_timeout=5.0):
        return t.request("POST", t.target("/chat/completions", None), dict(hdr, Authorization=f"Bearer {key}"),
                         json.dumps(body).encode(), stream=stream, connect_timeout=2, read_timeout=read_timeout)
    body = {"model": "chunks-8-0", "messages": [], "stream": True}
    for i in range(5):
        r = post("ok-check", body)
        events = list(iter_sse_data(r))
        r.close()
        assert events[-1] == "[DONE]" and len(events) == 10, events
    assert len(t.idle) == 1, "one keep-alive connection reused throughout"
    r = post("ok-check", {"model": "echo", "messages": [{"role": "user", "content": "hé"}]}, stream=False)
    assert r.json()["choices"][0]["message"]["content"] == "Echo: hé"
    r = post("bad-check", body)
    text, parsed = read_error_body(r)
    assert r.status_code == 401 and parsed["error"]["code"] == 401
    try:
        post("slow-check", body, read_timeout=0.5)
        raise AssertionError("slow upstream must time out")
    except requests.exceptions.ReadTimeout:
        pass
    r = post("cut-check", body)
    try:
        list(iter_sse_data(r))
        raise AssertionError("a dropped stream must raise")
    except requests.exceptions.RequestException:
        pass
    dead = Transport.for_url("http://127.0.0.1:1/v1")
    try:
        dead.request("POST", "/v1/x", {}, b"{}", True, 1, 1)
        raise AssertionError("refused connect must raise")
    except requests.exceptions.ConnectionError:
        pass
    try:
        post("ok\r\nX-Evil: 1", body)
        raise AssertionError("header injection must be refused")
    except requests.exceptions.InvalidHeader:
        pass


def test_sse_events_from_a_raw_body_without_read1():
    class Raw:                                   # like a mocked raw object lacking read1
        def __init__(self, data):
            self._b = io.BytesIO(data)

        def read(self, n=-1, **kw):
            return self._b.read(n)

    class R:
        raw = Raw(b'data: {"a":1}\r\n\r\n: comment\ndata: {"b":\ndata: 2}\n\ndata: {"c":3}')
    assert list(iter_sse_data(R())) == ['{"a":1}', '{"b":\n2}', '{"c":3}']
