"""Pure translation between the canonical model and Gemini's native wire format
(shared/reference/providers.md §A). No HTTP, no keys, no state: the adapter passes in what
it remembers about thought signatures.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from gateway.canonical import ChatRequest, Message, ToolCall
from gateway.tool_calls import arguments_from_output, pair_tool_results
from providers.media import sniff_mime
from providers.schema_sanitize import sanitize_schema

# Google documents this value as "skip validation" for function calls whose signature was
# lost (history from another model, a client that dropped it). Gemini 3 otherwise answers
# 400 "Function call is missing a thought_signature".
PLACEHOLDER_SIGNATURE = "skip_thought_signature_validator"

# Ollama's levels as token budgets. "max" stays within 2.5 Flash's 24576 ceiling so one
# mapping is valid for every 2.5 model.
THINK_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576, "max": 24576}
# 2.5 Pro (and 3 Pro) cannot switch thinking off (400 "Budget 0 is invalid"); its minimum
# budget without includeThoughts is the closest thing to think:false.
PRO_MIN_BUDGET = 128
# Models that think (2.5 and later, the moving "-latest" aliases). Others may reject a
# thinkingConfig, so think:false is simply not sent to them.
_THINKING = re.compile(r"gemini-(2\.5|[3-9])|thinking|gemini-(flash|flash-lite|pro)-latest", re.I)

MAX_STOP = 5
EMBED_BATCH = 100

FINISH_OK = {"STOP": "stop", "MAX_TOKENS": "length", "FINISH_REASON_UNSPECIFIED": "stop"}
FINISH_FAILED = {"MALFORMED_FUNCTION_CALL"}

# ---- tool-call ids that carry a thought signature ------------------------------------
# Ollama and OpenAI clients echo the tool-call id on the next turn but drop everything
# else, so the signature rides inside the id: "<base>_ts_<signature, base64url, no pad>".
_MARK = "_ts_"
_STD_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_ID_SIG = re.compile(r"^.*?" + _MARK + r"([A-Za-z0-9_-]+)$")
MAX_SIG_IN_ID = 16384


def encode_call_id(base: str, signature: Optional[str]) -> str:
    """The id a client sees. A signature that is not standard padded base64 (or is huge)
    is left out of the id; the adapter's memory still has it."""
    if not signature or len(signature) > MAX_SIG_IN_ID or len(signature) % 4 \
            or not _STD_B64.match(signature):
        return base
    return base + _MARK + signature.rstrip("=").replace("+", "-").replace("/", "_")


def signature_from_id(call_id: Optional[str]) -> Optional[str]:
    m = _ID_SIG.match(call_id or "")
    # Short tails are someone else's id that happens to contain the marker: sending them
    # as a signature would be a 400 "corrupted thought signature".
    if not m or len(m.group(1)) < 16:
        return None
    sig = m.group(1).replace("-", "+").replace("_", "/")
    sig += "=" * (-len(sig) % 4)
    try:
        base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return None
    return sig


# ---- request ---------------------------------------------------------------------------
def image_part(image: str) -> dict:
    """inlineData for a base64 image; a data: URL prefix is accepted and its MIME kept."""
    data, mime = str(image).strip(), None
    if data.startswith("data:") and "," in data:
        head, data = data.split(",", 1)
        mime = head[5:].split(";")[0] or None
    data = "".join(data.split())
    return {"inlineData": {"mimeType": mime or sniff_mime(data, default="image/jpeg"), "data": data}}


def _tool_response(content: str) -> dict:
    try:
        parsed = json.loads(content)
    except (TypeError, ValueError):
        parsed = None
    return parsed if isinstance(parsed, dict) else {"result": content}


