"""gunicorn's gevent worker with the client deadlines of gateway/ops/client_deadlines.py
(gunicorn.conf.py names it as worker_class). Each connection's socket becomes a
ClientSocket; gunicorn's keep-alive wait (`timeout_ctx`) starts a head phase and each
request a body phase. The pool (worker_connections) sizes the Connections registry that
closes the longest-waiting connection when the worker is nearly full."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

from gunicorn.workers.ggevent import GeventWorker

from gateway.ops.client_deadlines import ClientSocket, ClientTimeouts, Connections

_conn: ContextVar = ContextVar("gateway_client_socket", default=None)


class DeadlineGeventWorker(GeventWorker):
    def _timeouts(self) -> ClientTimeouts:
        t = getattr(self, "_client_timeouts", None)
        if t is None:
            state = getattr(self.wsgi, "extensions", {}).get("gateway")
            t = ClientTimeouts.of(state.settings) if state is not None else ClientTimeouts()
            self._client_timeouts = t
        return t

    def handle(self, listener, client, addr):
        conns = getattr(self, "_connections", None)
        if conns is None:
            conns = self._connections = Connections(self.worker_connections)
        # Each connection runs in its own greenlet, so the context variable is its own.
        wrapped = ClientSocket(client, self._timeouts(), conns)
        _conn.set(wrapped)
        try:
            super().handle(listener, wrapped, addr)
        finally:
            wrapped.close_connection()

    def timeout_ctx(self):
        conn = _conn.get()
        if conn is not None:
            conn.begin_head()
        return contextlib.nullcontext()

    def handle_request(self, listener_name, req, sock, addr):
        if isinstance(sock, ClientSocket):
            sock.begin_body()
        return super().handle_request(listener_name, req, sock, addr)
