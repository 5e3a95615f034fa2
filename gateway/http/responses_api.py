"""The OpenAI Responses surface: POST /v1/responses over every provider, stateless.
Errors as {"error": {message, type, param, code}} (gateway.http.render)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from gateway.http import responses_wire as wire
from gateway.errors import NotFound
from gateway.http.common import count_input_tokens, read_json_body
from gateway.http.ollama_wire import dumps
from gateway.http.serve import serve

bp = Blueprint("responses", __name__, url_prefix="/v1")


@bp.route("/responses", methods=["POST"])
def responses():
    body = read_json_body()
    req = wire.chat_request(body)
    return serve(current_app.extensions["gateway"], req, wire.ResponsesRenderer(wire.Shape(body, req)))


@bp.route("/responses/input_tokens", methods=["POST"])
def input_tokens():
    """The prompt's tokens: exact where the provider can count (see count_input_tokens)."""
    req = wire.chat_request(read_json_body())
    n = count_input_tokens(current_app.extensions["gateway"], req)
    return Response(dumps({"object": "response.input_tokens", "input_tokens": n}), mimetype="application/json")


@bp.route("/responses/<path:response_id>", methods=["GET", "DELETE"])
def stored_response(response_id):
    raise NotFound(f"response {response_id[:64]!r} not found: this gateway stores no responses")
