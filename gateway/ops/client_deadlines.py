"""Deadlines for slow clients: the request head must arrive within
`server.client_header_timeout`, the body within `server.client_body_timeout`, and a
keep-alive connection that sends nothing for `server.keepalive_timeout` is closed.

A per-read socket timeout cannot do this (one byte every few seconds resets it), so each
connection's socket is wrapped in a ClientSocket whose reads must finish by the deadline
of the phase the server is in. The servers mark the phases: gunicorn's gevent worker
(gateway/ops/gunicorn_worker.py) and the development server's pywsgi handler (below).
A head or idle deadline passing reads as end of stream, so the server closes the
connection quietly; a body deadline raises ClientTooSlow once (the app answers 408) and
reads as end of stream after that.

Deadlines alone do not stop a flood of slow connections from filling gunicorn's
connection pool (worker_connections) while they last. So, as nginx reuses its idle
connections when it runs short, a worker that is nearly full closes the connection that
has waited longest for a request head whenever a new one arrives.
"""
from __future__ import annotations

import io
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import gevent
from gevent import pywsgi


class ClientTooSlow(TimeoutError):
    """The request body did not arrive in time. An OSError, so a server draining the
    rest of a body after the answer treats it as the connection failing."""


@dataclass(frozen=True)
class ClientTimeouts:
    header: float = 60.0
    body: float = 60.0
    keepalive: float = 75.0

    @classmethod
    def of(cls, settings) -> "ClientTimeouts":
        return cls(settings.client_header_timeout, settings.client_body_timeout,
                   settings.keepalive_timeout)


class Connections:
    """The open connections of one server; those waiting for a request head, oldest
    first, are the ones closed to make room when the server is nearly full."""

    def __init__(self, capacity: Optional[int] = None):
        self.capacity = capacity
        # Keep a tenth of the pool for new clients (at least one place).
        self.limit = None if not capacity else max(1, capacity - max(1, capacity // 10))
        self.live = 0
        self.waiting: OrderedDict = OrderedDict()
        self.evicted = 0

    def opened(self, conn: "ClientSocket") -> None:
        self.live += 1
        while self.limit is not None and self.live > self.limit and self.waiting:
            oldest, _ = self.waiting.popitem(last=False)
            if oldest is conn:
                continue
            oldest.evict()
            self.evicted += 1
            break

    def closed(self, conn: "ClientSocket") -> None:
        self.live -= 1
        self.waiting.pop(conn, None)


class ClientSocket:
    """A connected client socket whose reads end at the current phase's deadline. Every
    other attribute is the wrapped socket's."""

    def __init__(self, sock, timeouts: ClientTimeouts, conns: Optional[Connections] = None):
        self._inner = sock
        self.sendall = sock.sendall      # the write path, without a __getattr__ per chunk
        self._t = timeouts
        self._deadline = time.monotonic() + timeouts.header
        self._idle = False
        self._phase = "header"
        self._expired = False
        self.served = 0
        self._conns = conns
        if conns is not None:
            conns.waiting[self] = None
            conns.opened(self)

    def close_connection(self) -> None:
        """The server is done with this connection (called once, from its handler)."""
        if self._conns is not None:
            self._conns.closed(self)
            self._conns = None

    def evict(self) -> None:
        """Close a connection that waits for a request head: its pending read ends."""
        self._expired = True
        try:
            self._inner.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- phases, marked by the server -------------------------------------------------
    def begin_head(self) -> None:
        """Before reading a request head: the first one must arrive within the header
        timeout; later ones may wait keepalive_timeout for their first byte."""
        now = time.monotonic()
        self._phase = "header"
        if self._conns is not None:
            self._conns.waiting[self] = None
            self._conns.waiting.move_to_end(self)
        if self.served == 0:
            self._idle = False
            self._deadline = now + self._t.header
        else:
            self._idle = True
            self._deadline = now + self._t.keepalive

    def begin_body(self) -> None:
        if self._conns is not None:
            self._conns.waiting.pop(self, None)
        self.served += 1
        self._idle = False
        self._phase = "body"
        self._deadline = time.monotonic() + self._t.body

    # ---- reads ---------------------------------------------------------------------------
    def recv(self, n, flags=0):
        return self._read(self._inner.recv, b"", n, flags)

    def recv_into(self, buf, nbytes=0, flags=0):
        return self._read(self._inner.recv_into, 0, buf, nbytes, flags)

    def makefile(self, mode="rb", buffering=-1, **_):
        if mode not in ("rb", "r"):   # pywsgi reads through makefile; writes use sendall
            return self._inner.makefile(mode, buffering)
        raw = socket.SocketIO(self, "rb")
        return io.BufferedReader(raw, io.DEFAULT_BUFFER_SIZE if buffering in (-1, None, 0) else buffering)

    def _read(self, fn, eof, *args):
        if self._expired:
            return eof
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return self._expire(eof)
        data = None
        with gevent.Timeout(remaining, False):
            data = fn(*args)
        if data is None:
            return self._expire(eof)
        if self._idle and data:
            # The next request has begun: its head gets the header timeout from here.
            self._idle = False
            self._deadline = time.monotonic() + self._t.header
        return data

    def _expire(self, eof):
        self._expired = True
        if self._conns is not None:
            self._conns.waiting.pop(self, None)
        if self._phase == "body":
            raise ClientTooSlow(f"request body not received within {self._t.body:g} s "
                                "(server.client_body_timeout)")
        return eof

    def __getattr__(self, name):
        return getattr(self._inner, name)


def deadline_handler(timeouts: ClientTimeouts):
    """A pywsgi handler class (development server) that applies `timeouts`."""

    class DeadlineHandler(pywsgi.WSGIHandler):
        def __init__(self, sock, address, server, rfile=None):
            super().__init__(ClientSocket(sock, timeouts), address, server, rfile)

        def handle_one_request(self):
            if isinstance(self.socket, ClientSocket):
                self.socket.begin_head()
            return super().handle_one_request()

        def handle_one_response(self):
            if isinstance(self.socket, ClientSocket):
                self.socket.begin_body()
            return super().handle_one_response()

    return DeadlineHandler
