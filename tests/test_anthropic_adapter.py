"""The `type: anthropic` provider: translation both ways, and the gateway against the
strict fake Anthropic upstream (tests/fake_anthropic.py) through every surface: the
anthropic SDK under gunicorn, the openai and ollama wires through the app."""
from __future__ import annotations

import json

import anthropic
import pytest
import requests

from gateway.canonical import ChatRequest, Message, Options, ToolCall
from providers import anthropic_wire as wire
from tests.conftest import Gunicorn, remote_config
from tests.fake_anthropic import check, signature

pytestmark = pytest.mark.timeout(120)
TOOLS = [{"name": "get_weather", "description": "weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}]
OAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                               "parameters": TOOLS[0]["input_schema"]}}]


def config(upstream, keys=("ok-ant-1",)):
    cfg = remote_config(upstream)
    cfg["providers"]["ant"] = {"type": "anthropic", "base_url": upstream + "/v1", "api_keys": list(keys),
                               "models": ["claude-echo", "claude-tools", "claude-think"], "timeout": 5}
    return cfg


def sent(upstream):
    return requests.get(upstream + "/_stats").json()["bodies"][-1]["body"]


# ---- canonical -> Anthropic ---------------------------------------------------------------------
def test_requests_become_what_anthropic_accepts():
    req = ChatRequest(model="ant:x", options=Options(temperature=0.5, top_k=3, stop=["END"]), tools=OAI_TOOLS,
                      tool_choice="required", messages=[
                          Message(role="system", content="one"), Message(role="system", content="two"),
                          Message(role="user", content="hi", images=["iVBORw0KGgo="]),
                          Message(role="system", content="reminder"),
                          Message(role="user", content="more"),
                          Message(role="assistant", content="", thinking="hm", thinking_signature=signature("hm"),
                                  tool_calls=[ToolCall(name="get_weather", arguments={"city": "A"}, id="call_1"),
                                              ToolCall(name="get_weather", arguments={"city": "B"})]),
                          Message(role="tool", content="sunny", tool_name="get_weather"),   # no id: by position
                          Message(role="tool", content="rain", tool_call_id="call_2"),
                          Message(role="user", content="thanks"),
                          Message(role="assistant", content="ok", thinking="unsigned thoughts")])
    body = wire.to_body(req, "claude-x")
    assert body["system"] == "one\n\ntwo" and body["max_tokens"] == wire.DEFAULT_MAX_TOKENS and body["stream"] is True
    assert body["tool_choice"] == {"type": "any"} and body["tools"] == TOOLS
    assert body["temperature"] == 0.5 and body["top_k"] == 3 and body["stop_sequences"] == ["END"]
    m = body["messages"]
    assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant"]
    assert m[0]["content"][0]["source"]["media_type"] == "image/png"
    assert [b.get("text") for b in m[0]["content"][1:]] == ["hi", "reminder", "more"]
    assert m[1]["content"][0] == {"type": "thinking", "thinking": "hm", "signature": signature("hm")}
    assert [b["id"] for b in m[1]["content"][1:]] == ["call_1", "call_2"]
    assert [(b["type"], b.get("tool_use_id")) for b in m[2]["content"]] == [
        ("tool_result", "call_1"), ("tool_result", "call_2"), ("text", None)]
    assert m[3]["content"] == [{"type": "text", "text": "ok"}]        # unsigned thinking left out
    # the fake's checks are the real API's: this body passes them
    assert check(body, {"anthropic-version": "2023-06-01"}) is None


def test_cache_breakpoints_after_tools_system_and_the_last_message():
    req = ChatRequest(model="m", tools=OAI_TOOLS, messages=[
        Message(role="system", content="sys"), Message(role="user", content="q"),
        Message(role="assistant", content="a", thinking="t", thinking_signature=signature("t")),
        Message(role="user", content="more", images=["iVBORw0KGgo="])])
    body = wire.to_body(req, "c", cache=True)
    eph = {"type": "ephemeral"}
    assert body["tools"][-1]["cache_control"] == eph and body["system"][0]["cache_control"] == eph
    assert [b.get("cache_control") for b in body["messages"][-1]["content"]] == [None, eph]
    assert check(body, {"anthropic-version": "v"}) is None
    assert "cache_control" not in json.dumps(wire.to_body(req, "c"))


def test_thinking_budget_fits_max_tokens_and_drops_sampling_it_forbids():
    req = ChatRequest(model="m", think="high", options=Options(temperature=0.2, top_k=4, top_p=0.5, num_predict=5000),
                      messages=[Message(role="user", content="q")])
    body = wire.to_body(req, "c")
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4999}
    assert "temperature" not in body and "top_k" not in body and body["top_p"] == 0.95
    req.thinking_budget, req.options.num_predict = 3000, None
    assert wire.to_body(req, "c")["thinking"]["budget_tokens"] == 3000
    req.options.num_predict = 500      # no room for the smallest budget: no thinking
    assert "thinking" not in wire.to_body(req, "c")