def build_contents(messages: list, remembered: Optional[Callable[[ToolCall], Optional[str]]]):
    """(system text, contents). Roles alternate user/model and start with user.
    remembered=None: send no real signature, the placeholder on every call (the retry after
    Gemini rejected a signature we replayed)."""
    system, contents = [], []

    def add(role: str, parts: list):
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for m in pair_tool_results(messages):
        if m.role == "system":
            if m.content:
                system.append(m.content)
        elif m.role == "assistant":
            parts = []
            if m.content:
                parts.append({"text": m.content})
            for i, tc in enumerate(m.tool_calls):
                part = {"functionCall": {"name": tc.name, "args": tc.arguments or {}}}
                sig = None
                if remembered is not None:
                    sig = (tc.extra or {}).get("thought_signature") \
                        or signature_from_id(tc.id) or remembered(tc)
                # Gemini validates the first call of a step; later parallel calls never had
                # a signature of their own, so only the first needs the placeholder.
                if sig or i == 0 or remembered is None:
                    part["thoughtSignature"] = sig or PLACEHOLDER_SIGNATURE
                parts.append(part)
            if parts:
                add("model", parts)
        elif m.role == "tool":
            # Gemini pairs a response with its call by name and order, so the name is the
            # paired call's; a result with no call to answer keeps the name it came with.
            add("user", [{"functionResponse": {"name": m.tool_name or "tool",
                                               "response": _tool_response(m.content or "")}}])
        else:
            parts = [{"text": m.content}] if m.content else []
            parts += [image_part(img) for img in m.images]
            add("user", parts or [{"text": " "}])
    if not contents or contents[0]["role"] != "user":
        # Gemini wants the conversation to open with a user turn; a single space is the
        # smallest text it accepts (an empty string is rejected).
        contents.insert(0, {"role": "user", "parts": [{"text": " "}]})
    return "\n\n".join(system), contents


def generation_config(req: ChatRequest, model_id: str) -> dict:
    o, g = req.options, {}
    if o.temperature is not None:
        g["temperature"] = o.temperature
    if o.top_p is not None:
        g["topP"] = o.top_p
    if o.top_k is not None:
        g["topK"] = o.top_k
    if o.num_predict is not None and o.num_predict > 0:
        g["maxOutputTokens"] = o.num_predict
    stops = [s for s in (o.stop or []) if isinstance(s, str) and s]
    if stops:
        g["stopSequences"] = stops[:MAX_STOP]
    if o.seed is not None:
        g["seed"] = o.seed
    # Zero is the default; some models answer 400 "Penalty is not enabled" to any value,
    # and clients often send 0 unasked.
    if o.presence_penalty:
        g["presencePenalty"] = o.presence_penalty
    if o.frequency_penalty:
        g["frequencyPenalty"] = o.frequency_penalty
    if req.format == "json":
        g["responseMimeType"] = "application/json"
    elif isinstance(req.format, dict) and req.format:
        g["responseMimeType"] = "application/json"
        g["responseSchema"] = sanitize_schema(req.format)
    thinking = thinking_config(req.think, model_id)
    if thinking is not None and req.think and req.thinking_budget:
        # the client's own budget (Anthropic surface), within what every thinking model takes
        thinking["thinkingBudget"] = min(int(req.thinking_budget), THINK_BUDGETS["max"])
    if thinking is not None:
        g["thinkingConfig"] = thinking
    return g


def supports_thinking(model_id: str) -> bool:
    return bool(_THINKING.search(model_id or ""))


def thinking_config(think, model_id: str) -> Optional[dict]:
    if think is None or (think is False and not supports_thinking(model_id)):
        return None
    if think is False:
        return {"thinkingBudget": PRO_MIN_BUDGET if "pro" in model_id.lower() else 0}
    budget = -1
    if isinstance(think, str):
        budget = THINK_BUDGETS.get(think.lower(), -1)
    return {"includeThoughts": True, "thinkingBudget": budget}


def tools_body(tools: list) -> list:
    decls = []
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) and "function" in t else t
        if not isinstance(fn, dict) or not fn.get("name"):
            continue
        d = {"name": str(fn["name"])}
        if fn.get("description"):
            d["description"] = str(fn["description"])
        params = fn.get("parameters")
        if isinstance(params, dict):
            clean = sanitize_schema(params)
            # An OBJECT without properties is a 400 ("properties: should be non-empty");
            # a declaration without parameters means the same thing.
            if clean.get("properties") or clean.get("type") != "OBJECT":
                d["parameters"] = clean
        decls.append(d)
    return [{"functionDeclarations": decls}] if decls else []


def tool_config(choice) -> Optional[dict]:
    if isinstance(choice, str):
        mode = {"none": "NONE", "auto": "AUTO", "required": "ANY", "any": "ANY"}.get(choice.lower())
        return {"functionCallingConfig": {"mode": mode}} if mode else None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    return None


