"""One JSON line per finished request (logger "gateway.access"), and the scrub filter that
keeps API keys out of every log line.

Prompt text appears only when `server.log_prompts: true` (the surfaces then put it in the
record); keys are scrubbed from it like from everything else.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from gateway.errors import scrub

ACCESS = logging.getLogger("gateway.access")

# Without an error class in the record, the status tells which GatewayError it was.
_CLASS_BY_STATUS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                    413: "TooLarge", 429: "RateLimited", 500: "GatewayError",
                    502: "UpstreamFailed", 503: "ServiceBusy", 504: "UpstreamTimeout"}


class ScrubFilter(logging.Filter):
    """Formats the message once and replaces every registered key with ***.

    Sits on handlers, not loggers: a logger's filters are skipped for records that
    propagate from its children, a handler's are not."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            msg = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = scrub(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def add_scrub_filter(handler: logging.Handler) -> None:
    if not any(isinstance(f, ScrubFilter) for f in handler.filters):
        handler.addFilter(ScrubFilter())


def install_log_filters() -> None:
    """Every handler that exists now: the root's (configure_logging) and gunicorn's own."""
    for name in (None, "gunicorn.error", "gunicorn.access", "gevent"):
        for h in logging.getLogger(name).handlers:
            add_scrub_filter(h)


class _JsonLine(logging.Formatter):
    def format(self, record):
        return record.getMessage()


def _access_handler() -> logging.Handler:
    # Its own handler so the line is bare JSON (log shippers parse it as is) rather than
    # JSON behind the root format's time/level prefix.
    for h in ACCESS.handlers:
        if getattr(h, "_gateway_access", False):
            return h
    h = logging.StreamHandler(sys.stderr)
    h._gateway_access = True
    h.setFormatter(_JsonLine())
    add_scrub_filter(h)
    ACCESS.addHandler(h)
    ACCESS.propagate = False
    return h


def error_class(record: dict):
    if record.get("error_class"):
        return record["error_class"]
    status = record.get("status") or 200
    if status < 400 and not record.get("error"):
        return None
    return _CLASS_BY_STATUS.get(status, "GatewayError")


# Each text field of a line is cut here: clients choose model names and paths.
MAX_FIELD = 512


def _cap(value, limit: int = MAX_FIELD):
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 1)


def access_line(record: dict, client=None) -> str:
    now = time.time()
    err = record.get("error")
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "route": _cap(record.get("route")),
        "model": _cap(record.get("model")),
        "provider": _cap(record.get("provider")),
        "key_index": record.get("key_index"),
        "client": _cap(client),
        "stream": record.get("stream"),
        "status": record.get("status"),
        "latency_ms": _ms(record.get("latency")),
        "ttft_ms": _ms(record.get("ttft")),
        "prompt_tokens": record.get("prompt_tokens"),
        "completion_tokens": record.get("completion_tokens"),
        "error_class": error_class(record),
        "error": scrub(err)[:500] if err else None,
    }
    if record.get("prompt") is not None:
        line["prompt"] = _cap(record["prompt"], 2000)
    return scrub(json.dumps(line, ensure_ascii=False, default=str))


def install(app, state) -> None:
    from gateway.ops import current_client_key, provider_of

    install_log_filters()
    raw = state.settings.raw.get("server") or {}
    if raw.get("access_log", True) is False:
        return
    _access_handler()

    def log_access(record: dict) -> None:
        if ACCESS.isEnabledFor(logging.INFO):
            rec = dict(record, provider=provider_of(record, state))
            ACCESS.info(access_line(rec, current_client_key()))

    state.observers.append(log_access)
