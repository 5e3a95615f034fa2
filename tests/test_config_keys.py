"""Unknown config keys stop the start (naming the nearest declared key), each section's keys
declared by its owner, unsupported value forms refused, --check-config, and the context
length remote models report."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from gateway.settings import KNOWN_TYPES, ConfigError, build_settings, load_settings
from tests.conftest import ROOT, remote_config, write_config

OAI = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "models": ["m"]}
GEM = {"type": "gemini", "base_url": "http://127.0.0.1:9/v1beta", "models": ["gemini-2.5-flash"]}
LOCAL_MODEL = {"path": "/nowhere.gguf"}


def _with(section: dict, **extra) -> dict:
    return {**section, **extra}


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        build_settings(cfg, "x.yaml", env={})
    return str(e.value)


@pytest.mark.parametrize("cfg,path,nearest", [
    ({"sever": {}}, "sever", "server"),
    ({"alias": {}}, "alias", "aliases"),
    ({"server": {"max_body": 5}}, "server.max_body", "max_body_mb"),
    ({"server": {"api_key": ["secret-1"]}}, "server.api_key", "api_keys"),
    ({"server": {"cors_origin": ["https://app.example"]}}, "server.cors_origin", "cors_origins"),
    ({"server": {"allowed_host": ["gw.example"]}}, "server.allowed_host", "allowed_hosts"),
    ({"server": {"clients": [{"key": "ck-1", "rmp": 5}]}}, "server.clients[0].rmp", "rpm"),
    ({"providers": {"up": _with(OAI, modles=["m"])}}, "providers.up.modles", "models"),
    ({"providers": {"up": _with(OAI, api_key="k")}}, "providers.up.api_key", "api_keys"),
    ({"providers": {"up": _with(OAI, models=[{"id": "m", "context_lenght": 8}])}},
     "providers.up.models[0].context_lenght", "context_length"),
    ({"providers": {"g": _with(GEM, base_ur="https://x")}}, "providers.g.base_ur", "base_url"),
    ({"providers": {"g": _with(GEM, idle_timout=5)}}, "providers.g.idle_timout", "idle_timeout"),
    ({"providers": {"l": {"type": "local", "max_loaded_model": 2}}}, "providers.l.max_loaded_model",
     "max_loaded_models"),
    ({"providers": {"l": {"type": "local", "models": {"m": _with(LOCAL_MODEL, n_cxt=512)}}}},
     "providers.l.models.m.n_cxt", "n_ctx"),
    ({"providers": {"l": {"type": "local", "models": {"m": {"pth": "/x.gguf"}}}}},
     "providers.l.models.m.pth", "path"),
    ({"providers": {"l": {"type": "local", "models": {"m": _with(LOCAL_MODEL, options={"temprature": 0})}}}},
     "providers.l.models.m.options.temprature", "temperature"),
])
def test_a_misspelt_key_stops_the_start_naming_the_nearest_known_key(cfg, path, nearest):
    assert _error(cfg) == f"config error in x.yaml: {path}: unknown key; did you mean `{nearest}`?"


def test_a_key_of_one_type_is_unknown_to_another():
    """`timeout` belongs to the remote types; a local provider has no upstream to wait for."""
    msg = _error({"providers": {"l": {"type": "local", "timeout": 5}}})
    assert msg.startswith("config error in x.yaml: providers.l.timeout: unknown key")


def test_an_unknown_key_with_nothing_close_lists_the_known_ones():
    msg = _error({"server": {"zzzzqqq": 1}})
    assert "server.zzzzqqq: unknown key" in msg and "did you mean" not in msg
    assert "api_keys" in msg and "\n" not in msg


def test_a_misspelt_type_suggests_a_registered_one():
    msg = _error({"providers": {"g": _with(GEM, type="gemeni")}})
    assert "providers.g.type: must be one of" in msg and "did you mean `gemini`?" in msg


def test_an_alias_is_a_name_or_a_list_of_names_never_a_mapping():
    base = {"providers": {"up": OAI}}
    assert build_settings({**base, "aliases": {"a": "up:m"}}, env={}).aliases["a"] == ["up:m"]
    assert build_settings({**base, "aliases": {"a": ["up:m"]}}, env={}).aliases["a"] == ["up:m"]
    msg = _error({**base, "aliases": {"a": {"targets": ["up:m"]}}})
    assert "aliases.a: must be a <provider>:<model> name or a non-empty list" in msg


def test_the_agreed_future_keys_are_declared_and_checked():
    from gateway.errors import scrub
    s = build_settings({
        "server": {"client_header_timeout": 5, "client_body_timeout": 7.5, "keepalive_timeout": 0,
                   "redis": "redis://127.0.0.1:6379/0",
                   "clients": [{"name": "team-a", "key": "ck-team-a-secret", "models": ["up:m"], "rpm": 60,
                                "tpm": 10000, "max_parallel": 2, "tokens_per_day": 100000}]},
        "providers": {"up": OAI, "l": {"type": "local", "num_parallel": 2,
                                       "models": {"m": _with(LOCAL_MODEL, num_parallel=4)}}}}, env={})
    assert (s.client_header_timeout, s.client_body_timeout, s.keepalive_timeout) == (5, 7.5, 0)
    assert s.redis == "redis://127.0.0.1:6379/0"
    assert s.clients[0]["name"] == "team-a" and s.clients[0]["rpm"] == 60
    assert "ck-team-a-secret" not in scrub("key ck-team-a-secret leaked")
    assert s.providers["l"]["num_parallel"] == 2 and s.providers["l"]["models"]["m"]["num_parallel"] == 4
    d = build_settings({}, env={})
    assert (d.client_header_timeout, d.client_body_timeout, d.keepalive_timeout) == (60, 60, 75)
    assert d.redis is None and d.clients == []


@pytest.mark.parametrize("cfg,path", [
    ({"server": {"client_header_timeout": -1}}, "server.client_header_timeout"),
    ({"server": {"keepalive_timeout": "long"}}, "server.keepalive_timeout"),
    ({"server": {"redis": "http://cache:6379"}}, "server.redis"),
    ({"server": {"clients": {"key": "x"}}}, "server.clients"),
    ({"server": {"clients": [{"name": "no key"}]}}, "server.clients[0].key"),
    ({"server": {"clients": [{"key": "k", "rpm": -1}]}}, "server.clients[0].rpm"),
    ({"providers": {"l": {"type": "local", "num_parallel": 0}}}, "providers.l.num_parallel"),
    ({"providers": {"l": {"type": "local", "models": {"m": _with(LOCAL_MODEL, num_parallel="2")}}}},
     "providers.l.models.m.num_parallel"),
    ({"providers": {"up": _with(OAI, context_length=0)}}, "providers.up.context_length"),
    ({"providers": {"up": _with(OAI, models=[{"context_length": 8}])}}, "providers.up.models[0].id"),
    ({"providers": {"up": _with(OAI, models=[["m"]])}}, "providers.up.models[0]"),
])
def test_declared_keys_with_bad_values_name_the_key(cfg, path):
    with pytest.raises(ConfigError) as e:
        build_settings(cfg, "x.yaml", env={})
    assert e.value.path == path, str(e.value)


def test_a_database_url_this_build_cannot_use_is_refused_and_creates_nothing(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("server:\n  usage_db: mysql://gw@db/usage\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "--config", str(cfg)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert p.returncode != 0
    assert (f"config error in {cfg}: server.usage_db: mysql:// is not supported by this build "
            "(supported: a SQLite file path, sqlite:///path, postgresql://user:pass@host/db, "
            "postgres://user:pass@host/db)") in p.stderr
    assert os.listdir(tmp_path) == ["gw.yaml"], "nothing may be created for a refused database URL"


def test_sqlite_urls_name_the_file_sqlalchemy_style():
    from gateway.ops.usage import db_path
    rel = build_settings({"server": {"usage_db": "sqlite:///data/u.sqlite3"}}, env={})
    absolute = build_settings({"server": {"usage_db": "sqlite:////var/lib/gw/u.sqlite3"}}, env={})
    plain = build_settings({"server": {"usage_db": "/srv/u.sqlite3"}}, env={})
    off = build_settings({"server": {"usage_db": ""}}, env={})
    assert [db_path(s) for s in (rel, absolute, plain, off)] == [
        "data/u.sqlite3", "/var/lib/gw/u.sqlite3", "/srv/u.sqlite3", None]
    for bad in ("sqlite://", "sqlite:///", "sqlite://host/u.db"):
        assert "sqlite:///relative/path or sqlite:////absolute/path" in _error({"server": {"usage_db": bad}})


def test_check_config_validates_without_starting(tmp_path):
    good = write_config(remote_config("http://127.0.0.1:9"), str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  api_key: [secret-1]\n")
    app = os.path.join(ROOT, "app.py")
    ok = subprocess.run([sys.executable, app, "--check-config", "--config", good], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"config OK: {good}"), ok.stderr
    no = subprocess.run([sys.executable, app, "--check-config", "--config", str(bad)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert no.returncode == 1 and no.stdout == ""
    assert no.stderr.strip() == f"config error in {bad}: server.api_key: unknown key; did you mean `api_keys`?"


def test_gunicorn_master_refuses_a_misspelt_security_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  cors_origin: ['https://evil.example']\n")
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c", "gunicorn.conf.py",
                        "wsgi:app"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GATEWAY_CONFIG": str(bad), "HOME": str(tmp_path)})
    assert p.returncode != 0
    assert "server.cors_origin: unknown key; did you mean `cors_origins`?" in p.stderr


def test_the_shipped_config_and_every_readme_example_load():
    load_settings(os.path.join(ROOT, "config", "gateway.yaml"), env={})
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"^```yaml\n(.*?)^```", fh.read(), re.S | re.M)
    assert len(blocks) >= 2
    for text in blocks:   # ${VAR}s set, as a deployment would
        env = {v: f"example-{v.lower()}" for v in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)}
        build_settings(yaml.safe_load(text), "README.md", env=env)


def test_every_declared_key_is_documented_in_the_readme():
    from gateway.settings import CLIENT_KEYS, SERVER_KEYS
    from providers import config_class
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    keys = set(SERVER_KEYS) | set(CLIENT_KEYS)
    for t in KNOWN_TYPES:
        cls = config_class(t)
        keys |= set(cls.config_keys) | set(getattr(cls, "model_keys", ()))
    spans = re.findall(r"`([^`\n]+)`", readme)

    def documented(k):
        return any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", span) for span in spans)
    assert sorted(k for k in keys if not documented(k)) == []


def test_types_come_from_the_registry_and_serving_classes_share_their_config_check():
    from providers import TYPES, config_class, provider_class
    assert KNOWN_TYPES == tuple(TYPES)
    for t in TYPES:
        assert issubclass(provider_class(t), config_class(t))
        assert provider_class(t).check_config.__func__ is config_class(t).check_config.__func__


def test_the_config_check_imports_neither_llama_cpp_nor_the_http_stack():
    code = ("import sys; from gateway.settings import load_settings; "
            "load_settings('config/gateway.yaml', env={}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'requests', 'flask') "
            "or m in ('providers.local.engine', 'providers.local.provider', 'providers.remote')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# ---- context length of remote models ----------------------------------------------------------

def test_remote_models_report_a_context_length_in_show_and_tags(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["models"] = ["echo", {"id": "long", "context_length": 200000}, "meta/llama:free"]
    cfg["providers"]["gem"]["context_length"] = 500000
    cfg["providers"]["gem"]["models"] = ["gemini-2.5-flash", {"id": "gemini-2.5-pro", "context_length": 2000000},
                                         "text-embedding-004"]
    c = make_app(cfg).test_client()

    def show(name):
        r = c.post("/api/show", json={"model": name})
        assert r.status_code == 200, r.json
        return r.json

    assert show("oai:echo")["model_info"]["oai.context_length"] == 32768          # the default
    assert show("oai:long")["model_info"]["oai.context_length"] == 200000         # per model
    meta = show("oai:meta/llama:free")
    assert meta["model_info"] == {"general.architecture": "meta", "meta.context_length": 32768}
    assert "num_ctx" in meta["parameters"] and "32768" in meta["parameters"]
    assert show("oai:unlisted-model")["model_info"]["oai.context_length"] == 32768
    assert show("gem:gemini-2.5-flash")["model_info"]["gemini.context_length"] == 500000   # per provider
    assert show("gem:gemini-2.5-pro")["model_info"]["gemini.context_length"] == 2000000
    tags = {m["name"]: m for m in c.get("/api/tags").json["models"]}
    assert tags["oai:long"]["details"]["context_length"] == 200000
    assert tags["oai:echo"]["details"]["context_length"] == 32768
    assert tags["gem:gemini-2.5-flash"]["details"]["context_length"] == 500000


def test_gemini_models_default_to_their_input_limit_and_embeddings_to_none(make_app, fake_upstream):
    c = make_app(remote_config(fake_upstream)).test_client()
    r = c.post("/api/show", json={"model": "gem:gemini-2.5-flash"}).json
    assert r["model_info"]["gemini.context_length"] == 1048576
    tags = {m["name"]: m for m in c.get("/api/tags").json["models"]}
    assert tags["gem:gemini-2.5-flash"]["details"]["context_length"] == 1048576
    assert "context_length" not in tags["gem:text-embedding-004"]["details"]
    emb = c.post("/api/show", json={"model": "gem:text-embedding-004"}).json
    assert not any("context_length" in k for k in emb["model_info"])
