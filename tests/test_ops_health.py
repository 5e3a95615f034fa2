"""/health and /health/ready through the real app (Flask test client)."""
from __future__ import annotations

import pytest

from gateway.canonical import LoadedModel, ModelCard
from providers.base import Gauges, Provider
from tests.conftest import remote_config

KEYS = ["echokey-health-0123456789", "ok-health-key-abcdef", "rl-health-key-987654"]
CLIENT_KEY = "client-secret-health-42"


class FakeLocal(Provider):
    """A provider of a type the ops code has never heard of, reporting a queue and a
    loaded model through the interface."""
    type_name = "fake-local"

    def __init__(self, depth=3):
        super().__init__("local", {})
        self.depth = depth

    def chat(self, req, upstream_id):
        raise NotImplementedError

    def loaded(self):
        return [LoadedModel(card=ModelCard(name="local:tiny", upstream_id="tiny", provider="local"),
                            size=1000, size_vram=400, expires_at=0.0, context_length=0)]

    def health(self):
        return {"type": self.type_name, "offered": True, "mode": "cpu", "queue_depth": self.depth,
                "loaded_models": [{"model": "local:tiny", "size": 1000, "size_vram": 400}]}

    def gauges(self):
        return Gauges(queue_depth=self.depth, loaded=self.loaded())


def _cfg(upstream, **server):
    cfg = remote_config(upstream)
    cfg["providers"]["oai"]["api_keys"] = list(KEYS)
    cfg["server"].update({"usage_db": "", **server})
    return cfg


def test_liveness_is_cheap_and_open(make_app, fake_upstream):
    app = make_app(_cfg(fake_upstream, api_keys=[CLIENT_KEY]))
    c = app.test_client()
    r = c.get("/health")
    assert r.status_code == 200 and r.json == {"status": "ok"}
    assert c.head("/health").status_code == 200
    # Liveness probes carry no client key; readiness shows provider detail, so it is
    # behind the client key like every route the contract does not exempt.
    assert c.get("/health/ready").status_code == 401
    ok = c.get("/health/ready", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert ok.status_code == 200 and ok.json["status"] == "ready"


def test_ready_reports_providers_and_keys_by_index(make_app, fake_upstream):
    app = make_app(_cfg(fake_upstream))
    c = app.test_client()
    # echokey fails with a 500 whose body holds the key; rl rests with a rate limit.
    for _ in range(3):
        c.post("/api/chat", json={"model": "oai:echo", "stream": False,
                                  "messages": [{"role": "user", "content": "hi"}]})
    r = c.get("/health/ready")
    assert r.status_code == 200
    j = r.json
    assert j["status"] == "ready" and j["config"]["loaded"] is True
    assert j["config"]["file"].endswith("gateway.yaml")
    assert set(j["offered"]) == {"oai", "gem"}
    oai = j["providers"]["oai"]
    assert oai["keys_total"] == 3 and oai["offered"] is True
    assert oai["keys_resting"] >= 1
    resting = [k for k in oai["keys"] if k["resting"]]
    assert all(k["rest_seconds_left"] > 0 and k["reason"] for k in resting)
    assert {k["last_error"] for k in resting} <= {"HTTP500", "HTTP429"}
    assert j["providers"]["nokeys"]["offered"] is False
    text = r.get_data(as_text=True)
    for k in KEYS + ["ok-oai-1", "ok-gem-1"]:
        assert k not in text


def test_ready_503_when_nothing_is_offered(make_app, fake_upstream):
    cfg = _cfg(fake_upstream)
    cfg["providers"] = {"nokeys": cfg["providers"]["nokeys"]}
    cfg["aliases"] = {}
    r = make_app(cfg).test_client().get("/health/ready")
    assert r.status_code == 503
    assert r.json["status"] == "unavailable" and r.json["offered"] == []


def test_ready_shows_local_models_and_queue(make_app, fake_upstream):
    app = make_app(_cfg(fake_upstream))
    app.extensions["gateway"].router.providers["local"] = FakeLocal(depth=5)
    j = app.test_client().get("/health/ready").json
    local = j["providers"]["local"]
    assert local["queue_depth"] == 5 and local["mode"] == "cpu"
    assert local["loaded_models"] == [{"model": "local:tiny", "size": 1000, "size_vram": 400}]


def test_a_failing_provider_health_does_not_break_ready(make_app, fake_upstream):
    app = make_app(_cfg(fake_upstream))

    class Broken(FakeLocal):
        def health(self):
            raise RuntimeError("boom " + KEYS[0])

        def loaded(self):
            raise RuntimeError("boom")

    app.extensions["gateway"].router.providers["local"] = Broken()
    r = app.test_client().get("/health/ready")
    assert r.status_code == 200
    assert r.json["providers"]["local"]["error"] == "RuntimeError"
    assert KEYS[0] not in r.get_data(as_text=True)


@pytest.mark.parametrize("path", ["/health/ready", "/metrics"])
def test_no_key_in_ops_answers_even_if_a_provider_leaks_one(make_app, fake_upstream, path):
    app = make_app(_cfg(fake_upstream))

    class Leaky(FakeLocal):
        def health(self):
            return {"type": "local", "offered": True, "last_error": f"failed with {KEYS[1]}"}

    app.extensions["gateway"].router.providers["local"] = Leaky()
    text = app.test_client().get(path).get_data(as_text=True)
    for k in KEYS:
        assert k not in text
