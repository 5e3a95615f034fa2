"""Anthropic Messages wire format ⇄ canonical model: requests in; whole messages, SSE
events and errors out. Pure functions and one small stream renderer, no Flask."""
from __future__ import annotations

import uuid
from json.encoder import encode_basestring as encode_str

from gateway.canonical import ChatRequest, Chunk, Message, ToolCall
from gateway.errors import BadRequest
from gateway.http.common import get_bool, get_model, get_number, strip_data_url, tool_objects
from gateway.http.ollama_wire import dumps
from gateway.http.serve import Renderer
from gateway.tool_calls import arguments_from_request

# Anthropic's error types by HTTP status (their API answers overloaded as 529).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# Anthropic's thinking budget → the canonical effort level (the budget itself travels too).
_BUDGET_LEVELS = ((4096, "low"), (16384, "medium"))


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


# ---- request translation ------------------------------------------------------------------
def _bad(field: str, expected: str) -> BadRequest:
    return BadRequest(f'invalid value for field "{field}": {expected}')


def _text_of(blocks, field: str) -> str:
    """A system prompt or tool_result content: a string or a list of text blocks."""
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise _bad(field, "expected a string or a list of text blocks")
    out = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise _bad(f"{field}[{j}]", "expected a text block")
        out.append(b["text"])
    return "\n".join(out)


def _image(block, field: str) -> str:
    src = block.get("source")
    if not isinstance(src, dict) or src.get("type") != "base64":
        raise _bad(f"{field}.source", "only base64 image sources are supported")
    if src.get("media_type") not in _IMAGE_TYPES:
        raise _bad(f"{field}.source.media_type", "expected one of " + ", ".join(_IMAGE_TYPES))
    return strip_data_url(src.get("data"), f"{field}.source.data")


def _tool_result(block, f: str, names: dict) -> Message:
    tid = block.get("tool_use_id")
    if not isinstance(tid, str) or not tid:
        raise _bad(f"{f}.tool_use_id", "expected the id of a tool_use block")
    content, images = block.get("content"), []
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif ptype == "image":
                images.append(_image(part, f"{f}.content[{k}]"))
            else:
                raise _bad(f"{f}.content[{k}]", "expected a text or image block")
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _bad(f"{f}.content", "expected a string or a list of blocks")
    if block.get("is_error") is True and not content.lower().startswith("error"):
        content = "Error: " + content
    return Message(role="tool", content=content, images=images, tool_call_id=tid,
                   tool_name=names.get(tid))


def _message(m, i: int, names: dict) -> list:
    """One Anthropic message → canonical messages: a user turn's tool_result blocks become
    tool messages (in order, before the rest of the turn)."""
    f = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f, "expected an object")
    role = m.get("role")
    if role not in ("user", "assistant", "system"):   # Claude Code sends system turns too
        raise _bad(f"{f}.role", 'expected "user" or "assistant"')
    content = m.get("content")
    if isinstance(content, str):
        return [Message(role=role, content=content)]
    if not isinstance(content, list):
        raise _bad(f"{f}.content", "expected a string or a list of content blocks")
    texts, images, calls, tools, thinking, signature = [], [], [], [], [], None
    for j, b in enumerate(content):
        bf = f"{f}.content[{j}]"
        btype = b.get("type") if isinstance(b, dict) else None
        if btype == "text":
            if not isinstance(b.get("text"), str):
                raise _bad(f"{bf}.text", "expected a string")
            texts.append(b["text"])
        elif btype == "image":
            images.append(_image(b, bf))
        elif btype == "tool_use" and role == "assistant":
            tid, name = b.get("id"), b.get("name")
            if not isinstance(tid, str) or not isinstance(name, str) or not name:
                raise _bad(bf, "a tool_use block needs an id and a name")
            args = b.get("input")
            if isinstance(args, str):
                raise _bad(f"{bf}.input", "expected an object")
            args = arguments_from_request(args, f"{bf}.input")
            names[tid] = name
            calls.append(ToolCall(name=name, arguments=args, id=tid, index=len(calls)))
        elif btype == "tool_result" and role == "user":
            tools.append(_tool_result(b, bf, names))
        elif btype == "thinking" and role == "assistant":
            if isinstance(b.get("thinking"), str):
                thinking.append(b["thinking"])
            if isinstance(b.get("signature"), str) and b["signature"]:
                signature = b["signature"]
        elif btype == "redacted_thinking" and role == "assistant":
            continue    # opaque to every model the gateway can reach without it
        elif isinstance(btype, str):
            raise _bad(f"{bf}.type", f'"{btype[:40]}" blocks are not supported in {role} messages')
        else:
            raise _bad(f"{bf}.type", "expected a content block type")
    out = list(tools)
    if texts or images or calls or thinking or not tools:
        out.append(Message(role=role, content="".join(texts) if role == "assistant" else "\n".join(texts),
                           images=images, tool_calls=calls,
                           thinking="".join(thinking) if thinking else None,
                           thinking_signature=signature))
    return out


