"""What a hostile client can make the gateway spend or reveal: bounded model names,
cross-site requests, path-steering model ids, keys as model names, log injection, deep
nesting, and that every refused request is logged and counted."""
from __future__ import annotations

import json
import logging

import pytest
import requests

from tests.conftest import remote_config
from tests.test_ops_logs import _capture
from tests.test_ops_metrics import CHAT, samples


@pytest.fixture
def app(make_app, fake_upstream, tmp_path):
    cfg = remote_config(fake_upstream)
    cfg["server"]["usage_db"] = str(tmp_path / "usage.sqlite3")
    return make_app(cfg)


# ---- 1. model names ----------------------------------------------------------------------
@pytest.mark.parametrize("route,field", [("/api/chat", "model"), ("/v1/chat/completions", "model"),
                                         ("/api/embed", "model"), ("/api/show", "name"),
                                         ("/api/copy", "source")])
def test_a_model_name_over_512_bytes_is_a_400_naming_the_field(app, route, field):
    c = app.test_client()
    long_name = "oai:" + "é" * 300            # 604 bytes, 304 characters
    body = {field: long_name, "input": "x", **CHAT}
    r = c.post(route, json=body)
    assert r.status_code == 400, r.data
    msg = json.dumps(r.get_json())
    assert f'field \\"{field}\\"' in msg and "512 bytes" in msg and "éééé" not in msg


def test_unlisted_model_names_cost_one_metric_label_and_bounded_usage_groups(app, monkeypatch):
    from gateway.ops import usage
    monkeypatch.setattr(usage, "MAX_GROUPS", 3)
    c = app.test_client()
    names = [f"oai:unlisted-{i}-" + "z" * 480 for i in range(5)] + [f"nope-{i}" for i in range(3)]
    for n in names:
        c.post("/api/chat", json={"model": n, "stream": False, **CHAT}).get_data()
    assert c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT}).status_code == 200
    text = c.get("/metrics").get_data(as_text=True)
    assert "unlisted" not in text and "nope-" not in text
    models = {dict(ls).get("model") for (n, ls) in samples(text) if n == "gateway_requests_total"}
    assert models == {"other", "oai:echo"}
    assert len(text) < 20000
    out = c.get("/api/usage?group_by=model").get_json()
    assert out["total"]["requests"] == len(names) + 1
    groups = out["groups"]
    assert len(groups) == 4 and groups[-1]["model"] == "other"
    assert sum(g["requests"] for g in groups) == len(names) + 1
    assert all(len(g["model"]) <= 512 for g in groups)


def upstream_calls(upstream: str) -> int:
    return sum(requests.get(upstream + "/_stats", timeout=5).json()["requests"].values())


