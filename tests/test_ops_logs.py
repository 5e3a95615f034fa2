"""Structured access logs, and no API key in any log line or response, checked on the real
gateway under gunicorn against an upstream that echoes keys back in its errors."""
from __future__ import annotations

import io
import json
import logging
import os
import sqlite3

import requests

from tests.conftest import remote_config, stop

CHAT = {"messages": [{"role": "user", "content": "secret prompt words"}]}


def _capture(logger_name="gateway.access"):
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger(logger_name).addHandler(h)
    return buf, h


def test_scrub_filter_covers_args_and_tracebacks():
    from gateway.errors import register_secret
    from gateway.ops.accesslog import ScrubFilter
    secret = "sk-scrub-filter-test-123456"
    register_secret(secret)
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.addFilter(ScrubFilter())
    log = logging.getLogger("test.scrub")
    log.addHandler(h)
    log.propagate = False
    try:
        log.warning("key is %s", secret)
        log.warning(f"inline {secret}")
        try:
            raise ValueError(f"boom {secret}")
        except ValueError:
            log.exception("failed with %r", {"k": secret})
    finally:
        log.removeHandler(h)
    out = buf.getvalue()
    assert secret not in out
    assert out.count("***") >= 4 and "ValueError: boom ***" in out


def test_root_handlers_carry_the_scrub_filter(make_app, fake_upstream):
    from gateway.ops.accesslog import ScrubFilter
    make_app(remote_config(fake_upstream, server={"usage_db": ""}))
    handlers = logging.getLogger().handlers + logging.getLogger("gateway.access").handlers
    real = [h for h in handlers if type(h).__module__ == "logging"]   # not pytest's capture
    assert real and all(any(isinstance(f, ScrubFilter) for f in h.filters) for h in real)


def test_one_json_line_per_request(make_app, fake_upstream):
    cfg = remote_config(fake_upstream, server={"usage_db": "", "api_keys": ["client-log-key-1"]})
    app = make_app(cfg)
    c = app.test_client()
    buf, h = _capture()
    try:
        auth = {"Authorization": "Bearer client-log-key-1"}
        assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}, headers=auth).status_code == 200
        r = c.post("/api/generate", json={"model": "gem:gemini-2.5-flash", "prompt": "secret prompt words"},
                   headers=auth)
        assert r.status_code == 200 and r.get_data()
        assert c.post("/api/chat", json={"model": "nope", **CHAT}, headers=auth).status_code == 404
        assert c.get("/api/tags", headers=auth).status_code == 200     # not a finished generation
    finally:
        logging.getLogger("gateway.access").removeHandler(h)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 3
    ok, gen, missing = lines
    for ln in lines:
        assert set(ln) >= {"ts", "route", "model", "provider", "key_index", "status", "latency_ms",
                           "ttft_ms", "prompt_tokens", "completion_tokens", "error_class", "error"}
        assert ln["ts"].endswith("Z") and ln["client"] == lines[0]["client"]
    assert ok["route"] == "/api/chat" and ok["provider"] == "oai" and ok["status"] == 200
    assert ok["prompt_tokens"] == 7 and ok["completion_tokens"] == 4 and ok["latency_ms"] > 0
    assert isinstance(ok["key_index"], int) and ok["error"] is None and ok["error_class"] is None
    assert gen["route"] == "/api/generate" and gen["stream"] is True and gen["ttft_ms"] is not None
    assert missing["status"] == 404 and missing["error_class"] == "NotFound" and "nope" in missing["error"]
    text = buf.getvalue()
    assert "secret prompt words" not in text and "client-log-key-1" not in text


def test_log_prompts_opt_in_and_error_class_of_a_mid_stream_failure(make_app, fake_upstream):
    cfg = remote_config(fake_upstream, server={"usage_db": "", "log_prompts": True})
    cfg["providers"]["cut"] = {"type": "openai", "base_url": fake_upstream + "/v1", "api_keys": ["cut-1"],
                               "models": ["chunks-8-0"], "timeout": 5}
    c = make_app(cfg).test_client()
    buf, h = _capture()
    try:
        c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT})
        body = c.post("/api/chat", json={"model": "cut:chunks-8-0", **CHAT}).get_data(as_text=True)
        emb = c.post("/api/embed", json={"model": "local:none", "input": "x"})
    finally:
        logging.getLogger("gateway.access").removeHandler(h)
    assert '"error"' in body.splitlines()[-1]
    assert emb.status_code == 404
    ok, cut, missing = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert ok["prompt"] == "secret prompt words" and ok["error_class"] is None
    assert cut["prompt"] == "secret prompt words"
    assert cut["error_class"] == "UpstreamHTTPError", cut
    assert cut["error"] and cut["status"] >= 500
    assert missing["error_class"] == "NotFound" and missing["route"] == "/api/embed"


