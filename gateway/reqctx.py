"""Facts about the request being served that deep layers report upward (which key index
answered, whether the next chunk is already in hand) without knowing about HTTP. Held in
context variables, which greenlet gives each greenlet (and so each request) on its own;
a background greenlet started for the request (heartbeat.FirstChunk) copies them."""
from __future__ import annotations

from contextvars import ContextVar

# The request's record (gateway.http.lifecycle.RequestRecord): anything with .note(**facts).
_record: ContextVar = ContextVar("gateway_request_record", default=None)

# Output coalescing. The stream writer (gateway.http.streaming.stream_body) puts a one-item list
# here while it streams; a provider that knows the next chunk is already in hand (parsed
# from bytes that have arrived, e.g. providers.remote's SSE reader) sets item 0 to True.
# The writer then keeps the rendered chunk and sends it together with the next ones, in
# one write, instead of one write (one syscall and one wake-up of the client) per chunk.
# Nothing waits on the network while held: a hint is only True when the next event is
# already parsed. A provider that never sets it (local models) gets one write per chunk.
more_ready: ContextVar = ContextVar("gateway_more_ready", default=None)


def begin(record):
    _record.set(record)
    return record


def current():
    return _record.get()


def note(**facts) -> None:
    rec = _record.get()
    if rec is not None:
        rec.note(**facts)
