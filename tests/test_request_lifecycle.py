"""One record per request, closed once its response has been written, whatever happened in
between: refused, answered whole, streamed, failed before or during the stream, or left
by the client. Each reaches every observer (access log, metrics, usage log) exactly once."""
from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from tests.conftest import remote_config
from tests.test_ops_logs import _capture
from tests.test_ops_metrics import total

CHAT = {"messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
def app(make_app, fake_upstream, tmp_path):
    cfg = remote_config(fake_upstream, server={"usage_db": str(tmp_path / "usage.sqlite3")})
    cfg["providers"]["cut"] = {"type": "openai", "base_url": fake_upstream + "/v1", "api_keys": ["cut-1"],
                               "models": ["chunks-8-0"], "timeout": 5}
    app = make_app(cfg)
    app.records = []
    app.extensions["gateway"].observers.append(app.records.append)
    return app


def _usage_rows(app, tmp_path):
    assert app.extensions["gateway_usage"].flush(10)
    conn = sqlite3.connect(str(tmp_path / "usage.sqlite3"))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        conn.close()


def test_a_400_for_bad_json_reaches_access_log_metrics_and_usage(app, tmp_path):
    c = app.test_client()
    buf, h = _capture()
    try:
        r = c.post("/api/chat", data=b"{not json", content_type="application/json")
    finally:
        logging.getLogger("gateway.access").removeHandler(h)
    assert r.status_code == 400
    (line,) = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert line["route"] == "/api/chat" and line["status"] == 400 and line["error_class"] == "BadRequest"
    assert line["error"] and line["latency_ms"] is not None
    metrics = c.get("/metrics").get_data(as_text=True)
    assert total(metrics, "gateway_requests_total", route="/api/chat", status="400") == 1
    (row,) = _usage_rows(app, tmp_path)
    assert row["route"] == "/api/chat" and row["status"] == 400 and row["model"] is None


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_is_one_record(app, stream):
    r = app.test_client().post("/api/chat", json={"model": "oai:echo", "stream": stream, **CHAT})
    assert r.status_code == 200 and r.get_data()
    (rec,) = app.records
    assert rec["status"] == 200 and rec["provider"] == "oai" and rec["stream"] is stream
    assert rec["completion_tokens"] and rec["key_index"] is not None


@pytest.mark.parametrize("path,body,status", [
    ("/api/chat", {"model": "oai:missing", "stream": True, **CHAT}, 404),     # upstream 404 before the first chunk
    ("/v1/chat/completions", {"model": "nope", **CHAT}, 404),                   # no such model
    ("/api/embed", {"model": "oai:echo", "input": 5}, 400),                     # a field that fails its check
])
def test_an_early_failure_is_one_record_with_its_status(app, path, body, status):
    r = app.test_client().post(path, json=body)
    assert r.status_code == status
    (rec,) = app.records
    assert rec["status"] == status and rec["error"] and rec["route"] == path


def test_a_failure_mid_stream_is_one_record_with_the_error(app):
    body = app.test_client().post("/api/chat", json={"model": "cut:chunks-8-0", **CHAT}).get_data(as_text=True)
    assert '"error"' in body.splitlines()[-1]
    (rec,) = app.records
    assert rec["status"] >= 500 and rec["error_class"] == "UpstreamHTTPError" and rec["provider"] == "cut"


def test_a_client_that_leaves_mid_stream_is_one_record_when_the_server_closes_the_response(app):
    r = app.test_client().post("/api/chat", json={"model": "oai:chunks-32-0", **CHAT}, buffered=False)
    first = next(iter(r.response))
    assert b'"done":false' in first
    assert app.records == [], "the record closes when the response is closed, not before"
    r.close()            # what a WSGI server does when the client has gone
    (rec,) = app.records
    assert rec["status"] == 200 and rec["provider"] == "oai" and rec["stream"] is True
    r.close()
    assert len(app.records) == 1, "closing twice reports once"


def test_a_listing_that_succeeded_is_not_a_finished_request(app):
    c = app.test_client()
    assert c.get("/api/tags").status_code == 200 and c.get("/health").status_code == 200
    assert app.records == []
    assert c.get("/api/nothing-here").status_code == 404
    (rec,) = app.records
    assert rec["status"] == 404 and rec["route"] == "/api/nothing-here"
