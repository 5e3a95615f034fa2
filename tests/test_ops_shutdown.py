"""Graceful stop under gunicorn: SIGTERM lets a running stream finish (bounded by
GATEWAY_GRACEFUL_TIMEOUT) while the master stops taking new connections."""
import json
import signal
import time

import pytest
import requests

from tests.conftest import remote_config

pytestmark = pytest.mark.timeout(60)


def test_sigterm_lets_a_running_stream_finish(gunicorn_gateway, fake_upstream):
    g = gunicorn_gateway(remote_config(fake_upstream))
    # Connection: close, since an idle keep-alive connection holds a stopping gevent
    # worker until the graceful timeout (bounded, tested below)
    r = requests.post(g.url + "/api/chat", stream=True, timeout=30, headers={"Connection": "close"}, json={
        "model": "oai:chunks-20-100", "messages": [{"role": "user", "content": "x"}]})
    lines = r.iter_lines()
    assert json.loads(next(lines))["done"] is False
    t0 = time.monotonic()
    g.proc.send_signal(signal.SIGTERM)
    rest = [json.loads(x) for x in lines if x]
    assert rest[-1]["done"] is True and rest[-1]["done_reason"] == "stop"
    assert len(rest) >= 19                       # nothing cut: all 20 chunks and the final one
    g.proc.wait(15)
    assert time.monotonic() - t0 < 15


def test_graceful_timeout_bounds_a_stream_that_never_ends(gunicorn_gateway, fake_upstream):
    g = gunicorn_gateway(remote_config(fake_upstream), env={"GATEWAY_GRACEFUL_TIMEOUT": "2"})
    r = requests.post(g.url + "/api/chat", stream=True, timeout=30, json={
        "model": "oai:chunks-2000-50", "messages": [{"role": "user", "content": "x"}]})
    lines = r.iter_lines()
    next(lines)
    t0 = time.monotonic()
    g.proc.send_signal(signal.SIGTERM)
    g.proc.wait(20)
    assert time.monotonic() - t0 < 8
    r.close()
