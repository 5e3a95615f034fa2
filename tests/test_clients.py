"""Client keys (server.clients): model globs and 403s, filtered model lists, rpm / tpm /
max_parallel / tokens_per_day limits (429 naming the limit, tokens counted from real
usage), and the client's name in access logs, usage rows and metrics. Per process here
(no Redis); tests/test_shared_state.py runs the same limits across instances."""
from __future__ import annotations

import json
import sqlite3
import time
import uuid

import pytest

from gateway.settings import ConfigError, build_settings
from tests.conftest import remote_config
from tests.test_ops_logs import _capture
from tests.test_ops_metrics import total

ALICE, BOB, ADMIN = "alice-client-secret-1", "bob-client-secret-2", "admin-client-secret-3"
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}
ECHO_TOKENS = 7 + 4      # the fake upstream's usage for "Echo: one two three"


def _cfg(upstream, tmp_path=None, **alice):
    cfg = remote_config(upstream)
    cfg["server"]["api_keys"] = [ADMIN]
    cfg["server"]["clients"] = [
        {"name": "alice", "key": ALICE, "models": ["oai:*", "fast"], **alice},
        {"name": "bob", "key": BOB, "models": ["gem:gemini-*"]},
    ]
    if tmp_path is not None:
        cfg["server"]["usage_db"] = str(tmp_path / "usage.sqlite3")
    return cfg


@pytest.fixture(params=["local", "redis"])
def limits_mode(request, monkeypatch):
    """Each limit test runs per process (no Redis) and with shared state in Redis (its own
    key prefix per test), where two apps stand for two gateway processes."""
    if request.param == "local":
        return None
    url, prefix = request.getfixturevalue("redis_service")
    monkeypatch.setenv("GATEWAY_REDIS_PREFIX", f"{prefix}{uuid.uuid4().hex[:8]}:")
    return url


def _clients(make_app, cfg, redis_url):
    """Two test clients: of one app without Redis, of two apps sharing Redis with it."""
    if redis_url is None:
        c = make_app(cfg).test_client()
        return c, c
    cfg["server"]["redis"] = redis_url
    return make_app(cfg).test_client(), make_app(cfg).test_client()


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _chat(c, key, model="oai:echo", path="/api/chat", stream=False):
    return c.post(path, json={"model": model, "stream": stream, **CHAT}, headers=_auth(key))


