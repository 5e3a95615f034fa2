"""Operations: health, Prometheus metrics, the SQLite usage log and structured access logs.

`install(app, state)` is called by create_app. Submodules are imported inside it, not
here: gunicorn.conf.py imports `gateway.ops.gunicorn_hooks` in the master, which must not
import prometheus_client before PROMETHEUS_MULTIPROC_DIR is decided.
"""
from __future__ import annotations

import hashlib
from contextvars import ContextVar
from typing import Optional

# The caller's client-key id, set before each request. Streamed answers finish (and call
# the observers) after Flask has popped the request context, but in the same greenlet or
# thread, so a context variable still knows who asked.
_client_key: ContextVar = ContextVar("gateway_client_key", default=None)


def client_key_id(authorization: Optional[str]) -> Optional[str]:
    """A short sha256 prefix of the bearer token: enough to tell clients apart in the
    usage log, useless for calling the gateway."""
    if not authorization or authorization[:7].lower() != "bearer ":
        return None
    token = authorization[7:].strip()
    if not token:
        return None
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def authorization(headers) -> Optional[str]:
    """The caller's Authorization, or Anthropic clients' x-api-key (the same client key) as one."""
    auth = headers.get("Authorization")
    if auth:
        return auth
    key = headers.get("x-api-key")
    return "Bearer " + key if key else None


def current_client_key() -> Optional[str]:
    """The caller's client name (server.clients), else the hash of its bearer token."""
    from gateway.clients import current_name
    name = current_name()
    if name:
        return name
    try:
        from flask import has_request_context, request
        if has_request_context():
            return client_key_id(authorization(request.headers))
    except Exception:  # outside Flask (unit tests of an observer): fall back below
        pass
    return _client_key.get()


def provider_of(record: dict, state) -> Optional[str]:
    """The provider that answered; for a request that failed before any answer, the one
    its `<provider>:` prefix names, so errors still count against the right provider."""
    if record.get("provider"):
        return record["provider"]
    model = record.get("model")
    if isinstance(model, str) and ":" in model:
        prefix = model.split(":", 1)[0]
        if prefix in state.router.providers:
            return prefix
    return None


def install(app, state) -> None:
    import time

    from flask import g, request

    from gateway import reqctx
    from gateway.ops import accesslog, client_metrics, health, metrics, usage

    @app.before_request
    def _remember_client():
        g.gateway_t0 = time.perf_counter()
        reqctx.begin(None)      # a keep-alive connection's greenlet served others before
        _client_key.set(client_key_id(authorization(request.headers)))

    @app.after_request
    def _record_refusal(resp):
        """An error answer that no generation/embedding record reported (a bad key, a
        refused origin, a body that failed its checks, an unknown route, a crash) still
        gets its access-log line and its count, once."""
        rec = reqctx.current()
        if resp.status_code < 400 or (rec is not None and rec.get("_done")):
            return resp
        err = g.get("gateway_error")
        rule = request.url_rule.rule if request.url_rule is not None else request.path
        record = rec if rec is not None else {"route": rule, "model": None, "stream": False}
        record.update(status=resp.status_code, latency=time.perf_counter() - g.get("gateway_t0", time.perf_counter()),
                      error=getattr(err, "message", None) or f"HTTP {resp.status_code}")
        if err is not None and type(err).__name__ != "GatewayError":
            record["error_class"] = type(err).__name__
        state.finished(record)
        return resp

    accesslog.install(app, state)
    metrics.install(app, state)
    client_metrics.install(app, state)
    usage.install(app, state)
    health.install(app, state)
