"""The usage log in PostgreSQL: the same rows and /api/usage answers as SQLite, and a
database that is unreachable or goes away mid-run: no request fails, rows wait in the
on-disk spool and are all written once it is back."""
from __future__ import annotations

import json
import time
import urllib.parse

import psycopg
import pytest
import requests

from tests.conftest import Gunicorn, remote_config
from tests.services import RUN, TcpProxy
from tests.test_ops_metrics import total

ALICE, ADMIN = f"alice-pg-{RUN}", f"admin-pg-{RUN}"
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


def _cfg(upstream, usage_db):
    cfg = remote_config(upstream)
    cfg["server"].update({"usage_db": usage_db, "api_keys": [ADMIN],
                          "clients": [{"name": "alice", "key": ALICE}]})
    cfg["providers"]["oai"]["api_keys"] = [f"ok-pg-{RUN}"]
    return cfg


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _with_table(url, table_schema):
    """A URL whose search_path is a fresh schema of its own (one per test)."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{table_schema}"')
    conn.close()
    u = urllib.parse.urlsplit(url)
    q = urllib.parse.urlencode({"options": f"-csearch_path={table_schema}"})
    return urllib.parse.urlunsplit((u.scheme, u.netloc, u.path, q, ""))


def _count(url):
    with psycopg.connect(url) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0


def _traffic(c):
    for key, model, path, stream in [(ALICE, "oai:echo", "/api/chat", False),
                                     (ALICE, "gem:gemini-2.5-flash", "/v1/chat/completions", True),
                                     (ADMIN, "oai:echo", "/api/generate", False),
                                     (ADMIN, "oai:missing", "/api/chat", False),
                                     (ALICE, "fast", "/api/chat", True)]:
        body = {"model": model, "stream": stream, **CHAT}
        if path == "/api/generate":
            body = {"model": model, "stream": stream, "prompt": "one two three"}
        r = c.post(path, json=body, headers=_auth(key))
        r.get_data()
        assert r.status_code in (200, 404)


def _comparable(answer):
    def strip(d):
        return {k: v for k, v in d.items() if not k.startswith("avg_")}
    groups = sorted((strip(g) for g in answer["groups"]), key=lambda g: str(sorted(g.items())))
    return strip(answer["total"]), groups


def test_same_rows_and_answers_as_sqlite(make_app, fake_upstream, tmp_path, postgres_service, monkeypatch):
    monkeypatch.setattr("gateway.ops.usage.MAX_GROUPS", 2)   # so the "other" group shows too
    url = _with_table(postgres_service[0].split("?")[0], f"gwtest_{RUN}_same")
    pg = make_app(_cfg(fake_upstream, url)).test_client()
    lite = make_app(_cfg(fake_upstream, str(tmp_path / "usage.sqlite3"))).test_client()
    since = time.time() - 1
    for c in (pg, lite):
        _traffic(c)
    for q in ("", "?group_by=model", "?group_by=provider", "?group_by=client", "?group_by=key",
              f"?since={since}&group_by=model", f"?since={time.time() + 60}"):
        a, b = pg.get("/api/usage" + q, headers=_auth(ADMIN)), lite.get("/api/usage" + q, headers=_auth(ADMIN))
        assert a.status_code == b.status_code == 200
        assert _comparable(a.json) == _comparable(b.json), q
    assert pg.get("/api/usage?group_by=model", headers=_auth(ADMIN)).json["groups"][-1]["model"] == "other"
    j = pg.get("/api/usage?group_by=client", headers=_auth(ADMIN)).json
    assert {g["client"] for g in j["groups"]} >= {"alice"} and j["total"]["requests"] == 5
    with psycopg.connect(url) as conn:
        idx = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'usage' "
                                          "AND schemaname = current_schema()")}
        row = conn.execute("SELECT client_key, route, provider, model, status, stream, prompt_tokens, "
                           "completion_tokens FROM usage ORDER BY id LIMIT 1").fetchone()
    assert {"usage_ts", "usage_ts_model"} <= idx
    assert row == ("alice", "/api/chat", "oai", "oai:echo", 200, 0, 7, 4)


def test_database_unreachable_then_back_loses_no_row(fake_upstream, postgres_service, tmp_path):
    real = urllib.parse.urlsplit(postgres_service[0])
    proxy = TcpProxy(real.hostname, real.port or 5432)
    direct = _with_table(postgres_service[0].split("?")[0], f"gwtest_{RUN}_outage")
    via_proxy = direct.replace(f"{real.hostname}:{real.port or 5432}", f"127.0.0.1:{proxy.port}")
    g = None
    http = requests.Session()
    try:
        g = Gunicorn(_cfg(fake_upstream, via_proxy), workers=2,
                     env={"GATEWAY_USAGE_SPOOL_DIR": str(tmp_path / "spool"), "GATEWAY_GRACEFUL_TIMEOUT": "2"})

        def send(n):
            for i in range(n):
                r = http.post(g.url + "/api/chat", json={"model": "oai:echo", "stream": i % 2 == 0, **CHAT},
                                  headers=_auth(ALICE), timeout=10)
                assert r.status_code == 200 and b'"done":true' in r.content

        def wait_rows(n, timeout=20):
            deadline = time.time() + timeout
            while _count(direct) < n and time.time() < deadline:
                time.sleep(0.2)
            return _count(direct)

        send(4)
        assert wait_rows(4) == 4
        proxy.cut()
        t0 = time.monotonic()
        send(12)
        assert time.monotonic() - t0 < 10, "requests never wait on the database"
        with http.get(g.url + "/api/usage", headers=_auth(ADMIN), timeout=15) as r:
            assert r.status_code == 503 and "unreachable" in r.json()["error"]
        spooled = 0
        for _ in range(2):   # the answering worker's spool; both together hold all 12
            text = http.get(g.url + "/metrics", headers=_auth(ADMIN), timeout=10).text
            spooled = max(spooled, total(text, "gateway_usage_spool_rows"))
        assert spooled > 0
        assert _count(direct) == 4
        proxy.restore()
        # 4 + 12 answers, and the 503 of /api/usage (every request is a row, refusals too)
        assert wait_rows(17) == 17, "every spooled row is written once the database is back"
        send(2)
        assert wait_rows(19) == 19
        time.sleep(0.5)
        assert _count(direct) == 19, "no row written twice"
        j = http.get(g.url + "/api/usage?group_by=client", headers=_auth(ADMIN), timeout=10).json()
        alice, admin = sorted(j["groups"], key=lambda grp: grp["client"] != "alice")
        assert (alice["client"], alice["requests"], alice["errors"]) == ("alice", 18, 0)
        assert (admin["requests"], admin["errors"]) == (1, 1), "the admin's refused /api/usage"
    finally:
        http.close()
        if g is not None:
            g.close()
        proxy.close()


def test_a_spool_left_by_a_stopped_gateway_is_written_by_the_next(make_app, fake_upstream, postgres_service,
                                                                  tmp_path, monkeypatch):
    direct = _with_table(postgres_service[0].split("?")[0], f"gwtest_{RUN}_restart")
    closed = direct.replace(urllib.parse.urlsplit(direct).netloc, "127.0.0.1:9")   # nothing listens
    monkeypatch.setenv("GATEWAY_USAGE_SPOOL_DIR", str(tmp_path / "spool"))
    first = make_app(_cfg(fake_upstream, closed))
    c = first.test_client()
    for _ in range(3):
        assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                      headers=_auth(ALICE)).status_code == 200
    usage = first.extensions["gateway_usage"]
    assert usage.flush(10) and usage.spool_rows() == 3
    first.extensions["gateway"].close()
    second = make_app(_cfg(fake_upstream, direct))
    deadline = time.time() + 15
    while _count(direct) < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert _count(direct) == 3
    assert second.extensions["gateway_usage"].spool_rows() == 0


@pytest.mark.parametrize("value", ["mysql://x/y", "redis://127.0.0.1/0"])
def test_usage_db_urls_of_other_databases_are_not_files(value, fake_upstream, make_app):
    """A URL that is not PostgreSQL's would become an odd SQLite file name: refused."""
    from gateway.settings import ConfigError, build_settings
    with pytest.raises(ConfigError) as e:
        build_settings(_cfg(fake_upstream, value), "x.yaml", env={})
    assert e.value.path == "server.usage_db"


