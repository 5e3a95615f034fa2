"""The flow every generation request takes, whatever the surface: record it, ask the
router for the first chunk (with heartbeats while a slow upstream says nothing), then
gather a whole answer or hand the chunks to the surface's stream renderer. Both surfaces
report to the same observers (logs, metrics, usage) through here."""
from __future__ import annotations

from flask import request

from gateway import reqctx
from gateway.errors import GatewayError
from gateway.http.heartbeat import Deferred, await_first
from gateway.http.streaming import collect


def answer(st, req, tally, heartbeat, render_whole, render_stream):
    """render_whole(tally) -> Response for stream:false; render_stream(chunks, finish) ->
    a streaming Response that calls finish(tally) when the stream ends."""
    record = reqctx.begin({"route": request.path, "model": req.model, "stream": req.stream})
    chunks = start_chat(st, req, tally, record, heartbeat)

    def finish(t):
        record.update(t.summary())
        st.finished(record)

    if not req.stream:
        try:
            collect(chunks, tally)
        except GatewayError as e:
            tally.error = e
            finish(tally)
            raise
        finish(tally)
        return render_whole(tally)
    return render_stream(chunks, finish)


def start_chat(st, req, tally, record, heartbeat=False):
    """Ask the router for the answer's first chunk; an early failure is recorded and
    raised (the error handler renders it with a real status). With `heartbeat`, a slow
    first chunk gives a Deferred iterator that yields None while it waits."""
    interval = st.settings.heartbeat
    if st.settings.log_prompts:          # opt-in only: prompts are people's data
        record["prompt"] = prompt_text(req)

    def start():
        chunks = st.router.chat(req)
        # Recorded as soon as the answer starts: on a heartbeat this runs in the
        # background, before the Deferred hands out the first real chunk.
        target = getattr(chunks, "target", None)
        record["provider"] = target.provider.name if target else None
        return chunks

    try:
        if heartbeat and interval > 0 and req.stream:
            chunks, pending = await_first(start, interval)
            if pending is not None:
                return Deferred(pending, interval)
        else:
            chunks = start()
    except GatewayError as e:
        tally.error = e
        record.update(tally.summary())
        st.finished(record)
        raise
    return chunks


def prompt_text(req, limit: int = 2000) -> str:
    """What the caller asked, for the access log when `server.log_prompts` is on: the
    generate prompt, or the last user message."""
    text = req.prompt or ""
    if not text:
        users = [m for m in req.messages if m.role == "user"]
        text = users[-1].content if users else ""
    return (text or "")[:limit]