# ---- 3. cross-site requests ----------------------------------------------------------------
@pytest.mark.parametrize("method,route", [("POST", "/api/chat"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/api/tags"), ("GET", "/api/version"),
                                          ("GET", "/metrics"), ("OPTIONS", "/api/chat"),
                                          ("GET", "/no/such/route")])
def test_a_request_from_an_origin_not_allowed_is_403_on_every_route(app, fake_upstream, method, route):
    c = app.test_client()
    before = upstream_calls(fake_upstream)
    body = json.dumps({"model": "oai:echo", "stream": False, **CHAT})
    r = c.open(route, method=method, data=body, content_type="text/plain",
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403, r.data
    assert "server.cors_origins" in r.get_data(as_text=True)
    assert "Origin" in r.headers.get("Vary", "") and "Access-Control-Allow-Origin" not in r.headers
    assert upstream_calls(fake_upstream) == before


def test_allowed_origins_and_requests_without_origin_are_served_with_vary_origin(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["cors_origins"] = ["https://app.example"]
    c = make_app(cfg).test_client()
    body = {"model": "oai:echo", "stream": False, **CHAT}
    for origin in ("https://app.example", "http://localhost:3000", "chrome-extension://abc", None):
        headers = {"Origin": origin} if origin else {}
        r = c.post("/api/chat", json=body, headers=headers)
        assert r.status_code == 200, (origin, r.data)
        assert "Origin" in r.headers.get("Vary", "")
        assert r.headers.get("Access-Control-Allow-Origin") == origin
    r = c.get("/api/version")
    assert r.status_code == 200 and "Origin" in r.headers.get("Vary", "")


# ---- 10. refused requests are logged and counted, once -------------------------------------
def test_every_error_answer_writes_one_access_line_and_counts_once(make_app, fake_upstream):
    from tests.test_ops_metrics import total
    cfg = remote_config(fake_upstream, server={"usage_db": "", "api_keys": ["client-key-sec-1"]})
    c = make_app(cfg).test_client()
    auth = {"Authorization": "Bearer client-key-sec-1"}
    body = {"model": "oai:echo", "stream": False, **CHAT}
    buf, h = _capture()
    try:
        assert c.post("/api/chat", json=body).status_code == 401
        assert c.post("/api/chat", json=body, headers={"Authorization": "Bearer guess"}).status_code == 401
        assert c.post("/api/chat", json=body, headers={**auth, "Origin": "https://evil.example"}).status_code == 403
        assert c.post("/api/chat", data=b"{not json", headers=auth).status_code == 400
        assert c.get("/x" * 3000, headers=auth).status_code == 404
        assert c.post("/api/chat", json={**body, "model": "nope"}, headers=auth).status_code == 404
        assert c.post("/api/chat", json=body, headers=auth).status_code == 200
        assert c.get("/api/tags", headers=auth).status_code == 200
        text = c.get("/metrics", headers=auth).get_data(as_text=True)
    finally:
        logging.getLogger("gateway.access").removeHandler(h)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [ln["status"] for ln in lines] == [401, 401, 403, 400, 404, 404, 200]
    assert [ln["error_class"] for ln in lines[:5]] == ["Unauthorized", "Unauthorized", "Forbidden",
                                                       "BadRequest", "NotFound"]
    assert lines[0]["route"] == "/api/chat" and "API key" in lines[0]["error"]
    assert lines[1]["client"] and lines[1]["client"] != lines[2]["client"]
    assert len(lines[4]["route"]) <= 513
    assert total(text, "gateway_requests_total", route="/api/chat", status="401") == 2
    assert total(text, "gateway_requests_total", route="/api/chat", status="403") == 1
    assert total(text, "gateway_requests_total", route="/api/chat", status="400") == 1
    assert total(text, "gateway_requests_total", route="other", status="404") == 1
    assert total(text, "gateway_requests_total", route="/api/chat", status="404") == 1
    assert total(text, "gateway_requests_total") == 7


# ---- 6. keys as model names ----------------------------------------------------------------
@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_a_key_sent_as_a_model_name_gets_the_same_404_as_any_unknown_name(app, fake_upstream, route):
    c = app.test_client()
    before = upstream_calls(fake_upstream)
    buf, h = _capture()
    try:
        answers = {}
        for name in ("ok-oai-1", "ok-oai-9", "oai:x-ok-gem-1", "oai:x-ok-gem-9", "nop:x-ok-gem-9"):
            r = c.post(route, json={"model": name, "stream": False, **CHAT})
            answers[name] = (r.status_code, r.get_data(as_text=True).replace(name, "NAME"))
    finally:
        logging.getLogger("gateway.access").removeHandler(h)
    assert answers["ok-oai-1"] == answers["ok-oai-9"] and answers["ok-oai-1"][0] == 404
    assert answers["oai:x-ok-gem-1"] == answers["nop:x-ok-gem-9"]
    assert upstream_calls(fake_upstream) == before + 1     # only the unlisted oai:x-ok-gem-9 went out
    seen = c.get("/metrics").get_data(as_text=True) + c.get("/api/usage?group_by=model").get_data(as_text=True)
    seen += buf.getvalue()
    assert "ok-oai-1" not in seen and "ok-gem-1" not in seen
    assert "ok-oai-9" in c.get("/api/usage?group_by=model").get_data(as_text=True)


# ---- 4. path steering in model ids ---------------------------------------------------------
STEERING_IDS = ["gem:../../../x", "gem:models/../../x", "gem:./x", "gem:x?key=1", "gem:x#frag",
                "gem:x%2F..%2Fy", "gem:a\\b", "gem:a//b", "gem:/x", "gem:x/", "gem:x\ny", "gem:.",
                "oai:../v1/x", "oai:x\r\nHost: evil", "gem:x\u2028y", "gem:x\x85y"]


@pytest.mark.parametrize("name", STEERING_IDS)
def test_model_ids_that_could_steer_an_upstream_path_are_a_400_before_any_upstream_call(app, fake_upstream, name):
    c = app.test_client()
    before = upstream_calls(fake_upstream)
    for route, body in (("/api/chat", {"stream": False, **CHAT}), ("/v1/chat/completions", CHAT),
                        ("/api/embed", {"input": "x"}), ("/api/show", {})):
        r = c.post(route, json={"model": name, **body})
        assert r.status_code == 400, (route, r.data)
        assert 'field \\"model\\"' in json.dumps(r.get_json())
    assert upstream_calls(fake_upstream) == before


def test_ordinary_ids_with_slashes_colons_and_dots_still_reach_the_upstream(app):
    c = app.test_client()
    for name in ("oai:meta/llama:free", "gem:gemini-2.5-flash", "gem:models/gemini-2.5-flash"):
        r = c.post("/api/chat", json={"model": name, "stream": False, **CHAT})
        assert r.status_code == 200, (name, r.data)


# ---- 5. a key straddling the cut of an upstream error ----------------------------------------
def test_an_upstream_error_is_scrubbed_before_it_is_cut(make_app, fake_upstream):
    key = "cutecho-straddling-key-0123456789"
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = [key]
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "oai:echo", "stream": False, **CHAT})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert "xxxxxxxx" in err and "***" in err
    assert key[:8] not in err and "straddling" not in err


# ---- 7. log injection --------------------------------------------------------------------------
def test_control_characters_and_line_separators_are_escaped_in_every_log_line(app):
    import io

    from gateway.ops.accesslog import ScrubFilter
    handlers = [h for name in (None, "gateway.access") for h in logging.getLogger(name).handlers
                if any(isinstance(f, ScrubFilter) for f in h.filters) and type(h) is logging.StreamHandler]
    assert len(handlers) >= 2       # the plain log lines' handler and the access log's
    buf = io.StringIO()
    old = [h.setStream(buf) for h in handlers]
    forged = 'x\n2026-01-01 INFO forged: line\r\x1b[2J\u2028\u2029\x85{"ts": "forged"}'
    try:
        logging.getLogger("gateway.upstream").warning("upstream said: %s", forged)
        r = app.test_client().post("/api/chat", json={"model": "nope" + forged, **CHAT})
        assert r.status_code == 404
    finally:
        for h, s in zip(handlers, old):
            h.setStream(s)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    plain, access = lines
    assert "upstream said: x\\n2026-01-01 INFO forged" in plain
    assert json.loads(access)["model"] == "nope" + forged     # still valid JSON, same text
    for ch in "\r\x1b\u2028\u2029\x85":
        assert ch not in buf.getvalue()


# ---- 8. deep nesting and malformed bodies are 400s ---------------------------------------------
def _nested_schema(levels: int) -> str:
    return '{"type":"object","properties":{"a":' * (levels // 2) + '{"type":"string"}' + "}}" * (levels // 2)


def _tool_messages(arguments: str) -> str:
    return ('[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function",'
            '"function":{"name":"f","arguments":%s}}]},{"role":"tool","tool_call_id":"c1","content":"ok"}]'
            % arguments)


@pytest.mark.parametrize("model", ["oai:echo", "gem:gemini-2.5-flash"])
def test_a_format_schema_nested_hundreds_deep_is_a_400_naming_the_field(app, model):
    for levels, shown in ((400, 'field "format": nested deeper than'), (960, "nested deeper than 100")):
        body = '{"model":"%s","stream":false,"messages":[{"role":"user","content":"x"}],"format":%s}' % (
            model, _nested_schema(levels))
        r = app.test_client().post("/api/chat", data=body)
        assert r.status_code == 400 and shown in r.get_json()["error"], r.data
    ok = body.replace(_nested_schema(960), _nested_schema(40))
    assert app.test_client().post("/api/chat", data=ok).status_code == 200


@pytest.mark.parametrize("arguments", ["[" * 960 + "]" * 960, "[" * 100000])
def test_deeply_nested_tool_arguments_on_v1_are_a_400(app, arguments):
    c = app.test_client()
    for args in (json.dumps(arguments), arguments if arguments.endswith("]") else None):
        if args is None:
            continue
        r = c.post("/v1/chat/completions", data='{"model":"oai:echo","messages":%s}' % _tool_messages(args))
        assert r.status_code == 400, r.data[:300]
        assert "tool_calls[0].function.arguments" in r.get_json()["error"]["message"] or \
            "nested deeper than" in r.get_json()["error"]["message"]


def test_a_malformed_chunked_body_is_a_400_under_gunicorn(gunicorn_gateway):
    import socket
    g = gunicorn_gateway({"server": {"host": "127.0.0.1", "port": 0, "usage_db": ""}})
    for chunks in (b"zz\r\n{}\r\n0\r\n\r\n", b"5\r\n{}\r\n0\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
        s.close()
        assert data.startswith(b"HTTP/1.1 400"), data[:300]
        assert b"invalid request body" in data


# ---- 9. local model files ----------------------------------------------------------------------
def test_models_dir_lists_only_gguf_files_inside_it_and_load_errors_name_the_model(make_app, tmp_path):
    import os

    from tests.tiny_gguf import write_corrupt_gguf, write_tiny_gguf
    d = tmp_path / "models"
    d.mkdir()
    good = write_tiny_gguf(str(d / "good.gguf"))
    write_corrupt_gguf(str(d / "broken.gguf"), good)
    outside = tmp_path / "private"
    outside.mkdir()
    write_tiny_gguf(str(outside / "elsewhere.gguf"))
    os.symlink(outside / "elsewhere.gguf", d / "escape.gguf")           # out of the folder
    os.symlink(d / "good.gguf", d / "alias-inside.gguf")                # inside: fine
    (d / "notgguf.gguf").write_bytes(b"PK\x03\x04 private bytes " * 8)
    (d / "folder.gguf").mkdir()
    os.mkfifo(d / "pipe.gguf")
    app = make_app({"server": {"usage_db": ""},
                    "providers": {"local": {"type": "local", "models_dir": str(d)}}})
    c = app.test_client()
    names = sorted(m["name"] for m in c.get("/api/tags").get_json()["models"])
    assert names == ["local:alias-inside", "local:broken", "local:good"]
    for name in ("escape", "notgguf", "folder", "pipe"):
        assert c.post("/api/show", json={"model": f"local:{name}"}).status_code == 404
    r = c.post("/api/chat", json={"model": "local:broken", "stream": False, **CHAT})
    assert r.status_code == 500
    err = r.get_json()["error"]
    assert err.startswith("failed to load model broken") and str(tmp_path) not in err and ".gguf" not in err