def test_the_spool_is_bounded_and_counts_what_it_drops(tmp_path):
    from gateway.ops.usage_pg import PgUsageLog

    class Count:
        n = 0

        def inc(self, k=1):
            self.n += k
    dropped = Count()
    usage = PgUsageLog("postgresql://127.0.0.1:9/test", on_spool_drop=dropped, spool_dir=str(tmp_path),
                       max_spool_rows=3)
    try:
        for i in range(5):
            usage.record({"route": "/api/chat", "model": "m", "status": 200})
        assert usage.flush(10)
        assert usage.spool_rows() == 3 and dropped.n == 2 and usage.spool_dropped == 2
        assert sum(1 for _ in open(usage.spool.path)) == 3
    finally:
        usage.close()


def test_rows_postgresql_would_refuse_are_cleaned_not_stuck(make_app, fake_upstream, postgres_service):
    """A model name with NUL or a lone surrogate (SQLite keeps both) still makes a row."""
    direct = _with_table(postgres_service[0].split("?")[0], f"gwtest_{RUN}_text")
    app = make_app(_cfg(fake_upstream, direct))
    c = app.test_client()
    for model in ("oai:a\x00b", "oai:\ud800x", "oai:echo"):
        r = c.post("/api/chat", data=json.dumps({"model": model, "stream": False, **CHAT}),
                   headers=_auth(ALICE))
        assert r.status_code in (200, 400, 404)
    assert app.extensions["gateway_usage"].flush(10)
    with psycopg.connect(direct) as conn:
        models = [m for (m,) in conn.execute("SELECT model FROM usage ORDER BY id")]
    assert models[-1] == "oai:echo" and app.extensions["gateway_usage"].spool_rows() == 0
    assert len(models) == 3, "one row per request: the refused one too, without a model"
    assert all("\x00" not in m for m in models if m is not None)
