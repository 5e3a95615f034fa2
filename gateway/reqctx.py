"""Facts about the request being served that deep layers report upward (which key index
answered) without knowing about HTTP. One dict per request, held in a context variable,
which greenlet gives each greenlet (and so each request) on its own."""
from __future__ import annotations

from contextvars import ContextVar

_record: ContextVar = ContextVar("gateway_request_record", default=None)


def begin(record: dict) -> dict:
    _record.set(record)
    return record


def current():
    return _record.get()


def note(**facts) -> None:
    rec = _record.get()
    if rec is not None:
        rec.update(facts)
