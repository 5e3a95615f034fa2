"""Google Gemini through its native API (YAML `type: gemini`), not the OpenAI shim: the
native API gives exact control of thinking, thought signatures and structured output.

Translation is in gemini_wire (pure functions); this class adds the HTTP calls (through
RemoteProvider's attempt loop, which owns the keys), Gemini's error classification and a
memory of thought signatures.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from typing import Iterator, Optional
from urllib.parse import quote

from gateway.canonical import (ChatRequest, Chunk, EmbedRequest, EmbedResult, ModelCard,
                               ToolCall)
from gateway.errors import BadRequest, Passthrough, UpstreamFailed
from gateway.tool_calls import new_call_id
from providers import gemini_wire as wire
from providers.remote import (PASS, ROTATE_AUTH, ROTATE_RATE, RemoteProvider, UpstreamHTTPError,
                              gather, parse_retry_after)
from providers.vectors import l2_normalise

log = logging.getLogger("gateway.upstream")

# Listed models have no upstream timestamp we could trust without a call; a constant keeps
# /api/tags stable across restarts (clients diff it).
MODIFIED_AT = 1735689600.0          # 2025-01-01T00:00:00Z
CONTEXT_LENGTH = 1048576            # every Gemini 1.5/2.x/3 chat model's input limit
_SIG_MEMORY = 4096
_SIGNATURE_REFUSED = re.compile(r"thought.?signature", re.I)


class GeminiProvider(RemoteProvider):
    type_name = "gemini"

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        # Second source of thought signatures, for clients that drop or rewrite tool-call
        # ids (the Ollama Python client keeps only name and arguments). Per process.
        self._sigs: OrderedDict = OrderedDict()
        self._sig_lock = threading.Lock()

    def auth_headers(self, key: str) -> dict:
        # A header, never ?key=: URLs end up in logs and in exception texts.
        return {"x-goog-api-key": key}

    # ---- discovery ------------------------------------------------------------------------
    def card(self, upstream_id: str) -> Optional[ModelCard]:
        uid = (upstream_id or "").strip()
        # Unlisted ids are forwarded too: the upstream decides whether they exist.
        return self._card(uid) if uid else None

    def _card(self, uid: str) -> ModelCard:
        full = f"{self.name}:{uid}"
        embedding = "embedding" in uid.lower()
        if embedding:
            caps = ["embedding"]
        else:
            caps = ["completion", "tools", "vision"]
            if wire.supports_thinking(uid):
                caps.append("thinking")
        return self.with_context_length(ModelCard(
            name=full, provider=self.name, upstream_id=uid, size=0,
            digest=hashlib.sha256(full.encode()).hexdigest(),
            modified_at=MODIFIED_AT, format="api", family="gemini", families=["gemini"],
            parameter_size="", quantization_level="", capabilities=caps))

    def default_context_length(self, uid: str) -> Optional[int]:
        return None if "embedding" in uid.lower() else CONTEXT_LENGTH

    # ---- chat -------------------------------------------------------------------------------
    def chat(self, req: ChatRequest, upstream_id: str) -> Iterator[Chunk]:
        return self._chat(req, upstream_id)

    def _chat(self, req: ChatRequest, uid: str) -> Iterator[Chunk]:
        # A generator: nothing is sent until the first next(), so the surface learns about
        # a refused request before it has committed to a response status.
        body = wire.build_generate_body(req, uid, self._remembered)
        try:
            resp = self._send_chat(uid, body)
        except Passthrough as e:
            # A replayed signature can be refused (another key's project, a memory hit from
            # another conversation). The documented placeholder is always accepted, so one
            # retry with placeholders beats failing the conversation.
            if e.status != 400 or not _SIGNATURE_REFUSED.search(e.message) \
                    or not wire.has_real_signature(body):
                raise
            log.info("provider=%s thought signature refused; retrying with placeholders",
                     self.name)
            resp = self._send_chat(uid, wire.build_generate_body(req, uid, None))
        try:
            chunks = self._translate(self.sse_json(resp))
            yield from (chunks if req.stream else gather(chunks))
        finally:
            # Runs on generator.close() too: a client that disconnects frees the upstream.
            resp.close()

    def _send_chat(self, uid: str, body: dict):
        # Streamed upstream also for a non-streaming client (gathered): `timeout` bounds
        # the first byte, and generateContent sends none until a long thinking answer ends.
        return self.send("POST", _model_path(uid) + ":streamGenerateContent", body, stream=True,
                         params={"alt": "sse"})

    def _translate(self, events) -> Iterator[Chunk]:
        finish, usage, emitted, n_calls = None, None, False, 0
        for obj in events:
            p = wire.parse_response(obj)
            if p.error:
                raise UpstreamHTTPError(f"{self.name}: {p.error}")
            if p.block_reason:
                if not emitted:
                    raise BadRequest(f"{self.name}: prompt blocked: {p.block_reason}")
                raise UpstreamHTTPError(f"{self.name}: answer blocked: {p.block_reason}")
            if p.usage:
                usage = p.usage          # cumulative: the last one is the total
            calls = []
            for name, args, upstream_id, sig in p.calls:
                call_id = wire.encode_call_id(upstream_id or new_call_id(), sig)
                if sig:
                    self._remember(call_id, name, args, sig)
                calls.append(ToolCall(name=name, arguments=args, id=call_id, index=n_calls,
                                      extra={"thought_signature": sig} if sig else {}))
                n_calls += 1
            if p.finish in wire.FINISH_FAILED:
                raise UpstreamHTTPError(f"{self.name}: the model produced a malformed "
                                        f"function call ({p.finish})")
            if p.finish:
                finish = p.finish
            if p.text or p.thinking or calls:
                emitted = True
                yield Chunk(content=p.text, thinking=p.thinking, tool_calls=calls)
        if finish is None:
            raise UpstreamHTTPError(f"{self.name}: stream ended early (no finish reason)")
        reason = wire.FINISH_OK.get(finish)
        if reason is None:
            # SAFETY, RECITATION, PROHIBITED_CONTENT...: the answer simply stops there.
            log.warning("provider=%s finish_reason=%s (answer cut by the upstream)",
                        self.name, finish)
            reason = "stop"
        yield Chunk(done=True, done_reason=reason,
                    prompt_tokens=usage[0] if usage else None,
                    completion_tokens=usage[1] if usage else None)

    # ---- thought-signature memory -------------------------------------------------------------
    def _remember(self, call_id: str, name: str, args: dict, sig: str) -> None:
        with self._sig_lock:
            for k in ("id:" + call_id, _fn_key(name, args)):
                self._sigs[k] = sig
                self._sigs.move_to_end(k)
            while len(self._sigs) > _SIG_MEMORY:
                self._sigs.popitem(last=False)

    def _remembered(self, tc: ToolCall) -> Optional[str]:
        with self._sig_lock:
            if tc.id and ("id:" + tc.id) in self._sigs:
                return self._sigs["id:" + tc.id]
            return self._sigs.get(_fn_key(tc.name, tc.arguments or {}))

    # ---- embeddings ---------------------------------------------------------------------------
    def embed(self, req: EmbedRequest, upstream_id: str) -> EmbedResult:
        path = _model_path(upstream_id)
        texts = [str(t) for t in req.inputs]
        dims = req.dimensions if req.dimensions and req.dimensions > 0 else None
        vectors = []
        if len(texts) == 1:
            data = self._post_json(path + ":embedContent", wire.embed_content(texts[0], dims))
            vectors.append(self._values(data.get("embedding")))
        for start in range(0, len(texts) if len(texts) > 1 else 0, wire.EMBED_BATCH):
            batch = texts[start:start + wire.EMBED_BATCH]
            model = path.lstrip("/")
            body = {"requests": [{"model": model, **wire.embed_content(t, dims)} for t in batch]}
            got = self._post_json(path + ":batchEmbedContents", body).get("embeddings")
            if not isinstance(got, list) or len(got) != len(batch):
                raise UpstreamFailed(f"{self.name}: upstream returned "
                                     f"{len(got) if isinstance(got, list) else 'no'} embeddings "
                                     f"for {len(batch)} inputs")
            vectors += [self._values(e) for e in got]
        if dims:
            # Truncated Gemini embeddings are not unit length; cosine users expect them to be.
            vectors = [l2_normalise(v[:dims]) for v in vectors]
        return EmbedResult(embeddings=vectors)

    def count_tokens(self, req: ChatRequest, upstream_id: str) -> Optional[int]:
        """Gemini's own countTokens over the request it would send."""
        body = wire.build_generate_body(req, upstream_id, self._remembered)
        inner = {k: body[k] for k in ("contents", "systemInstruction", "tools") if k in body}
        inner["model"] = _model_path(upstream_id)[1:]
        total = self._post_json(_model_path(upstream_id) + ":countTokens",
                                {"generateContentRequest": inner}).get("totalTokens")
        return int(total) if isinstance(total, int) else None

    def _post_json(self, path: str, body: dict) -> dict:
        resp = self.send("POST", path, body)
        try:
            data = resp.json()
        except ValueError:
            raise UpstreamFailed(f"{self.name}: upstream answered malformed JSON")
        finally:
            resp.close()
        if not isinstance(data, dict):
            raise UpstreamFailed(f"{self.name}: upstream answered something that is not an object")
        return data

    def _values(self, emb) -> list:
        values = emb.get("values") if isinstance(emb, dict) else None
        if not isinstance(values, list):
            raise UpstreamFailed(f"{self.name}: upstream embedding has no values")
        return [float(x) for x in values]

    # ---- errors --------------------------------------------------------------------------------
    def classify(self, status: int, body, text: str, headers) -> tuple:
        st, msg, details = wire.error_details(body)
        if status == 400:
            # Gemini answers a bad or expired key with 400, and a project without access
            # (region, billing) with FAILED_PRECONDITION: both are the key's fault.
            if any(d.get("reason") == "API_KEY_INVALID" for d in details) \
                    or "API key not valid" in msg or st == "FAILED_PRECONDITION":
                return ROTATE_AUTH, None
            return PASS, None
        if status in (401, 403):
            return ROTATE_AUTH, None
        if status == 429:
            return ROTATE_RATE, _rate_rest(details, headers)
        return super().classify(status, body, text, headers)


def _rate_rest(details: list, headers) -> Optional[float]:
    for d in details:
        for v in d.get("violations") or []:
            # A daily quota stays exhausted until its reset: retrying sooner only adds 429s.
            if isinstance(v, dict) and "PerDay" in str(v.get("quotaId") or ""):
                return wire.seconds_to_pacific_midnight()
    for d in details:
        if "retryDelay" in d:
            seconds = wire.parse_duration(d["retryDelay"])
            if seconds is not None:
                return seconds
    return parse_retry_after(headers.get("Retry-After") if headers is not None else None)


def _model_path(uid: str) -> str:
    uid = (uid or "").strip().strip("/")
    if not uid.startswith(("models/", "tunedModels/")):
        uid = "models/" + uid
    return "/" + quote(uid, safe="/-._~")


def _fn_key(name: str, args: dict) -> str:
    return "fn:" + name + ":" + json.dumps(args, sort_keys=True, separators=(",", ":"),
                                          default=str)