def test_no_key_in_logs_or_answers_under_gunicorn(gunicorn_gateway, fake_upstream, tmp_path):
    client_keys = ["client-gunicorn-key-alpha", "client-gunicorn-key-beta"]
    leaky_oai = ["echokey-oai-leak-0001", "echokey-oai-leak-0002"]
    leaky_gem = ["echokey-gem-leak-0003"]
    ok_keys = ["ok-oai-1", "ok-oai-2", "ok-gem-1"]
    db = tmp_path / "usage.sqlite3"
    cfg = remote_config(fake_upstream, server={"host": "127.0.0.1", "port": 0, "api_keys": client_keys,
                                               "usage_db": str(db)})
    cfg["providers"]["leak"] = {"type": "openai", "base_url": fake_upstream + "/v1", "api_keys": leaky_oai,
                                "models": ["echo"], "cooldown": 0, "timeout": 5}
    cfg["providers"]["leakgem"] = {"type": "gemini", "base_url": fake_upstream + "/v1beta",
                                   "api_keys": leaky_gem, "models": ["gemini-2.5-flash"], "cooldown": 0,
                                   "timeout": 5}
    # One echoing key ahead of a good one: the request succeeds after a logged failure.
    cfg["providers"]["oai"]["api_keys"] = ["echokey-oai-first-0004", "ok-oai-1", "ok-oai-2"]
    every_key = client_keys + leaky_oai + leaky_gem + ok_keys + ["echokey-oai-first-0004"]
    g = gunicorn_gateway(cfg, workers=1)
    auth = {"Authorization": f"Bearer {client_keys[0]}"}
    s = requests.Session()
    answers = []

    def call(method, path, **kw):
        kw.setdefault("headers", auth)
        r = s.request(method, g.url + path, timeout=15, **kw)
        answers.append((path, r.status_code, r.text, dict(r.headers)))
        return r

    assert call("POST", "/api/chat", json={"model": "leak:echo", "stream": False, **CHAT}).status_code == 502
    assert call("POST", "/api/chat", json={"model": "leak:echo", **CHAT}).status_code == 502
    assert call("POST", "/v1/chat/completions", json={"model": "leak:echo", "stream": True, **CHAT}).status_code == 502
    assert call("POST", "/api/chat", json={"model": "leakgem:gemini-2.5-flash", **CHAT}).status_code == 502
    assert call("POST", "/api/embed", json={"model": "leak:echo", "input": "x"}).status_code == 502
    assert call("POST", "/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}).status_code == 200
    assert call("POST", "/api/chat", json={"model": "oai:echo", **CHAT}).status_code == 200
    assert call("POST", "/v1/chat/completions", json={"model": "gem:gemini-2.5-flash", "stream": True,
                                                      **CHAT}).status_code == 200
    assert call("POST", "/api/chat", json={"model": "oai:echo", **CHAT},
                headers={"Authorization": f"Bearer {client_keys[1]}"}).status_code == 200
    assert call("POST", "/api/chat", json={"model": "oai:echo", **CHAT},
                headers={"Authorization": "Bearer wrong-client-key"}).status_code == 401
    for path in ("/health", "/health/ready", "/metrics", "/api/usage?group_by=key",
                 "/api/usage?group_by=provider", "/api/tags", "/v1/models", "/api/ps"):
        assert call("GET", path).status_code == 200, path
    ready = json.loads(answers[-7][2])
    assert ready["providers"]["leak"]["keys_total"] == 2 and ready["providers"]["leak"]["last_error"] == "HTTP500"
    usage = json.loads(answers[-5][2])
    assert usage["total"]["requests"] == 10, usage   # the refused 401 is a row too

    for _ in range(3):   # still queued for the usage log when the worker is stopped
        assert call("POST", "/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}).status_code == 200
    s.close()
    stop(g.proc)   # a clean stop flushes every log line and the usage log
    logs = g.logs()
    for path, _status, body, headers in answers:
        for k in every_key:
            assert k not in body, (path, k)
            assert k not in json.dumps(headers), (path, k)
    for k in every_key:
        assert k not in logs, k
    assert "***" in logs, "the echoed keys reached the log path and were scrubbed"
    access = [json.loads(x) for x in logs.splitlines() if x.startswith('{"ts"')]
    assert len(access) == 13      # the 401 too: a refused key is logged (without the key)
    assert [a["status"] for a in access[:5]] == [502] * 5
    assert all(a["error_class"] == "UpstreamFailed" for a in access[:5])
    assert [a["status"] for a in access[9:10]] == [401]
    assert {a["provider"] for a in access[5:] if a["status"] == 200} == {"oai", "gem"}
    assert len({a["client"] for a in access}) == 3
    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 13      # every request is a row, the 401 too
    conn.close()
    raw = b"".join(open(p, "rb").read() for p in (str(db), str(db) + "-wal") if os.path.exists(p))
    for k in every_key:
        assert k.encode() not in raw
    assert "secret prompt words" not in logs
