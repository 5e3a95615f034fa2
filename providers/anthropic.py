"""Anthropic's Messages API as an upstream: YAML `type: anthropic`.

Keys go as `x-api-key` with `anthropic-version`. Rests: 429 for its retry-after, 529
(overloaded) briefly before the next key, 401/403 (and a spent credit balance) as auth
faults; other 4xx are the request's fault and pass through. Chat always streams upstream
(see providers.openai_compat for why); translation is in anthropic_wire."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator, Optional

import requests

from gateway.canonical import ChatRequest, Chunk, ModelCard
from gateway.errors import UpstreamFailed, scrub
from providers import anthropic_wire as wire
from providers.anthropic_config import AnthropicConfig
from providers.remote import (PASS, ROTATE_AUTH, ROTATE_RATE, ROTATE_TRANSIENT, RemoteProvider,
                              UpstreamHTTPError, gather, parse_retry_after)

_STARTED = time.time()
CONTEXT_LENGTH = 200000
OVERLOADED_REST = 5.0            # seconds a key rests after a 529 (the service, not the key, is busy)
_BILLING = ("credit balance", "billing")


class AnthropicProvider(RemoteProvider, AnthropicConfig):
    type_name = "anthropic"

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        self.version = str(cfg.get("anthropic_version") or "2023-06-01")
        self.max_tokens = int(cfg.get("max_tokens") or wire.DEFAULT_MAX_TOKENS)
        self.prompt_cache = cfg.get("prompt_cache") is not False

    def auth_headers(self, key: str) -> dict:
        return {"x-api-key": key, "anthropic-version": self.version}

    # ---- discovery ------------------------------------------------------------------------
    def _card(self, uid: str) -> ModelCard:
        full = f"{self.name}:{uid}"
        return self.with_context_length(ModelCard(
            name=full, provider=self.name, upstream_id=uid, size=0,
            digest=hashlib.sha256(full.encode()).hexdigest(), modified_at=_STARTED,
            format="api", family="claude", families=["claude"],
            capabilities=["completion", "tools", "vision", "thinking"]))

    def default_context_length(self, uid: str) -> Optional[int]:
        return CONTEXT_LENGTH

    # ---- errors ---------------------------------------------------------------------------
    def classify(self, status: int, body: dict, text: str, headers) -> tuple:
        err = body.get("error") if isinstance(body, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        msg = str((err or {}).get("message") or text or "").lower() if isinstance(err, dict) else text.lower()
        retry_after = parse_retry_after(headers.get("retry-after"))
        if status in (401, 403) or kind in ("authentication_error", "permission_error"):
            return ROTATE_AUTH, None
        if status == 400 and any(w in msg for w in _BILLING):
            return ROTATE_AUTH, None          # this key's account is out of credit
        if status == 429 or kind == "rate_limit_error":
            return ROTATE_RATE, retry_after
        if status == 529 or kind == "overloaded_error":
            return ROTATE_TRANSIENT, retry_after if retry_after is not None else OVERLOADED_REST
        if status == 408 or status >= 500:
            return ROTATE_TRANSIENT, retry_after
        return PASS, None

    def error_message(self, body: dict, text: str) -> str:
        return wire.error_message(body) or super().error_message(body, text)

    # ---- chat -----------------------------------------------------------------------------
    def chat(self, req: ChatRequest, upstream_id: str) -> Iterator[Chunk]:
        # A generator: nothing is sent until the first next(), so the caller sees
        # pre-stream errors (429/502/...) before it starts its own response.
        body = wire.to_body(req, upstream_id, self.max_tokens, cache=self.prompt_cache)
        resp = self.send("POST", "/messages", body, stream=True)
        try:
            chunks = self._chunks(resp)
            yield from (chunks if req.stream else gather(chunks))
        finally:
            resp.close()

    def _chunks(self, resp) -> Iterator[Chunk]:
        ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype and "event-stream" not in ctype:
            events = wire.message_events(self._json(resp))
        else:
            events = self.sse_json(resp)
        try:
            yield from wire.chunks(events)
        except wire.UpstreamStreamError as e:
            raise UpstreamHTTPError(f"{self.name}: {scrub(str(e))}")

    def _json(self, resp) -> dict:
        try:
            obj = json.loads(resp.content)
        except (ValueError, requests.exceptions.RequestException):
            raise UpstreamHTTPError(f"{self.name}: upstream sent an unreadable answer")
        if not isinstance(obj, dict):
            raise UpstreamHTTPError(f"{self.name}: upstream answered something that is not an object")
        return obj

    def count_tokens(self, req: ChatRequest, upstream_id: str) -> Optional[int]:
        """Anthropic's own count (free; rate-limited separately from messages)."""
        resp = self.send("POST", "/messages/count_tokens", wire.to_body(req, upstream_id, self.max_tokens,
                                                                          count_only=True))
        try:
            n = self._json(resp).get("input_tokens")
        except UpstreamHTTPError as e:
            raise UpstreamFailed(e.message)
        finally:
            resp.close()
        return int(n) if isinstance(n, int) else None
