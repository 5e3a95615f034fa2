"""Any OpenAI-compatible upstream (OpenRouter, Akash, vLLM, Groq, ...): YAML `type: openai`.

Chat always streams upstream, also for a client's non-streaming request: `timeout` bounds
the wait for the first byte, and a non-streamed answer sends nothing until the whole
generation is done, so a slow model would time out and rest every key. A non-streaming
request gets the same answer gathered into one content chunk plus the final chunk.
"""
from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from typing import Iterator, Optional

import requests

from gateway.canonical import ChatRequest, Chunk, EmbedRequest, EmbedResult, ModelCard
from gateway.errors import UpstreamFailed, scrub
from providers.openai_wire import (ToolCallAccumulator, error_text, finish_to_done_reason, reasoning_of,
                                   to_body, usage_into)
from providers.remote import (PASS, ROTATE_AUTH, ROTATE_RATE, ROTATE_TRANSIENT, RemoteProvider,
                              UpstreamHTTPError, gather, parse_retry_after)
from providers.think import ThinkSplitter

_STARTED = time.time()   # remote models have no file date; a stable one keeps lists steady
_MODERATION_WORDS = ("moderation", "flagged")
_KEY_BLAME = ("invalid api key", "incorrect api key", "api key not valid", "invalid_api_key")


