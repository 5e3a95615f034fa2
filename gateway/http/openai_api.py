"""The OpenAI API surface (/v1/*). SSE streams ending `data: [DONE]`; errors as
{"error": {"message", "type", "code"}}."""
from __future__ import annotations

import base64
import struct
import time
import uuid
from json.encoder import encode_basestring

from flask import Blueprint, Response, current_app

from gateway.canonical import ChatRequest, Chunk, EmbedRequest, Message, ToolCall
from gateway.errors import BadRequest, GatewayError
from gateway.http import lifecycle, ollama_wire
from gateway.http.common import (check_model_name, get_bool, get_model, get_number, get_str, parse_format, parse_tools,
                                 read_json_body, stop_list, strip_data_url)
from gateway.http.serve import Renderer, serve, serve_embed
from gateway.http.streaming import Tally
from gateway.tool_calls import arguments_from_request, arguments_text, new_call_id

bp = Blueprint("openai", __name__, url_prefix="/v1")
SSE = "text/event-stream"
dumps = ollama_wire.dumps
encode_str = encode_basestring   # == dumps(a str), ensure_ascii=False, in C
_EFFORT = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "max": "max", "xhigh": "max", "ultra": "max"}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def state():
    return current_app.extensions["gateway"]


def json_response(obj, status=200):
    return Response(dumps(obj), status=status, mimetype="application/json")


# ---- request translation ----------------------------------------------------------------
def _message(m, i) -> Message:
    f = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f'invalid value for field "{f}": expected an object')
    role = m.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise BadRequest(f'invalid value for field "{f}.role": expected system, user, assistant or tool')
    content, images = m.get("content"), []
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif ptype == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(f'invalid value for field "{f}.content[{j}].image_url": '
                                     "only data: URLs are supported")
                images.append(strip_data_url(url, f"{f}.content[{j}].image_url"))
            else:
                raise BadRequest(f'invalid value for field "{f}.content[{j}]": expected a text or image_url part')
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise BadRequest(f'invalid value for field "{f}.content": expected a string or a list of parts')
    calls = []
    for k, tc in enumerate(m.get("tool_calls") or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f'invalid value for field "{f}.tool_calls[{k}]": expected a function call')
        args = arguments_from_request(fn.get("arguments"), f"{f}.tool_calls[{k}].function.arguments")
        cid = tc.get("id")
        calls.append(ToolCall(name=fn["name"], arguments=args, id=cid if isinstance(cid, str) and cid else None,
                              index=k))
    reasoning = m.get("reasoning") or m.get("reasoning_content")
    return Message(role=role, content=content, images=images, tool_calls=calls,
                   thinking=reasoning if isinstance(reasoning, str) else None,
                   tool_call_id=m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None,
                   tool_name=m.get("name") if isinstance(m.get("name"), str) else None)


def _sampling(body, req: ChatRequest) -> ChatRequest:
    o = req.options
    o.temperature = get_number(body, "temperature", minimum=0, maximum=2)
    o.top_p = get_number(body, "top_p", minimum=0, maximum=1)
    o.seed = get_number(body, "seed", integer=True)
    o.frequency_penalty = get_number(body, "frequency_penalty", minimum=-2, maximum=2)
    o.presence_penalty = get_number(body, "presence_penalty", minimum=-2, maximum=2)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        o.num_predict = get_number({"max_tokens": mt}, "max_tokens", integer=True, minimum=1)
    o.stop = stop_list(body.get("stop"))
    req.stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest('invalid value for field "stream_options": expected an object')
    req.want_usage = bool(so and so.get("include_usage"))
    return req


