"""What every HTTP upstream shares: one pooled session, the key pool, the attempt loop
(one attempt per key, rests, the 429/502/504 verdict) and zero-buffer SSE reading.

Subclasses say how to authenticate, how to classify an upstream error and how to
translate; they never loop over keys themselves.
"""
from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import time
import urllib.parse
import zlib
from typing import Iterator, Optional

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from gateway import reqctx
from gateway.canonical import Chunk, ModelCard
from gateway.errors import (BadRequest, GatewayError, Passthrough, RateLimited, UpstreamFailed,
                            UpstreamTimeout, scrub)
from gateway.reqctx import more_ready
from providers.base import Gauges
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
                            auth_cooldown=float(cfg.get("auth_cooldown", 3600)))
        self.model_ids = [str(m) for m in (cfg.get("models") or [])]
        self.context_lengths = dict(cfg.get("context_lengths") or {})
        self.session = requests.Session()
        # Many concurrent streams share one session; never block waiting for a slot.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2048, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.trust_env = False   # proxies from env would silently reroute keys
        # The hot path: a lean HTTP/1.1 client with its own keep-alive pool (see Transport).
        # `self.session` stays for the case where requests' transport has been replaced
        # (the `responses` library in unit tests patches HTTPAdapter.send).
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
        self.session.close()
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
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        transport = self.transport if not _requests_transport_replaced() else None
        url = self.base_url + path
        if transport is not None:
            target = transport.target(path, params)
        outcomes = []
        last_detail = ""
        for idx in order:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            headers.update(self.extra_headers)
            headers.update(self.auth_headers(self.pool.key(idx)))
            try:
                if transport is not None:
                    resp = transport.request(method, target, headers, data, stream=stream,
                                             connect_timeout=self.connect_timeout,
                                             read_timeout=self.timeout, url=url)
                else:
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
                return _STOP
            try:
                return _json_loads(data)
            except ValueError:
                raise UpstreamHTTPError(f"{name}: upstream sent malformed JSON in its stream")

        try:
            yield from _sse_events(resp, decode)
        except requests.exceptions.Timeout:
            raise UpstreamHTTPError(f"{self.name}: upstream went silent for over "
                                    f"{self.idle_timeout:g}s")
        except requests.exceptions.RequestException as e:
            raise UpstreamHTTPError(f"{self.name}: upstream connection broke mid-stream "
                                    f"({type(e).__name__})")


_STOP = object()
_scan_json = json.JSONDecoder().scan_once     # the C scanner behind json.loads


def _json_loads(data: bytes):
    """json.loads(data) for one SSE event, without its whitespace and 'extra data'
    regexes in the common case (a bare object); anything else takes json.loads."""
    text = data.decode("utf-8", "replace")
    try:
        obj, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return obj


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
    raw = resp.raw
    if isinstance(raw, Body):
        raw.set_timeout(seconds)
        return
    try:
        conn = getattr(raw, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(seconds)
    except Exception:  # best effort: the read timeout still applies
        pass


def _sse_events(resp, convert) -> Iterator:
    """Each SSE event's data as soon as its blank line arrives (no read-ahead buffering),
    passed through `convert` (a result of _STOP ends the stream there): sse_json decodes
    JSON in the same pass, without a second generator per event. Accepts LF or CRLF, joins
    multi-line data, skips comments and other fields; a final event without its blank
    line is still delivered.

    While the surface that drives the stream has put a hint in the context
    (gateway.reqctx.more_ready), item 0 says whether another whole event has
    already arrived after the one just yielded: the surface may then write the chunks
    of one burst together, and it never holds anything while this reader would wait."""
    raw = resp.raw
    read = getattr(raw, "read1", None)
    if read is None:
        def read(n, _read=raw.read):
            return _read(1024)
    tail = b""          # an unterminated line carried over to the next read
    data_lines = []
    while True:
        piece = read(65536)
        if not piece:
            break
        if tail:
            piece = tail + piece
        lines = piece.split(b"\n")
        tail = lines.pop()
        events = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data_lines:
                    events.append(data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines))
                    data_lines = []
                continue
            if line[:5] == b"data:":
                data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:1] == b"{" or line[:1] == b"[":
                # Some upstreams send a raw JSON error line without "data:".
                data_lines.append(line)
            # comments (":") and other fields are ignored
        last = len(events) - 1
        for i, ev in enumerate(events):
            out = convert(ev)
            if out is _STOP:
                return
            hint = more_ready.get()
            if hint is not None:
                hint[0] = i < last
            yield out
    hint = more_ready.get()
    if hint is not None:
        hint[0] = False
    if tail.strip():
        line = tail.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            v = line[5:]
            data_lines.append(v[1:] if v.startswith(b" ") else v)
    if data_lines:
        out = convert(b"\n".join(data_lines))
        if out is not _STOP:
            yield out


