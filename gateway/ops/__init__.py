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


def current_client_key() -> Optional[str]:
    """The caller's client name (server.clients), else the hash of its bearer token."""
    from gateway.clients import current_name
    name = current_name()
    if name:
        return name
    try:
        from flask import has_request_context, request
        if has_request_context():
            return client_key_id(request.headers.get("Authorization"))
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
    from flask import request

    from gateway.ops import accesslog, client_metrics, health, metrics, usage

    @app.before_request
    def _remember_client():
        _client_key.set(client_key_id(request.headers.get("Authorization")))

    accesslog.install(app, state)
    metrics.install(app, state)
    client_metrics.install(app, state)
    usage.install(app, state)
    health.install(app, state)
