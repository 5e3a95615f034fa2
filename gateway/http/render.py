"""Errors in the caller's surface shape: {"error": msg} on Ollama routes,
{"error": {message, type, code}} on /v1."""
from __future__ import annotations

import json

from flask import Response, has_request_context, request

from gateway import reqctx
from gateway.errors import scrub


def path() -> str:
    return request.path if has_request_context() else ""


def method() -> str:
    return request.method if has_request_context() else ""


def error(e) -> Response:
    status = getattr(e, "status", 500) or 500
    rec = reqctx.current() if has_request_context() else None
    if rec is not None:
        rec.failed(e)             # the request's record reports what the client was told
    msg = getattr(e, "client_message", None) or scrub(getattr(e, "message", None) or str(e))
    if path().startswith("/v1/messages"):
        from gateway.http.anthropic_wire import error_body
        body = error_body(status, msg)
    elif path().startswith("/v1"):
        kind = getattr(e, "kind", "api_error")
        if status == 404 and kind == "api_error":
            kind = "not_found_error"
        body = {"error": {"message": msg, "type": kind, "param": None,
                          "code": getattr(e, "code", None) or str(status)}}
    else:
        body = {"error": msg}
    resp = Response(json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json")
    retry = getattr(e, "retry_after", None)
    if retry is not None:
        resp.headers["Retry-After"] = str(max(1, int(retry + 0.999)))
    return resp
