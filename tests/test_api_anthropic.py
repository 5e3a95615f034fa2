"""The Anthropic Messages surface (/v1/messages, /v1/messages/count_tokens): the official
`anthropic` SDK and raw SSE against the real gateway under gunicorn, routed to the fake
OpenAI-type and Gemini upstreams and to the tiny local GGUF; translation unit tests."""
from __future__ import annotations

import json

import anthropic
import pytest
import requests

from gateway.errors import BadRequest
from gateway.http import anthropic_wire as wire
from gateway.http.common import estimate_tokens
from tests.conftest import Gunicorn, remote_config

pytestmark = pytest.mark.timeout(120)
TOOLS = [{"name": "get_weather", "description": "weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def gw(fake_upstream):
    g = Gunicorn(remote_config(fake_upstream, server={"usage_db": "", "heartbeat": 0.5}))
    yield g
    g.close()


def client(gw, **kw):
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=gw.url, max_retries=0, **kw)


def sse_events(resp):
    """[(event name, data)] of a raw SSE body; each event's name must equal its data.type."""
    out = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((lines["event"], data))
    return out


def post(gw, body, path="/v1/messages?beta=true", **headers):
    return requests.post(gw.url + path, json=body, timeout=30,
                         headers={"anthropic-version": "2023-06-01", "Accept": "application/json", **headers})


# ---- official SDK ------------------------------------------------------------------------------
@pytest.mark.parametrize("model,usage_in", [("oai:echo", 7), ("gem:gemini-2.5-flash", 5)])
def test_sdk_create_answers_a_message_with_usage(gw, model, usage_in):
    r = client(gw).messages.create(model=model, max_tokens=64, system="be brief",
                                   messages=[{"role": "user", "content": "hello there"}])
    assert r.type == "message" and r.role == "assistant" and r.model == model and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Echo: hello there"
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    assert r.usage.input_tokens == usage_in and r.usage.output_tokens == 3


@pytest.mark.parametrize("model", ["oai:echo", "gem:gemini-2.5-flash", "fast"])
def test_sdk_stream_text_and_final_message(gw, model):
    with client(gw).messages.stream(model=model, max_tokens=64,
                                    messages=[{"role": "user", "content": "one two three"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Echo: one two three"
    assert final.content[0].text == text and final.stop_reason == "end_turn" and final.usage.output_tokens == 4


def test_stream_follows_anthropics_event_grammar(gw):
    r = post(gw, {"model": "oai:echo", "max_tokens": 32, "stream": True,
                  "messages": [{"role": "user", "content": "a b"}]})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    ev = sse_events(r)
    names = [n for n, _ in ev]
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = ev[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert ev[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0 for n, d in ev if n == "content_block_delta")
    assert ev[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert ev[-2][1]["usage"]["output_tokens"] == 3


def test_sdk_tool_use_round_trip_carries_the_ids(gw, fake_upstream):
    c = client(gw)
    q = {"role": "user", "content": "weather in Tokyo?"}
    r = c.messages.create(model="oai:tools", max_tokens=64, tools=TOOLS, messages=[q],
                          tool_choice={"type": "any"})
    assert r.stop_reason == "tool_use"
    use = [b for b in r.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.input == {"city": "Tokyo"} and use.id.startswith("call_")
    sent = requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]
    assert sent["tool_choice"] == "required" and sent["tools"][0]["function"]["name"] == "get_weather"

    with c.messages.stream(model="oai:tools", max_tokens=64, tools=TOOLS, messages=[q]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Tokyo"}

    answer = c.messages.create(model="oai:echo", max_tokens=64, tools=TOOLS, messages=[
        q, {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                             {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21C"},
                                     {"type": "text", "text": "and tomorrow?"}]}])
    assert answer.content[0].text == "Echo: and tomorrow?"
    msgs = requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "user"]
    assert msgs[1]["tool_calls"][0]["id"] == use.id and json.loads(msgs[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Tokyo"}
    assert msgs[2] == {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21C"}


def test_sdk_count_tokens_upstream_count_or_estimate(gw):
    c = client(gw)
    msgs = [{"role": "user", "content": "four words right here"}]
    # the fake Gemini counts words: the upstream's own count came back, not an estimate
    assert c.messages.count_tokens(model="gem:gemini-2.5-flash", messages=msgs).input_tokens == 4
    est = c.messages.count_tokens(model="oai:echo", messages=msgs, tools=TOOLS).input_tokens
    assert est == estimate_tokens(wire.chat_request({"model": "m", "messages": msgs, "tools": TOOLS},
                                                         count_only=True))
    assert est > c.messages.count_tokens(model="oai:echo", messages=msgs).input_tokens
    # an upstream whose count fails still gets an answer: the estimate
    missing = c.messages.count_tokens(model="gem:missing", messages=msgs).input_tokens
    assert missing == estimate_tokens(wire.chat_request({"model": "m", "messages": msgs}, count_only=True))


def test_claude_code_request_shape_is_accepted(gw):
    """What Claude Code sends to any model name: a system turn inside messages, adaptive
    thinking, cache_control, metadata, output_config, context_management, beta headers."""
    body = {"model": "oai:echo", "max_tokens": 32000, "stream": True,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: abc"},
                       {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                         {"role": "system", "content": "reminder"},
                         {"role": "user", "content": "go on"}],
            "tools": TOOLS, "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "context_management": {"edits": []}, "metadata": {"user_id": json.dumps({"session": "s"})}}
    r = post(gw, body, **{"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert r.status_code == 200, r.text
    assert "".join(d["delta"].get("text", "") for n, d in sse_events(r) if n == "content_block_delta") == "Echo: go on"
    body["thinking"] = {"type": "enabled", "budget_tokens": 31999}   # a model without thinking ignores it
    body["stream"] = False
    assert post(gw, body).status_code == 200


# ---- errors ------------------------------------------------------------------------------------
def test_errors_have_anthropics_shape_and_status(gw, fake_upstream):
    c = client(gw)
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="nope:x", max_tokens=5, messages=[{"role": "user", "content": "a"}])
    assert e.value.body["error"]["type"] == "not_found_error" and e.value.body["type"] == "error"
    r = post(gw, {"model": "oai:echo", "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens is required"}}
    r = post(gw, {"model": "oai:echo", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]})
    assert r.status_code == 400 and "messages[0].content[0].source" in r.json()["error"]["message"]
    r = post(gw, {"model": "oai:echo", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {}}]}]})
    assert r.status_code == 400 and '"document" blocks are not supported' in r.json()["error"]["message"]
    r = post(gw, {"model": "oai:echo", "max_tokens": 5, "messages": [{"role": "robot", "content": "a"}]})
    assert r.status_code == 400 and "messages[0].role" in r.json()["error"]["message"]
    assert post(gw, {"x": 1}, path="/v1/messages/nothing").json()["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def faulty(fake_upstream):
    """One gateway, client keys required, and a provider per upstream failure (the fake
    upstream fails by key)."""
    cfg = remote_config(fake_upstream, server={"usage_db": "", "heartbeat": 0.5, "max_body_mb": 1,
                                                "api_keys": ["client-key-anthropic"]})
    base = cfg["providers"]["oai"]
    for name, keys in {"rl": ["rl-a1", "rl-a2"], "err": ["err-a1"], "bad": ["bad-a1"],
                       "cut": ["cut-a1"], "slow": ["slow-a1"]}.items():
        cfg["providers"][name] = {**base, "api_keys": keys}
    g = Gunicorn(cfg)
    yield g
    g.close()


KEY = "client-key-anthropic"


@pytest.mark.parametrize("provider,status,etype,exc", [
    ("rl", 429, "rate_limit_error", anthropic.RateLimitError),
    ("err", 502, "api_error", anthropic.InternalServerError),
    ("bad", 502, "api_error", anthropic.InternalServerError),
])
def test_upstream_failures_map_to_anthropic_error_types(faulty, provider, status, etype, exc):
    with pytest.raises(exc) as e:
        client(faulty, api_key=KEY).messages.create(model=f"{provider}:echo", max_tokens=5,
                                                    messages=[{"role": "user", "content": "a"}])
    assert e.value.status_code == status and e.value.body["error"]["type"] == etype


def test_gateway_refusals_have_anthropic_types(faulty):
    big = {"model": "oai:echo", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = post(faulty, big, **{"x-api-key": KEY})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = post(faulty, {"model": "oai:echo", "max_tokens": 5, "messages": []}, **{"x-api-key": KEY, "Host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert [wire.error_type(s) for s in (503, 529, 500, 502, 504, 405, 422)] == [
        "overloaded_error", "overloaded_error", "api_error", "api_error", "api_error",
        "invalid_request_error", "invalid_request_error"]


def test_x_api_key_and_bearer_both_carry_the_client_key(faulty):
    q = dict(model="oai:echo", max_tokens=5, messages=[{"role": "user", "content": "k"}])
    assert client(faulty, api_key=KEY).messages.create(**q).content[0].text == "Echo: k"
    assert anthropic.Anthropic(base_url=faulty.url, auth_token=KEY, api_key=None,
                               max_retries=0).messages.create(**q).content[0].text == "Echo: k"
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(faulty, api_key="wrong").messages.create(**q)
    assert e.value.body["error"]["type"] == "authentication_error"
    r = requests.post(faulty.url + "/v1/messages/count_tokens", json={"model": "oai:echo", "messages": []})
    assert r.status_code == 401 and r.json()["type"] == "error"


def test_mid_stream_failure_ends_with_an_error_event(faulty):
    r = post(faulty, {"model": "cut:chunks-32-0", "max_tokens": 64, "stream": True,
                      "messages": [{"role": "user", "content": "a"}]}, **{"x-api-key": KEY})
    ev = sse_events(r)
    assert ev[0][0] == "message_start" and any(n == "content_block_delta" for n, _ in ev)
    assert ev[-1][0] == "error" and ev[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in ev]
    with pytest.raises(anthropic.APIStatusError):
        with client(faulty, api_key=KEY).messages.stream(model="cut:chunks-32-0", max_tokens=64,
                                                         messages=[{"role": "user", "content": "a"}]) as s:
            for _ in s.text_stream:
                pass


def test_ping_goes_out_while_the_upstream_is_silent(faulty):
    ev = sse_events(post(faulty, {"model": "slow:echo", "max_tokens": 64, "stream": True,
                                  "messages": [{"role": "user", "content": "late"}]}, **{"x-api-key": KEY}))
    names = [n for n, _ in ev]
    assert names[0] == "message_start" and names[1] == "ping" and names.count("ping") >= 3
    first_block = names.index("content_block_start")
    assert set(names[1:first_block]) == {"ping"} and names[-1] == "message_stop"
    with client(faulty, api_key=KEY).messages.stream(model="slow:echo", max_tokens=8,
                                                     messages=[{"role": "user", "content": "sdk"}]) as s:
        assert "".join(s.text_stream) == "Echo: sdk"


# ---- the tiny local model ---------------------------------------------------------------------
def test_sdk_against_a_local_gguf_count_is_exact(fake_upstream, tmp_path):
    from tests.tiny_gguf import write_tiny_gguf
    cfg = remote_config(fake_upstream)
    cfg["providers"]["local"] = {"type": "local", "keep_alive": "5m", "n_threads": 1,
                                 "cache_dir": str(tmp_path / "cache"),
                                 "models": {"tiny": {"path": write_tiny_gguf(str(tmp_path / "tiny.gguf"))}}}
    g = Gunicorn(cfg)
    try:
        c = client(g)
        msgs = [{"role": "user", "content": "hello world, the capital of France"}]
        r = c.messages.create(model="local:tiny", max_tokens=4, system="be brief", messages=msgs,
                              extra_body={"temperature": 0.5, "top_k": 5})
        assert r.content[0].type == "text" and r.usage.output_tokens >= 1
        assert r.stop_reason in ("end_turn", "max_tokens")
        n = c.messages.count_tokens(model="local:tiny", system="be brief", messages=msgs).input_tokens
        assert n == r.usage.input_tokens and n > 5
        with c.messages.stream(model="local:tiny", max_tokens=4, messages=msgs) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert final.usage.output_tokens >= 1 and final.content[0].text == text
    finally:
        g.close()


# ---- translation -------------------------------------------------------------------------------
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def test_every_block_type_translates_to_the_canonical_model():
    req = wire.chat_request({
        "model": "m", "max_tokens": 100, "system": [{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}],
        "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 7,
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "tool_choice": {"type": "tool", "name": "get_weather"}, "tools": TOOLS + [{"type": "web_search_20250305", "name": "web_search"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig-1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "cold"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True}]},
        ]})
    m = req.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool", "tool"]
    assert m[0].content == "s1\ns2" and m[1].content == "look" and m[1].images == [PNG]
    assert m[2].thinking == "hmm" and m[2].thinking_signature == "sig-1" and m[2].content == "calling"
    assert [(t.id, t.name, t.arguments) for t in m[2].tool_calls] == [
        ("toolu_1", "get_weather", {"city": "Oslo"}), ("toolu_2", "get_weather", {"city": "Rome"})]
    assert (m[3].tool_call_id, m[3].tool_name, m[3].content) == ("toolu_1", "get_weather", "cold")
    assert m[4].content == "Error: boom"
    assert req.options.stop == ["END"] and req.options.num_predict == 100 and req.options.top_k == 7
    assert req.think == "low" and req.thinking_budget == 2000
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert [t["function"]["name"] for t in req.tools] == ["get_weather"]   # server tools dropped
    lone = wire.chat_request({"model": "m", "max_tokens": 5, "tool_choice": {"type": "any"},
                              "messages": [{"role": "user", "content": "q"}]})
    assert lone.tool_choice is None


def test_canonical_answers_render_as_anthropic_blocks():
    from gateway.canonical import Chunk, ToolCall
    from gateway.http.streaming import Tally
    t = Tally(0.0)
    for ch in [Chunk(thinking="th"), Chunk(thinking_signature="sig"), Chunk(content="hi"),
               Chunk(tool_calls=[ToolCall(name="f", arguments={"a": 1}, id="toolu_x")]),
               Chunk(done=True, done_reason="stop", prompt_tokens=3, completion_tokens=2)]:
        t.add(ch)
    msg = wire.whole_message("msg_1", "m", t)
    assert msg["content"] == [{"type": "thinking", "thinking": "th", "signature": "sig"},
                              {"type": "text", "text": "hi"},
                              {"type": "tool_use", "id": "toolu_x", "name": "f", "input": {"a": 1}}]
    assert msg["stop_reason"] == "tool_use" and msg["usage"] == {"input_tokens": 3, "output_tokens": 2}
    r = wire.MessagesRenderer("msg_1", "m")
    out = "".join(r.chunk(c) for c in [Chunk(thinking="th"), Chunk(thinking_signature="sig"), Chunk(content="hi"),
                                       Chunk(done=True, done_reason="length", stop_sequence=None)])
    evs = [json.loads(b.split("data: ", 1)[1]) for b in out.split("\n\n") if b]
    assert [(e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type")) for e in evs] == [
        ("message_start", None, None), ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"), ("content_block_delta", 1, "text_delta"), ("content_block_stop", 1, None),
        ("message_delta", None, None), ("message_stop", None, None)]
    assert evs[-2]["delta"]["stop_reason"] == "max_tokens"
    done = Chunk(done=True, done_reason="stop", stop_sequence="END")
    assert wire.stop_reason(done, False) == ("stop_sequence", "END")


Q = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("body,field", [
    ({"messages": []}, "messages: at least one message"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "input": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0].tool_use_id"),
    ({"messages": Q, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"messages": Q, "tool_choice": {"type": "maybe"}}, "tool_choice"),
    ({"messages": Q, "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"messages": Q, "temperature": 3}, "temperature"),
    ({"messages": Q, "stop_sequences": "x"}, "stop_sequences"),
    ({"messages": Q, "system": [{"type": "image"}]}, "system[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "{}"}]}]},
     "messages[0].content[0].input"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(BadRequest) as e:
        wire.chat_request({"model": "m", "max_tokens": 5, **body})
    assert field in e.value.message


def test_a_thinking_budget_reaches_gemini_within_its_range():
    from providers import gemini_wire
    for budget, sent in [(2000, 2000), (31999, 24576)]:
        req = wire.chat_request({"model": "m", "max_tokens": 40000, "messages": [{"role": "user", "content": "q"}],
                                 "thinking": {"type": "enabled", "budget_tokens": budget}})
        body = gemini_wire.build_generate_body(req, "gemini-2.5-flash", None)
        assert body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": sent}


def test_usage_log_attributes_x_api_key_callers(make_app, fake_upstream, tmp_path):
    import hashlib
    import sqlite3
    db = tmp_path / "usage.sqlite3"
    app = make_app(remote_config(fake_upstream, server={"usage_db": str(db), "api_keys": [KEY]}))
    r = app.test_client().post("/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "oai:echo", "max_tokens": 5, "messages": [{"role": "user", "content": "u"}]})
    assert r.status_code == 200
    app.extensions["gateway"].close()       # flushes the usage log
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT client_key, route FROM usage").fetchall()
    conn.close()
    assert rows == [(hashlib.sha256(KEY.encode()).hexdigest()[:12], "/v1/messages")]


def test_a_clients_model_list_binds_x_api_key_callers_on_both_routes(make_app, fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["server"]["clients"] = [{"name": "cc", "key": KEY, "models": ["oai:*"]}]
    c = make_app(cfg).test_client()
    q = {"max_tokens": 5, "messages": [{"role": "user", "content": "u"}]}
    h = {"x-api-key": KEY}
    assert c.post("/v1/messages", headers=h, json={"model": "oai:echo", **q}).status_code == 200
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = c.post(path, headers=h, json={"model": "gem:gemini-2.5-flash", **q})
        assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"
