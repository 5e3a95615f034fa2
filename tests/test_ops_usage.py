"""The SQLite usage log: rows per request, /api/usage summaries, restarts, and a locked or
unwritable file that never fails a request."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT, remote_config
from tests.test_ops_metrics import total

CLIENT_A, CLIENT_B = "client-usage-secret-a", "client-usage-secret-b"
CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


def _cfg(upstream, db):
    cfg = remote_config(upstream)
    cfg["server"].update({"usage_db": str(db), "api_keys": [CLIENT_A, CLIENT_B]})
    cfg["providers"]["oai"]["api_keys"] = ["rl-usage-key-0", "ok-usage-key-1"]
    return cfg


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _flush(app):
    assert app.extensions["gateway_usage"].flush(10)


def _rows(db):
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


def _kid(token):
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def test_every_request_is_a_row_with_hashed_client_key(make_app, fake_upstream, tmp_path):
    db = tmp_path / "sub" / "usage.sqlite3"
    app = make_app(_cfg(fake_upstream, db))
    c = app.test_client()
    assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                  headers=_auth(CLIENT_A)).status_code == 200
    r = c.post("/v1/chat/completions", json={"model": "gem:gemini-2.5-flash", "stream": True, **CHAT},
               headers=_auth(CLIENT_B))
    assert r.status_code == 200 and b"[DONE]" in r.get_data()
    assert c.post("/api/chat", json={"model": "oai:missing", "stream": False, **CHAT},
                  headers=_auth(CLIENT_A)).status_code == 404
    _flush(app)
    rows = _rows(db)
    assert len(rows) == 3
    a, b, err = rows
    assert a["client_key"] == _kid(CLIENT_A) and b["client_key"] == _kid(CLIENT_B)
    assert a["provider"] == "oai" and a["model"] == "oai:echo" and a["status"] == 200
    assert a["key_index"] == 1, "key 0 is rate-limited: key 1 answered"
    assert (a["prompt_tokens"], a["completion_tokens"]) == (7, 4)
    assert a["latency_ms"] > 0 and a["ttft_ms"] is not None and a["stream"] == 0
    assert b["provider"] == "gem" and b["stream"] == 1 and b["route"] == "/v1/chat/completions"
    assert (b["prompt_tokens"], b["completion_tokens"]) == (5, 4)
    assert err["status"] == 404 and err["provider"] == "oai"
    assert abs(a["ts"] - time.time()) < 60
    conn = sqlite3.connect(str(db))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    raw = b"".join(open(p, "rb").read() for p in (str(db), str(db) + "-wal") if os.path.exists(p))
    for secret in (CLIENT_A, CLIENT_B, "ok-usage-key-1", "rl-usage-key-0"):
        assert secret.encode() not in raw


def test_usage_summary_grouping_and_since(make_app, fake_upstream, tmp_path):
    app = make_app(_cfg(fake_upstream, tmp_path / "usage.sqlite3"))
    c = app.test_client()
    before = time.time() - 1
    for key, model in ((CLIENT_A, "oai:echo"), (CLIENT_A, "oai:echo"), (CLIENT_B, "gem:gemini-2.5-flash")):
        assert c.post("/api/chat", json={"model": model, "stream": False, **CHAT},
                      headers=_auth(key)).status_code == 200
    assert c.post("/api/chat", json={"model": "oai:missing", "stream": False, **CHAT},
                  headers=_auth(CLIENT_B)).status_code == 404
    h = _auth(CLIENT_A)
    j = c.get("/api/usage", headers=h).json
    assert j["total"]["requests"] == 4 and j["total"]["errors"] == 1
    assert j["total"]["prompt_tokens"] == 7 + 7 + 5
    assert j["total"]["completion_tokens"] == 12
    assert j["total"]["avg_latency_ms"] > 0 and j["groups"] == []
    by_model = {g["model"]: g for g in c.get("/api/usage?group_by=model", headers=h).json["groups"]}
    assert by_model["oai:echo"]["requests"] == 2 and by_model["oai:echo"]["errors"] == 0
    assert by_model["oai:missing"]["errors"] == 1
    by_prov = {g["provider"]: g for g in c.get("/api/usage?group_by=provider", headers=h).json["groups"]}
    assert by_prov["oai"]["requests"] == 3 and by_prov["gem"]["requests"] == 1
    by_key = {g["key"]: g for g in c.get("/api/usage?group_by=key", headers=h).json["groups"]}
    assert by_key == {_kid(CLIENT_A): by_key[_kid(CLIENT_A)], _kid(CLIENT_B): by_key[_kid(CLIENT_B)]}
    assert by_key[_kid(CLIENT_A)]["requests"] == 2 and by_key[_kid(CLIENT_B)]["errors"] == 1

    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before))
    for since in (str(before), iso, iso.replace("Z", "+00:00"), "2000-01-01"):
        assert c.get(f"/api/usage?since={since}", headers=h).json["total"]["requests"] == 4, since
    future = time.time() + 3600
    for since in (str(int(future)), time.strftime("%Y-%m-%dT%H:%M:%S.5+00:00", time.gmtime(future))):
        j = c.get("/api/usage", query_string={"since": since, "group_by": "model"}, headers=h).json
        assert j["total"]["requests"] == 0 and j["groups"] == [], since
    assert c.get("/api/usage").status_code == 401, "usage is behind the client key"


@pytest.mark.parametrize("query,field", [("since=yesterday", "since"), ("since=2025-13-45T00:00:00Z", "since"),
                                         ("since=nan", "since"), ("group_by=team", "group_by"), ("group_by=model;DROP", "group_by")])
def test_bad_usage_parameters_are_400_naming_the_field(make_app, fake_upstream, tmp_path, query, field):
    app = make_app(_cfg(fake_upstream, tmp_path / "usage.sqlite3"))
    r = app.test_client().get("/api/usage?" + query, headers=_auth(CLIENT_A))
    assert r.status_code == 400
    assert f'"{field}"' in r.json["error"]


def test_a_restart_keeps_the_data(make_app, fake_upstream, tmp_path):
    db = tmp_path / "usage.sqlite3"
    first = make_app(_cfg(fake_upstream, db))
    for _ in range(3):
        assert first.test_client().post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                                        headers=_auth(CLIENT_A)).status_code == 200
    first.extensions["gateway"].close()    # flushes and closes the writer
    assert len(_rows(db)) == 3
    second = make_app(_cfg(fake_upstream, db))
    c = second.test_client()
    assert c.get("/api/usage", headers=_auth(CLIENT_A)).json["total"]["requests"] == 3
    assert c.post("/api/chat", json={"model": "gem:gemini-2.5-flash", "stream": False, **CHAT},
                  headers=_auth(CLIENT_B)).status_code == 200
    j = c.get("/api/usage?group_by=provider", headers=_auth(CLIENT_A)).json
    assert j["total"]["requests"] == 4
    assert {g["provider"]: g["requests"] for g in j["groups"]} == {"oai": 3, "gem": 1}


def test_a_locked_file_never_fails_a_request(make_app, fake_upstream, tmp_path, monkeypatch, caplog):
    from gateway.ops import usage
    monkeypatch.setattr(usage, "BUSY_TIMEOUT", 0.2)
    db = tmp_path / "usage.sqlite3"
    app = make_app(_cfg(fake_upstream, db))
    c = app.test_client()
    assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                  headers=_auth(CLIENT_A)).status_code == 200
    _flush(app)
    assert len(_rows(db)) == 1
    locker = sqlite3.connect(str(db), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.time()
        for _ in range(3):
            r = c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}, headers=_auth(CLIENT_A))
            assert r.status_code == 200
        assert time.time() - t0 < 2, "requests never wait for the usage writer"
        _flush(app)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    metrics = c.get("/metrics", headers=_auth(CLIENT_A)).get_data(as_text=True)
    assert total(metrics, "gateway_usage_write_errors_total") >= 1
    assert any("usage log" in rec.getMessage() and "locked" in rec.getMessage() for rec in caplog.records)
    # The file recovers: the next batch goes through on a fresh connection.
    assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                  headers=_auth(CLIENT_A)).status_code == 200
    _flush(app)
    assert len(_rows(db)) >= 2


@pytest.mark.parametrize("kind", ["parent-is-a-file", "not-a-database", "read-only-fs", "read-only-dir"])
def test_an_unwritable_file_never_fails_a_request(make_app, fake_upstream, tmp_path, kind):
    if kind == "parent-is-a-file":
        (tmp_path / "afile").write_text("x")
        db = tmp_path / "afile" / "usage.sqlite3"
    elif kind == "not-a-database":
        db = tmp_path / "usage.sqlite3"
        db.write_bytes(b"this is not sqlite" * 100)
    elif kind == "read-only-fs":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        db = "/proc/self/usage.sqlite3"     # nobody, root included, creates files there
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through file permissions")
        ro = tmp_path / "ro"
        ro.mkdir()
        db = ro / "usage.sqlite3"
        os.chmod(ro, 0o555)
    app = make_app(_cfg(fake_upstream, db))
    c = app.test_client()
    for stream in (False, True):
        r = c.post("/api/chat", json={"model": "oai:echo", "stream": stream, **CHAT}, headers=_auth(CLIENT_A))
        assert r.status_code == 200 and b"Echo" in r.get_data()
    _flush(app)
    metrics = c.get("/metrics", headers=_auth(CLIENT_A)).get_data(as_text=True)
    assert total(metrics, "gateway_usage_write_errors_total") >= 1


def test_an_empty_usage_db_turns_the_log_off(make_app, fake_upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for off in ("", False, None):
        cfg = _cfg(fake_upstream, "x")
        cfg["server"]["usage_db"] = off
        app = make_app(cfg)
        c = app.test_client()
        assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT},
                      headers=_auth(CLIENT_A)).status_code == 200
        r = c.get("/api/usage", headers=_auth(CLIENT_A))
        assert r.status_code == 404 and "usage_db" in r.json["error"]
    assert not os.path.exists(tmp_path / "data")


def test_usage_db_defaults_to_data_usage_sqlite3(tmp_path):
    from gateway.ops.usage import db_path
    from gateway.settings import build_settings
    assert db_path(build_settings({})) == "data/usage.sqlite3"
    assert db_path(build_settings({"server": {"usage_db": "/var/lib/gw/u.db"}})) == "/var/lib/gw/u.db"


def test_record_never_blocks_and_a_full_queue_drops(tmp_path, monkeypatch):
    from gateway.ops.usage import UsageLog
    dropped = []
    log = UsageLog(str(tmp_path / "u.sqlite3"), on_drop=lambda: dropped.append(1), max_queue=5)
    slow = log._write

    def write(rows):
        time.sleep(0.3)
        slow(rows)
    monkeypatch.setattr(log, "_write", write)
    t0 = time.perf_counter()
    for _ in range(50):
        log.record({"route": "/api/chat", "model": "m", "status": 200, "latency": 0.1})
    assert time.perf_counter() - t0 < 0.1
    assert dropped, "rows beyond the queue's room are dropped, not waited for"
    assert log.flush(10)
    log.close()
    assert len(_rows(tmp_path / "u.sqlite3")) == 50 - len(dropped)


GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys, time
    sys.path.insert(0, {root!r})
    import gevent
    from gateway.ops.usage import UsageLog
    real_sleep = monkey.get_original("time", "sleep")
    log = UsageLog({db!r})
    slow = log._write
    def write(rows):            # runs on a native pool thread: a blocking sleep is fine
        real_sleep(0.5)
        slow(rows)
    log._write = write
    ticks = []
    def ticker():
        while len(ticks) < 40:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)
    t = gevent.spawn(ticker)
    for i in range(20):
        log.record({{"route": "/api/chat", "model": "m", "status": 200}})
    t.join()
    assert log.flush(10)
    log.close()
    gaps = max(b - a for a, b in zip(ticks, ticks[1:]))
    print("MAXGAP", gaps)
    import sqlite3
    print("ROWS", sqlite3.connect({db!r}).execute("select count(*) from usage").fetchone()[0])
""")


def test_under_gevent_the_writer_never_blocks_the_event_loop(tmp_path):
    db = str(tmp_path / "u.sqlite3")
    out = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT.format(root=ROOT, db=db)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    vals = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("MAXGAP", "ROWS")))
    assert int(vals["ROWS"]) == 20
    assert float(vals["MAXGAP"]) < 0.25, "a greenlet waited on SQLite"
