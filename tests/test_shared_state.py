"""Shared state in Redis across instances: three gateways (separate gunicorn processes,
two workers each) against one fake upstream act as one for key rests, round-robin and
client limits; a Redis that stops or hangs mid-run never fails or stalls a request."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Gunicorn, remote_config
from tests.services import RUN, RedisServer
from tests.test_ops_metrics import total

ADMIN = f"admin-shared-{RUN}"
TEAM = f"team-shared-{RUN}"
K1, K2 = f"rl-k1-{RUN}", f"ok-k2-{RUN}"
CHAT = {"messages": [{"role": "user", "content": "one two three"}], "stream": False}


def _cfg(upstream, team_limits=None):
    cfg = remote_config(upstream)
    cfg["providers"]["oai"]["api_keys"] = [K1, K2]
    cfg["server"]["api_keys"] = [ADMIN]
    cfg["server"]["clients"] = [{"name": "team", "key": TEAM, "models": ["oai:*"], **(team_limits or {})}]
    return cfg


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _upstream_count(upstream, key):
    return requests.get(upstream + "/_stats", timeout=5).json()["requests"].get(key, 0)


@pytest.fixture(scope="module")
def three(fake_upstream, redis_service):
    url, prefix = redis_service
    env = {"GATEWAY_REDIS_URL": url, "GATEWAY_REDIS_PREFIX": prefix + "three:"}
    cfg = _cfg(fake_upstream, {"rpm": 60})
    gws = []
    try:
        for _ in range(3):
            gws.append(Gunicorn(cfg, workers=2, env=env))
        yield gws
    finally:
        for g in gws:
            g.close()


def test_a_rate_limited_key_gets_one_request_across_all_instances(three, fake_upstream):
    statuses = []
    for i in range(18):
        r = requests.post(three[i % 3].url + "/api/chat", json={"model": "oai:echo", **CHAT},
                          headers=_auth(ADMIN), timeout=10)
        statuses.append(r.status_code)
    assert statuses == [200] * 18
    assert _upstream_count(fake_upstream, K1) == 1, "k1 rests on every worker of every instance"
    assert _upstream_count(fake_upstream, K2) == 18
    for g in three:   # every instance shows the shared rest
        ready = requests.get(g.url + "/health/ready", headers=_auth(ADMIN), timeout=5).json()
        assert ready["shared_state"]["up"] is True
        keys = ready["providers"]["oai"]["keys"]
        assert keys[0]["resting"] and keys[0]["reason"] == "rate_limit" and 20 < keys[0]["rest_seconds_left"] <= 30
        assert not keys[1]["resting"]
        text = requests.get(g.url + "/metrics", headers=_auth(ADMIN), timeout=5).text
        assert total(text, "gateway_provider_keys_resting", provider="oai", reason="rate_limit") == 1
        assert total(text, "gateway_shared_state_up") == 1
        assert K1 not in text and K1 not in json.dumps(ready)


def test_rpm_holds_across_instances(three, redis_service):
    import redis
    r = redis.Redis.from_url(redis_service[0])
    sec = r.time()[0]
    if 60 - sec % 60 < 15:      # the window is Redis' calendar minute: start a fresh one
        time.sleep(60 - sec % 60 + 0.1)

    def one(i):
        resp = requests.post(three[i % 3].url + "/v1/chat/completions", json={"model": "oai:echo", **CHAT},
                             headers=_auth(TEAM), timeout=10)
        return resp.status_code, resp.headers.get("Retry-After"), resp.text
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(one, range(72)))
    codes = [o[0] for o in out]
    assert codes.count(200) == 60 and codes.count(429) == 12, codes
    limited = [o for o in out if o[0] == 429]
    assert all("limit rpm reached (60 requests per minute)" in o[2] for o in limited)
    assert all(1 <= int(o[1]) <= 60 for o in limited)
    late = [requests.post(g.url + "/api/chat", json={"model": "oai:echo", **CHAT}, headers=_auth(TEAM),
                          timeout=10).status_code for g in three]
    assert late == [429, 429, 429]


def test_redis_stopped_or_hung_mid_run_never_fails_a_request(fake_upstream):
    own = RedisServer()
    g = None
    try:
        cfg = _cfg(fake_upstream, {"rpm": 1000, "max_parallel": 4})
        cfg["providers"]["oai"]["api_keys"] = [f"ok-a-{RUN}", f"ok-b-{RUN}"]
        g = Gunicorn(cfg, workers=2, env={"GATEWAY_REDIS_URL": own.url, "GATEWAY_REDIS_PREFIX": "t:"})

        def run(n, key=TEAM):
            out = []
            for _ in range(n):
                t0 = time.monotonic()
                r = requests.post(g.url + "/api/chat", json={"model": "oai:echo", **CHAT},
                                  headers=_auth(key), timeout=10)
                out.append((r.status_code, time.monotonic() - t0))
            return out

        def ready():
            return requests.get(g.url + "/health/ready", headers=_auth(ADMIN), timeout=5).json()["shared_state"]

        assert {s for s, _ in run(4)} == {200} and ready()["up"] is True
        import redis
        r = redis.Redis(port=own.port)
        def counts():
            stats = r.info("commandstats")
            return [sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in group)
                    for group in (("evalsha", "eval"), ("get",), ("set", "incr", "pttl", "mget"))]
        before = counts()
        for _ in range(5):   # 32 chunks each: one round trip per request, none per chunk
            body = requests.post(g.url + "/api/chat", json={"model": "oai:chunks-32-0", **CHAT, "stream": True},
                                 headers=_auth(ADMIN), timeout=10).content
            assert body.count(b"\n") == 33
        after = counts()
        scripts, gets, others = (x - y for x, y in zip(after, before))
        assert scripts == 5, "one script call per request"
        assert gets == 5 * 2 and others == 5, "inside it: a GET per key, one INCR; nothing per chunk"
        r.close()
        own.stop()
        down = run(10) + run(4, ADMIN)
        assert {s for s, _ in down} == {200}
        assert max(t for _, t in down) < 2.0
        assert ready()["up"] is False
        text = requests.get(g.url + "/metrics", headers=_auth(ADMIN), timeout=5).text
        assert total(text, "gateway_shared_state_up") == 0
        own.start()
        time.sleep(1.2)             # past the retry interval: the next call tries Redis again
        assert {s for s, _ in run(4)} == {200}
        assert ready()["up"] is True
        own.pause()                 # accepts connections, never answers
        try:
            hung = run(6)
        finally:
            own.resume()
        assert {s for s, _ in hung} == {200}
        assert max(t for _, t in hung) < 2.0, hung
        logs = g.logs()
        assert "Redis redis://127.0.0.1" in logs and "is back; shared state resumed" in logs
    finally:
        if g is not None:
            g.close()
        own.close()


def test_without_redis_each_worker_rests_the_key_on_its_own(make_app, fake_upstream):
    """The embedded default: no Redis configured, per-process state (one app here)."""
    cfg = _cfg(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = [f"rl-solo-{RUN}", f"ok-solo-{RUN}"]
    c = make_app(cfg).test_client()
    for _ in range(6):
        assert c.post("/api/chat", json={"model": "oai:echo", **CHAT}, headers=_auth(ADMIN)).status_code == 200
    assert _upstream_count(fake_upstream, f"rl-solo-{RUN}") == 1
    ready = c.get("/health/ready", headers=_auth(ADMIN)).json
    assert ready["shared_state"] == {"configured": False}
