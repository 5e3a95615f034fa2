"""Who may call: client API keys, CORS origins, and the Host allowlist against DNS
rebinding (Ollama's rules)."""
from __future__ import annotations

import ipaddress
import re
import socket

from flask import Response, request

from gateway import clients, reqctx
from gateway.errors import Forbidden, Unauthorized

_EXEMPT = {"/", "/api/version", "/health"}
_ORIGIN_SCHEMES = ("app://", "file://", "tauri://", "vscode-webview://", "vscode-file://",
                   "chrome-extension://", "moz-extension://", "safari-web-extension://")
_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?$", re.I)
ALLOW_HEADERS = ("Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, "
                 "x-api-key, anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access, "
                 "x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
                 "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, "
                 "x-stainless-async, x-stainless-helper-method, x-stainless-timeout")


class Guard:
    def __init__(self, settings):
        self.clients = clients.ClientBook(settings)
        self.extra_origins = [o.rstrip("/") for o in settings.cors_origins]
        self.allowed_hosts = {h.lower() for h in settings.allowed_hosts}
        self.check_host = _is_loopback(settings.host)

    # ---- auth -----------------------------------------------------------------------------
    def check_auth(self) -> None:
        clients.set_current(None)   # a keep-alive connection serves several callers
        if not self.clients or request.method == "OPTIONS":
            return
        if request.path.rstrip("/") in _EXEMPT or request.path == "/":
            if request.method in ("GET", "HEAD"):
                return
        header = request.headers.get("Authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not given:   # Anthropic clients send the same key as x-api-key
            given = request.headers.get("x-api-key", "").strip().encode()
        client = self.clients.match(given)
        if client is None:
            raise Unauthorized("missing or invalid API key: send Authorization: Bearer <key> (or x-api-key: <key>)")
        clients.set_current(client)
        if client.name:      # logs and usage name a configured client, else show its key's hash
            reqctx.note(client=client.name)

    # ---- host -----------------------------------------------------------------------------
    def check_host_header(self) -> None:
        if not self.check_host:
            return
        host = (request.host or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if _host_allowed(name) or name in self.allowed_hosts:
            return
        raise Forbidden(f"host {name!r} is not allowed (add it to server.allowed_hosts)")

    # ---- CORS -----------------------------------------------------------------------------
    def origin_allowed(self, origin: str) -> bool:
        if not origin:
            return False
        o = origin.rstrip("/")
        if "*" in self.extra_origins or o in self.extra_origins:
            return True
        if _LOCAL_ORIGIN.match(o):
            return True
        return o.lower().startswith(_ORIGIN_SCHEMES)

    def check_origin(self) -> None:
        """Ollama's rule: a request that carries an Origin not allowed is refused on every
        route, so a web page cannot make a browser spend this gateway's upstream keys
        (a `text/plain` POST needs no preflight)."""
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin):
            shown = origin[:200].encode("unicode_escape").decode("ascii")
            raise Forbidden(f"origin {shown!r} is not allowed (add it to server.cors_origins)")

    def preflight(self):
        if request.method != "OPTIONS":
            return None
        resp = Response(status=204)
        self.add_cors(resp)
        return resp

    def add_cors(self, resp):
        # Every answer depends on Origin (allowed, refused, or none), so caches must key on it.
        resp.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin and self.origin_allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            resp.headers["Access-Control-Allow-Credentials"] = "true"
        return resp


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(name: str) -> bool:
    if name in ("", "localhost") or name == socket.gethostname().lower():
        return True
    if name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private or addr.is_unspecified
