"""Pure translation between the canonical model and Anthropic's Messages API (as an
upstream). No HTTP here. Used by AnthropicProvider.

Anthropic is stricter than the canonical model: one system prompt, user and assistant
turns that alternate, tool results in the user turn right after the assistant turn that
asked for them, thinking blocks only with their signature, max_tokens always."""
from __future__ import annotations

import json
from typing import Iterator, Optional

from gateway.canonical import ChatRequest, Chunk, Message, ToolCall
from gateway.tool_calls import arguments_from_output, pair_tool_results
from providers.media import sniff_mime

DEFAULT_MAX_TOKENS = 4096
MIN_BUDGET = 1024                 # Anthropic's smallest thinking budget
_BUDGETS = {"low": 2048, "medium": 8192, "high": 16384, "max": 32000}
_DONE = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
         "pause_turn": "stop", "refusal": "stop", "model_context_window_exceeded": "length"}


# ---- canonical -> Anthropic ------------------------------------------------------------------
def _user_blocks(m: Message) -> list:
    blocks = [{"type": "image", "source": {"type": "base64", "media_type": sniff_mime(img), "data": img}}
              for img in m.images]
    if m.content:
        blocks.append({"type": "text", "text": m.content})
    return blocks


def _assistant_blocks(m: Message) -> list:
    blocks = []
    # Unsigned thinking (another model's) cannot go back: Anthropic checks the signature.
    if m.thinking and m.thinking_signature:
        blocks.append({"type": "thinking", "thinking": m.thinking, "signature": m.thinking_signature})
    if m.content:
        blocks.append({"type": "text", "text": m.content})
    for tc in m.tool_calls:      # ids: pair_tool_results gave every call one
        blocks.append({"type": "tool_use", "id": tc.id, "name": tc.name,
                       "input": tc.arguments if isinstance(tc.arguments, dict) else arguments_from_output(tc.arguments)})
    return blocks


def to_messages(messages: list) -> tuple:
    """(system text, [messages]) with turns merged so that roles alternate."""
    system, out = [], []
    leading = True
    answerable: set = set()       # ids of the last assistant turn's calls

    def add(role: str, blocks: list):
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            if role == "user":
                # tool results must come first in a user turn
                merged = out[-1]["content"] + blocks
                out[-1]["content"] = ([b for b in merged if b["type"] == "tool_result"]
                                      + [b for b in merged if b["type"] != "tool_result"])
            else:
                out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})

    for m in pair_tool_results(messages):
        if m.role == "system":
            if leading:
                system.append(m.content)
            else:   # a system turn mid-conversation (Claude Code's reminders): user-side text
                add("user", [{"type": "text", "text": m.content}] if m.content else [])
            continue
        leading = False
        if m.role == "assistant":
            answerable = {tc.id for tc in m.tool_calls}
            add("assistant", _assistant_blocks(m))
        elif m.role == "tool":
            if m.tool_call_id not in answerable:
                # no call to answer: Anthropic would refuse a dangling tool_result
                add("user", [{"type": "text", "text": m.content or "(empty tool result)"}])
                continue
            answerable.discard(m.tool_call_id)
            block = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content or ""}
            if m.images:
                block["content"] = ([{"type": "text", "text": m.content}] if m.content else []) + _user_blocks(
                    Message(role="user", images=m.images))
            add("user", [block])
        else:
            add("user", _user_blocks(m))
    if out and out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continue)"}]})
    return "\n\n".join(s for s in system if s), out


def _unsigned_tool_turn(messages: list) -> bool:
    last = next((m for m in reversed(messages) if m["role"] == "assistant"), None)
    if last is None or not any(b["type"] == "tool_use" for b in last["content"]):
        return False
    return last["content"][0]["type"] != "thinking"


def _tool_choice(tc):
    if tc is None:
        return None
    if tc == "auto":
        return {"type": "auto"}
    if tc == "required":
        return {"type": "any"}
    if tc == "none":
        return {"type": "none"}
    if isinstance(tc, dict):
        name = (tc.get("function") or {}).get("name") if isinstance(tc.get("function"), dict) else tc.get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    return None


def to_body(req: ChatRequest, upstream_id: str, default_max_tokens: int = DEFAULT_MAX_TOKENS,
            count_only: bool = False, cache: bool = False) -> dict:
    system, messages = to_messages(req.messages)
    body: dict = {"model": upstream_id, "messages": messages}
    if system:
        body["system"] = system
    if req.tools:
        body["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description") or "",
                          "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                         for t in req.tools]
        choice = _tool_choice(req.tool_choice)
        if choice is not None:
            body["tool_choice"] = choice
    o = req.options
    max_tokens = o.num_predict if o.num_predict and o.num_predict > 0 else default_max_tokens
    thinking = None
    if req.think:
        budget = req.thinking_budget or _BUDGETS.get(req.think if isinstance(req.think, str) else "medium", 8192)
        budget = min(budget, max_tokens - 1)
        if budget >= MIN_BUDGET:
            thinking = {"type": "enabled", "budget_tokens": budget}
    if thinking is not None and _unsigned_tool_turn(messages):
        # Anthropic wants the last assistant turn's signed thinking back when it used tools;
        # a client that dropped it (every non-Anthropic surface does) gets an answer
        # without thinking rather than a 400
        thinking = None
    if thinking is not None:
        body["thinking"] = thinking
    if count_only:
        return body
    body["max_tokens"] = max_tokens
    body["stream"] = True
    if thinking is None:      # thinking allows neither a temperature other than 1 nor top_k
        for key in ("temperature", "top_k"):
            if getattr(o, key) is not None:
                body[key] = getattr(o, key)
    if o.top_p is not None:
        body["top_p"] = o.top_p if thinking is None else max(0.95, o.top_p)
    if o.stop:
        body["stop_sequences"] = list(o.stop)
    if cache:
        mark_cache(body)
    return body


