"""Config loading, config errors at start, listen-address precedence, client auth."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from unittest import mock

import pytest

from app import listen_address
from gateway.settings import ConfigError, build_settings, load_settings
from tests.conftest import ROOT, free_port, remote_config, wait_http


def test_shipped_config_loads_and_expands_keys():
    s = load_settings(os.path.join(ROOT, "config", "gateway.yaml"),
                      env={"GOOGLE_API_KEYS": "g1, g2", "OPENROUTER_API_KEYS": ""})
    assert s.providers["google"]["api_keys"] == ["g1", "g2"]
    assert s.providers["openrouter"]["api_keys"] == []
    assert s.providers["local"]["type"] == "local"
    assert s.aliases["fast"][0] == "google:gemini-2.5-flash"
    assert (s.host, s.port) == ("127.0.0.1", 11434)


@pytest.mark.parametrize("cfg,path", [
    ({"providers": {"google": {"type": "gemini", "base_url": "https://x", "api_keys": 5}}}, "providers.google.api_keys"),
    ({"providers": {"g": {"type": "nope"}}}, "providers.g.type"),
    ({"providers": {"g": {"type": "openai", "base_url": "ftp://x"}}}, "providers.g.base_url"),
    ({"providers": {"g": {"type": "openai", "base_url": "http://x", "timeout": "soon"}}}, "providers.g.timeout"),
    ({"providers": {"l": {"type": "local", "models": {"m": {}}}}}, "providers.l.models.m"),
    ({"providers": {"l": {"type": "local", "memory_budget": "lots"}}}, "providers.l.memory_budget"),
    ({"providers": {"l": {"type": "local", "keep_alive": "forever"}}}, "providers.l.keep_alive"),
    ({"server": {"port": 99999}}, "server.port"),
    ({"providers": {}, "aliases": {"fast": ["nowhere:x"]}}, "aliases.fast"),
    ({"server": []}, "server"),
])
def test_config_errors_name_the_key_path(cfg, path):
    with pytest.raises(ConfigError) as e:
        build_settings(cfg, "my.yaml", env={})
    assert e.value.path == path
    assert "my.yaml" in str(e.value) and path in str(e.value)


def test_api_keys_accept_list_or_comma_string():
    s = build_settings({"providers": {"a": {"type": "openai", "base_url": "http://x", "api_keys": "k1,k2 , k3"},
                                      "b": {"type": "openai", "base_url": "http://x", "api_keys": ["k4", "k5"]}}},
                       env={})
    assert s.providers["a"]["api_keys"] == ["k1", "k2", "k3"]
    assert s.providers["b"]["api_keys"] == ["k4", "k5"]


def test_listen_precedence():
    s = build_settings({"server": {"host": "10.0.0.1", "port": 1234}}, env={})

    class A:
        host = None
        port = None
        bind = None
    assert listen_address(A, s, env={}) == ("10.0.0.1", 1234)
    assert listen_address(A, s, env={"PORT": "7"}) == ("10.0.0.1", 7)
    assert listen_address(A, s, env={"GATEWAY_PORT": "8", "PORT": "7", "GATEWAY_HOST": "0.0.0.0"}) == ("0.0.0.0", 8)
    a = A()
    a.port, a.host = 9, "127.0.0.2"
    assert listen_address(a, s, env={"GATEWAY_PORT": "8"}) == ("127.0.0.2", 9)
    assert listen_address(A, build_settings({}, env={}), env={}) == ("127.0.0.1", 11434)
    assert listen_address(A, s, env={"GATEWAY_BIND": "[::1]:5", "GATEWAY_HOST": "0.0.0.0"}) == ("::1", 5)
    b = A()
    b.bind = "127.0.0.3:6"
    assert listen_address(b, s, env={"GATEWAY_BIND": "0.0.0.0:5"}) == ("127.0.0.3", 6)
    with pytest.raises(SystemExit, match="HOST:PORT only.*run gunicorn"):
        listen_address(A, s, env={"GATEWAY_BIND": "unix:/run/gw.sock"})


def test_gunicorn_and_the_host_guard_share_the_listen_precedence(monkeypatch):
    """gunicorn.conf.py's bind and wsgi.py's idea of the bound host come from the same
    place as the development server's: flags aside, the same answer."""
    import runpy
    from gateway.listen import listen_bind
    s = build_settings({"server": {"host": "10.0.0.1", "port": 1234}}, env={})
    assert listen_bind(s, env={}) == "10.0.0.1:1234"
    assert listen_bind(s, env={"GATEWAY_HOST": "::", "PORT": "7"}) == "[::]:7"
    assert listen_bind(s, env={"GATEWAY_BIND": "unix:/run/gw.sock", "GATEWAY_HOST": "0.0.0.0"}) == "unix:/run/gw.sock"
    monkeypatch.setenv("GATEWAY_CONFIG", os.path.join(ROOT, "config", "gateway.yaml"))
    monkeypatch.setenv("GATEWAY_HOST", "0.0.0.0")
    monkeypatch.setenv("GATEWAY_PORT", "8123")
    monkeypatch.delenv("GATEWAY_BIND", raising=False)
    assert runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))["bind"] == "0.0.0.0:8123"


