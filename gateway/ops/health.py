"""GET /health (liveness) and GET /health/ready (readiness with provider detail).

/health does no work at all, so an orchestrator's probe never waits on a busy model.
/health/ready asks every provider for its health(); key pools only ever report keys by
index, and the whole answer is run through scrub() as well, so no key can slip out even
if a provider put one in an error string.
"""
from __future__ import annotations

import json
import logging

from gateway.errors import scrub
from gateway.http.streaming import active_streams

log = logging.getLogger("gateway.ops")


def provider_report(name, p) -> dict:
    """The provider's own health() (each type says what it knows), and whether it is offered."""
    try:
        h = dict(p.health() or {})
    except Exception as e:
        log.warning("health: provider %s failed to report: %s", name, type(e).__name__)
        h = {"error": type(e).__name__}
    h.setdefault("type", p.type_name)
    h["offered"] = bool(p.offered)
    return h


def readiness(state) -> tuple:
    providers = {name: provider_report(name, p) for name, p in list(state.router.providers.items())}
    offered = [n for n, h in providers.items() if h.get("offered")]
    body = {"status": "ready" if offered else "unavailable",
            "config": {"file": state.settings.file, "loaded": True},
            "active_streams": active_streams(),
            "offered": offered,
            "providers": providers}
    # Redis down is not "unavailable": requests are served with per-process state.
    shared = getattr(state, "shared", None)
    body["shared_state"] = shared.report() if shared is not None else {"configured": False}
    return body, (200 if offered else 503)


def install(app, state) -> None:
    from flask import Response

    @app.route("/health", methods=["GET", "HEAD"])
    def health():
        return Response('{"status":"ok"}', mimetype="application/json")

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def ready():
        body, status = readiness(state)
        text = scrub(json.dumps(body, ensure_ascii=False, default=str))
        return Response(text, status=status, mimetype="application/json",
                        headers={"Cache-Control": "no-store"})