class OpenAIProvider(RemoteProvider):
    type_name = "openai"

    # ---- discovery --------------------------------------------------------------------
    def _card(self, uid: str) -> ModelCard:
        full = f"{self.name}:{uid}"
        family = uid.split("/", 1)[0] if "/" in uid else self.name
        return self.with_context_length(ModelCard(
            name=full, provider=self.name, upstream_id=uid, size=0,
            digest=hashlib.sha256(full.encode()).hexdigest(),
            modified_at=_STARTED, format="api", family=family, families=[family],
            parameter_size="", quantization_level="", capabilities=["completion", "tools"]))

    # ---- errors -----------------------------------------------------------------------
    def classify(self, status: int, body: dict, text: str, headers) -> tuple:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        msg = str(err.get("message") or text or "").lower()
        code = _int(err.get("code"))
        # Proxies (LiteLLM) may wrap an upstream auth/rate error in a generic status.
        if status in (400, 500, 502, 503) and code in (401, 402, 403, 429):
            status = code
        retry_after = parse_retry_after(headers.get("Retry-After"))
        if status == 403 and _is_moderation(err, msg):
            return PASS, None
        if status == 402 and retry_after is not None:
            return ROTATE_TRANSIENT, retry_after    # OpenRouter in-flight budget: brief
        if status in (401, 402, 403):
            return ROTATE_AUTH, None
        if status == 400 and any(w in msg for w in _KEY_BLAME):
            return ROTATE_AUTH, None
        if status == 429:
            if retry_after is None:
                retry_after = _reset_seconds(headers.get("X-RateLimit-Reset"))
            return ROTATE_RATE, retry_after
        if status == 408 or status >= 500:
            return ROTATE_TRANSIENT, retry_after
        return PASS, None

    # ---- chat -------------------------------------------------------------------------
    def chat(self, req: ChatRequest, upstream_id: str) -> Iterator[Chunk]:
        # A generator: nothing is sent until the first next(), so the caller sees
        # pre-stream errors (429/502/...) before it starts its own response.
        body = to_body(req, upstream_id)
        resp = self.send("POST", "/chat/completions", body, stream=True)
        try:
            chunks = self._chunks(resp)
            if req.stream:
                yield from chunks
            else:
                yield from gather(chunks)
        finally:
            resp.close()

    def _events(self, resp) -> Iterator[dict]:
        ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype and "event-stream" not in ctype:
            # An upstream that ignored stream:true answers one chat.completion object.
            try:
                obj = json.loads(resp.content)
            except ValueError:
                raise UpstreamHTTPError(f"{self.name}: upstream sent a malformed JSON answer")
            except requests.exceptions.RequestException as e:
                raise UpstreamHTTPError(f"{self.name}: upstream connection broke "
                                        f"({type(e).__name__})")
            resp.sse_done = True
            yield obj
            return
        yield from self.sse_json(resp)

    def _chunks(self, resp) -> Iterator[Chunk]:
        split, tools = ThinkSplitter(), ToolCallAccumulator()
        final = Chunk(done=True)
        finish = None
        for ev in self._events(resp):
            if not isinstance(ev, dict):
                continue
            if ev.get("error"):
                raise UpstreamHTTPError(f"{self.name}: {scrub(error_text(ev['error']))}")
            usage_into(final, ev.get("usage"))
            for choice in ev.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                d = choice.get("delta") or choice.get("message") or {}
                out = Chunk(thinking=reasoning_of(d))
                out.content, think = split.feed(_text(d.get("content")))
                out.thinking += think
                tools.add(d.get("tool_calls"))
                fr = choice.get("finish_reason")
                if fr == "error":
                    raise UpstreamHTTPError(f"{self.name}: upstream stopped with an error")
                if fr:
                    finish = fr
                    _flush_into(out, split, tools)
                if out.content or out.thinking or out.tool_calls:
                    yield out
        if finish is None and not getattr(resp, "sse_done", False):
            raise UpstreamHTTPError(f"{self.name}: upstream stream ended early")
        _flush_into(final, split, tools)
        if final.content or final.thinking or final.tool_calls:
            # Keep the final chunk free of text: surfaces render it as the closing line.
            yield Chunk(content=final.content, thinking=final.thinking,
                        tool_calls=final.tool_calls)
            final.content, final.thinking, final.tool_calls = "", "", []
        final.done_reason = finish_to_done_reason(finish)
        yield final

    # ---- embeddings -------------------------------------------------------------------
    def embed(self, req: EmbedRequest, upstream_id: str) -> EmbedResult:
        body = {"model": upstream_id, "input": list(req.inputs)}
        if req.dimensions:
            body["dimensions"] = int(req.dimensions)
        resp = self.send("POST", "/embeddings", body)
        try:
            obj = resp.json()
        except (ValueError, requests.exceptions.RequestException):
            raise UpstreamFailed(f"{self.name}: upstream sent an unreadable embeddings answer")
        finally:
            resp.close()
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list) or len(data) != len(req.inputs):
            raise UpstreamFailed(f"{self.name}: upstream answered {len(data or [])} embeddings "
                                 f"for {len(req.inputs)} input(s)")
        try:
            rows = sorted(data, key=lambda r: int(r.get("index", 0)))
            vectors = [_vector(r["embedding"]) for r in rows]
        except (KeyError, TypeError, ValueError, AttributeError, struct.error):
            raise UpstreamFailed(f"{self.name}: upstream sent malformed embeddings")
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        pt = usage.get("prompt_tokens")
        return EmbedResult(embeddings=vectors, prompt_tokens=int(pt) if pt is not None else None)


# ---- helpers ----------------------------------------------------------------------------
def _flush_into(out: Chunk, split: ThinkSplitter, tools: ToolCallAccumulator) -> None:
    content, think = split.flush()
    out.content += content
    out.thinking += think
    if tools:
        out.tool_calls.extend(tools.take())


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # a few backends send content as parts
        return "".join(p if isinstance(p, str) else str((p or {}).get("text") or "")
                       for p in content)
    return ""


def _vector(v) -> list:
    if isinstance(v, str):   # encoding_format=base64: little-endian float32
        raw = base64.b64decode(v)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return [float(x) for x in v]


def _int(v) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _is_moderation(err: dict, msg: str) -> bool:
    meta = err.get("metadata")
    if isinstance(meta, dict) and ("reasons" in meta or "flagged_input" in meta):
        return True
    return any(w in msg for w in _MODERATION_WORDS)


def _reset_seconds(value) -> Optional[float]:
    """OpenRouter's X-RateLimit-Reset is an epoch time, in ms when above 1e12."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if v > 1e12:
        v /= 1000.0
    left = v - time.time() if v > 1e9 else v    # small values: already a delay
    return left if left > 0 else None
