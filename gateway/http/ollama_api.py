"""The Ollama API surface (/api/*). NDJSON streams; errors as {"error": "..."}."""
from __future__ import annotations

import time
from json.encoder import encode_basestring

from flask import Blueprint, Response, current_app, request

from gateway.canonical import Chunk, EmbedRequest
from gateway.durations import rfc3339
from gateway.errors import BadRequest, GatewayError, model_not_found
from gateway.http import lifecycle
from gateway.http import ollama_wire as wire
from gateway.http.common import (check_model_name, get_bool, get_model, get_number, parse_keep_alive_field, parse_options,
                                 read_json_body)
from gateway.http.serve import STREAM_HEADERS, Renderer, serve, serve_embed
from gateway.http.streaming import Tally

bp = Blueprint("ollama", __name__)
encode_str = encode_basestring   # == wire.dumps(a str), ensure_ascii=False, in C
_stamp = (-1, "")                # (second, "YYYY-MM-DDTHH:MM:SS") of the last timestamp


def now_rfc3339() -> str:
    """durations.rfc3339() for now, formatting the date part once per second (it was a
    time.strftime + gmtime per streamed chunk)."""
    global _stamp
    sec, frac = divmod(time.time_ns(), 1_000_000_000)
    stamp = _stamp
    if stamp[0] != sec:
        stamp = _stamp = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{stamp[1]}.{frac:09d}Z"


NDJSON = "application/x-ndjson"


def state():
    return current_app.extensions["gateway"]


def json_response(obj, status=200) -> Response:
    return Response(wire.dumps(obj), status=status, mimetype="application/json")


@bp.route("/", methods=["GET", "HEAD"])
def root():
    return Response("Ollama is running", mimetype="text/plain")


@bp.route("/api/version", methods=["GET", "HEAD"])
def version():
    return json_response({"version": state().settings.version})


@bp.route("/api/tags", methods=["GET", "HEAD"])
def tags():
    return json_response({"models": [wire.tag_entry(c) for c in state().router.list_cards()]})


@bp.route("/api/ps", methods=["GET"])
def ps():
    loaded = sorted(state().router.loaded(), key=lambda lm: lm.expires_at, reverse=True)
    return json_response({"models": [wire.ps_entry(lm) for lm in loaded]})


@bp.route("/api/show", methods=["POST"])
def show():
    body = read_json_body()
    name = get_model(body, legacy_name=True)
    return json_response(wire.show_response(state().router.card(name)))


# ---- generation -------------------------------------------------------------------------
def _load_or_unload(req, kind):
    """Empty messages/prompt: Ollama loads the model, or with keep_alive 0 unloads it."""
    router = state().router
    reason = "unload" if req.keep_alive == 0 else "load"
    if reason == "unload":
        router.unload(req.model)
    else:
        router.load(req.model, req.keep_alive)
    obj = {"model": req.model, "created_at": rfc3339()}
    if kind == "chat":
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update({"done_reason": reason, "done": True})
    if req.stream:
        return Response(wire.dumps(obj) + "\n", mimetype=NDJSON, headers=STREAM_HEADERS)
    return json_response(obj)


def _run(req, kind: str):
    has_input = req.messages if kind == "chat" else (req.prompt or req.suffix or
                                                     any(m.images for m in req.messages))
    if not has_input:
        return _load_or_unload(req, kind)
    return serve(state(), req, OllamaRenderer(req, kind))


class OllamaRenderer(Renderer):
    """NDJSON lines of /api/chat or /api/generate."""
    mimetype = NDJSON

    def __init__(self, req, kind: str):
        self.req = req
        self.tally = lifecycle.current().tally     # what the answer produced so far
        self.kind = kind
        # Precomputed heads (a seam kept for speed): a plain content chunk is
        # head + timestamp + key + encoded text, no dict or json.dumps.
        self.head = '{"model":' + wire.dumps(req.model) + ',"created_at":"'
        self.key = '","message":{"role":"assistant","content":' if kind == "chat" else '","response":'
        # No heartbeat on /api/generate: its clients reject empty non-final chunks.
        if kind == "chat":
            self.heartbeat = (self.head + rfc3339()
                              + '","message":{"role":"assistant","content":""},"done":false}\n')

    def chunk(self, ch: Chunk):
        req = self.req
        if ch.done:
            return wire.dumps(_final(req, self.kind, self.tally, whole=False, last=ch)) + "\n"
        if self.kind == "chat":
            if not (ch.content or ch.thinking or ch.tool_calls):
                return None
            if ch.thinking or ch.tool_calls:
                msg = {"role": "assistant", "content": ch.content}
                if ch.thinking:
                    msg["thinking"] = ch.thinking
                if ch.tool_calls:
                    msg["tool_calls"] = wire.tool_calls_out(ch.tool_calls)
                return wire.dumps({"model": req.model, "created_at": rfc3339(), "message": msg,
                                   "done": False}) + "\n"
            return self.head + now_rfc3339() + self.key + encode_str(ch.content) + '},"done":false}\n'
        if ch.thinking:
            return wire.dumps({"model": req.model, "created_at": rfc3339(), "response": ch.content,
                               "thinking": ch.thinking, "done": False}) + "\n"
        if not ch.content:   # LiteLLM rejects non-final generate chunks with empty response
            return None
        return self.head + now_rfc3339() + self.key + encode_str(ch.content) + ',"done":false}\n'

    def error(self, e: GatewayError) -> str:
        return wire.dumps({"error": e.message}) + "\n"

    def whole(self, tally: Tally) -> dict:
        return _final(self.req, self.kind, tally, whole=True)