def test_thinking_is_left_off_when_a_tool_turn_lost_its_signed_thinking():
    call = ToolCall(name="f", arguments={}, id="t1")
    history = [Message(role="user", content="q"), Message(role="assistant", tool_calls=[call]),
               Message(role="tool", content="r", tool_call_id="t1")]
    req = ChatRequest(model="m", think="low", messages=history)
    body = wire.to_body(req, "c")
    assert "thinking" not in body and check(body, {"anthropic-version": "v"}) is None
    history[1].thinking, history[1].thinking_signature = "hm", signature("hm")
    body = wire.to_body(req, "c")
    assert body["thinking"]["budget_tokens"] == 2048 and check(body, {"anthropic-version": "v"}) is None


# ---- Anthropic -> canonical ---------------------------------------------------------------------
def test_stream_events_become_chunks():
    evs = [{"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 3}}},
           {"type": "ping"},
           {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
           {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "t"}},
           {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "S"}},
           {"type": "content_block_stop", "index": 0},
           {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
           {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "hi"}},
           {"type": "content_block_stop", "index": 1},
           {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "tu", "name": "f", "input": {}}},
           {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"a"'}},
           {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
           {"type": "content_block_stop", "index": 2},
           {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
           {"type": "message_stop"}]
    out = list(wire.chunks(evs))
    assert [c.thinking for c in out[:1]] == ["t"] and out[1].thinking_signature == "S" and out[2].content == "hi"
    assert (out[3].tool_calls[0].id, out[3].tool_calls[0].arguments) == ("tu", {"a": 1})
    assert out[-1].done and out[-1].done_reason == "tool_calls"
    assert (out[-1].prompt_tokens, out[-1].completion_tokens) == (8, 9)
    stopped = list(wire.chunks([{"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}},
                                {"type": "message_stop"}]))
    assert stopped[-1].stop_sequence == "END" and stopped[-1].done_reason == "stop"
    with pytest.raises(wire.UpstreamStreamError, match="overloaded_error: Overloaded"):
        list(wire.chunks([{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]))
    with pytest.raises(wire.UpstreamStreamError, match="ended early"):
        list(wire.chunks(evs[:5]))


# ---- the gateway against the fake Anthropic -----------------------------------------------------
@pytest.fixture(scope="module")
def gw(fake_upstream):
    g = Gunicorn(config(fake_upstream))
    yield g
    g.close()


def test_sdk_through_the_gateway_to_anthropic_tools_and_signed_thinking(gw, fake_upstream):
    c = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    r = c.messages.create(model="ant:claude-echo", max_tokens=100, system="sys",
                          messages=[{"role": "user", "content": "hello"}])
    assert r.content[0].text == "Echo: hello" and r.usage.input_tokens == 11
    body = sent(fake_upstream)
    assert body["system"] == [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    assert body["max_tokens"] == 100

    q = {"role": "user", "content": "weather?"}
    with c.messages.stream(model="ant:claude-tools", max_tokens=100, tools=TOOLS, messages=[q]) as s:
        final = s.get_final_message()
    use = final.content[-1]
    assert final.stop_reason == "tool_use" and (use.id, use.input) == ("toolu_fake_1", {"city": "Tokyo"})
    r = c.messages.create(model="ant:claude-tools", max_tokens=100, tools=TOOLS, messages=[
        q, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert r.stop_reason == "end_turn"

    think = dict(model="ant:claude-think", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2048})
    r = c.messages.create(messages=[{"role": "user", "content": "ponder"}], **think)
    assert r.content[0].type == "thinking" and r.content[0].signature == signature("Let me think.")
    assert sent(fake_upstream)["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    again = c.messages.create(messages=[{"role": "user", "content": "ponder"},
                                        {"role": "assistant", "content": [b.model_dump() for b in r.content]},
                                        {"role": "user", "content": "again"}], **think)
    assert again.content[-1].text == "Echo: again"   # the fake checked the signature came back
    assert c.messages.count_tokens(model="ant:claude-echo", system="a b",
                                   messages=[{"role": "user", "content": "c d e"}]).input_tokens == 5


def test_responses_sdk_function_call_round_trip_to_anthropic(gw, fake_upstream):
    import openai
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["input_schema"]}]
    events = list(c.responses.create(model="ant:claude-tools", input="weather?", tools=tools, stream=True))
    call = [e.item for e in events if e.type == "response.output_item.done"][-1]
    assert events[-1].type == "response.completed" and call.type == "function_call"
    assert (call.call_id, json.loads(call.arguments)) == ("toolu_fake_1", {"city": "Tokyo"})
    r = c.responses.create(model="ant:claude-tools", tools=tools, input=[
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r.status == "completed" and r.output_text == "Echo: weather?"
    result = sent(fake_upstream)["messages"][2]["content"][0]
    assert (result["type"], result["tool_use_id"], result["content"]) == ("tool_result", "toolu_fake_1", "sunny")


def test_signed_thinking_survives_a_round_trip_through_the_responses_surface(gw, fake_upstream):
    import openai
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    r = c.responses.create(model="ant:claude-think", input="ponder", reasoning={"effort": "low"})
    rs = r.output[0]
    assert rs.type == "reasoning" and rs.summary[0].text == "Let me think." and rs.encrypted_content
    again = c.responses.create(model="ant:claude-think", reasoning={"effort": "low"}, input=[
        {"role": "user", "content": "ponder"}, rs.model_dump(exclude_none=True),
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": r.output_text}]},
        {"role": "user", "content": "again"}])
    assert again.output_text == "Echo: again"
    assert sent(fake_upstream)["messages"][1]["content"][0] == {
        "type": "thinking", "thinking": "Let me think.", "signature": signature("Let me think.")}


def test_openai_and_ollama_surfaces_reach_anthropic_tool_results_paired(make_app, fake_upstream):
    app = make_app(config(fake_upstream)).test_client()
    r = app.post("/v1/chat/completions", json={"model": "ant:claude-tools", "tools": OAI_TOOLS,
                                               "messages": [{"role": "user", "content": "w"}]})
    call = r.get_json()["choices"][0]["message"]["tool_calls"][0]
    assert call["id"] == "toolu_fake_1" and json.loads(call["function"]["arguments"]) == {"city": "Tokyo"}
    # Ollama's clients keep no ids: results are paired with the calls by name and position
    r = app.post("/api/chat", json={"model": "ant:claude-tools", "stream": False, "tools": OAI_TOOLS, "messages": [
        {"role": "user", "content": "w"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    msgs = sent(fake_upstream)["messages"]
    assert msgs[2]["content"][0]["tool_use_id"] == msgs[1]["content"][0]["id"]
    r = app.post("/api/chat", json={"model": "ant:claude-echo", "stream": True,
                                    "messages": [{"role": "user", "content": "x y"}]})
    lines = [json.loads(x) for x in r.get_data(as_text=True).splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == "Echo: x y" and lines[-1]["done_reason"] == "stop"


def test_overloaded_key_rests_briefly_and_the_next_key_answers(make_app, fake_upstream):
    app = make_app(config(fake_upstream, keys=["ovl-ant-1", "ok-ant-2"]))
    c = app.test_client()
    for _ in range(2):
        r = c.post("/v1/messages", json={"model": "ant:claude-echo", "max_tokens": 10,
                                         "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 200
    keys = app.extensions["gateway"].router.providers["ant"].health()["keys"]
    assert keys[0]["resting"] and keys[0]["reason"] == "transient" and 0 < keys[0]["rest_seconds_left"] <= 5
    assert not keys[1]["resting"]


@pytest.mark.parametrize("keys,model,status,etype", [
    (["rl-ant-1"], "claude-echo", 429, "rate_limit_error"),
    (["bad-ant-1"], "claude-echo", 502, "api_error"),
    (["forbid-ant-1"], "claude-echo", 502, "api_error"),
    (["ok-ant-1"], "missing", 404, "not_found_error"),
])
def test_upstream_faults(make_app, fake_upstream, keys, model, status, etype):
    app = make_app(config(fake_upstream, keys=keys))
    r = app.test_client().post("/v1/messages", json={"model": f"ant:{model}", "max_tokens": 10,
                                                     "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == status and r.get_json()["error"]["type"] == etype
    if status == 429:
        assert r.headers["Retry-After"] == "30"
    h = app.extensions["gateway"].router.providers["ant"].health()
    assert "ant-1" not in json.dumps(h) and (status == 404 or h["keys"][0]["resting"])


def test_mid_stream_error_event_ends_the_stream(make_app, fake_upstream):
    app = make_app(config(fake_upstream, keys=["midfail-ant"])).test_client()
    r = app.post("/v1/chat/completions", json={"model": "ant:claude-echo", "stream": True,
                                               "messages": [{"role": "user", "content": "a b c"}]})
    body = r.get_data(as_text=True)
    assert '"content":"Echo: "' in body and "overloaded_error: Overloaded" in body and "[DONE]" not in body


def test_no_keys_means_not_offered(make_app, fake_upstream):
    app = make_app(config(fake_upstream, keys=[]))
    assert not any(m["name"].startswith("ant:") for m in app.test_client().get("/api/tags").get_json()["models"])