def test_bad_config_stops_start_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  google:\n    type: gemini\n    base_url: https://x\n    api_keys: {a: 1}\n")
    for cmd in ([sys.executable, "app.py", "--config", str(bad)],
                [os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]):
        t = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "GATEWAY_CONFIG": str(bad), "HOME": str(tmp_path)})
        assert p.returncode != 0
        assert time.time() - t < 30
        line = [x for x in p.stderr.splitlines() if "config error" in x]
        assert line and str(bad) in line[0] and "providers.google.api_keys" in line[0], p.stderr


def test_dev_server_serves(tmp_path, fake_upstream):
    from tests.conftest import write_config
    path = write_config(remote_config(fake_upstream), str(tmp_path))
    port = free_port()
    p = subprocess.Popen([sys.executable, "app.py", "--config", path, "--port", str(port)], cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc=p)
        import requests
        r = requests.post(f"http://127.0.0.1:{port}/api/chat", json={
            "model": "oai:echo", "stream": False, "messages": [{"role": "user", "content": "dev"}]})
        assert r.json()["message"]["content"] == "Echo: dev"
    finally:
        p.terminate()
        p.wait(10)


def test_client_auth(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["api_keys"] = ["sekret-client-key"]
    c = make_app(cfg).test_client()
    assert c.get("/").status_code == 200
    assert c.head("/").status_code == 200
    assert c.get("/api/version").status_code == 200
    assert c.options("/api/chat", headers={"Origin": "http://localhost:3000"}).status_code == 204
    r = c.get("/api/tags")
    assert r.status_code == 401 and "API key" in r.json["error"]
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.json["error"]["type"] == "authentication_error"
    assert c.get("/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/tags", headers={"Authorization": "Bearer sekret-client-key"}).status_code == 200
    r = c.post("/api/chat", headers={"Authorization": "Bearer sekret-client-key"},
               json={"model": "oai:echo", "stream": False, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200


def test_host_header_allowlist_on_loopback(make_app, fake_upstream):
    c = make_app(remote_config(fake_upstream)).test_client()
    assert c.get("/api/tags", headers={"Host": "localhost:11434"}).status_code == 200
    assert c.get("/api/tags", headers={"Host": "127.0.0.1:11434"}).status_code == 200
    r = c.get("/api/tags", headers={"Host": "attacker.example.com"})
    assert r.status_code == 403 and "not allowed" in r.json["error"]


def test_auth_exemptions_are_exactly_the_contracts(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["api_keys"] = "k-one,k-two"
    c = make_app(cfg).test_client()
    assert c.get("/health").status_code == 200
    assert c.head("/api/version").status_code == 200
    assert c.post("/api/version").status_code in (401, 405)
    for path in ("/api/ps", "/health/ready", "/metrics", "/v1/models/oai:echo"):
        assert c.get(path).status_code == 401, path
    assert c.get("/api/ps", headers={"Authorization": "Bearer k-two"}).status_code == 200


def test_host_guard_follows_the_bound_address_under_gunicorn(gunicorn_gateway, fake_upstream):
    """GATEWAY_BIND on all interfaces (Docker): no DNS-rebinding Host check, as Ollama with
    OLLAMA_HOST=0.0.0.0; on loopback a foreign Host is refused."""
    import requests
    g = gunicorn_gateway(remote_config(fake_upstream), bind_host="0.0.0.0")
    r = requests.get(g.url + "/api/tags", headers={"Host": "gateway.example.com"}, timeout=5)
    assert r.status_code == 200
    g2 = gunicorn_gateway(remote_config(fake_upstream))
    r = requests.get(g2.url + "/api/tags", headers={"Host": "evil.example.com"}, timeout=5)
    assert r.status_code == 403 and "evil.example.com" in r.json()["error"]


def test_literal_keys_in_the_file_are_warned_about_and_env_keys_are_not(caplog):
    from gateway.settings import build_settings
    raw = {"server": {"api_keys": "${GW_TEST_CLIENT_KEYS}"},
           "providers": {"a": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_keys": "${GW_TEST_A}"},
                         "b": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_keys": ["sk-literal-123"]}}}
    with caplog.at_level("WARNING", logger="gateway.settings"):
        s = build_settings(raw, "x.yaml", env={"GW_TEST_A": "sk-env-1,sk-env-2", "GW_TEST_CLIENT_KEYS": "c1"})
    assert s.providers["a"]["api_keys"] == ["sk-env-1", "sk-env-2"] and s.api_keys == ["c1"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "providers.b.api_keys" in warned[0] and "sk-literal-123" not in warned[0]


@pytest.mark.parametrize("with_local,expected", [(True, 1), (False, None)])
def test_default_worker_count_follows_the_provider_types(tmp_path, fake_upstream, with_local, expected):
    """One worker when local models are configured (each worker would load its own
    copies), one per core when every provider is remote; GATEWAY_WORKERS overrides."""
    import runpy
    from tests.conftest import write_config
    cfg = remote_config(fake_upstream)
    if with_local:
        cfg["providers"]["local"] = {"type": "local", "models": {"m": {"path": "/nowhere.gguf"}}}
    path = write_config(cfg, str(tmp_path))
    conf = os.path.join(ROOT, "gunicorn.conf.py")
    env = {"GATEWAY_CONFIG": path, "GATEWAY_WORKERS": ""}
    with mock.patch.dict(os.environ, env):
        assert runpy.run_path(conf)["workers"] == (expected or os.cpu_count())
    with mock.patch.dict(os.environ, dict(env, GATEWAY_WORKERS="3")):
        assert runpy.run_path(conf)["workers"] == 3
