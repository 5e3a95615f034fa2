"""Pure translation between the canonical model and the OpenAI chat/completions wire.

No HTTP here, so every rule is testable with plain objects. Used by OpenAIProvider.
"""
from __future__ import annotations

from typing import Optional

from gateway.canonical import ChatRequest, Chunk, Message, ToolCall
from gateway.errors import BadRequest
from gateway.tool_calls import arguments_from_output, arguments_text, new_call_id, pair_tool_results
from providers.media import sniff_mime

# OpenRouter names efforts minimal/low/medium/high; Ollama's "max" has no upstream peer.
_EFFORT = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
           "max": "high", "xhigh": "high"}
_OPENAI_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
           "function_call": "tool_calls", "content_filter": "stop"}


# ---- canonical -> OpenAI ----------------------------------------------------------------
def image_url(img: str) -> str:
    img = str(img).strip()
    if img.startswith("data:"):          # clients should strip it; accept it anyway
        return img
    return f"data:{sniff_mime(img, default='image/png')};base64,{img}"


def _user_content(m: Message):
    if not m.images:
        return m.content
    # An empty text part is rejected by some backends behind OpenRouter (Anthropic).
    parts = [{"type": "text", "text": m.content}] if m.content else []
    parts += [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in m.images]
    return parts


def to_messages(messages: list) -> list:
    out = []
    for i, m in enumerate(pair_tool_results(messages)):
        if m.role == "assistant" and m.tool_calls:
            calls = [{"id": tc.id, "type": "function",
                      "function": {"name": tc.name, "arguments": arguments_text(tc.arguments)}}
                     for tc in m.tool_calls]
            # null, not "": some backends reject an empty text block next to tool calls.
            out.append({"role": "assistant", "content": m.content or None, "tool_calls": calls})
        elif m.role == "tool":
            if not m.tool_call_id:
                # OpenAI-type upstreams answer 400 to a result that answers no call; say
                # which message before spending an upstream call on it.
                raise BadRequest(f"messages[{i}]: a tool result with no tool call to answer "
                                 "(no preceding assistant message has an unanswered tool call)")
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
        elif m.role == "user":
            out.append({"role": "user", "content": _user_content(m)})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def to_body(req: ChatRequest, upstream_id: str) -> dict:
    o = req.options
    body: dict = {"model": upstream_id, "messages": to_messages(req.messages),
                  "stream": True, "stream_options": {"include_usage": True}}
    for key in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
        v = getattr(o, key)
        if v is not None:
            body[key] = v
    if o.num_predict is not None and o.num_predict > 0:
        body["max_tokens"] = o.num_predict
    if o.stop:
        body["stop"] = list(o.stop)
    passed = req.openai_fields
    if "response_format" in passed:
        body["response_format"] = passed["response_format"]
    elif req.format == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "response", "schema": req.format, "strict": False}}
    if req.tools:
        body["tools"] = req.tools
    if req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if "reasoning_effort" in passed:
        # OpenAI's own efforts go as sent; Ollama's extra names get their nearest peer.
        effort = passed["reasoning_effort"]
        body["reasoning_effort"] = effort if effort in _OPENAI_EFFORTS else _EFFORT.get(effort, "high")
    elif "reasoning" in passed:
        body["reasoning"] = passed["reasoning"]
    elif req.think:
        level = req.think if isinstance(req.think, str) else "medium"
        body["reasoning"] = {"effort": _EFFORT.get(level.lower(), "medium")}
    return body


# ---- OpenAI -> canonical ----------------------------------------------------------------
def finish_to_done_reason(reason: Optional[str]) -> str:
    return _FINISH.get(reason or "stop", "stop")


class ToolCallAccumulator:
    """OpenAI streams a tool call as fragments keyed by `index`: the first carries id and
    name, later ones append to `arguments`. Emitted whole once the stream finishes."""

    def __init__(self):
        self._calls: list = []           # [{"id","name","args":[str]}]
        self._by_index: dict = {}

    def add(self, deltas) -> None:
        for d in deltas or []:
            if not isinstance(d, dict):
                continue
            fn = d.get("function") or {}
            idx = d.get("index")
            cur = self._by_index.get(idx) if idx is not None else None
            # A new id at a known index is a new call (some backends send index 0 for all).
            if cur is None or (d.get("id") and cur["id"] and d["id"] != cur["id"]):
                cur = {"id": d.get("id"), "name": "", "args": []}
                self._calls.append(cur)
                if idx is not None:
                    self._by_index[idx] = cur
            if d.get("id") and not cur["id"]:
                cur["id"] = d["id"]
            if fn.get("name") and not cur["name"]:
                cur["name"] = fn["name"]
            a = fn.get("arguments")
            if isinstance(a, dict):
                cur["args"] = [arguments_text(a)]
            elif a:
                cur["args"].append(str(a))

    def __bool__(self):
        return bool(self._calls)

    def take(self) -> list:
        out = [ToolCall(name=c["name"], arguments=arguments_from_output("".join(c["args"])),
                        id=c["id"] or new_call_id(), index=i) for i, c in enumerate(self._calls)]
        self._calls, self._by_index = [], {}
        return out


def usage_into(chunk: Chunk, usage) -> None:
    if isinstance(usage, dict):
        if usage.get("prompt_tokens") is not None:
            chunk.prompt_tokens = int(usage["prompt_tokens"])
        if usage.get("completion_tokens") is not None:
            chunk.completion_tokens = int(usage["completion_tokens"])


def reasoning_of(d: dict) -> str:
    r = d.get("reasoning") or d.get("reasoning_content")
    return r if isinstance(r, str) else ""


def error_text(err) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or "upstream error")
    return str(err)
