"""What every HTTP upstream shares: one pooled session, the key pool, the attempt loop
(one attempt per key, rests, the 429/502/504 verdict) and zero-buffer SSE reading.

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
from requests.adapters import HTTPAdapter

from gateway import reqctx
from gateway.errors import (BadRequest, GatewayError, Passthrough, RateLimited, UpstreamFailed,
                            UpstreamTimeout, scrub)
from providers.base import Provider
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


class RemoteProvider(Provider):
    type_name = "remote"

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        self.base_url = str(cfg.get("base_url", "")).rstrip("/")
        self.timeout = float(cfg.get("timeout", 30))
        self.connect_timeout = float(cfg.get("connect_timeout", min(self.timeout, 10.0)))
        self.idle_timeout = float(cfg.get("idle_timeout", 300))
        self.extra_headers = {str(k): str(v) for k, v in (cfg.get("headers") or {}).items()}
        self.pool = KeyPool(list(cfg.get("api_keys") or []),
                            cooldown=float(cfg.get("cooldown", 30)),
                            auth_cooldown=float(cfg.get("auth_cooldown", 3600)))
        self.model_ids = [str(m) for m in (cfg.get("models") or [])]
        self.session = requests.Session()
        # Many concurrent streams share one session; never block waiting for a slot.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2048, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.trust_env = False   # proxies from env would silently reroute keys
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
        return (text or "").strip()[:500] or "no error message"

    # ---- discovery --------------------------------------------------------------------
    @property
    def offered(self) -> bool:
        return len(self.pool) > 0

    def health(self) -> dict:
        out = {"type": self.type_name, "offered": self.offered, "last_error": self.last_error_class}
        out.update(self.pool.snapshot())
        return out

    def close(self) -> None:
        self.session.close()

    # ---- the attempt loop -------------------------------------------------------------
    def send(self, method: str, path: str, body: Optional[dict] = None, stream: bool = False,
             params: Optional[dict] = None) -> requests.Response:
        """Send one request, trying each usable key once. Returns a 2xx response (the
        caller closes it) or raises the client-facing GatewayError."""
        order = self.pool.attempt_order()
        if not order:
            raise self._all_resting()
        url = self.base_url + path
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        outcomes = []
        last_detail = ""
        for idx in order:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            headers.update(self.extra_headers)
            headers.update(self.auth_headers(self.pool.key(idx)))
            try:
                resp = self.session.request(method, url, data=data, headers=headers, params=params,
                                            stream=stream, timeout=(self.connect_timeout, self.timeout),
                                            allow_redirects=False)
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
            msg = scrub(self.error_message(parsed, text))
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
        try:
            for data in iter_sse_data(resp):
                if data == "[DONE]":
                    resp.sse_done = True   # lets an adapter tell [DONE] from a cut stream
                    return
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise UpstreamHTTPError(f"{self.name}: upstream sent malformed JSON in its stream")
                yield obj
        except requests.exceptions.Timeout:
            raise UpstreamHTTPError(f"{self.name}: upstream went silent for over "
                                    f"{self.idle_timeout:g}s")
        except requests.exceptions.RequestException as e:
            raise UpstreamHTTPError(f"{self.name}: upstream connection broke mid-stream "
                                    f"({type(e).__name__})")


def read_error_body(resp: requests.Response, limit: int = 65536):
    try:
        if getattr(resp, "_content_consumed", False):
            # stream=False: requests has already drained raw into resp.content.
            raw = (resp.content or b"")[:limit]
        else:
            raw = resp.raw.read(limit, decode_content=True) if resp.raw is not None else b""
    except Exception:
        raw = b""
    finally:
        resp.close()
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = {}
    return text, parsed


def set_idle_timeout(resp: requests.Response, seconds: float) -> None:
    """After the headers, bound the silence between chunks instead of time to first byte."""
    try:
        conn = getattr(resp.raw, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(seconds)
    except Exception:  # best effort: the read timeout still applies
        pass


def iter_sse_data(resp: requests.Response) -> Iterator[str]:
    """Yield each SSE event's data as soon as its blank line arrives (no read-ahead
    buffering). Accepts LF or CRLF, joins multi-line data, skips comments and other
    fields. A final event without its blank line is still delivered."""
    raw = resp.raw
    read = getattr(raw, "read1", None)
    buf = b""
    data_lines = []
    while True:
        piece = read(65536) if read is not None else raw.read(1024)
        if not piece:
            break
        buf += piece
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = buf[:nl]
            buf = buf[nl + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data_lines:
                    yield b"\n".join(data_lines).decode("utf-8", "replace")
                    data_lines = []
                continue
            if line.startswith(b"data:"):
                v = line[5:]
                data_lines.append(v[1:] if v.startswith(b" ") else v)
            elif line[:1] == b"{" or line[:1] == b"[":
                # Some upstreams send a raw JSON error line without "data:".
                data_lines.append(line)
            # comments (":") and other fields are ignored
    if buf.strip():
        line = buf.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            v = line[5:]
            data_lines.append(v[1:] if v.startswith(b" ") else v)
    if data_lines:
        yield b"\n".join(data_lines).decode("utf-8", "replace")


def require_keys_json(obj, what: str):
    if not isinstance(obj, dict):
        raise UpstreamFailed(f"{what}: upstream answered something that is not a JSON object")
    return obj


__all__ = ["RemoteProvider", "UpstreamHTTPError", "parse_retry_after", "iter_sse_data",
           "ROTATE_AUTH", "ROTATE_RATE", "ROTATE_TRANSIENT", "PASS", "BadRequest"]
