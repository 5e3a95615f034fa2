"""Slow clients cannot hold a connection: the request head and body must arrive within
server.client_header_timeout / client_body_timeout, and an idle keep-alive connection is
closed after server.keepalive_timeout, under gunicorn's gevent worker and the development
server, while other clients are served meanwhile."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import ROOT, free_port, stop, wait_http, write_config

TIMEOUTS = {"client_header_timeout": 1, "client_body_timeout": 1, "keepalive_timeout": 1}
CFG = {"server": {"host": "127.0.0.1", "port": 0, "usage_db": "", **TIMEOUTS}}


def _closed_after(sock, send_every: float, piece: bytes, limit: float = 8.0):
    """Trickle `piece` every `send_every` s until the server closes; (seconds, bytes read)."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(send_every)
    while time.monotonic() - t0 < limit:
        try:
            sock.sendall(piece)
        except OSError:
            return time.monotonic() - t0, got
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0, got
        if not data:
            return time.monotonic() - t0, got
        got += data
    raise AssertionError(f"connection still open after {limit}s (read {got[:200]!r})")


def _check_server(url: str):
    port = int(url.rsplit(":", 1)[1])
    # Head trickled one header line at a time: closed after ~the header timeout.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    took, _ = _closed_after(s, 0.25, b"X-Slow: 1\r\n")
    s.close()
    assert 0.7 <= took <= 5, took

    # Body trickled: a 408 naming the setting, then the connection closes.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{")
    with requests.Session() as other:   # a normal client is served meanwhile
        assert other.get(url + "/api/version", timeout=5).status_code == 200
    took, got = _closed_after(s, 0.25, b" ")
    s.close()
    assert 0.7 <= took <= 5, took
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"client_body_timeout" in got

    # Idle keep-alive: served, reused while fresh, closed once idle past the timeout.
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    req = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(2):
        s.sendall(req)
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        while not data.endswith(b"}"):
            data += s.recv(65536)
        time.sleep(0.3)
    t0 = time.monotonic()
    assert s.recv(65536) == b""
    assert 0.4 <= time.monotonic() - t0 <= 5
    s.close()


def test_slow_head_body_and_idle_connections_are_closed_under_gunicorn(gunicorn_gateway):
    g = gunicorn_gateway(CFG)
    _check_server(g.url)


def test_slow_head_body_and_idle_connections_are_closed_by_the_dev_server(tmp_path):
    path = write_config(CFG, str(tmp_path))
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--config", path,
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/version", proc=proc)
        _check_server(url)
    finally:
        stop(proc)


@pytest.mark.parametrize("key", ["client_header_timeout", "client_body_timeout"])
def test_read_timeouts_must_be_positive_numbers(key):
    from gateway.settings import ConfigError, build_settings
    assert getattr(build_settings({"server": {key: 2.5}}), key) == 2.5
    with pytest.raises(ConfigError, match=f"server.{key}"):
        build_settings({"server": {key: 0}})


def test_a_nearly_full_worker_closes_the_longest_waiting_heads_so_others_are_served(gunicorn_gateway):
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "usage_db": ""}}     # default 60 s deadlines
    g = gunicorn_gateway(cfg, env={"GATEWAY_WORKER_CONNECTIONS": "20"})
    slow = []
    for _ in range(30):          # more slow heads than the worker has places
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(b"GET /api/version HTTP/1.1\r\n")
        slow.append(s)
        time.sleep(0.01)
    for _ in range(5):
        assert requests.get(g.url + "/api/version", timeout=5).status_code == 200
    closed = 0
    for s in slow:
        s.settimeout(0.05)
        try:
            closed += s.recv(1) == b""
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        s.close()
    assert closed >= 10
