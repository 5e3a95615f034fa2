"""Where the server listens, one precedence for the development server (app.py), gunicorn
(gunicorn.conf.py) and the Host-header guard (wsgi.py, which must know the real address):
command-line flags, then GATEWAY_BIND, then GATEWAY_HOST / GATEWAY_PORT (or PORT), then
server.host / server.port, then 127.0.0.1:11434."""
from __future__ import annotations

import os
from typing import Optional


def listen_bind(settings, env=os.environ, bind: Optional[str] = None, host: Optional[str] = None,
                port: Optional[int] = None) -> str:
    """A gunicorn bind string: HOST:PORT, or GATEWAY_BIND as given (unix:PATH, fd://N)."""
    if not (bind or host or port) and env.get("GATEWAY_BIND"):
        return env["GATEWAY_BIND"]
    bhost, bport = split_bind(bind) if bind else (None, None)
    h = host or bhost or env.get("GATEWAY_HOST") or settings.host or "127.0.0.1"
    p = (port or bport or env.get("GATEWAY_PORT") or env.get("PORT") or settings.port or 11434)
    return f"[{h}]:{int(p)}" if ":" in h else f"{h}:{int(p)}"


def split_bind(bind: str):
    """(host, port) of a HOST:PORT bind ("[::1]:80" gives "::1"); (None, None) for unix:/fd://."""
    if bind.startswith(("unix:", "fd://")):
        return None, None
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or None, int(port) if port else None
