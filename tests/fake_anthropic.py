"""A fake Anthropic Messages API for tests/fake_upstream.py, as strict as the real one
about what it is sent: anthropic-version present, max_tokens required, a non-empty first
user turn, roles that alternate, no empty text blocks, every tool_result answering a
tool_use of the assistant turn just before it (and every tool_use answered), thinking
blocks carrying the signature this server gave them, thinking budgets within max_tokens
and without temperature/top_k.

By model id: "claude-tools" answers a tool call, "claude-think" thinks first (signed),
"missing" is 404; anything else echoes the last user text. By key: "ovl..." 529
overloaded; the other key behaviours are fake_upstream's.
"""
from __future__ import annotations

import hashlib
import json


def signature(thinking: str) -> str:
    return "sig-" + hashlib.sha256(thinking.encode()).hexdigest()[:16]


def _err(kind, message):
    return {"type": "error", "error": {"type": kind, "message": message}}


def check(body: dict, headers: dict, count_only: bool = False):
    """The first problem the real API would answer 400 for, or None."""
    if not headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not count_only and not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: at least one message is required"
    if msgs[0].get("role") != "user":
        return "messages: first message must use the \"user\" role"
    system = body.get("system")
    if system is not None and not isinstance(system, str) and not (
            isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system)):
        return "system: Input should be a valid string or a list of text blocks"
    prev_uses: set = set()
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if i and msgs[i - 1].get("role") == role:
            return "messages: roles must alternate between \"user\" and \"assistant\""
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not content:
            return f"messages.{i}: all messages must have non-empty content"
        uses, results = set(), set()
        for j, b in enumerate(content):
            t = b.get("type")
            if t == "text" and not b.get("text"):
                return f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
            if t == "tool_use":
                if role != "assistant" or not isinstance(b.get("input"), dict) or not b.get("id"):
                    return f"messages.{i}.content.{j}: bad tool_use block"
                uses.add(b["id"])
            elif t == "tool_result":
                if role != "user" or b.get("tool_use_id") not in prev_uses:
                    return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                            "`tool_use` block in the previous message.")
                results.add(b["tool_use_id"])
            elif t == "thinking":
                if role != "assistant" or b.get("signature") != signature(b.get("thinking", "")):
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
            elif t == "image":
                src = b.get("source") or {}
                if src.get("type") != "base64" or not src.get("media_type") or not src.get("data"):
                    return f"messages.{i}.content.{j}.source: bad image source"
            elif t != "text":
                return f"messages.{i}.content.{j}.type: unknown block type {t!r}"
        if role == "user" and prev_uses - results:
            return ("messages: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    + ", ".join(sorted(prev_uses - results)))
        prev_uses = uses
    thinking = body.get("thinking")
    if thinking is not None and not count_only:
        budget = thinking.get("budget_tokens")
        if thinking.get("type") != "enabled" or not isinstance(budget, int) or budget < 1024:
            return "thinking.budget_tokens: Input should be greater than or equal to 1024"
        if budget >= body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
        if body.get("temperature") not in (None, 1) or body.get("top_k") is not None:
            return "temperature and top_k may not be set when thinking is enabled"
        last = next((m for m in reversed(msgs) if m["role"] == "assistant"), None)
        blocks = last["content"] if last and isinstance(last["content"], list) else []
        if any(b.get("type") == "tool_use" for b in blocks) and blocks[0].get("type") != "thinking":
            return ("messages: Expected `thinking` or `redacted_thinking`, but found `tool_use`. When `thinking` "
                    "is enabled, a final `assistant` message must start with a thinking block")
    for t in body.get("tools") or []:
        if not t.get("name") or not isinstance(t.get("input_schema"), dict):
            return "tools: each tool needs name and input_schema"
    return None


def _last_user_text(msgs) -> str:
    for m in reversed(msgs):
        if m["role"] != "user":
            continue
        c = m["content"]
        if isinstance(c, str):
            return c
        texts = [b["text"] for b in c if b.get("type") == "text"]
        if texts:
            return texts[-1]
    return ""


def _ev(kind, data) -> str:
    data = {"type": kind, **data}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def messages(body: dict, key: str, headers: dict, start, json_reply, sse_reply):
    """POST /v1/messages"""
    if key.startswith("ovl"):
        return json_reply(start, "529 Overloaded", _err("overloaded_error", "Overloaded"))
    problem = check(body, headers)
    if problem:
        return json_reply(start, "400 Bad Request", _err("invalid_request_error", problem))
    model = body.get("model")
    if model == "missing":
        return json_reply(start, "404 Not Found", _err("not_found_error", f"model: {model}"))
    words = ("Echo: " + _last_user_text(body["messages"])).split(" ")
    pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
    usage_in = 11
    events = [_ev("message_start", {"message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": usage_in - 2, "cache_read_input_tokens": 2, "output_tokens": 1}}}),
        _ev("ping", {})]
    idx = 0
    if model == "claude-think" and body.get("thinking"):
        thought = "Let me think."
        events += [_ev("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
                   _ev("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
                   _ev("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}}),
                   _ev("content_block_delta", {"index": 0, "delta": {"type": "signature_delta", "signature": signature(thought)}}),
                   _ev("content_block_stop", {"index": 0})]
        idx = 1
    stop = "end_turn"
    if model == "claude-tools" and body.get("tools") and body["messages"][-1]["role"] == "user" \
            and not any(b.get("type") == "tool_result" for b in body["messages"][-1]["content"]
                        if isinstance(body["messages"][-1]["content"], list)):
        name = body["tools"][0]["name"]
        events += [_ev("content_block_start", {"index": idx, "content_block": {
                       "type": "tool_use", "id": "toolu_fake_1", "name": name, "input": {}}}),
                   _ev("content_block_delta", {"index": idx, "delta": {"type": "input_json_delta", "partial_json": ""}}),
                   _ev("content_block_delta", {"index": idx, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}}),
                   _ev("content_block_delta", {"index": idx, "delta": {"type": "input_json_delta", "partial_json": '"Tokyo"}'}}),
                   _ev("content_block_stop", {"index": idx})]
        stop, pieces = "tool_use", []
    else:
        events.append(_ev("content_block_start", {"index": idx, "content_block": {"type": "text", "text": ""}}))
        for p in pieces:
            events.append(_ev("content_block_delta", {"index": idx, "delta": {"type": "text_delta", "text": p}}))
        events.append(_ev("content_block_stop", {"index": idx}))
    events += [_ev("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": len(pieces) or 5}}),
               _ev("message_stop", {})]
    if key.startswith("midfail"):
        events = events[:4] + [_ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})]
    if not body.get("stream"):
        return json_reply(start, "400 Bad Request", _err("invalid_request_error", "the gateway always streams"))
    return sse_reply(start, events)


def count_tokens(body: dict, headers: dict, start, json_reply):
    """POST /v1/messages/count_tokens: a word count, so tests can tell it from an estimate."""
    problem = check(body, headers, count_only=True)
    if problem:
        return json_reply(start, "400 Bad Request", _err("invalid_request_error", problem))
    words = len(str(body.get("system") or "").split())
    for m in body["messages"]:
        c = m["content"]
        words += sum(len(str(b.get("text") or b.get("content") or "").split()) for b in c) \
            if isinstance(c, list) else len(c.split())
    return json_reply(start, "200 OK", {"input_tokens": words})
