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


# Control characters and Unicode line breaks in a log line would let text a client or an
# upstream chose forge lines or drive a terminal: they are written as \uXXXX escapes
# (valid inside the access log's JSON strings too).
_CONTROLS = [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]
_ESCAPE_ALL = {c: f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPE_ALL.update({0x0a: "\\n", 0x0d: "\\r", 0x09: "\\t"})
_ESCAPE_KEEP_NEWLINES = {c: v for c, v in _ESCAPE_ALL.items() if c != 0x0a}


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    return text.translate(_ESCAPE_KEEP_NEWLINES if keep_newlines else _ESCAPE_ALL)


class ScrubFilter(logging.Filter):
    """Formats the message once, replaces every registered key with *** and escapes
    control characters (a traceback keeps its line breaks).

    Sits on handlers, not loggers: a logger's filters are skipped for records that
    propagate from its children, a handler's are not."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            msg = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = escape_controls(scrub(msg)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = escape_controls(scrub(record.exc_text), keep_newlines=True)
        if record.stack_info:
            record.stack_info = escape_controls(scrub(record.stack_info), keep_newlines=True)
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


def access_line(record: dict) -> str:
    now = time.time()
    err = record.get("error")
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "route": _cap(record.get("route")),
        "model": _cap(record.get("model")),
        "provider": _cap(record.get("provider")),
        "key_index": record.get("key_index"),
        "client": _cap(record.get("client")),
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
    install_log_filters()
    raw = state.settings.raw.get("server") or {}
    if raw.get("access_log", True) is False:
        return
    _access_handler()

    def log_access(record: dict) -> None:
        if ACCESS.isEnabledFor(logging.INFO):
            ACCESS.info(access_line(record))

    state.observers.append(log_access)
