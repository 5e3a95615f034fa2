"""The OpenAI Responses surface: POST /v1/responses over every provider, stateless.
Errors as {"error": {message, type, param, code}} (gateway.http.render)."""
from __future__ import annotations

import time

from flask import Blueprint, Response, current_app

from gateway.http import responses_wire as wire
from gateway.http.answer import answer
from gateway.errors import NotFound
from gateway.http.common import count_input_tokens, read_json_body
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


@bp.route("/responses/input_tokens", methods=["POST"])
def input_tokens():
    """The prompt's tokens: exact where the provider can count (see count_input_tokens)."""
    req = wire.chat_request(read_json_body())
    n = count_input_tokens(current_app.extensions["gateway"], req)
    return Response(dumps({"object": "response.input_tokens", "input_tokens": n}), mimetype="application/json")


@bp.route("/responses/<path:response_id>", methods=["GET", "DELETE"])
def stored_response(response_id):
    raise NotFound(f"response {response_id[:64]!r} not found: this gateway stores no responses")