def chat_request(body) -> ChatRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise BadRequest('invalid value for field "messages": expected a list of messages'
                         if msgs is not None else "messages is required")
    req = ChatRequest(model=get_model(body), messages=[_message(m, i) for i, m in enumerate(msgs)],
                      tools=parse_tools(body.get("tools")), tool_choice=body.get("tool_choice"))
    rf = body.get("response_format")
    if rf is not None:
        rtype = rf.get("type") if isinstance(rf, dict) else None
        if rtype == "json_object":
            req.format = "json"
        elif rtype == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
            req.format = parse_format(schema if isinstance(schema, dict) else "json")
            if isinstance(schema, dict):
                req.openai_fields["response_format"] = rf
        elif rtype != "text":
            raise BadRequest('invalid value for field "response_format.type": expected text, json_object or json_schema')
    effort, key = body.get("reasoning_effort"), "reasoning_effort"
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort, key = body["reasoning"].get("effort"), "reasoning"
    if effort is not None:
        if not isinstance(effort, str) or effort not in _EFFORT:
            raise BadRequest(f'invalid value for field "reasoning_effort": {str(effort)[:40]!r} is not one of '
                             + ", ".join(_EFFORT))
        req.think = _EFFORT[effort]
        req.openai_fields[key] = body[key]
    return _sampling(body, req)


def completion_request(body) -> ChatRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest('invalid value for field "prompt": expected a string')
    req = ChatRequest(model=get_model(body), prompt=prompt, suffix=get_str(body, "suffix"),
                      messages=[Message(role="user", content=prompt)], kind="generate")
    return _sampling(body, req)


# ---- response rendering -----------------------------------------------------------------
def _tool_calls(calls) -> list:
    return [{"id": tc.id or new_call_id(), "index": tc.index, "type": "function",
             "function": {"name": tc.name, "arguments": arguments_text(tc.arguments)}} for tc in calls]


