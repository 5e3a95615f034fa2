"""Clients that go away mid-stream: the upstream connection closes within a second and
nothing leaks over many disconnects (real gunicorn + gevent, real sockets)."""
from __future__ import annotations

import json
import os
import socket
import time

import requests

from tests.conftest import Gunicorn, remote_config


def worker_pid(master: int) -> int:
    with open(f"/proc/{master}/task/{master}/children") as fh:
        kids = [int(x) for x in fh.read().split()]
    assert kids, "gunicorn has no worker"
    return kids[0]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_and_drop(port: int, path: str, body: dict, read_bytes: int = 200):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while len(got) < read_bytes:
        piece = s.recv(4096)
        if not piece:
            break
        got += piece
    s.close()
    return got


def open_streams(upstream: str) -> int:
    return requests.get(upstream + "/_stats", timeout=5).json()["open_streams"]


def wait_streams(upstream: str, target: int, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if open_streams(upstream) <= target:
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"upstream still has {open_streams(upstream)} open streams after {timeout}s")


def test_disconnect_closes_upstream_quickly_and_nothing_leaks(fake_upstream):
    g = Gunicorn(remote_config(fake_upstream))
    try:
        base = open_streams(fake_upstream)
        for path, body in (("/api/chat", {"model": "oai:chunks-2000-20", "messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/chat/completions", {"model": "oai:chunks-2000-20", "stream": True,
                                                     "messages": [{"role": "user", "content": "x"}]}),
                           ("/api/generate", {"model": "gem:chunks-2000-20", "prompt": "x"})):
            got = start_and_drop(g.port, path, body)
            assert b"200 OK" in got
            assert wait_streams(fake_upstream, base, 1.5) <= 1.5, path

        pid = worker_pid(g.proc.pid)
        # warm up, then measure: fds must stay flat over many disconnects
        for _ in range(20):
            start_and_drop(g.port, "/api/chat", {"model": "oai:chunks-2000-5",
                                                 "messages": [{"role": "user", "content": "x"}]}, 100)
        wait_streams(fake_upstream, base, 3)
        before = open_fds(pid)
        for _ in range(500):
            start_and_drop(g.port, "/api/chat", {"model": "oai:chunks-2000-5",
                                                 "messages": [{"role": "user", "content": "x"}]}, 100)
        wait_streams(fake_upstream, base, 5)
        time.sleep(0.5)
        after = open_fds(pid)
        assert after <= before + 5, f"fds grew from {before} to {after}"
        # every dropped stream's generator was closed (its greenlet ended with it)
        assert requests.get(g.url + "/health/ready").json()["active_streams"] == 0
        # and the gateway still answers
        r = requests.post(g.url + "/api/chat", json={"model": "oai:echo", "stream": False,
                                                     "messages": [{"role": "user", "content": "still here"}]})
        assert r.json()["message"]["content"] == "Echo: still here"
    finally:
        g.close()
