"""One record per request, opened when the request arrives and closed once its response
has been written (streamed or not, whatever happened in between), at the edge: Flask's
before/after-request hooks and the response's `call_on_close`. Every request a client
sends, refused (400/401/403/404/413) or served, reaches the observers (access log,
metrics, usage log) from `RequestRecord.close`, once.

What the layers in between learn goes into the record: the surface notes the model and
stream flag (`serve`), the router the provider it tried, a remote provider the key index
(`gateway.reqctx.note`), the stream writer the chunks (`Tally`), the error renderer the
error.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Optional

from flask import Flask, Response, request

from gateway import reqctx
from gateway.errors import GatewayError
from gateway.http.streaming import Tally


class RequestRecord:
    """What one request asked and got, reported once when its response has been written."""
    __slots__ = ("state", "facts", "tally", "status", "closed")

    def __init__(self, state, facts: dict):
        self.state = state
        self.facts = facts
        self.tally = Tally(time.perf_counter())
        self.status = 200            # the response's, set when it is ready
        self.closed = False

    def note(self, **facts) -> None:
        self.facts.update(facts)

    def failed(self, e: GatewayError) -> None:
        """The error the client is told (rendered as a status, or as a stream's last line)."""
        if self.tally.error is None:
            self.tally.error = e

    def close(self) -> None:
        """Report the finished request to the observers; later calls do nothing. Only
        generation/embedding work (a model was named) and failures are reported: a
        health probe or a model listing that succeeded is not a finished request."""
        if self.closed:
            return
        self.closed = True
        f, t = self.facts, self.tally
        f.update(t.summary())
        if t.error is None:
            f["status"] = self.status
            if self.status >= 400:
                f["error"] = f"HTTP {self.status}"
        elif type(t.error) is GatewayError:
            f["error_class"] = None       # a plain GatewayError: the status names its class
        if f.get("model") is None and f["status"] < 400:
            return
        if not f.get("provider"):
            f["provider"] = self.state.router.provider_named_by(f.get("model"))
        self.state.finished(f)


def authorization(headers) -> Optional[str]:
    """The caller's Authorization, or Anthropic clients' x-api-key (the same client key) as one."""
    auth = headers.get("Authorization")
    if auth:
        return auth
    key = headers.get("x-api-key")
    return "Bearer " + key if key else None


def client_key_id(authorization: Optional[str]) -> Optional[str]:
    """A short sha256 prefix of the bearer token: enough to tell clients apart in the
    usage log, useless for calling the gateway."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    if not token:
        return None
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def current() -> RequestRecord:
    """The record of the request being served (opened before every route)."""
    rec = reqctx.current()
    if rec is None:
        raise RuntimeError("no request is being served")
    return rec


class _ClosingBody:
    """A streamed body handed to the server as is (iterating it is iterating the
    generator: no wrapper per chunk), whose close() also runs the response's
    `call_on_close` callbacks, as werkzeug's ClosingIterator does for other bodies."""
    __slots__ = ("body", "response")

    def __init__(self, body, response):
        self.body, self.response = body, response

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        self.response.close()


class GatewayResponse(Response):
    # direct_passthrough (streams of bytes: no per-chunk re-encoding in werkzeug) makes
    # werkzeug hand back the bare body, so nothing would call the on-close callbacks.
    def get_app_iter(self, environ) -> Any:
        it = super().get_app_iter(environ)
        return _ClosingBody(it, self) if it is self.response else it


def install(app: Flask, state) -> None:
    """Registered first, so even a request the guard refuses has its record."""
    app.response_class = GatewayResponse

    @app.before_request
    def _open_record():
        rule = request.url_rule.rule if request.url_rule is not None else request.path
        rec = RequestRecord(state, {"route": rule, "model": None, "stream": False,
                                    "client": client_key_id(authorization(request.headers))})
        reqctx.begin(rec)

    @app.after_request
    def _close_record_when_written(resp):
        rec = reqctx.current()
        if rec is not None:
            rec.status = resp.status_code
            resp.call_on_close(rec.close)
        return resp