# ---- the transport ------------------------------------------------------------------------
# requests costs ~0.7 ms of CPU per call (session merging, PreparedRequest, urllib3's
# pool/Retry/Timeout objects, http.client's email-parser header parsing, cookie jars) and
# it closes a streamed connection that was not read to its very end, so every stream paid
# a new TCP connection. On a gevent worker that relays a few thousand chunks a second this
# was a third of the gateway's CPU. Transport is a small HTTP/1.1 client with the same
# contract: requests' exceptions (ConnectTimeout, ReadTimeout, ConnectionError,
# ChunkedEncodingError, InvalidHeader), a requests.Response with `raw` readable by
# _sse_events/read_error_body, a LIFO keep-alive pool that never blocks, and the
# connection returned to the pool once the body has been read to its end.

def _requests_transport_replaced() -> bool:
    """True while something has replaced requests' HTTP transport (the `responses` test
    library patches HTTPAdapter.send): requests must then carry the call."""
    return getattr(HTTPAdapter.send, "__module__", None) != "requests.adapters"


_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]|^[ \t]")
_UA = requests.utils.default_user_agent()
_FIXED_NAMES = frozenset(("host", "user-agent", "accept-encoding", "connection"))
_MAX_HEAD = 65536


class Transport:
    """Keep-alive HTTP/1.1 connections to one origin (scheme, host, port)."""

    def __init__(self, scheme: str, host: str, port: int, base_path: str, maxsize: int = 2048):
        self.scheme, self.host, self.port = scheme, host, port
        self.base_path = base_path
        self.maxsize = maxsize
        self.idle = []              # LIFO: the warmest connection first
        self._ssl_context = None
        default = 443 if scheme == "https" else 80
        host_hdr = f"[{host}]" if ":" in host else host
        if port != default:
            host_hdr += f":{port}"
        # requests' defaults; a configured header of the same name replaces its default
        self._fixed_items = (("Host", host_hdr), ("User-Agent", _UA),
                             ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"))
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in self._fixed_items)
        self._targets = {}

    @classmethod
    def for_url(cls, base_url: str, maxsize: int = 2048) -> Optional["Transport"]:
        """None when the URL is not plain http(s) (requests then reports the problem)."""
        try:
            u = urllib.parse.urlsplit(base_url)
            scheme = u.scheme.lower()
            if scheme not in ("http", "https") or not u.hostname or u.username or u.password:
                return None
            port = u.port or (443 if scheme == "https" else 80)
        except ValueError:
            return None
        return cls(scheme, u.hostname, port, u.path.rstrip("/"), maxsize)

    # ---- request --------------------------------------------------------------------------
    def target(self, path: str, params: Optional[dict]) -> str:
        """The request-target for path + params, quoted as requests would (cached)."""
        key = (path, tuple(sorted(params.items())) if params else None)
        t = self._targets.get(key)
        if t is None:
            t = self.base_path + path
            if params:
                t += ("&" if "?" in t else "?") + urllib.parse.urlencode(sorted(params.items()), doseq=True)
            t = requests.utils.requote_uri(t or "/")
            if len(self._targets) < 1024:
                self._targets[key] = t
        return t

    def request(self, method: str, target: str, headers: dict, data: Optional[bytes], stream: bool,
                connect_timeout: float, read_timeout: float, url: str = "") -> requests.Response:
        fixed = self._fixed
        names = {k.lower() for k in headers}
        if not _FIXED_NAMES.isdisjoint(names):
            fixed = "".join(f"{k}: {v}\r\n" for k, v in self._fixed_items if k.lower() not in names)
        lines = [f"{method} {target} HTTP/1.1\r\n", fixed]
        for k, v in headers.items():
            if _BAD_HEADER_VALUE.search(v) or _BAD_HEADER_VALUE.search(k) or ":" in k:
                raise requests.exceptions.InvalidHeader(f"invalid header {k!r}")
            lines.append(f"{k}: {v}\r\n")
        if data is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(data or b'')}\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise requests.exceptions.InvalidHeader("a header value is not latin-1")
        payload = head + data if data else head
        started = time.monotonic()
        sock = self._checkout(connect_timeout)
        # `timeout` bounds connect plus the wait for the first byte (the contract): what
        # the connect used comes off the wait
        wait = max(read_timeout - (time.monotonic() - started), 0.001)
        try:
            sock.settimeout(wait)
            sock.sendall(payload)
            status, reason, hdrs, buf, version = _read_head(sock)
        except socket.timeout as e:
            _close(sock)
            raise requests.exceptions.ReadTimeout(f"no answer within {read_timeout:g}s: {e}")
        except OSError as e:
            _close(sock)
            raise requests.exceptions.ConnectionError(f"connection failed: {type(e).__name__}: {e}")
        except _ProtocolError as e:
            _close(sock)
            raise requests.exceptions.ConnectionError(f"bad response: {e}")
        body = Body(self, sock, buf, hdrs, method, status, version)
        resp = requests.Response()
        resp.status_code = status
        resp.reason = reason
        resp.headers = hdrs
        resp.raw = body
        resp.url = url
        resp.encoding = requests.utils.get_encoding_from_headers(hdrs)
        if not stream:
            resp.content        # read now, as requests does for stream=False (timeouts included)
        return resp

    # ---- connections ----------------------------------------------------------------------
    def _checkout(self, connect_timeout: float):
        idle = self.idle
        while idle:
            sock = idle.pop()
            if _alive(sock):
                return sock
            _close(sock)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        except socket.timeout as e:
            raise requests.exceptions.ConnectTimeout(f"connect timed out after {connect_timeout:g}s: {e}")
        except OSError as e:
            raise requests.exceptions.ConnectionError(f"connect failed: {type(e).__name__}: {e}")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self._tls(sock, connect_timeout)
        except BaseException:
            _close(sock)
            raise
        return sock

    def _tls(self, sock, timeout):
        import ssl
        if self._ssl_context is None:
            # requests' default: certifi's CA bundle, hostname checked
            self._ssl_context = ssl.create_default_context(cafile=requests.certs.where())
        try:
            sock.settimeout(timeout)
            return self._ssl_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as e:
            raise requests.exceptions.SSLError(f"TLS failed: {e}")
        except socket.timeout as e:
            raise requests.exceptions.ConnectTimeout(f"TLS handshake timed out: {e}")
        except OSError as e:
            raise requests.exceptions.ConnectionError(f"TLS failed: {type(e).__name__}: {e}")

    def checkin(self, sock) -> None:
        if len(self.idle) < self.maxsize:
            self.idle.append(sock)
        else:
            _close(sock)

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for sock in idle:
            _close(sock)