def _tools(value) -> list:
    out = []
    for i, t in tool_objects(value):
        if t.get("type") not in (None, "custom"):
            continue    # Anthropic's server tools (web_search, bash_…): no model here runs them
        name, schema = t.get("name"), t.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", "expected a non-empty string")
        if not isinstance(schema, dict):
            raise _bad(f"tools[{i}].input_schema", "expected a JSON schema object")
        out.append({"type": "function", "function": {
            "name": name, "description": str(t.get("description") or ""), "parameters": schema}})
    return out


def _tool_choice(value):
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise _bad("tool_choice", 'expected {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}')


def _thinking(value, req: ChatRequest) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "disabled":
        req.think = False
    elif kind == "enabled":
        budget = get_number(value, "budget_tokens", integer=True, minimum=1)
        if budget is None:
            raise BadRequest("thinking.budget_tokens is required when thinking is enabled")
        req.thinking_budget = budget
        req.think = next((lvl for top, lvl in _BUDGET_LEVELS if budget <= top), "high")
    elif kind != "adaptive":     # adaptive: the model's own default
        raise _bad("thinking.type", 'expected "enabled", "disabled" or "adaptive"')


def chat_request(body: dict, count_only: bool = False) -> ChatRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise BadRequest("messages is required" if msgs is None else
                         'invalid value for field "messages": expected a list of messages')
    if not msgs:
        raise BadRequest("messages: at least one message is required")
    names: dict = {}
    messages = []
    system = body.get("system")
    if system:
        messages.append(Message(role="system", content=_text_of(system, "system")))
    for i, m in enumerate(msgs):
        messages.extend(_message(m, i, names))
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"))
    # without tools a choice means nothing, and OpenAI-type upstreams refuse it
    req = ChatRequest(model=get_model(body), messages=messages, tools=tools,
                      tool_choice=choice if tools else None)
    o = req.options
    mt = get_number(body, "max_tokens", integer=True, minimum=1)
    if mt is None and not count_only:
        raise BadRequest("max_tokens is required")
    o.num_predict = mt
    o.temperature = get_number(body, "temperature", minimum=0, maximum=1)
    o.top_p = get_number(body, "top_p", minimum=0, maximum=1)
    o.top_k = get_number(body, "top_k", integer=True, minimum=0)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences", "expected a list of strings")
        o.stop = [s for s in stops if s]
    _thinking(body.get("thinking"), req)
    req.stream = bool(get_bool(body, "stream", False)) and not count_only
    req.want_usage = True
    return req


# ---- response rendering ---------------------------------------------------------------------
def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_id(tc: ToolCall) -> str:
    if not tc.id:
        tc.id = "toolu_" + uuid.uuid4().hex[:24]
    return tc.id


def stop_reason(final: Chunk, had_tools: bool):
    """(stop_reason, stop_sequence)"""
    if final.stop_sequence:
        return "stop_sequence", final.stop_sequence
    reason = _STOP.get(final.done_reason or "stop", "end_turn")
    return ("tool_use" if had_tools and reason == "end_turn" else reason), None


def usage(final: Chunk) -> dict:
    return {"input_tokens": int(final.prompt_tokens or 0), "output_tokens": int(final.completion_tokens or 0)}


