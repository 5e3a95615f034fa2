"""The one HTTP path to upstreams: `Transport`, a lean keep-alive HTTP/1.1 client (a seam
kept for speed: requests cost a third of the gateway's CPU), its response `Body`, and
zero-buffer SSE reading (`sse_events`). Failures are requests' exceptions, so callers
classify them one way whatever carried the call."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.parse
import zlib
from typing import Iterator, Optional

import requests
from requests.structures import CaseInsensitiveDict

from gateway.reqctx import more_ready

STOP = object()
_scan_json = json.JSONDecoder().scan_once     # the C scanner behind json.loads


def json_loads(data: bytes):
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
    resp.raw.set_timeout(seconds)


def sse_events(resp, convert) -> Iterator:
    """Each SSE event's data as soon as its blank line arrives (no read-ahead buffering),
    passed through `convert` (a result of STOP ends the stream there): sse_json decodes
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
            if out is STOP:
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
        if out is not STOP:
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