class _ProtocolError(Exception):
    pass


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass


try:   # the real poll(): a zero-timeout readiness check must not enter gevent's hub
    from gevent.monkey import get_original as _get_original
    _poll = _get_original("select", "poll")
except Exception:  # pragma: no cover - gevent is a dependency; plain select otherwise
    import select as _select
    _poll = _select.poll


def _alive(sock) -> bool:
    """An idle pooled connection is reusable when nothing is waiting to be read on it:
    readable means the server closed it (EOF) or sent something unasked."""
    try:
        p = _poll()
        p.register(sock.fileno(), 1)            # POLLIN
        if not p.poll(0):
            return True
        if hasattr(sock, "cipher"):             # TLS: may be a session ticket, not data
            sock.settimeout(0.0)
            try:
                sock.recv(1)
            except Exception as e:
                return type(e).__name__ == "SSLWantReadError"
        return False
    except (OSError, ValueError):
        return False


def _read_head(sock):
    """(status, reason, headers, leftover bytes, http version) of the next final response."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > _MAX_HEAD:
                raise _ProtocolError("response head too large")
            piece = sock.recv(65536)
            if not piece:
                raise _ProtocolError("connection closed before a response" if not buf
                                     else "connection closed inside the response head")
            buf += piece
            end = buf.find(b"\r\n\r\n")
        head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
        if 100 <= status < 200 and status != 101:
            continue        # 100 Continue, 103 Early Hints: the real answer follows
        hdrs = CaseInsensitiveDict()
        last = None
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and last is not None:     # obsolete line folding
                hdrs[last] = hdrs[last] + " " + line.strip()
                continue
            k, sep, v = line.partition(":")
            if not sep:
                continue
            k, v = k.strip(), v.strip()
            if k in hdrs:
                hdrs[k] = hdrs[k] + ", " + v            # as urllib3 joins repeated fields
            else:
                hdrs[k] = v
            last = k
        return status, (parts[2] if len(parts) > 2 else ""), hdrs, buf, parts[0]


class Body:
    """A response body over a pooled connection, de-chunked and decompressed: read1()
    for _sse_events, read()/stream() for read_error_body and requests' .content.
    Reading it to its end returns the connection to the pool; close() before that
    closes the connection, unless the rest has already arrived (then it is drained)."""

    def __init__(self, transport, sock, buf, headers, method, status, version):
        self._t, self._sock, self._buf = transport, sock, buf
        te = headers.get("Transfer-Encoding", "").lower()
        conn = headers.get("Connection", "").lower()
        self._keep = ("close" not in conn) and (version != "HTTP/1.0" or "keep-alive" in conn)
        self._chunk_left = 0      # chunked: data bytes left in this chunk; -1 CRLF due; -2 trailers
        self._remaining = None
        if method == "HEAD" or status in (204, 304):
            self._mode = "none"
        elif "chunked" in te:
            self._mode = "chunked"
        elif headers.get("Content-Length", "").strip().isdigit():
            self._mode = "length"
            self._remaining = int(headers["Content-Length"].strip())
        else:
            self._mode = "close"
            self._keep = False
        enc = headers.get("Content-Encoding", "").lower().strip()
        self._decoder = (zlib.decompressobj(16 + zlib.MAX_WBITS) if enc == "gzip"
                         else zlib.decompressobj() if enc == "deflate" else None)
        self.done = False
        if self._mode == "none" or (self._mode == "length" and self._remaining == 0):
            self._finish()

    # ---- file-like API --------------------------------------------------------------------
    def read1(self, amt: int = 65536, decode_content: bool = True) -> bytes:
        """Whatever body bytes are available (waiting for at least one); b"" at the end."""
        while not self.done:
            out = self._take()
            if out:
                if self._decoder is not None:
                    out = self._decoder.decompress(out)
                    if not out:
                        continue
                return out
            if self.done:
                break
            self._fill()
        if self._decoder is not None:
            rest, self._decoder = self._decoder.flush(), None
            return rest
        return b""

    def read(self, amt: Optional[int] = None, decode_content: bool = True) -> bytes:
        out = []
        n = 0
        while amt is None or n < amt:
            piece = self.read1()
            if not piece:
                break
            out.append(piece)
            n += len(piece)
        data = b"".join(out)
        if amt is not None and len(data) > amt:
            data = data[:amt]      # only read_error_body reads a bounded amount; it then closes
        return data

    def stream(self, amt: int = 65536, decode_content: bool = True):
        while True:
            piece = self.read1()
            if not piece:
                return
            yield piece

    def set_timeout(self, seconds: float) -> None:
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def release_conn(self) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is None:
            return
        if not self.done:
            self._drain_ready()
        if self._sock is not None:
            _close(self._sock)
            self._sock = None
            self.done = True

    @property
    def closed(self) -> bool:
        return self._sock is None

    # ---- internals --------------------------------------------------------------------------
    def _fill(self) -> None:
        try:
            piece = self._sock.recv(65536)
        except socket.timeout as e:
            self._abort()
            raise requests.exceptions.ReadTimeout(f"upstream silent: {e}")
        except OSError as e:
            self._abort()
            raise requests.exceptions.ConnectionError(f"connection broken: {type(e).__name__}: {e}")
        if not piece:
            if self._mode == "close":
                self._finish()
                return
            self._abort()
            raise requests.exceptions.ChunkedEncodingError("connection closed before the end of the body")
        self._buf += piece

    def _take(self) -> bytes:
        """Body bytes decodable from the buffer now (may finish the body)."""
        buf = self._buf
        if not buf:
            return b""
        mode = self._mode
        if mode == "close":
            self._buf = b""
            return buf
        if mode == "length":
            n = self._remaining
            out, self._buf = buf[:n], buf[n:]
            self._remaining = n - len(out)
            if self._remaining == 0:
                self._finish()
            return out
        # chunked
        out = []
        pos, size = 0, len(buf)
        left = self._chunk_left
        while pos < size:
            if left == 0:
                # fast path: a whole "<hex>\r\n<data>\r\n" chunk in the buffer
                nl = buf.find(b"\r\n", pos, pos + 64)
                if nl > pos:
                    try:
                        n = int(buf[pos:nl], 16)
                    except ValueError:
                        n = -1                  # extensions or junk: the careful path below
                    end = nl + 2 + n
                    if n > 0 and end + 2 <= size and buf[end:end + 2] == b"\r\n":
                        out.append(buf[nl + 2:end])
                        pos = end + 2
                        continue
            if left > 0:
                take = min(left, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                left -= take
                if left == 0:
                    left = -1
            elif left == -1:                    # the CRLF after a chunk's data
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    self._abort()
                    raise requests.exceptions.ChunkedEncodingError("malformed chunk")
                pos += 2
                left = 0
            else:                               # a size line, or (-2) trailer lines
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if size - pos > 4096:
                        self._abort()
                        raise requests.exceptions.ChunkedEncodingError("malformed chunk size")
                    break
                line = buf[pos:nl].rstrip(b"\r")
                pos = nl + 1
                if left == -2:
                    if not line:                # end of trailers: the body is complete
                        self._buf = buf[pos:]
                        self._chunk_left = 0
                        self._finish()
                        return b"".join(out)
                    continue
                try:
                    n = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self._abort()
                    raise requests.exceptions.ChunkedEncodingError("malformed chunk size")
                left = n if n > 0 else -2
        self._buf = buf[pos:] if pos < size else b""
        self._chunk_left = left
        return out[0] if len(out) == 1 else b"".join(out)

    def _drain_ready(self) -> None:
        """Finish the body from what has already arrived, without waiting (lets a stream
        that ended with [DONE] give its connection back)."""
        try:
            self._sock.settimeout(0.0)
            for _ in range(4):
                self._take()
                if self.done:
                    return
                try:
                    piece = self._sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    return
                if not piece:
                    return
                self._buf += piece
        except Exception:
            return

    def _finish(self) -> None:
        self.done = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._keep and not self._buf:
            self._t.checkin(sock)
        else:
            _close(sock)

    def _abort(self) -> None:
        self.done = True
        sock, self._sock = self._sock, None
        if sock is not None:
            _close(sock)


__all__ = ["RemoteProvider", "UpstreamHTTPError", "parse_retry_after",
           "ROTATE_AUTH", "ROTATE_RATE", "ROTATE_TRANSIENT", "PASS", "BadRequest"]