def whole_message(msg_id: str, model: str, tally) -> dict:
    content = []
    if tally.thinking:
        content.append({"type": "thinking", "thinking": "".join(tally.thinking), "signature": tally.signature})
    text = "".join(tally.content)
    if text or not tally.tool_calls:
        content.append({"type": "text", "text": text})
    for tc in tally.tool_calls:
        content.append({"type": "tool_use", "id": tool_id(tc), "name": tc.name, "input": tc.arguments})
    reason, seq = stop_reason(tally.final, bool(tally.tool_calls))
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": usage(tally.final)}


def event(name: str, data: dict) -> str:
    return "event: " + name + "\ndata: " + dumps(data) + "\n\n"


PING = 'event: ping\ndata: {"type":"ping"}\n\n'


class MessagesRenderer(Renderer):
    """Canonical chunks → Anthropic's SSE grammar: message_start, ping*, per block
    content_block_start → deltas → content_block_stop (indexes 0, 1, …), message_delta,
    message_stop; `error` after a failure. Thinking, text and each tool call open their
    own block; a change of kind closes the open one. `whole` is the stream:false message."""
    mimetype = "text/event-stream"
    heartbeat = PING

    def __init__(self, msg_id: str, model: str):
        self.msg_id, self.model = msg_id, model
        self.started = False
        self.index = -1
        self.open = None          # "thinking" | "text" | None
        self.had_tools = False
        self._text_head = ""

    def beat(self) -> str:
        return self._start() + PING        # the first heartbeat also starts the message

    def whole(self, tally) -> dict:
        return whole_message(self.msg_id, self.model, tally)

    def _start(self) -> str:
        if self.started:
            return ""
        self.started = True
        return event("message_start", {"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _close(self) -> str:
        if self.open is None:
            return ""
        self.open = None
        return ('event: content_block_stop\ndata: {"type":"content_block_stop","index":'
                + str(self.index) + "}\n\n")

    def _open(self, kind: str, block: dict) -> str:
        out = self._close()
        self.index += 1
        self.open = kind
        if kind == "text":
            self._text_head = ('event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                               + str(self.index) + ',"delta":{"type":"text_delta","text":')
        return out + event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                   "content_block": block})

    def _delta(self, delta: dict) -> str:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                             "delta": delta})

    def chunk(self, ch: Chunk) -> str:
        if (self.open == "text" and ch.content and not ch.done
                and not (ch.thinking or ch.tool_calls or ch.thinking_signature)):
            return self._text_head + encode_str(ch.content) + "}}\n\n"   # the common case, per token
        out = [] if self.started else [self._start()]
        if ch.thinking:
            if self.open != "thinking":
                out.append(self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
            out.append(self._delta({"type": "thinking_delta", "thinking": ch.thinking}))
        if ch.thinking_signature:
            if self.open != "thinking":
                out.append(self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}))
            out.append(self._delta({"type": "signature_delta", "signature": ch.thinking_signature}))
        if ch.content:
            if self.open != "text":
                out.append(self._open("text", {"type": "text", "text": ""}))
            out.append(self._text_head + encode_str(ch.content) + "}}\n\n")
        for tc in ch.tool_calls:
            self.had_tools = True
            out.append(self._open("tool", {"type": "tool_use", "id": tool_id(tc), "name": tc.name,
                                           "input": {}}))
            out.append(self._delta({"type": "input_json_delta", "partial_json": dumps(tc.arguments)}))
            out.append(self._close())
        if ch.done:
            out.append(self._close())
            reason, seq = stop_reason(ch, self.had_tools)
            out.append(event("message_delta", {"type": "message_delta",
                                               "delta": {"stop_reason": reason, "stop_sequence": seq},
                                               "usage": usage(ch)}))
            out.append('event: message_stop\ndata: {"type":"message_stop"}\n\n')
        return "".join(out)

    def error(self, e) -> str:
        status = getattr(e, "status", 500) or 500
        return event("error", error_body(status, getattr(e, "message", str(e))))


__all__ = ["chat_request", "whole_message", "MessagesRenderer", "error_body", "error_type",
           "new_message_id"]
