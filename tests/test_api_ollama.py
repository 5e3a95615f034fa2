"""The Ollama surface through the real app (Flask test client) against the fake upstream
over real HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import remote_config
from tests.helpers import ndjson

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


def test_root_says_ollama_is_running_and_version_is_numeric(client):
    r = client.get("/")
    assert r.status_code == 200 and r.data == b"Ollama is running"
    assert r.mimetype == "text/plain"
    assert client.head("/").status_code == 200
    v = client.get("/api/version")
    assert v.mimetype == "application/json"
    assert all(p.isdigit() for p in v.json["version"].split("."))
    assert client.head("/api/version").status_code == 200


def test_tags_fields_and_aliases(client):
    models = client.get("/api/tags").json["models"]
    names = [m["name"] for m in models]
    assert "oai:echo" in names and "gem:gemini-2.5-flash" in names and "oai:meta/llama:free" in names
    assert "nokeys:hidden" not in names, "a provider without keys is not offered"
    assert "fast" in names, "aliases are listed under their bare name"
    for m in models:
        assert m["model"] == m["name"]
        assert TS.match(m["modified_at"])
        assert isinstance(m["size"], int) and isinstance(m["digest"], str) and len(m["digest"]) == 64
        for k in ("parent_model", "format", "family", "parameter_size", "quantization_level"):
            assert isinstance(m["details"][k], str)
        assert isinstance(m["details"]["families"], list)
    fast = next(m for m in models if m["name"] == "fast")
    assert fast["details"]["family"] == next(m for m in models if m["name"] == "oai:echo")["details"]["family"]


def test_show_accepts_model_and_name(client):
    for body in ({"model": "gem:gemini-2.5-flash"}, {"name": "gem:gemini-2.5-flash"}, {"model": "fast:latest"}):
        r = client.post("/api/show", json=body)
        assert r.status_code == 200, r.data
        j = r.json
        assert isinstance(j["model_info"], dict)
        for k in ("license", "template", "modelfile", "parameters"):
            assert isinstance(j[k], str)
        assert "completion" in j["capabilities"]
        assert TS.match(j["modified_at"])
    assert client.post("/api/show", json={}).json == {"error": "model is required"}
    assert client.post("/api/show", json={}).status_code == 400


def test_chat_stream_default_ndjson(client):
    r = client.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "hi there"}]})
    assert r.status_code == 200
    assert r.mimetype == "application/x-ndjson"
    assert r.headers["X-Accel-Buffering"] == "no"
    out = ndjson(r)
    for ch in out:
        assert ch["model"] == "oai:echo" and TS.match(ch["created_at"])
        assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
        assert isinstance(ch["done"], bool)
    assert "".join(c["message"]["content"] for c in out) == "Echo: hi there"
    last = out[-1]
    assert last["done"] is True and last["done_reason"] == "stop"
    assert last["prompt_eval_count"] == 7 and last["eval_count"] == 3
    for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[k], int) and last[k] >= 0
    assert last["total_duration"] > 0
    assert all(not c["done"] for c in out[:-1])


def test_chat_non_stream_and_gemini(client):
    r = client.post("/api/chat", json={"model": "gem:gemini-2.5-flash", "stream": False,
                                       "messages": [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "hello"}]})
    assert r.status_code == 200 and r.mimetype == "application/json"
    j = r.json
    assert j["message"] == {"role": "assistant", "content": "Echo: hello"}
    assert j["done"] is True and j["done_reason"] == "stop" and j["eval_count"] == 2


def test_chat_tool_calls_are_objects(client):
    r = client.post("/api/chat", json={"model": "oai:echo", "stream": False, "messages": [
        {"role": "user", "content": "weather?"}]})
    assert r.status_code == 200
    # the fake returns tool calls for the model id "tools" (unlisted ids are still forwarded)
    r = client.post("/api/chat", json={"model": "oai:tools", "stream": False, "messages": [
        {"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})
    assert r.status_code == 200, r.data
    calls = r.json["message"]["tool_calls"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["function"]["arguments"] == {"city": "Tokyo"}
    assert r.json["done_reason"] == "stop"


def test_generate_stream_and_not(client):
    r = client.post("/api/generate", json={"model": "oai:echo", "prompt": "why sky"})
    out = ndjson(r)
    assert all(c["response"] for c in out[:-1]), "non-final generate chunks must have a response"
    assert "".join(c["response"] for c in out) == "Echo: why sky"
    assert out[-1]["done"] and out[-1]["response"] == ""
    r = client.post("/api/generate", json={"model": "oai:echo", "prompt": "x", "system": "s", "stream": False})
    assert r.json["response"] == "Echo: x" and r.json["done_reason"] == "stop"


def test_load_and_unload_remote(client):
    r = client.post("/api/chat", json={"model": "oai:echo", "messages": []})
    assert ndjson(r)[-1]["done_reason"] == "load"
    r = client.post("/api/generate", json={"model": "oai:echo", "keep_alive": 0, "stream": False})
    assert r.json["done_reason"] == "unload" and r.json["response"] == ""


def test_unknown_model_404_exact_text(client):
    for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/api/generate", {"prompt": "x"}), ("/api/show", {}), ("/api/embed", {"input": "x"})):
        r = client.post(path, json={"model": "nope:thing", **body})
        assert r.status_code == 404
        assert r.json == {"error": 'model "nope:thing" not found, try pulling it first'}
        # Continue extracts the name from the second word
        assert r.json["error"].split(" ")[1][1:-1] == "nope:thing"
    r = client.post("/api/chat", json={"model": "nokeys:hidden", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404


@pytest.mark.parametrize("body,field", [
    ({"messages": []}, "model"),
    ({"model": "", "messages": []}, "model"),
    ({"model": 5, "messages": []}, "model"),
    ({"model": "oai:echo", "messages": "hi"}, "messages"),
    ({"model": "oai:echo", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "oai:echo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "oai:echo", "messages": [], "options": {"temperature": "hot"}}, "options.temperature"),
    ({"model": "oai:echo", "messages": [], "options": []}, "options"),
    ({"model": "oai:echo", "messages": [], "stream": "yes"}, "stream"),
    ({"model": "oai:echo", "messages": [], "keep_alive": "soon"}, "keep_alive"),
    ({"model": "oai:echo", "messages": [], "format": 7}, "format"),
    ({"model": "oai:echo", "messages": [], "think": "very"}, "think"),
    ({"model": "oai:echo", "messages": [{"role": "user", "content": "x", "images": ["%%%"]}]}, "images"),
])
def test_bad_chat_input_names_the_field(client, body, field):
    r = client.post("/api/chat", json=body)
    assert r.status_code == 400, r.data
    assert field.split("[")[0] in r.json["error"]


def test_malformed_and_missing_bodies(client):
    r = client.post("/api/chat", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON" in r.json["error"]
    r = client.post("/api/chat", data="")
    assert r.status_code == 400 and r.json["error"] == "missing request body"
    r = client.post("/api/chat", data="[1,2]")
    assert r.status_code == 400
    r = client.post("/api/chat", data=b"\xff\xfe{", content_type="application/json")
    assert r.status_code == 400
    # Ollama decodes the body whatever the Content-Type says
    r = client.post("/api/chat", data=json.dumps({"model": "oai:echo", "messages": [], "stream": False}),
                    content_type="text/plain")
    assert r.status_code == 200
    # curl -d sends a form Content-Type: still the JSON body
    r = client.post("/api/chat", data=json.dumps({"model": "oai:echo", "messages": [], "stream": False}),
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 200 and r.json["done_reason"] == "load"


def test_unknown_options_and_fields_ignored(client):
    r = client.post("/api/chat", json={"model": "oai:echo", "stream": False, "new_topic_penalty": 1,
                                       "metadata": {"a": 1}, "options": {"made_up": 3, "num_ctx": 4096},
                                       "messages": [{"role": "user", "content": "ok"}]})
    assert r.status_code == 200


def test_body_over_limit_413(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["max_body_mb"] = 0.01
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "x" * 20000}]})
    assert r.status_code == 413 and "too large" in r.json["error"]


def test_embed_and_legacy_embeddings(client):
    r = client.post("/api/embed", json={"model": "oai:echo", "input": ["ab", "abc"]})
    assert r.status_code == 200
    assert r.json["embeddings"] == [[2.0, 1.0, 0.5], [3.0, 1.0, 0.5]]
    r = client.post("/api/embed", json={"model": "gem:text-embedding-004", "input": "abcd"})
    assert r.json["embeddings"] == [[4.0, 2.0]]
    r = client.post("/api/embed", json={"model": "oai:echo", "input": 5})
    assert r.status_code == 400 and r.json["error"] == "invalid input type"
    r = client.post("/api/embeddings", json={"model": "gem:text-embedding-004", "prompt": "abc"})
    assert r.json == {"embedding": [3.0, 2.0]}
    assert client.post("/api/embeddings", json={"model": "oai:echo", "prompt": ""}).json == {"embedding": []}


def test_ps_and_management_routes(client):
    assert client.get("/api/ps").json == {"models": []}
    r = client.post("/api/pull", json={"model": "oai:echo", "stream": False})
    assert r.json == {"status": "success"}
    r = client.post("/api/pull", json={"name": "nope:x"})
    assert r.status_code == 400 and "pull is not supported" in r.json["error"]
    for method, path, body in (("delete", "/api/delete", {"name": "oai:echo"}),
                               ("post", "/api/copy", {"source": "oai:echo", "destination": "y"}),
                               ("post", "/api/create", {"model": "x"}), ("post", "/api/push", {"model": "x"})):
        r = getattr(client, method)(path, json=body)
        assert r.status_code == 400 and "not supported" in r.json["error"], path
    assert client.head("/api/blobs/sha256:abc").status_code == 404
    assert client.get("/api/nothing").status_code == 404


def test_alias_skips_unoffered_and_failing_targets(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["down"] = {"type": "openai", "base_url": fake_upstream + "/v1",
                                "api_keys": ["err-1", "err-2"], "models": ["echo"]}
    cfg["aliases"] = {"smart": ["down:echo", "gem:gemini-2.5-flash"]}
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "smart", "stream": False, "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 200 and r.json["message"]["content"] == "Echo: a"
    assert r.json["model"] == "smart"
    r = c.post("/api/chat", json={"model": "smart:latest", "stream": False, "messages": [{"role": "user", "content": "b"}]})
    assert r.status_code == 200


def test_all_keys_fail_502_names_provider(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["err-a", "err-b"]
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502 and "oai" in r.json["error"]
    assert "err-a" not in r.get_data(as_text=True)


def test_all_keys_rate_limited_429_retry_after(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["rl-a", "rl-b"]
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # now every key rests: answered at once without calling upstream
    r = c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 429 and 25 <= int(r.headers["Retry-After"]) <= 31


def test_rotation_skips_failed_key(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["bad-1", "ok-rot-2"]
    c = make_app(cfg).test_client()
    for _ in range(3):
        r = c.post("/api/chat", json={"model": "oai:echo", "stream": False, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200


def test_upstream_404_passes_through(client):
    r = client.post("/api/chat", json={"model": "oai:missing", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "missing" in r.json["error"]


def test_mid_stream_failure_ends_with_error_line(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["cut-1"]
    c = make_app(cfg).test_client()
    r = c.post("/api/chat", json={"model": "oai:chunks-32-0", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    out = ndjson(r)
    assert "error" in out[-1] and "cut-1" not in out[-1]["error"]
    assert any(c.get("message", {}).get("content") for c in out[:-1])


def test_heartbeats_while_upstream_is_silent(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["heartbeat"] = 0.5
    cfg["providers"]["oai"]["api_keys"] = ["slow-hb"]     # 3 s before the upstream answers
    c = make_app(cfg).test_client()
    out = ndjson(c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "zz"}]}))
    beats = [o for o in out if not o["done"] and o["message"]["content"] == ""]
    assert len(beats) >= 3
    assert "".join(o["message"]["content"] for o in out) == "Echo: zz" and out[-1]["done"]
    r = c.post("/v1/chat/completions", json={"model": "oai:echo", "stream": True,
                                             "messages": [{"role": "user", "content": "zz"}]})
    text = r.get_data(as_text=True)
    assert text.count(": keep-alive\n\n") >= 3 and text.endswith("data: [DONE]\n\n")
    out = ndjson(c.post("/api/generate", json={"model": "oai:echo", "prompt": "zz"}))
    assert all(o["response"] for o in out[:-1]), "no heartbeats on /api/generate"


def test_heartbeat_then_failure_is_an_error_line(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["heartbeat"] = 0.5
    cfg["providers"]["oai"]["api_keys"] = ["slow-x"]
    cfg["providers"]["oai"]["timeout"] = 1.2
    c = make_app(cfg).test_client()
    out = ndjson(c.post("/api/chat", json={"model": "oai:echo", "messages": [{"role": "user", "content": "zz"}]}))
    assert "error" in out[-1] and "timed out" in out[-1]["error"]
