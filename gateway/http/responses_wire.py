"""OpenAI Responses wire format ⇄ canonical model: requests in; response objects and the
streaming event sequence (with sequence_numbers) out. Stateless: nothing is stored, so
`previous_response_id`, `conversation`, `store: true` and item references are refused.

Reasoning goes out as a `reasoning` item whose `encrypted_content` is the gateway's own
opaque copy of the thinking (and its signature); a client that sends the item back (store
off, as Codex does) gives the next assistant turn its thinking again."""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from json.encoder import encode_basestring as encode_str
from typing import Optional

from gateway.canonical import ChatRequest, Chunk, Message, ToolCall
from gateway.errors import BadRequest
from gateway.http.common import get_bool, get_model, get_number, parse_format, strip_data_url
from gateway.http.ollama_wire import dumps
from gateway.http.serve import Renderer
from gateway.tool_calls import arguments_from_request, arguments_text

_EFFORT = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "max"}
_REASONING_TAG = "gw1:"


def _bad(field: str, expected: str) -> BadRequest:
    return BadRequest(f'invalid value for field "{field}": {expected}')


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ---- request translation -------------------------------------------------------------------
def _parts(content, f: str, role: str):
    """(text, images) of a message's content: a string or input_text/input_image parts
    (output_text/refusal for assistant turns given back)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"{f}.content", "expected a string or a list of content parts")
    texts, images = [], []
    for j, p in enumerate(content):
        ptype = p.get("type") if isinstance(p, dict) else None
        if ptype in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            texts.append(p["text"])
        elif ptype == "refusal" and isinstance(p.get("refusal"), str):
            texts.append(p["refusal"])
        elif ptype == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise _bad(f"{f}.content[{j}].image_url", "only data: URLs are supported (no file_id, no remote URLs)")
            images.append(strip_data_url(url, f"{f}.content[{j}].image_url"))
        else:
            raise _bad(f"{f}.content[{j}]", "expected an input_text or input_image part")
    return "".join(texts) if role == "assistant" else "\n".join(texts), images


def _reasoning_in(item) -> tuple:
    """(thinking, signature) from one of our own reasoning items, else ("", None)."""
    enc = item.get("encrypted_content")
    if isinstance(enc, str) and enc.startswith(_REASONING_TAG):
        try:
            data = json.loads(base64.b64decode(enc[len(_REASONING_TAG):], validate=True))
            return str(data.get("t") or ""), data.get("s") or None
        except (ValueError, binascii.Error, AttributeError):
            pass
    return "", None


def _input(items, messages: list) -> None:
    names: dict = {}
    # a reasoning item belongs to the next assistant turn: its thinking and signature wait here
    pending_text: list = [""]
    pending_sig: list = [None]

    def assistant() -> Message:
        if messages and messages[-1].role == "assistant":
            return messages[-1]
        m = Message(role="assistant")
        messages.append(m)
        return m

    def take_thinking(m: Message):
        if pending_text[0] or pending_sig[0]:
            m.thinking = (m.thinking or "") + pending_text[0]
            m.thinking_signature = pending_sig[0] or m.thinking_signature
            pending_text[0], pending_sig[0] = "", None

    for i, it in enumerate(items):
        f = f"input[{i}]"
        if not isinstance(it, dict):
            raise _bad(f, "expected an input item object")
        kind = it.get("type") or ("message" if "role" in it else None)
        if kind == "message":
            role = it.get("role")
            if role == "developer":
                role = "system"
            if role not in ("user", "system", "assistant"):
                raise _bad(f"{f}.role", 'expected "user", "assistant", "system" or "developer"')
            text, images = _parts(it.get("content"), f, role)
            if role == "assistant":
                m = Message(role="assistant", content=text)
                messages.append(m)
                take_thinking(m)
            else:
                messages.append(Message(role=role, content=text, images=images))
        elif kind in ("function_call", "custom_tool_call"):
            cid, name = it.get("call_id"), it.get("name")
            if not isinstance(cid, str) or not cid or not isinstance(name, str) or not name:
                raise _bad(f, "a function_call needs call_id and name")
            raw = it.get("arguments") if kind == "function_call" else it.get("input")
            if kind == "custom_tool_call":
                args = {"input": raw if isinstance(raw, str) else ""}
            else:
                args = arguments_from_request(raw, f"{f}.arguments")
            m = assistant()
            take_thinking(m)
            names[cid] = name
            m.tool_calls.append(ToolCall(name=name, arguments=args, id=cid, index=len(m.tool_calls)))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            cid, out = it.get("call_id"), it.get("output")
            if not isinstance(cid, str) or not cid:
                raise _bad(f"{f}.call_id", "expected the call_id of a function_call")
            if isinstance(out, list):
                out, _ = _parts(out, f, "user")
            elif not isinstance(out, str):
                raise _bad(f"{f}.output", "expected a string")
            messages.append(Message(role="tool", content=out, tool_call_id=cid, tool_name=names.get(cid)))
        elif kind == "reasoning":
            think, sig = _reasoning_in(it)
            pending_text[0] += think
            pending_sig[0] = sig or pending_sig[0]
        elif kind == "item_reference":
            raise _bad(f, "item references need stored responses; this gateway is stateless "
                          "(send the whole conversation in input)")
        else:
            raise _bad(f"{f}.type", f"{str(kind)[:40]!r} items are not supported")


def _tools(value) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("tools", "expected a list of tools")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise _bad(f"tools[{i}]", "expected an object")
        kind = t.get("type")
        if kind == "namespace":          # Codex: a group of function tools, flattened
            out.extend(_tools([x for x in (t.get("tools") or []) if isinstance(x, dict)]))
            continue
        if kind != "function":
            continue                     # hosted tools (web_search, file_search, …) run nowhere here
        name, params = t.get("name"), t.get("parameters")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name", "expected a non-empty string")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"tools[{i}].parameters", "expected a JSON schema object")
        out.append({"type": "function", "function": {
            "name": name, "description": str(t.get("description") or ""),
            "parameters": params or {"type": "object", "properties": {}}}})
    return out


def _tool_choice(value):
    if value is None or value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        return value.get("mode") if value.get("mode") in ("auto", "required") else "auto"
    raise _bad("tool_choice", '"auto", "none", "required" or {"type": "function", "name": ...}')


def _format(text):
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema", "expected a JSON schema object")
        return parse_format(schema)
    raise _bad("text.format.type", 'expected "text", "json_object" or "json_schema"')


def chat_request(body: dict) -> ChatRequest:
    if body.get("previous_response_id") is not None:
        raise BadRequest('previous_response_id is not supported: this gateway stores no responses; '
                         'send the whole conversation in "input"')
    if body.get("conversation") is not None:
        raise BadRequest('conversation is not supported: this gateway stores no conversations; '
                         'send the whole conversation in "input"')
    if body.get("store") is True:
        raise BadRequest('store: true is not supported: this gateway stores no responses; send "store": false')
    if body.get("background") is True:
        raise BadRequest("background: true is not supported")
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "expected a string")
        if instructions:
            messages.append(Message(role="system", content=instructions))
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append(Message(role="user", content=inp))
    elif isinstance(inp, list):
        _input(inp, messages)
    elif inp is None:
        raise BadRequest("input is required")
    else:
        raise _bad("input", "expected a string or a list of input items")
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"))
    # without tools a choice means nothing, and OpenAI-type upstreams refuse it
    req = ChatRequest(model=get_model(body), messages=messages, tools=tools,
                      tool_choice=choice if tools else None, format=_format(body.get("text")))
    o = req.options
    o.temperature = get_number(body, "temperature", minimum=0, maximum=2)
    o.top_p = get_number(body, "top_p", minimum=0, maximum=1)
    o.num_predict = get_number(body, "max_output_tokens", integer=True, minimum=1)
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _bad("reasoning", "expected an object")
    effort = (reasoning or {}).get("effort")
    if effort is not None:
        if effort not in _EFFORT:
            raise _bad("reasoning.effort", "expected one of " + ", ".join(_EFFORT))
        req.think = _EFFORT[effort]
    req.stream = bool(get_bool(body, "stream", False))
    return req


# ---- response rendering -----------------------------------------------------------------------
class Shape:
    """The parts of a response object that echo the request, made once per request."""

    def __init__(self, body: dict, req: ChatRequest):
        self.id = _new_id("resp_")
        self.created = int(time.time())
        self.model = req.model
        tc = body.get("tool_choice")
        self.base = {
            "id": self.id, "object": "response", "created_at": self.created, "model": req.model,
            "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
            "max_output_tokens": req.options.num_predict, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": None, "store": False,
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "temperature": req.options.temperature, "top_p": req.options.top_p,
            "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
            "tool_choice": tc if tc is not None else "auto",
            "tools": [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                       "parameters": t["function"]["parameters"], "strict": False} for t in req.tools],
            "truncation": "disabled", "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
            "user": None,
        }

    def response(self, status: str, output: list, final=None, error=None) -> dict:
        r = dict(self.base)
        r.update(status=status, output=output, error=error, usage=usage(final) if final is not None else None,
                 incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)
        return r


def usage(final: Chunk) -> dict:
    p, c = int(final.prompt_tokens or 0), int(final.completion_tokens or 0)
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}


def status_of(final: Optional[Chunk]) -> str:
    return "incomplete" if final is not None and final.done_reason == "length" else "completed"


def reasoning_item(item_id: str, thinking: str, signature: str) -> dict:
    blob = base64.b64encode(dumps({"t": thinking, "s": signature or None}).encode()).decode()
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": thinking}],
            "encrypted_content": _REASONING_TAG + blob, "status": "completed"}


def message_item(item_id: str, text: str, status="completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_id(tc: ToolCall) -> str:
    if not tc.id:
        tc.id = _new_id("call_")
    return tc.id


def function_item(item_id: str, tc: ToolCall, status="completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id(tc), "name": tc.name,
            "arguments": arguments_text(tc.arguments) if status == "completed" else "", "status": status}


def whole_output(tally) -> list:
    out = []
    if tally.thinking:
        out.append(reasoning_item(_new_id("rs_"), "".join(tally.thinking), tally.signature))
    text = "".join(tally.content)
    if text or not tally.tool_calls:
        out.append(message_item(_new_id("msg_"), text))
    for tc in tally.tool_calls:
        out.append(function_item(_new_id("fc_"), tc))
    return out


class ResponsesRenderer(Renderer):
    """Canonical chunks → the Responses event sequence: response.created,
    response.in_progress, per output item …output_item.added → content/arguments deltas
    → their .done events → …output_item.done, then response.completed (or
    response.incomplete at the token limit, response.failed after a failure); every
    event with the next sequence_number."""

    mimetype = "text/event-stream"
    heartbeat = ": keep-alive\n\n"

    def __init__(self, shape: Shape):
        self.shape = shape
        self.seq = 0
        self.started = False
        self.output = []              # finished items, in order
        self.open = None              # "reasoning" | "message" | None
        self.item_id = ""
        self.text = []
        self._delta_head = ""
        self._signature = ""

    def _ev(self, kind: str, data: dict) -> str:
        data["type"] = kind
        data["sequence_number"] = self.seq
        self.seq += 1
        return "event: " + kind + "\ndata: " + dumps(data) + "\n\n"

    def beat(self) -> str:
        return self._start() + ": keep-alive\n\n"     # the first heartbeat also announces the response

    def whole(self, tally) -> dict:
        return self.shape.response(status_of(tally.final), whole_output(tally), tally.final)

    def _start(self) -> str:
        if self.started:
            return ""
        self.started = True
        r = self.shape.response("in_progress", [])
        return self._ev("response.created", {"response": r}) + self._ev("response.in_progress", {"response": r})

    def _close(self) -> str:
        if self.open is None:
            return ""
        idx, iid, text = len(self.output), self.item_id, "".join(self.text)
        self.text = []
        out = []
        if self.open == "reasoning":
            item = reasoning_item(iid, text, self._signature)
            out.append(self._ev("response.reasoning_summary_text.done", {
                "item_id": iid, "output_index": idx, "summary_index": 0, "text": text}))
            out.append(self._ev("response.reasoning_summary_part.done", {
                "item_id": iid, "output_index": idx, "summary_index": 0,
                "part": {"type": "summary_text", "text": text}}))
        else:
            item = message_item(iid, text)
            out.append(self._ev("response.output_text.done", {
                "item_id": iid, "output_index": idx, "content_index": 0, "text": text, "logprobs": []}))
            out.append(self._ev("response.content_part.done", {
                "item_id": iid, "output_index": idx, "content_index": 0, "part": item["content"][0]}))
        out.append(self._ev("response.output_item.done", {"output_index": idx, "item": item}))
        self.output.append(item)
        self.open = None
        return "".join(out)

    def _open(self, kind: str) -> str:
        out = [self._close()]
        idx = len(self.output)
        self.open = kind
        if kind == "reasoning":
            self.item_id, self._signature = _new_id("rs_"), ""
            out.append(self._ev("response.output_item.added", {"output_index": idx, "item": {
                "type": "reasoning", "id": self.item_id, "summary": [], "status": "in_progress"}}))
            out.append(self._ev("response.reasoning_summary_part.added", {
                "item_id": self.item_id, "output_index": idx, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}}))
        else:
            self.item_id = _new_id("msg_")
            out.append(self._ev("response.output_item.added", {
                "output_index": idx, "item": message_item(self.item_id, "", "in_progress")}))
            out.append(self._ev("response.content_part.added", {
                "item_id": self.item_id, "output_index": idx, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
            self._delta_head = ('event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                                '"item_id":"' + self.item_id + '","output_index":' + str(idx)
                                + ',"content_index":0,"logprobs":[],"delta":')
        return "".join(out)

    def _text_delta(self, text: str) -> str:
        self.text.append(text)
        n = self.seq
        self.seq += 1
        return self._delta_head + encode_str(text) + ',"sequence_number":' + str(n) + "}\n\n"

    def chunk(self, ch: Chunk) -> str:
        out = [] if self.started else [self._start()]
        if ch.content and self.open == "message" and not (ch.thinking or ch.tool_calls):
            out.append(self._text_delta(ch.content))     # the common case
        else:
            if ch.thinking or ch.thinking_signature:
                if self.open != "reasoning":
                    out.append(self._open("reasoning"))
                if ch.thinking:
                    self.text.append(ch.thinking)
                    out.append(self._ev("response.reasoning_summary_text.delta", {
                        "item_id": self.item_id, "output_index": len(self.output), "summary_index": 0,
                        "delta": ch.thinking}))
                if ch.thinking_signature:
                    self._signature = ch.thinking_signature
            if ch.content:
                if self.open != "message":
                    out.append(self._open("message"))
                out.append(self._text_delta(ch.content))
            for tc in ch.tool_calls:
                out.append(self._close())
                idx, iid = len(self.output), _new_id("fc_")
                out.append(self._ev("response.output_item.added", {
                    "output_index": idx, "item": function_item(iid, tc, "in_progress")}))
                args = arguments_text(tc.arguments)
                out.append(self._ev("response.function_call_arguments.delta", {
                    "item_id": iid, "output_index": idx, "delta": args}))
                out.append(self._ev("response.function_call_arguments.done", {
                    "item_id": iid, "output_index": idx, "name": tc.name, "arguments": args}))
                item = function_item(iid, tc)
                out.append(self._ev("response.output_item.done", {"output_index": idx, "item": item}))
                self.output.append(item)
        if ch.done:
            out.append(self._close())
            status = status_of(ch)
            event = "response.completed" if status == "completed" else "response.incomplete"
            out.append(self._ev(event, {"response": self.shape.response(status, self.output, ch)}))
        return "".join(out)

    def error(self, e) -> str:
        err = {"code": "server_error" if (getattr(e, "status", 500) or 500) >= 500 else "invalid_request",
               "message": getattr(e, "message", str(e))}
        return self._start() + self._ev("response.failed", {"response": self.shape.response(
            "failed", self.output, None, error=err)})