def build_generate_body(req: ChatRequest, model_id: str,
                        remembered: Optional[Callable[[ToolCall], Optional[str]]] = lambda tc: None
                        ) -> dict:
    messages = list(req.messages)
    if not messages and req.prompt:
        messages = [Message(role="user", content=req.prompt)]
    if req.system and not any(m.role == "system" and m.content == req.system for m in messages):
        messages.insert(0, Message(role="system", content=req.system))
    system, contents = build_contents(messages, remembered)
    body: dict = {"contents": contents}
    if system and model_id.lower().split("/")[-1].startswith("gemma"):
        # Gemma on the Gemini API answers 400 "Developer instruction is not enabled".
        contents[0]["parts"].insert(0, {"text": system + "\n\n"})
    elif system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    tools = tools_body(req.tools)
    if tools:
        body["tools"] = tools
        cfg = tool_config(req.tool_choice)
        if cfg:
            body["toolConfig"] = cfg
    gen = generation_config(req, model_id)
    if gen:
        body["generationConfig"] = gen
    return body


# ---- response ------------------------------------------------------------------------------
@dataclass
class Parsed:
    """What one GenerateContentResponse (one SSE event) says."""
    text: str = ""
    thinking: str = ""
    calls: list = field(default_factory=list)   # [(name, args, upstream id, signature)]
    finish: Optional[str] = None
    usage: Optional[tuple] = None               # (prompt, completion), cumulative
    block_reason: Optional[str] = None
    error: Optional[str] = None


def has_real_signature(body: dict) -> bool:
    return any(part.get("thoughtSignature") not in (None, PLACEHOLDER_SIGNATURE)
               for turn in body.get("contents", []) for part in turn["parts"])


def parse_response(obj) -> Parsed:
    p = Parsed()
    if isinstance(obj, list):               # the array framing of a non-SSE stream
        obj = obj[0] if obj else {}
    if not isinstance(obj, dict):
        p.error = "upstream sent something that is not a JSON object"
        return p
    err = obj.get("error")
    if err:
        p.error = str(err.get("message") or err.get("status") or err) if isinstance(err, dict) \
            else str(err)
        return p
    cands = obj.get("candidates") or []
    if not cands:
        fb = obj.get("promptFeedback") or {}
        if fb.get("blockReason"):
            p.block_reason = str(fb["blockReason"])
    else:
        cand = cands[0] if isinstance(cands[0], dict) else {}
        for part in (cand.get("content") or {}).get("parts") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("functionCall"), dict):
                fc = part["functionCall"]
                args = fc.get("args")
                p.calls.append((str(fc.get("name") or ""), arguments_from_output(args),
                                fc.get("id"), part.get("thoughtSignature")))
            elif isinstance(part.get("text"), str):
                if part.get("thought"):
                    p.thinking += part["text"]
                else:
                    p.text += part["text"]
        if cand.get("finishReason"):
            p.finish = str(cand["finishReason"])
    um = obj.get("usageMetadata")
    if isinstance(um, dict) and um:
        completion = int(um.get("candidatesTokenCount") or 0) + int(um.get("thoughtsTokenCount") or 0)
        p.usage = (int(um.get("promptTokenCount") or 0), completion)
    return p


# ---- embeddings -------------------------------------------------------------------------------
def embed_content(text: str, dimensions: Optional[int]) -> dict:
    body = {"content": {"parts": [{"text": text}]}}
    if dimensions:
        body["outputDimensionality"] = int(dimensions)
    return body


# ---- error details ------------------------------------------------------------------------------
def error_details(body) -> tuple:
    """(status, message, details list) of a Gemini error body (dict, or the shim's array)."""
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "", "", []
    details = err.get("details")
    return str(err.get("status") or ""), str(err.get("message") or ""), \
        [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def parse_duration(value) -> Optional[float]:
    """A protobuf Duration in JSON ("37s", "0.5s") or object form; None if unreadable."""
    if isinstance(value, dict):
        try:
            return max(0.0, float(value.get("seconds") or 0) + float(value.get("nanos") or 0) / 1e9)
        except (TypeError, ValueError):
            return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*s?\s*", str(value or ""))
    return float(m.group(1)) if m else None


def seconds_to_pacific_midnight(now: Optional[datetime.datetime] = None) -> float:
    """Gemini's per-day quotas reset at midnight US Pacific time."""
    try:
        from zoneinfo import ZoneInfo
        tz = ZoneInfo("America/Los_Angeles")
    except Exception:                      # no tzdata: PST is the conservative (later) reset
        tz = datetime.timezone(datetime.timedelta(hours=-8))
    now = (now or datetime.datetime.now(datetime.timezone.utc)).astimezone(tz)
    nxt = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(0), tz)
    # Same-tzinfo subtraction ignores offsets (wrong by an hour on DST days): go via UTC.
    utc = datetime.timezone.utc
    return max(1.0, (nxt.astimezone(utc) - now.astimezone(utc)).total_seconds())
