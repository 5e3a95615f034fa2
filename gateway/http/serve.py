"""The flow of every generation (`serve`) and embedding (`serve_embed`) request, whatever
the surface: note what was asked in the request's record, ask the router for the first
chunk (with heartbeats while a slow upstream says nothing), then gather a whole answer or
write the stream with the surface's `Renderer`. The record is closed and reported by
gateway.http.lifecycle once the response has been written."""
from __future__ import annotations

from typing import Optional

from flask import Response

from gateway.canonical import Chunk
from gateway.errors import GatewayError
from gateway.http import lifecycle
from gateway.http.heartbeat import Deferred, await_first
from gateway.http.ollama_wire import dumps
from gateway.http.streaming import Tally, collect, stream_body
from gateway.limits import admit_request

STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


class Renderer:
    """One API surface's rendering of one answer. Built per request, so it can hold the
    request's precomputed heads (no dict or json.dumps per plain content chunk)."""
    mimetype = "application/json"     # of the stream
    heartbeat: Optional[str] = None   # sent while a slow answer has not started; None: wait

    def beat(self) -> str:
        """One heartbeat (a surface whose stream must open with an event makes the first
        one open it)."""
        return self.heartbeat or ""

    def chunk(self, ch: Chunk) -> Optional[str]:
        """The text a streamed chunk becomes (None or "": nothing to send)."""
        raise NotImplementedError

    def error(self, e: GatewayError) -> str:
        """The stream's last line when the answer fails after the first byte."""
        raise NotImplementedError

    def whole(self, tally: Tally) -> dict:
        """The body of a stream:false answer."""
        raise NotImplementedError


def serve(st, req, renderer: Renderer) -> Response:
    rec = lifecycle.current()
    rec.note(model=req.model, stream=req.stream)
    if st.settings.log_prompts:          # opt-in only: prompts are people's data
        rec.note(prompt=prompt_text(req))
    admit_request(st, rec.facts)         # the client's model access (403) and limits (429)
    chunks = first_chunk(st, req, rec, heartbeat=renderer.heartbeat is not None and req.stream)
    if not req.stream:
        collect(chunks, rec.tally)
        return Response(dumps(renderer.whole(rec.tally)), mimetype="application/json")
    # stream_body() yields bytes: direct_passthrough skips werkzeug's per-chunk re-encoding wrappers
    return Response(stream_body(chunks, rec.tally, renderer), mimetype=renderer.mimetype,
                    headers=STREAM_HEADERS, direct_passthrough=True)


def first_chunk(st, req, rec, heartbeat: bool):
    """The router's answer with its first chunk in hand; a failure before it raises (the
    error handler renders it with a real status). With `heartbeat`, a first chunk slower
    than one interval gives a Deferred iterator that yields None while it waits."""
    interval = st.settings.heartbeat

    def start():
        chunks = st.router.chat(req)
        # On a heartbeat this runs in the background (with the request's context), before
        # the Deferred hands out the first real chunk.
        rec.note(provider=chunks.target.provider.name)
        return chunks

    if heartbeat and interval > 0:
        chunks, pending = await_first(start, interval)
        return chunks if pending is None else Deferred(pending, interval)
    return start()


def serve_embed(st, req):
    """Route an EmbedRequest; the result, noted in the record (provider, prompt tokens)."""
    rec = lifecycle.current()
    rec.note(model=req.model, stream=False)
    admit_request(st, rec.facts)
    result, target = st.router.embed(req)
    rec.note(provider=target.provider.name)
    rec.tally.ended(Chunk(done=True, prompt_tokens=result.prompt_tokens))
    return result


def prompt_text(req, limit: int = 2000) -> str:
    """What the caller asked, for the access log when `server.log_prompts` is on: the
    generate prompt, or the last user message."""
    text = req.prompt or ""
    if not text:
        users = [m for m in req.messages if m.role == "user"]
        text = users[-1].content if users else ""
    return (text or "")[:limit]