_EPHEMERAL = {"type": "ephemeral"}


def mark_cache(body: dict) -> None:
    """Prompt-cache breakpoints where an agent loop re-reads its prefix: after the tools,
    after the system prompt and at the end of the conversation (Anthropic reads the longest
    cached prefix back; a prompt under its minimum is simply not cached). Clients' own
    cache_control markers do not survive the canonical model, so these stand in for them."""
    if body.get("tools"):
        body["tools"][-1] = {**body["tools"][-1], "cache_control": _EPHEMERAL}
    if body.get("system"):
        body["system"] = [{"type": "text", "text": body["system"], "cache_control": _EPHEMERAL}]
    msgs = body.get("messages") or []
    if msgs:
        blocks = msgs[-1]["content"]
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i]["type"] in ("text", "image", "tool_use", "tool_result"):
                blocks[i] = {**blocks[i], "cache_control": _EPHEMERAL}
                break


# ---- Anthropic -> canonical ------------------------------------------------------------------
class UpstreamStreamError(Exception):
    """An `error` event, or a stream that broke the grammar; the provider words it."""


def chunks(events) -> Iterator[Chunk]:
    """Canonical chunks from Anthropic's stream events (decoded JSON). Text, thinking and
    signatures go out as they come; a tool call goes out whole at its block's end."""
    final = Chunk(done=True)
    blocks: dict = {}             # index -> {"type", "id", "name", "json": [str]}
    stop = None
    calls = 0
    ended = False
    for ev in events:
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind == "content_block_delta":
            d = ev.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                if d.get("text"):
                    yield Chunk(content=d["text"])
            elif dt == "thinking_delta":
                if d.get("thinking"):
                    yield Chunk(thinking=d["thinking"])
            elif dt == "signature_delta":
                if d.get("signature"):
                    yield Chunk(thinking_signature=d["signature"])
            elif dt == "input_json_delta":
                b = blocks.get(ev.get("index"))
                if b is not None:
                    b["json"].append(str(d.get("partial_json") or ""))
        elif kind == "content_block_start":
            cb = ev.get("content_block") or {}
            if cb.get("type") == "tool_use":
                blocks[ev.get("index")] = {"id": cb.get("id"), "name": cb.get("name") or "", "json": [],
                                           "input": cb.get("input")}
            elif cb.get("type") == "text" and cb.get("text"):
                yield Chunk(content=cb["text"])
            elif cb.get("type") == "thinking" and cb.get("thinking"):
                yield Chunk(thinking=cb["thinking"])
        elif kind == "content_block_stop":
            b = blocks.pop(ev.get("index"), None)
            if b is not None:
                raw = "".join(b["json"])
                args = arguments_from_output(raw if raw else b["input"])
                yield Chunk(tool_calls=[ToolCall(name=b["name"], arguments=args, id=b["id"], index=calls)])
                calls += 1
        elif kind == "message_start":
            usage_into(final, (ev.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            d = ev.get("delta") or {}
            stop = d.get("stop_reason") or stop
            if d.get("stop_sequence"):
                final.stop_sequence = d["stop_sequence"]
            usage_into(final, ev.get("usage"))
        elif kind == "message_stop":
            ended = True
            break
        elif kind == "error":
            err = ev.get("error") or {}
            raise UpstreamStreamError(f"{err.get('type') or 'error'}: {err.get('message') or 'upstream error'}")
        # ping and unknown event types are skipped, as Anthropic asks of clients
    if not ended:
        raise UpstreamStreamError("upstream stream ended early")
    final.done_reason = _DONE.get(stop or "end_turn", "stop")
    yield final


def usage_into(chunk: Chunk, usage) -> None:
    if not isinstance(usage, dict):
        return
    inp = usage.get("input_tokens")
    if inp is not None:
        chunk.prompt_tokens = int(inp) + int(usage.get("cache_creation_input_tokens") or 0) \
            + int(usage.get("cache_read_input_tokens") or 0)
    if usage.get("output_tokens") is not None:
        chunk.completion_tokens = int(usage["output_tokens"])


def message_events(msg: dict) -> list:
    """A whole (non-streamed) message as the events that would have streamed it, so one
    reader serves both."""
    evs = [{"type": "message_start", "message": {"usage": msg.get("usage") or {}}}]
    for i, b in enumerate(msg.get("content") or []):
        evs.append({"type": "content_block_start", "index": i, "content_block": b})
        if b.get("type") == "tool_use":
            evs.append({"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(b.get("input") or {})}})
        elif b.get("type") == "thinking" and b.get("signature"):
            evs.append({"type": "content_block_delta", "index": i,
                        "delta": {"type": "signature_delta", "signature": b["signature"]}})
        evs.append({"type": "content_block_stop", "index": i})
    evs.append({"type": "message_delta", "delta": {"stop_reason": msg.get("stop_reason"),
                                                   "stop_sequence": msg.get("stop_sequence")},
                "usage": {"output_tokens": (msg.get("usage") or {}).get("output_tokens")}})
    evs.append({"type": "message_stop"})
    return evs


def error_message(body) -> Optional[str]:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"{err.get('type') or 'error'}: {err['message']}"
    return None