def _fresh_minute(margin=4.0):
    """Wait out the end of a minute: the rpm/tpm windows are calendar minutes."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def test_models_outside_the_list_are_403_in_each_surface_shape(make_app, fake_upstream):
    c = make_app(_cfg(fake_upstream)).test_client()
    assert _chat(c, ALICE).status_code == 200
    assert _chat(c, ALICE, "fast").status_code == 200
    assert _chat(c, ALICE, "fast:latest").status_code == 200
    r = _chat(c, ALICE, "gem:gemini-2.5-flash")
    assert r.status_code == 403
    assert r.json == {"error": 'model "gem:gemini-2.5-flash" is not allowed for client alice'}
    r = _chat(c, ALICE, "gem:gemini-2.5-flash", path="/v1/chat/completions")
    assert r.status_code == 403
    assert r.json["error"]["type"] == "permission_error"
    assert "not allowed for client alice" in r.json["error"]["message"]
    r = c.post("/api/embed", json={"model": "gem:text-embedding-004", "input": "x"}, headers=_auth(ALICE))
    assert r.status_code == 403
    assert c.post("/api/show", json={"model": "gem:gemini-2.5-flash"}, headers=_auth(ALICE)).status_code == 403
    assert c.get("/v1/models/gem:gemini-2.5-flash", headers=_auth(ALICE)).status_code == 403
    # bob's glob covers gem:gemini-* only; the shorthand api_keys client sees everything
    assert _chat(c, BOB, "gem:gemini-2.5-flash").status_code == 200
    assert _chat(c, BOB).status_code == 403
    assert _chat(c, ADMIN, "gem:gemini-2.5-flash").status_code == 200
    assert _chat(c, "not-a-client-key").status_code == 401


def test_model_lists_show_only_the_clients_models(make_app, fake_upstream):
    c = make_app(_cfg(fake_upstream)).test_client()
    tags = {m["name"] for m in c.get("/api/tags", headers=_auth(ALICE)).json["models"]}
    assert tags == {"oai:echo", "oai:chunks-32-0", "oai:meta/llama:free", "fast"}
    v1 = {m["id"] for m in c.get("/v1/models", headers=_auth(BOB)).json["data"]}
    assert v1 == {"gem:gemini-2.5-flash"}
    everything = {m["name"] for m in c.get("/api/tags", headers=_auth(ADMIN)).json["models"]}
    assert tags | v1 < everything


def test_rpm_gives_429_naming_the_limit_with_retry_after(make_app, fake_upstream, limits_mode):
    c, other = _clients(make_app, _cfg(fake_upstream, rpm=3), limits_mode)
    _fresh_minute()
    assert [_chat(x, ALICE).status_code for x in (c, other, c)] == [200, 200, 200]
    r = _chat(other, ALICE, path="/v1/chat/completions")
    assert r.status_code == 429
    assert "limit rpm reached (3 requests per minute)" in r.json["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    r = c.post("/api/embed", json={"model": "oai:echo", "input": "x"}, headers=_auth(ALICE))
    assert r.status_code == 429 and "rpm" in r.json["error"]
    assert _chat(c, BOB, "gem:gemini-2.5-flash").status_code == 200, "other clients are not limited"


def test_forbidden_models_do_not_use_up_the_rpm(make_app, fake_upstream):
    c = make_app(_cfg(fake_upstream, rpm=2)).test_client()
    _fresh_minute()
    assert [_chat(c, ALICE, "gem:gemini-2.5-flash").status_code for _ in range(4)] == [403] * 4
    assert [_chat(c, ALICE).status_code for _ in range(3)] == [200, 200, 429]


def test_tpm_counts_real_usage_when_the_answer_ends(make_app, fake_upstream, limits_mode):
    c, other = _clients(make_app, _cfg(fake_upstream, tpm=ECHO_TOKENS + 1), limits_mode)
    _fresh_minute()
    assert _chat(c, ALICE).status_code == 200          # 11 of 12 tokens used
    r = _chat(other, ALICE, stream=True)               # admitted: the overrun is finished
    assert r.status_code == 200 and b'"done":true' in r.get_data()
    r = _chat(c, ALICE)
    assert r.status_code == 429
    assert "limit tpm reached" in r.json["error"] and 1 <= int(r.headers["Retry-After"]) <= 60


def test_tokens_per_day_gives_429_until_the_utc_day_ends(make_app, fake_upstream, limits_mode):
    c, other = _clients(make_app, _cfg(fake_upstream, tokens_per_day=ECHO_TOKENS), limits_mode)
    assert _chat(c, ALICE, path="/v1/chat/completions").status_code == 200
    r = _chat(other, ALICE, path="/v1/chat/completions")
    assert r.status_code == 429
    assert "limit tokens_per_day reached" in r.json["error"]["message"]
    left = 86400 - time.time() % 86400
    assert abs(int(r.headers["Retry-After"]) - left) <= 2


def test_max_parallel_counts_requests_in_flight(make_app, fake_upstream, limits_mode):
    c, other = _clients(make_app, _cfg(fake_upstream, max_parallel=1), limits_mode)
    held = other.post("/api/chat", json={"model": "oai:chunks-3-50", "stream": True, **CHAT},
                  headers=_auth(ALICE), buffered=False)
    assert held.status_code == 200
    r = _chat(c, ALICE)
    assert r.status_code == 429 and "limit max_parallel reached (1 requests in flight)" in r.json["error"]
    assert r.headers["Retry-After"] == "1"
    assert b'"done":true' in b"".join(held.response)
    held.close()
    assert _chat(c, ALICE).status_code == 200, "the finished stream gave its slot back"
    assert _chat(c, ALICE).status_code == 200


def test_client_name_in_access_log_usage_and_metrics(make_app, fake_upstream, tmp_path):
    app = make_app(_cfg(fake_upstream, tmp_path, rpm=2))
    c = app.test_client()
    buf, h = _capture()
    try:
        _fresh_minute()
        assert _chat(c, ALICE).status_code == 200
        assert b'"done":true' in _chat(c, ALICE, stream=True).get_data()
        assert _chat(c, ALICE).status_code == 429
        assert _chat(c, BOB, "gem:gemini-2.5-flash").status_code == 200
        assert _chat(c, ADMIN).status_code == 200
    finally:
        import logging
        logging.getLogger("gateway.access").removeHandler(h)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["client"] for x in lines[:4]] == ["alice", "alice", "alice", "bob"]
    assert len(lines[4]["client"]) == 12 and lines[4]["client"] != "alice"   # a hash for api_keys
    assert app.extensions["gateway_usage"].flush(10)
    conn = sqlite3.connect(str(tmp_path / "usage.sqlite3"))
    assert [r[0] for r in conn.execute("SELECT client_key FROM usage ORDER BY id")][:4] == ["alice"] * 3 + ["bob"]
    conn.close()
    groups = c.get("/api/usage?group_by=client", headers=_auth(ADMIN)).json["groups"]
    alice = next(g for g in groups if g["client"] == "alice")
    assert alice["requests"] == 3 and alice["errors"] == 1
    assert alice["prompt_tokens"] + alice["completion_tokens"] == 2 * ECHO_TOKENS
    text = c.get("/metrics", headers=_auth(ADMIN)).get_data(as_text=True)
    assert total(text, "gateway_client_requests_total", client="alice", status="200") == 2
    assert total(text, "gateway_client_limited_total", client="alice", limit="rpm") == 1
    assert total(text, "gateway_client_tokens_total", client="alice") == 2 * ECHO_TOKENS
    assert ALICE not in text and "client=\"" + ADMIN not in text


@pytest.mark.parametrize("client,field", [
    ({"key": "k-1234"}, "server.clients[0].name"),
    ({"name": "a b", "key": "k-1234"}, "server.clients[0].name"),
    ({"name": "a"}, "server.clients[0].key"),
    ({"name": "a", "key": "k-1234", "rpm": -1}, "server.clients[0].rpm"),
    ({"name": "a", "key": "k-1234", "tpm": "lots"}, "server.clients[0].tpm"),
    ({"name": "a", "key": "k-1234", "models": "oai:*", "max_parallel": 1.5}, "server.clients[0].max_parallel"),
    ({"name": "a", "key": "k-1234", "models": {"oai:*": 1}}, "server.clients[0].models"),
    ({"name": "a", "key": "k-1234", "rps": 3}, "server.clients[0].rps"),
])
def test_bad_client_settings_name_the_field(fake_upstream, client, field):
    cfg = remote_config(fake_upstream)
    cfg["server"]["clients"] = [client]
    with pytest.raises(ConfigError) as e:
        build_settings(cfg, "x.yaml", env={})
    assert e.value.path == field


def test_two_clients_cannot_share_a_name_or_key(fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["clients"] = [{"name": "a", "key": "k-1234"}, {"name": "a", "key": "k-5678"}]
    with pytest.raises(ConfigError, match="used by another client"):
        build_settings(cfg, "x.yaml", env={})
    cfg["server"]["clients"][1]["name"] = "b"
    cfg["server"]["clients"][1]["key"] = "k-1234"
    with pytest.raises(ConfigError, match="key of another client"):
        build_settings(cfg, "x.yaml", env={})
