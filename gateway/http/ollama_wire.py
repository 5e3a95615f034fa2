"""Ollama wire format ⇄ canonical model: requests in, chunks and cards out."""
from __future__ import annotations

import hashlib
import json

from gateway.canonical import ChatRequest, Message, ToolCall
from gateway.durations import rfc3339
from gateway.errors import BadRequest
from gateway.tool_calls import arguments_from_request, new_call_id
from gateway.http.common import (get_bool, get_model, get_str, parse_format, parse_keep_alive_field,
                                 parse_options, parse_think, parse_tools, strip_data_url)

_ROLES = ("system", "user", "assistant", "tool")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj) -> str:
    return _dumps(obj)


def _content(value, field):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):   # defensively accept OpenAI-style text parts
        parts = []
        for p in value:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "".join(parts)
    raise BadRequest(f'invalid value for field "{field}": expected a string')


def _tool_calls(value, field):
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f'invalid value for field "{field}": expected a list')
    out = []
    for i, tc in enumerate(value):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f'invalid value for field "{field}[{i}]": expected '
                             '{"function": {"name": ..., "arguments": {...}}}')
        args = arguments_from_request(fn.get("arguments"), f"{field}[{i}].function.arguments")
        idx = fn.get("index", i)
        out.append(ToolCall(name=fn["name"], arguments=args,
                            id=tc.get("id") if isinstance(tc.get("id"), str) else None,
                            index=idx if isinstance(idx, int) and not isinstance(idx, bool) else i))
    return out


def parse_messages(value, field="messages") -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f'invalid value for field "{field}": expected a list of messages')
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f'invalid value for field "{f}": expected an object')
        role = m.get("role")
        if not isinstance(role, str) or role.lower() not in _ROLES:
            raise BadRequest(f'invalid value for field "{f}.role": expected one of {", ".join(_ROLES)}')
        images = m.get("images") or []
        if not isinstance(images, list):
            raise BadRequest(f'invalid value for field "{f}.images": expected a list of base64 strings')
        out.append(Message(
            role=role.lower(), content=_content(m.get("content"), f"{f}.content"),
            images=[strip_data_url(img, f"{f}.images[{j}]") for j, img in enumerate(images)],
            thinking=m.get("thinking") if isinstance(m.get("thinking"), str) else None,
            tool_calls=_tool_calls(m.get("tool_calls"), f"{f}.tool_calls"),
            tool_name=m.get("tool_name") if isinstance(m.get("tool_name"), str) else None,
            tool_call_id=m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None))
    return out


def _common(body, req: ChatRequest) -> ChatRequest:
    req.options = parse_options(body.get("options"))
    req.format = parse_format(body.get("format"))
    req.think = parse_think(body.get("think"))
    req.keep_alive = parse_keep_alive_field(body)
    req.stream = get_bool(body, "stream", True)
    return req


def chat_request(body: dict) -> ChatRequest:
    req = ChatRequest(model=get_model(body), messages=parse_messages(body.get("messages")),
                      tools=parse_tools(body.get("tools")))
    _common(body, req)
    system = body.get("system")   # Open WebUI sometimes sends a top-level system
    if isinstance(system, str) and system and not any(m.role == "system" for m in req.messages):
        req.messages.insert(0, Message(role="system", content=system))
    return req


def generate_request(body: dict) -> ChatRequest:
    prompt = get_str(body, "prompt", default="")
    system = get_str(body, "system")
    template = get_str(body, "template")
    raw = get_bool(body, "raw", False)
    if raw and (template or system or body.get("context")):
        raise BadRequest("raw mode does not support template, system, or context")
    images = body.get("images") or []
    if not isinstance(images, list):
        raise BadRequest('invalid value for field "images": expected a list of base64 strings')
    images = [strip_data_url(img, f"images[{j}]") for j, img in enumerate(images)]
    messages = []
    if system:
        messages.append(Message(role="system", content=system))
    if prompt or images:
        messages.append(Message(role="user", content=prompt, images=images))
    req = ChatRequest(model=get_model(body), messages=messages, prompt=prompt,
                      suffix=get_str(body, "suffix"), system=system, raw=raw, template=template,
                      kind="generate")
    return _common(body, req)


def tool_calls_out(calls) -> list:
    return [{"id": tc.id or new_call_id(),
             "function": {"index": tc.index, "name": tc.name, "arguments": tc.arguments}}
            for tc in calls]


def details(card) -> dict:
    return {"parent_model": "", "format": card.format or "", "family": card.family or "",
            "families": list(card.families or ([card.family] if card.family else [])),
            "parameter_size": card.parameter_size or "",
            "quantization_level": card.quantization_level or ""}


def digest(card) -> str:
    return card.digest or hashlib.sha256(card.name.encode()).hexdigest()


def tag_entry(card) -> dict:
    d = details(card)
    if card.context_length:        # Ollama 0.30+: clients read the context length here
        d["context_length"] = int(card.context_length)
    entry = {"name": card.name, "model": card.name, "modified_at": rfc3339(card.modified_at or 0),
             "size": int(card.size or 0), "digest": digest(card), "details": d}
    if card.capabilities:
        entry["capabilities"] = list(card.capabilities)
    return entry


def show_response(card) -> dict:
    return {
        "license": "",
        "modelfile": f"# Modelfile generated by the gateway\nFROM {card.name}\n",
        "parameters": card.parameters or (f"num_ctx                        {card.context_length}"
                                          if card.context_length else ""),
        "template": card.template or "",
        "details": details(card),
        "model_info": dict(card.model_info or {}),
        "capabilities": list(card.capabilities or []),
        "modified_at": rfc3339(card.modified_at or 0),
    }


def ps_entry(lm) -> dict:
    card = lm.card
    return {"name": card.name, "model": card.name, "size": int(lm.size), "size_vram": int(lm.size_vram),
            "digest": digest(card), "details": details(card), "expires_at": rfc3339(lm.expires_at),
            "context_length": int(lm.context_length)}
