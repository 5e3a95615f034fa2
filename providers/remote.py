"""What every HTTP upstream shares: the key pool, the attempt loop (one attempt per key,
rests, the 429/502/504 verdict) and error classification. The HTTP itself is
providers/transport.py.

Subclasses say how to authenticate, how to classify an upstream error and how to
translate; they never loop over keys themselves.
"""
from __future__ import annotations

import email.utils
import json
import logging
import time
from typing import Iterator, Optional

import requests

from gateway import reqctx, shared_state
from gateway.canonical import Chunk, ModelCard
from gateway.errors import (BadRequest, GatewayError, Passthrough, RateLimited, UpstreamFailed,
                            UpstreamTimeout, scrub)
from providers.base import Gauges
from providers.transport import STOP, Transport, json_loads, read_error_body, set_idle_timeout, sse_events
from providers.remote_config import RemoteConfig
from providers.keypool import AUTH, RATE, TRANSIENT, KeyPool

log = logging.getLogger("gateway.upstream")

# Verdicts of classify()
ROTATE_RATE, ROTATE_AUTH, ROTATE_TRANSIENT, PASS = "rate", "auth", "transient", "pass"
_REASON = {ROTATE_RATE: RATE, ROTATE_AUTH: AUTH, ROTATE_TRANSIENT: TRANSIENT}
MAX_REST = 86400.0


