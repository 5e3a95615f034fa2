"""The Anthropic Messages surface: POST /v1/messages and /v1/messages/count_tokens, over
every provider. Errors as {"type": "error", "error": {type, message}} (gateway.http.render)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from gateway.errors import GatewayError
from gateway.http import anthropic_wire as wire
from gateway.http.common import count_input_tokens, read_json_body
from gateway.http.ollama_wire import dumps
from gateway.http.serve import serve

bp = Blueprint("anthropic", __name__, url_prefix="/v1")


def state():
    return current_app.extensions["gateway"]


def json_response(obj, status=200):
    return Response(dumps(obj), status=status, mimetype="application/json")


def _thinking_hint(req) -> None:
    """Anthropic's `thinking` is a preference (Claude Code sends it to every model): a
    model whose card does not list thinking answers without it instead of a 400."""
    if req.think:
        try:
            caps = state().router.card(req.model).capabilities or []
        except GatewayError:
            return          # unknown model: routing answers the 404
        if "thinking" not in caps:
            req.think, req.thinking_budget = None, None


@bp.route("/messages", methods=["POST"])
def messages():
    req = wire.chat_request(read_json_body())
    _thinking_hint(req)
    return serve(state(), req, wire.MessagesRenderer(wire.new_message_id(), req.model))


@bp.route("/messages/count_tokens", methods=["POST"])
def count_tokens():
    """Exact where the provider can count, else an estimate (see count_input_tokens)."""
    req = wire.chat_request(read_json_body(), count_only=True)
    _thinking_hint(req)
    return json_response({"input_tokens": count_input_tokens(state(), req)})