def _usage(final: Chunk):
    p, c = int(final.prompt_tokens or 0), int(final.completion_tokens or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(tally: Tally, last: Chunk) -> str:
    reason = _FINISH.get(last.done_reason or "stop", "stop")
    return "tool_calls" if tally.tool_calls and reason == "stop" else reason


def _error_event(e: GatewayError) -> str:
    return "data: " + dumps({"error": {"message": e.message, "type": e.kind, "code": str(e.status)}}) + "\n\n"


class ChatCompletionRenderer(Renderer):
    """chat.completion (whole) and chat.completion.chunk SSE events."""
    mimetype = SSE
    heartbeat = ": keep-alive\n\n"
    error = staticmethod(_error_event)

    def __init__(self, req: ChatRequest):
        self.req = req
        self.tally = lifecycle.current().tally     # what the answer produced so far
        self.cid, self.created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        # Precomputed event head and tail (a seam kept for speed): a plain content chunk
        # is head + encoded text + tail, no dict or json.dumps.
        self.head = ('data: {"id":"' + self.cid + '","object":"chat.completion.chunk","created":'
                     + str(self.created) + ',"model":' + dumps(req.model)
                     + ',"system_fingerprint":"fp_gateway","choices":[{"index":0,"delta":')
        self.sent_role = False

    def chunk(self, ch: Chunk) -> str:
        head, tail = self.head, ',"finish_reason":null}]}\n\n'
        out = []
        if not self.sent_role:
            self.sent_role = True
            out.append(head + '{"role":"assistant","content":""}' + tail)
        if ch.content and not (ch.thinking or ch.tool_calls):
            # the common case, without building and encoding a dict
            out.append(head + '{"content":' + encode_str(ch.content) + "}" + tail)
        else:
            delta = {}
            if ch.content:
                delta["content"] = ch.content
            if ch.thinking:
                delta["reasoning"] = delta["reasoning_content"] = ch.thinking
            if ch.tool_calls:
                delta["tool_calls"] = _tool_calls(ch.tool_calls)
            if delta:
                out.append(head + dumps(delta) + tail)
        if ch.done:
            out.append(head + '{},"finish_reason":"' + _finish_reason(self.tally, ch) + '"}]}\n\n')
            if self.req.want_usage:
                out.append("data: " + dumps({"id": self.cid, "object": "chat.completion.chunk",
                                             "created": self.created, "model": self.req.model, "choices": [],
                                             "usage": _usage(ch)}) + "\n\n")
            out.append("data: [DONE]\n\n")
        return "".join(out)

    def whole(self, t: Tally) -> dict:
        msg = {"role": "assistant", "content": "".join(t.content)}
        if t.thinking:
            msg["reasoning"] = "".join(t.thinking)
        if t.tool_calls:
            msg["tool_calls"] = _tool_calls(t.tool_calls)
        return {"id": self.cid, "object": "chat.completion", "created": self.created, "model": self.req.model,
                "system_fingerprint": "fp_gateway",
                "choices": [{"index": 0, "message": msg, "finish_reason": _finish_reason(t, t.final)}],
                "usage": _usage(t.final)}


class CompletionRenderer(Renderer):
    """text_completion (whole) and its SSE events."""
    mimetype = SSE
    heartbeat = ": keep-alive\n\n"
    error = staticmethod(_error_event)

    def __init__(self, req: ChatRequest):
        self.req = req
        self.tally = lifecycle.current().tally     # what the answer produced so far
        self.cid, self.created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

    def _event(self, text, finish) -> str:
        return "data: " + dumps({"id": self.cid, "object": "text_completion", "created": self.created,
                                 "model": self.req.model,
                                 "choices": [{"text": text, "index": 0, "finish_reason": finish}]}) + "\n\n"

    def chunk(self, ch: Chunk) -> str:
        out = self._event(ch.content, None) if ch.content else ""
        if ch.done:
            out += self._event("", _FINISH.get(ch.done_reason or "stop", "stop"))
            if self.req.want_usage:
                out += "data: " + dumps({"id": self.cid, "object": "text_completion", "created": self.created,
                                         "model": self.req.model, "choices": [], "usage": _usage(ch)}) + "\n\n"
            out += "data: [DONE]\n\n"
        return out

    def whole(self, t: Tally) -> dict:
        return {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.req.model,
                "choices": [{"text": "".join(t.content), "index": 0, "logprobs": None,
                             "finish_reason": _FINISH.get(t.final.done_reason or "stop", "stop")}],
                "usage": _usage(t.final)}


@bp.route("/chat/completions", methods=["POST"])
def chat_completions():
    req = chat_request(read_json_body())
    return serve(state(), req, ChatCompletionRenderer(req))


@bp.route("/completions", methods=["POST"])
def completions():
    req = completion_request(read_json_body())
    return serve(state(), req, CompletionRenderer(req))


@bp.route("/embeddings", methods=["POST"])
def embeddings():
    body = read_json_body()
    model = get_model(body)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not (isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs)):
        raise BadRequest('invalid value for field "input": expected a string or a non-empty list of strings')
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest('invalid value for field "encoding_format": expected "float" or "base64"')
    req = EmbedRequest(model=model, inputs=inputs,
                       dimensions=get_number(body, "dimensions", integer=True, minimum=1))
    result = serve_embed(state(), req)
    data = []
    for i, vec in enumerate(result.embeddings):
        emb = (base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec)
        data.append({"object": "embedding", "embedding": emb, "index": i})
    n = int(result.prompt_tokens or 0)
    return json_response({"object": "list", "data": data, "model": model,
                          "usage": {"prompt_tokens": n, "total_tokens": n}})


def _model_obj(card) -> dict:
    return {"id": card.name, "object": "model", "created": int(card.modified_at or 0),
            "owned_by": card.provider}


@bp.route("/models", methods=["GET"])
def models():
    return json_response({"object": "list", "data": [_model_obj(c) for c in state().router.list_cards()]})


@bp.route("/models/<path:model_id>", methods=["GET"])
def model(model_id):
    return json_response(_model_obj(state().router.card(check_model_name(model_id))))
