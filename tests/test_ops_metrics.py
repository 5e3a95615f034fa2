"""/metrics: counters and histograms from finished requests, scrape-time gauges from
provider state, and correct totals with two gunicorn workers (multiprocess mode)."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import time

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import remote_config
from tests.test_ops_health import FakeLocal

CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value}"""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(text: str, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and want <= ls)


@pytest.fixture
def app(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["usage_db"] = ""
    cfg["providers"]["oai"]["api_keys"] = ["rl-metrics-key-1", "ok-metrics-key-2"]
    return make_app(cfg)


def test_requests_latency_ttft_and_tokens(app):
    c = app.test_client()
    r = c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT})
    assert r.status_code == 200
    r = c.post("/api/chat", json={"model": "gem:gemini-2.5-flash", **CHAT})   # streamed
    assert r.status_code == 200 and r.get_data()
    assert c.post("/api/chat", json={"model": "oai:missing", **CHAT}).status_code == 404
    assert c.post("/api/chat", json={"model": "unknown-model", **CHAT}).status_code == 404
    r = c.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    assert total(text, "gateway_requests_total") == 4
    assert total(text, "gateway_requests_total", route="/api/chat", provider="oai", model="oai:echo",
                 status="200") == 1
    assert total(text, "gateway_requests_total", provider="gem", status="200") == 1
    # A failure before any answer still counts against the provider its prefix names.
    # Names that are not configured models or aliases are all counted as "other".
    assert total(text, "gateway_requests_total", model="other", provider="oai", status="404") == 1
    assert total(text, "gateway_requests_total", model="other", provider="none", status="404") == 1
    assert total(text, "gateway_request_duration_seconds_count") == 4
    assert total(text, "gateway_time_to_first_token_seconds_count") == 2
    # Fake upstream: openai counts 7 prompt tokens, gemini 5; one completion token a word.
    assert total(text, "gateway_prompt_tokens_total", provider="oai") == 7
    assert total(text, "gateway_prompt_tokens_total", provider="gem") == 5
    assert total(text, "gateway_completion_tokens_total", provider="oai") == 4
    assert total(text, "gateway_completion_tokens_total", provider="gem") == 4
    assert "_created" not in text


def test_key_rests_by_reason_and_keys_never_shown(app):
    c = app.test_client()
    text = c.get("/metrics").get_data(as_text=True)
    assert total(text, "gateway_provider_keys_resting", provider="oai") == 0
    assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}).status_code == 200
    text = c.get("/metrics").get_data(as_text=True)
    assert total(text, "gateway_provider_keys", provider="oai") == 2
    assert total(text, "gateway_provider_keys_resting", provider="oai", reason="rate_limit") == 1
    assert total(text, "gateway_provider_keys_resting", provider="oai", reason="auth") == 0
    assert total(text, "gateway_provider_offered", provider="nokeys") == 0
    assert total(text, "gateway_provider_offered", provider="gem") == 1
    for k in ("rl-metrics-key-1", "ok-metrics-key-2", "ok-gem-1"):
        assert k not in text


def test_local_gauges_at_scrape(app):
    app.extensions["gateway"].router.providers["local"] = FakeLocal(depth=4)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert total(text, "gateway_local_queue_depth", provider="local") == 4
    assert total(text, "gateway_local_models_loaded", provider="local") == 1
    assert total(text, "gateway_local_model_memory_bytes", provider="local", model="tiny", kind="total") == 1000
    assert total(text, "gateway_local_model_memory_bytes", provider="local", model="tiny", kind="vram") == 400


def test_model_label_values_are_capped(app, monkeypatch):
    from gateway.ops import metrics
    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 2)
    c = app.test_client()
    listed = ["oai:echo", "oai:chunks-32-0", "gem:gemini-2.5-flash", "fast", "oai:meta/llama:free"]
    for name in listed:     # configured names, so only the cap makes them "other"
        c.post("/api/chat", json={"model": name, "stream": False, **CHAT}).get_data()
    text = c.get("/metrics").get_data(as_text=True)
    assert total(text, "gateway_requests_total") == 5
    assert total(text, "gateway_requests_total", model="other") == 3
    assert not [k for k in samples(text) if ("model", listed[-1]) in k[1]]


def _requests_by_pid(mp_dir: str) -> dict:
    out = {}
    for f in glob.glob(os.path.join(mp_dir, "counter_*.db")):
        pid = int(re.search(r"counter_(\d+)\.db$", f).group(1))
        n = 0
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(f):
            if json.loads(key)[1] == "gateway_requests_total":
                n += value
        out[pid] = n
    return out


def _scrape_total(url: str) -> float:
    r = requests.get(url + "/metrics", headers={"Connection": "close"}, timeout=10)
    assert r.status_code == 200
    return total(r.text, "gateway_requests_total")


def _chat(url: str, model="oai:echo") -> int:
    return requests.post(url + "/api/chat", json={"model": model, "stream": False, **CHAT},
                         headers={"Connection": "close"}, timeout=10).status_code


def test_two_gunicorn_workers_sum_to_the_request_count(gunicorn_gateway, fake_upstream, tmp_path):
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    (mp_dir / "counter_1.db").write_bytes(b"stale file from an earlier run")
    cfg = remote_config(fake_upstream)
    cfg["server"]["usage_db"] = ""
    g = gunicorn_gateway(cfg, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)})
    sent = 0
    # New connections until both workers have answered some (the kernel picks the worker).
    while sent < 400:
        for _ in range(10):
            assert _chat(g.url) == 200
            sent += 1
        served = _requests_by_pid(str(mp_dir))
        if len([n for n in served.values() if n > 0]) >= 2 and sent >= 20:
            break
    assert len([n for n in served.values() if n > 0]) == 2, served
    assert _chat(g.url, "nope") == 404
    sent += 1
    for _ in range(8):
        assert _scrape_total(g.url) == sent

    # A worker that dies keeps its counts: totals never drop after a restart.
    victim = max(served, key=served.get)
    os.kill(victim, signal.SIGKILL)
    # Wait for the replacement to build its app (its metric files appear then): a worker
    # still booting when the test ends would miss gunicorn's SIGTERM.
    deadline = time.time() + 30
    while time.time() < deadline and not (set(_requests_by_pid(str(mp_dir))) - set(served)):
        time.sleep(0.1)
    assert set(_requests_by_pid(str(mp_dir))) - set(served), "no replacement worker started"
    for _ in range(4):
        assert _scrape_total(g.url) == sent
    assert _chat(g.url) == 200
    assert _scrape_total(g.url) == sent + 1


def test_gunicorn_creates_a_multiprocess_dir_for_several_workers(gunicorn_gateway, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["usage_db"] = ""
    env = {"PROMETHEUS_MULTIPROC_DIR": ""}
    g = gunicorn_gateway(cfg, workers=2, env=env)
    for _ in range(12):
        assert _chat(g.url) == 200
    for _ in range(6):
        assert _scrape_total(g.url) == 12
    m = re.search(r"prometheus multiprocess dir (\S+) \(2 workers\)", g.logs())
    assert m, g.logs()
    assert os.path.isdir(m.group(1))
    g.close()
    assert not os.path.exists(m.group(1)), "the gateway removes the directory it created"
