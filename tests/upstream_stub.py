"""Canned upstream answers for adapter unit tests, served through the production
providers.transport.Transport: only its socket is replaced by an in-memory connection, so
the request head the adapter builds, the response head and body framing, timeouts and
connection failures all take the production path.

    upstream = UpstreamStub()
    p = upstream.attach(OpenAIProvider(...))         # the provider's transport, stubbed
    upstream.add("POST", url, json={...}, status=200, headers={...}, match=[has_header(...)])
    upstream.add("POST", url, body=b"data: ...", content_type="text/event-stream")
    upstream.add("POST", url, body=requests.exceptions.ReadTimeout())   # the call fails so
    upstream.add_callback("POST", url, callback)     # callback(request) -> (status, headers, body)
    upstream.calls[i].request.{method, url, headers, body}

Several answers registered for one request are given in turn, the last one repeats; a
request nothing matches fails as a refused connection.
"""
from __future__ import annotations

import json as _json
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import requests
from requests.structures import CaseInsensitiveDict

from providers.transport import Transport

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def has_header(name: str, value: str) -> Callable:
    """A `match` item: the request carries this header value."""
    return lambda request: request.headers.get(name) == value


@dataclass
class StubRequest:
    method: str
    url: str
    headers: CaseInsensitiveDict
    body: bytes


@dataclass
class Call:
    request: StubRequest


@dataclass
class _Answer:
    method: str
    url: str
    status: int = 200
    body: Any = b""
    headers: dict = field(default_factory=dict)
    content_type: Optional[str] = None
    match: list = field(default_factory=list)
    callback: Optional[Callable] = None

    def matches(self, request: StubRequest) -> bool:
        return (self.method == request.method and self.url == request.url.split("?", 1)[0]
                and all(m(request) for m in self.match))


class UpstreamStub:
    def __init__(self):
        self.answers: list[_Answer] = []
        self.calls: list[Call] = []

    def reset(self) -> None:
        self.answers.clear()
        self.calls.clear()

    def attach(self, provider):
        provider.transport = _StubTransport.of(provider.transport, self)
        return provider

    # ---- registering answers -----------------------------------------------------------
    def add(self, method: str, url: str, body: Any = b"", json: Any = None, status: int = 200,
            headers: Optional[dict] = None, content_type: Optional[str] = None, match=()) -> None:
        if json is not None:
            body, content_type = _json.dumps(json).encode(), content_type or "application/json"
        self.answers.append(_Answer(method, url, status, body, dict(headers or {}), content_type, list(match)))

    def add_callback(self, method: str, url: str, callback: Callable) -> None:
        self.answers.append(_Answer(method, url, callback=callback))

    def replace(self, method: str, url: str, **kw) -> None:
        for i, a in enumerate(self.answers):
            if a.method == method and a.url == url:
                del self.answers[i]
                self.add(method, url, **kw)
                self.answers.insert(i, self.answers.pop())
                return
        raise AssertionError(f"nothing registered for {method} {url}")

    # ---- answering ---------------------------------------------------------------------
    def _answer(self, request: StubRequest) -> bytes:
        self.calls.append(Call(request))
        found = [a for a in self.answers if a.matches(request)]
        if not found:
            raise ConnectionRefusedError(f"no stub answer for {request.method} {request.url}")
        a = found[0]
        if len(found) > 1:
            self.answers.remove(a)
        if a.callback is not None:
            status, headers, body = a.callback(request)
            content_type = None
        else:
            status, headers, body, content_type = a.status, a.headers, a.body, a.content_type
        if isinstance(body, BaseException):
            if isinstance(body, requests.exceptions.Timeout):
                raise socket.timeout(str(body))
            raise ConnectionResetError(str(body))
        if isinstance(body, str):
            body = body.encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        names = {k.lower() for k in headers}
        if content_type and "content-type" not in names:
            head.append(f"Content-Type: {content_type}")
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
        head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _StubTransport(Transport):
    """The production Transport with in-memory connections to the stub."""
    stub: UpstreamStub

    @classmethod
    def of(cls, real: Transport, stub: UpstreamStub) -> "_StubTransport":
        t = cls(real.scheme, real.host, real.port, real.base_path, real.maxsize)
        t.stub = stub
        return t

    def _checkout(self, connect_timeout: float):
        return _StubSocket(self)

    def checkin(self, sock) -> None:
        sock.close()     # one answer per connection


class _StubSocket:
    def __init__(self, transport: _StubTransport):
        self.t = transport
        self.reply = b""
        self.closed = False

    def settimeout(self, seconds) -> None:
        pass

    def setsockopt(self, *args) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = CaseInsensitiveDict(line.split(": ", 1) for line in lines[1:])
        assert len(body) == int(headers.get("Content-Length", 0)), "the body is sent with its head"
        default = 443 if self.t.scheme == "https" else 80
        origin = f"{self.t.scheme}://{self.t.host}" + (f":{self.t.port}" if self.t.port != default else "")
        self.reply = self.t.stub._answer(StubRequest(method, origin + target, headers, body))

    def recv(self, n: int) -> bytes:
        out, self.reply = self.reply[:n], self.reply[n:]
        return out

    def close(self) -> None:
        self.closed = True