def _final(req, kind, tally: Tally, whole: bool, last: Chunk = None) -> dict:
    last = last or tally.final or Chunk(done=True)
    obj = {"model": req.model, "created_at": rfc3339()}
    content = "".join(tally.content) if whole else ""
    if kind == "chat":
        msg = {"role": "assistant", "content": content}
        if whole and tally.thinking:
            msg["thinking"] = "".join(tally.thinking)
        if whole and tally.tool_calls:
            msg["tool_calls"] = wire.tool_calls_out(tally.tool_calls)
        obj["message"] = msg
    else:
        obj["response"] = content
        if whole and tally.thinking:
            obj["thinking"] = "".join(tally.thinking)
    reason = last.done_reason or "stop"
    obj["done"] = True
    obj["done_reason"] = "stop" if reason == "tool_calls" else reason
    obj.update(tally.metrics())
    if kind == "generate" and last.context:
        obj["context"] = last.context
    return obj


@bp.route("/api/chat", methods=["POST"])
def chat():
    return _run(wire.chat_request(read_json_body()), "chat")


@bp.route("/api/generate", methods=["POST"])
def generate():
    return _run(wire.generate_request(read_json_body()), "generate")


# ---- embeddings -------------------------------------------------------------------------
def _embed(model, inputs, body):
    req = EmbedRequest(model=model, inputs=inputs, truncate=get_bool(body, "truncate", True),
                       dimensions=get_number(body, "dimensions", integer=True, minimum=1),
                       keep_alive=parse_keep_alive_field(body), options=parse_options(body.get("options")))
    return serve_embed(state(), req)


@bp.route("/api/embed", methods=["POST"])
def embed():
    body = read_json_body()
    model = get_model(body)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    elif inputs is None:
        inputs = []
    elif not (isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
        raise BadRequest("invalid input type")
    if not inputs:
        state().router.resolve(model)
        return json_response({"model": model, "embeddings": []})
    result = _embed(model, inputs, body)
    tally = lifecycle.current().tally
    return json_response({"model": model, "embeddings": result.embeddings,
                          "total_duration": int(((tally.t_end or time.perf_counter()) - tally.t0) * 1e9),
                          "load_duration": int(result.load_duration or 0),
                          "prompt_eval_count": int(result.prompt_tokens or 0)})


@bp.route("/api/embeddings", methods=["POST"])
def embeddings_legacy():
    body = read_json_body()
    model = get_model(body)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest('invalid value for field "prompt": expected a string')
    if not prompt:
        state().router.resolve(model)
        return json_response({"embedding": []})
    result = _embed(model, [prompt], body)
    return json_response({"embedding": result.embeddings[0] if result.embeddings else []})


# ---- model management: not supported, but answered clearly ------------------------------
def _unsupported(what):
    return BadRequest(f"{what} is not supported by this gateway; models are configured in the "
                      "gateway's YAML config")


@bp.route("/api/pull", methods=["POST"])
def pull():
    body = read_json_body()
    name = get_model(body, legacy_name=True)
    try:
        state().router.resolve(name)
    except GatewayError:
        raise BadRequest(f'pull is not supported by this gateway; add "{name}" to the config')
    if get_bool(body, "stream", True):
        return Response(wire.dumps({"status": "success"}) + "\n", mimetype=NDJSON)
    return json_response({"status": "success"})


@bp.route("/api/delete", methods=["DELETE", "POST"])
def delete():
    body = read_json_body()
    name = get_model(body, legacy_name=True)
    state().router.resolve(name)
    raise _unsupported("delete")


@bp.route("/api/copy", methods=["POST"])
def copy():
    body = read_json_body()
    src = body.get("source")
    if not isinstance(src, str) or not src:
        raise BadRequest("source is required")
    state().router.resolve(check_model_name(src, "source"))
    raise _unsupported("copy")


@bp.route("/api/create", methods=["POST"])
def create():
    read_json_body(allow_empty=True)
    raise _unsupported("create")


@bp.route("/api/push", methods=["POST"])
def push():
    read_json_body(allow_empty=True)
    raise _unsupported("push")


@bp.route("/api/blobs/<path:digest>", methods=["HEAD", "POST"])
def blobs(digest):
    if request.method == "HEAD":
        return Response(status=404)
    raise _unsupported("uploading blobs")


__all__ = ["bp", "model_not_found"]