def parse_retry_after(value) -> Optional[float]:
    """Retry-After as delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None or value == "":
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class UpstreamHTTPError(UpstreamFailed):
    """Raised inside a stream when the upstream fails after the first byte (502)."""


# Context length reported for a remote model when neither the model nor the provider sets
# one: most hosted chat models take at least 32K tokens today, and a client that trims its
# history to this figure stays within them; a larger upstream limit is set in the config.
DEFAULT_CONTEXT_LENGTH = 32768


class RemoteProvider(RemoteConfig):

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        self.base_url = str(cfg.get("base_url", "")).rstrip("/")
        self.timeout = float(cfg.get("timeout", 30))
        self.connect_timeout = float(cfg.get("connect_timeout", min(self.timeout, 10.0)))
        self.idle_timeout = float(cfg.get("idle_timeout", 300))
        self.extra_headers = {str(k): str(v) for k, v in (cfg.get("headers") or {}).items()}
        self.pool = KeyPool(list(cfg.get("api_keys") or []),
                            cooldown=float(cfg.get("cooldown", 30)),
                            auth_cooldown=float(cfg.get("auth_cooldown", 3600)),
                            shared=shared_state.for_settings(settings), scope=name)
        self.model_ids = [str(m) for m in (cfg.get("models") or [])]
        self.context_lengths = dict(cfg.get("context_lengths") or {})
        # Every call goes through this one client (and its keep-alive pool); no proxies
        # from the environment, which would silently reroute keys.
        self.transport = Transport.for_url(self.base_url, maxsize=2048)
        self.last_error_class: Optional[str] = None

    # ---- hooks for subclasses ---------------------------------------------------------
    def auth_headers(self, key: str) -> dict:
        return {"Authorization": f"Bearer {key}"}

    def classify(self, status: int, body: dict, text: str, headers) -> tuple:
        """(verdict, rest seconds or None). Default: the contract's table."""
        if status in (401, 402, 403):
            return ROTATE_AUTH, parse_retry_after(headers.get("Retry-After")) if status == 402 else None
        if status == 429:
            return ROTATE_RATE, parse_retry_after(headers.get("Retry-After"))
        if status in (408,) or status >= 500:
            return ROTATE_TRANSIENT, parse_retry_after(headers.get("Retry-After"))
        return PASS, None

    def error_message(self, body: dict, text: str) -> str:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(body, list) and body and isinstance(body[0], dict):
            return self.error_message(body[0], text)
        # Scrub, then cut: a cut first would leave a key's head that scrub() cannot match.
        return scrub((text or "").strip())[:500] or "no error message"

    # ---- discovery --------------------------------------------------------------------
    def listed(self, upstream_id: str) -> bool:
        return upstream_id in self.model_ids   # card() also accepts unlisted ids

    @property
    def offered(self) -> bool:
        return len(self.pool) > 0

    def default_context_length(self, uid: str) -> Optional[int]:
        """The type's figure for a model the config gives no context_length."""
        return DEFAULT_CONTEXT_LENGTH

    def with_context_length(self, card: ModelCard) -> ModelCard:
        """The model's context length (config per model, then per provider, then the type's
        default) where clients read it: /api/show model_info["<family>.context_length"]
        (LlamaIndex, LiteLLM) and /api/tags details."""
        n = (self.context_lengths.get(card.upstream_id) or self.cfg.get("context_length")
             or self.default_context_length(card.upstream_id))
        if n:
            card.context_length = int(n)
            family = card.family or self.type_name
            card.model_info = {"general.architecture": family, f"{family}.context_length": int(n),
                               **(card.model_info or {})}
        return card

    def health(self) -> dict:
        out = {"type": self.type_name, "offered": self.offered, "last_error": self.last_error_class}
        out.update(self.pool.snapshot())
        return out

    def gauges(self) -> Gauges:
        resting: dict[str, int] = {}
        snap = self.pool.snapshot()
        for k in snap["keys"]:
            if k["resting"]:
                reason = str(k["reason"] or "unknown")
                resting[reason] = resting.get(reason, 0) + 1
        return Gauges(keys_total=snap["keys_total"], keys_resting=resting)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---- the attempt loop -------------------------------------------------------------
    def send(self, method: str, path: str, body: Optional[dict] = None, stream: bool = False,
             params: Optional[dict] = None) -> requests.Response:
        """Send one request, trying each usable key once. Returns a 2xx response (the
        caller closes it) or raises the client-facing GatewayError."""
        order = self.pool.attempt_order()
        if not order:
            raise self._all_resting()
        transport = self.transport
        if transport is None:      # the config check allows only http(s) URLs
            raise UpstreamFailed(f"{self.name}: base_url is not an http(s) URL")
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        url = self.base_url + path
        target = transport.target(path, params)
        outcomes = []
        last_detail = ""
        for idx in order:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            headers.update(self.extra_headers)
            headers.update(self.auth_headers(self.pool.key(idx)))
            try:
                resp = transport.request(method, target, headers, data, stream=stream,
                                         connect_timeout=self.connect_timeout,
                                         read_timeout=self.timeout, url=url)
            except requests.exceptions.Timeout as e:
                self._failed(idx, TRANSIENT, None, type(e).__name__)
                outcomes.append("timeout")
                last_detail = "timed out"
                continue
            except requests.exceptions.RequestException as e:
                self._failed(idx, TRANSIENT, None, type(e).__name__)
                outcomes.append("transport")
                last_detail = "connection failed"
                continue
            if resp.status_code < 400:
                self.pool.mark_ok(idx)
                log.debug("provider=%s key_index=%d status=%d", self.name, idx, resp.status_code)
                reqctx.note(provider=self.name, key_index=idx)
                resp.key_index = idx
                if stream:
                    set_idle_timeout(resp, self.idle_timeout)
                return resp
            text, parsed = read_error_body(resp)
            verdict, seconds = self.classify(resp.status_code, parsed, text, resp.headers)
            msg = scrub(self.error_message(parsed, text))[:1000]
            if verdict == PASS:
                log.info("provider=%s key_index=%d status=%d passthrough", self.name, idx,
                         resp.status_code)
                raise Passthrough(f"{self.name}: {msg}", status=resp.status_code)
            self._failed(idx, _REASON[verdict], seconds, f"HTTP{resp.status_code}")
            outcomes.append(_REASON[verdict])
            last_detail = f"HTTP {resp.status_code}: {msg}"[:300]
        return self._verdict(outcomes, last_detail)

    def _failed(self, idx, reason, seconds, error_class):
        if seconds is not None:
            seconds = min(seconds, MAX_REST)
        self.pool.rest(idx, reason, seconds, error_class)
        self.last_error_class = error_class
        log.warning("provider=%s key_index=%d failed: %s; resting (%s)", self.name, idx,
                    error_class, reason)

    def _all_resting(self) -> GatewayError:
        rate, left = self.pool.resting_summary()
        if rate:
            return RateLimited(f"{self.name}: every API key is rate-limited; retry in {left:.0f}s",
                               retry_after=max(1.0, left))
        return UpstreamFailed(f"{self.name}: every API key is resting after failures")

    def _verdict(self, outcomes, detail):
        n = len(outcomes)
        if n and all(o == RATE for o in outcomes):
            _, left = self.pool.resting_summary()
            raise RateLimited(f"{self.name}: all {n} API key(s) are rate-limited ({detail})",
                              retry_after=max(1.0, left))
        if n and all(o == "timeout" for o in outcomes):
            raise UpstreamTimeout(f"{self.name}: upstream timed out on all {n} attempt(s)")
        raise UpstreamFailed(f"{self.name}: upstream failed on all {n} attempt(s) ({detail})")

    # ---- stream helpers -----------------------------------------------------------------
    def sse_json(self, resp: requests.Response) -> Iterator[dict]:
        """Decoded JSON of each SSE data event; stops at [DONE]. Errors after the first
        byte become UpstreamHTTPError (the surface turns it into an error line)."""
        name = self.name

        def decode(data: bytes):
            if data == b"[DONE]":
                resp.sse_done = True   # lets an adapter tell [DONE] from a cut stream
                return STOP
            try:
                return json_loads(data)
            except ValueError:
                raise UpstreamHTTPError(f"{name}: upstream sent malformed JSON in its stream")

        try:
            yield from sse_events(resp, decode)
        except requests.exceptions.Timeout:
            raise UpstreamHTTPError(f"{self.name}: upstream went silent for over "
                                    f"{self.idle_timeout:g}s")
        except requests.exceptions.RequestException as e:
            raise UpstreamHTTPError(f"{self.name}: upstream connection broke mid-stream "
                                    f"({type(e).__name__})")


def gather(chunks) -> Iterator[Chunk]:
    """A streamed answer as one chunk plus the final one, for a client that did not ask to
    stream. Adapters stream upstream even then: `timeout` bounds the wait for the first
    byte, and a non-streamed upstream answer sends nothing until the generation is done."""
    whole = Chunk()
    for ch in chunks:
        if ch.done:
            if whole.content or whole.thinking or whole.tool_calls:
                yield whole
            yield ch
            return
        whole.content += ch.content
        whole.thinking += ch.thinking
        whole.tool_calls.extend(ch.tool_calls)
        whole.thinking_signature = ch.thinking_signature or whole.thinking_signature


__all__ = ["RemoteProvider", "UpstreamHTTPError", "parse_retry_after",
           "ROTATE_AUTH", "ROTATE_RATE", "ROTATE_TRANSIENT", "PASS", "BadRequest"]
