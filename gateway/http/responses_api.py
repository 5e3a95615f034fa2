"""The OpenAI Responses surface: POST /v1/responses over every provider, stateless.
Errors as {"error": {message, type, param, code}} (gateway.http.render)."""
from __future__ import annotations

import time

from flask import Blueprint, Response, current_app

from gateway.http import responses_wire as wire
from gateway.http.answer import answer
from gateway.http.common import read_json_body
from gateway.http.ollama_wire import dumps
from gateway.http.streaming import Tally, drive

bp = Blueprint("responses", __name__, url_prefix="/v1")
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


@bp.route("/responses", methods=["POST"])
def responses():
    tally = Tally(time.perf_counter())
    body = read_json_body()
    req = wire.chat_request(body)
    shape = wire.Shape(body, req)

    def whole(t: Tally):
        obj = shape.response(wire.status_of(t.final), wire.whole_output(t), t.final)
        return Response(dumps(obj), mimetype="application/json")

    def stream(chunks, finish):
        r = wire.StreamRenderer(shape)
        # the renderer is its own heartbeat: response.created first, then SSE comments
        return Response(drive(chunks, tally, r.chunk, r.error, finish, heartbeat=r),
                        mimetype="text/event-stream", headers=STREAM_HEADERS, direct_passthrough=True)

    return answer(current_app.extensions["gateway"], req, tally, heartbeat=True,
                  render_whole=whole, render_stream=stream)
