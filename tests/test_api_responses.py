"""The OpenAI Responses surface (/v1/responses): the official `openai` SDK's
responses.create / responses.stream and raw SSE against the real gateway under gunicorn,
routed to the fake OpenAI-type and Gemini upstreams and the tiny local GGUF; translation
unit tests."""
from __future__ import annotations

import json

import openai
import pytest
import requests

from gateway.canonical import Chunk, ToolCall
from gateway.errors import BadRequest
from gateway.http import responses_wire as wire
from gateway.http.streaming import Tally
from tests.conftest import Gunicorn, remote_config
from tests.helpers import with_tiny_local

pytestmark = pytest.mark.timeout(120)
TOOLS = [{"type": "function", "name": "get_weather", "description": "weather in a city", "strict": False,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def gw(fake_upstream):
    cfg = remote_config(fake_upstream, server={"usage_db": "", "heartbeat": 0.5})
    cfg["providers"]["cut"] = {**cfg["providers"]["oai"], "api_keys": ["cut-resp"]}
    cfg["providers"]["slow"] = {**cfg["providers"]["oai"], "api_keys": ["slow-resp"]}
    g = Gunicorn(cfg)
    yield g
    g.close()


def client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def sse_events(text):
    out = []
    for block in text.split("\n\n"):
        lines = [x for x in block.split("\n") if x and not x.startswith(":")]
        if not lines:
            continue
        fields = dict(x.split(": ", 1) for x in lines)
        data = json.loads(fields["data"])
        assert fields["event"] == data["type"]
        out.append(data)
    return out


def last_upstream_body(fake_upstream):
    return requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]


@pytest.mark.parametrize("model,usage_in", [("oai:echo", 7), ("gem:gemini-2.5-flash", 5)])
def test_sdk_create_plain(gw, fake_upstream, model, usage_in):
    r = client(gw).responses.create(model=model, input="hello there", instructions="be brief",
                                    temperature=0.3, top_p=0.9, max_output_tokens=50, store=False)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Echo: hello there" and r.output[0].type == "message"
    assert r.usage.input_tokens == usage_in and r.usage.output_tokens == 3
    if model == "oai:echo":
        sent = last_upstream_body(fake_upstream)
        assert sent["messages"][0] == {"role": "system", "content": "be brief"}
        assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9 and sent["max_tokens"] == 50


def test_sdk_stream_event_sequence(gw):
    with client(gw).responses.stream(model="oai:echo", input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a b c"}]}]) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Echo: a b c"
    assert final.output_text == "Echo: a b c" and final.usage.output_tokens == 4


def test_sdk_function_call_round_trip(gw, fake_upstream):
    c = client(gw)
    r = c.responses.create(model="oai:tools", input="weather in Tokyo?", tools=TOOLS, tool_choice="required")
    call = [o for o in r.output if o.type == "function_call"][0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Tokyo"} and call.call_id.startswith("call_")
    assert last_upstream_body(fake_upstream)["tool_choice"] == "required"

    stream = list(c.responses.create(model="oai:tools", input="weather?", tools=TOOLS, stream=True))
    types = [e.type for e in stream]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = [e for e in stream if e.type == "response.output_item.done"][0]
    assert done.item.type == "function_call" and done.item.call_id.startswith("call_")

    r2 = c.responses.create(model="oai:echo", tools=TOOLS, input=[
        {"type": "message", "role": "developer", "content": "base prompt", "id": "x1"},
        {"type": "message", "role": "user", "content": "weather in Tokyo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments, "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        {"type": "message", "role": "user", "content": "thanks"}])
    assert r2.output_text == "Echo: thanks"
    msgs = last_upstream_body(fake_upstream)["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[2]["tool_calls"][0]["id"] == call.call_id
    assert msgs[3] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_codex_request_shape_is_accepted(gw):
    body = {"model": "oai:echo", "stream": True, "store": False, "tool_choice": "auto", "parallel_tool_calls": True,
            "reasoning": {"summary": "auto"}, "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
            "client_metadata": {"a": "b"},
            "tools": TOOLS + [{"type": "web_search", "external_web_access": False},
                              {"type": "namespace", "name": "ns", "tools": [{**TOOLS[0], "name": "inner"}]}],
            "input": [{"type": "message", "role": "developer", "id": "m0", "content": [{"type": "input_text", "text": "sys"}]},
                      {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque-from-elsewhere"},
                      {"type": "message", "role": "user", "id": "m1", "content": [{"type": "input_text", "text": "go"}]}]}
    r = requests.post(gw.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 200, r.text
    ev = sse_events(r.text)
    assert ev[-1]["type"] == "response.completed" and ev[-1]["response"]["output"][0]["content"][0]["text"] == "Echo: go"


def test_stateful_requests_are_a_clear_400(gw):
    c = client(gw)
    for kw, word in [({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
                     ({"input": [{"type": "item_reference", "id": "x"}]}, "stateless")]:
        args = {"model": "oai:echo", "input": "x", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(**args)
        assert word in e.value.message and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope:x", input="x")


def test_mid_stream_failure_ends_with_response_failed(gw):
    r = requests.post(gw.url + "/v1/responses", json={"model": "cut:chunks-32-0", "input": "a", "stream": True},
                      timeout=30)
    ev = sse_events(r.text)
    assert ev[0]["type"] == "response.created" and any(e["type"] == "response.output_text.delta" for e in ev)
    assert ev[-1]["type"] == "response.failed" and ev[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))


def test_keepalive_while_the_upstream_is_silent(gw):
    r = requests.post(gw.url + "/v1/responses", json={"model": "slow:echo", "input": "late", "stream": True},
                      timeout=30)
    blocks = r.text.split("\n\n")
    assert blocks[0].startswith("event: response.created") and blocks[1].startswith("event: response.in_progress")
    assert blocks[2] == ": keep-alive"
    assert sse_events(r.text)[-1]["type"] == "response.completed"


def test_responses_against_a_local_gguf(fake_upstream, tmp_path):
    g = Gunicorn(with_tiny_local(remote_config(fake_upstream), tmp_path))
    try:
        c = client(g)
        r = c.responses.create(model="local:tiny", input="hello world", max_output_tokens=4)
        assert r.status in ("completed", "incomplete") and r.usage.output_tokens >= 1
        if r.status == "incomplete":
            assert r.incomplete_details.reason == "max_output_tokens"
        events = list(c.responses.create(model="local:tiny", input="hello", max_output_tokens=4, stream=True))
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert [e.sequence_number for e in events] == list(range(len(events)))
    finally:
        g.close()


# ---- translation -----------------------------------------------------------------------------
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def test_every_item_type_translates_to_the_canonical_model():
    rs = wire.reasoning_item("rs_1", "pondering", "sig-9")
    req = wire.chat_request({
        "model": "m", "instructions": "sys", "reasoning": {"effort": "high"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "tool_choice": {"type": "function", "name": "get_weather"}, "tools": TOOLS,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                         {"type": "input_image", "image_url": "data:image/png;base64," + PNG}]},
            rs,
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "calling"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": ""},
            {"type": "function_call_output", "call_id": "c1", "output": "cold"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "warm"}]}]})
    m = req.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool", "tool"]
    assert m[1].images == [PNG] and m[2].content == "calling"
    assert m[2].thinking == "pondering" and m[2].thinking_signature == "sig-9"
    assert [(t.id, t.arguments) for t in m[2].tool_calls] == [("c1", {"city": "Oslo"}), ("c2", {})]
    assert (m[3].tool_call_id, m[3].tool_name, m[4].content) == ("c1", "get_weather", "warm")
    assert req.think == "high" and req.format == {"type": "object"}
    assert wire.chat_request({"model": "m", "input": "x", "tool_choice": "required"}).tool_choice is None
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}


def test_canonical_answers_render_as_output_items():
    t = Tally(0.0)
    for ch in [Chunk(thinking="th"), Chunk(content="hi"), Chunk(tool_calls=[ToolCall(name="f", arguments={"a": 1}, id="c9")]),
               Chunk(done=True, done_reason="length", prompt_tokens=3, completion_tokens=2)]:
        t.add(ch)
    out = wire.whole_output(t)
    assert [o["type"] for o in out] == ["reasoning", "message", "function_call"]
    assert out[1]["content"][0]["text"] == "hi" and out[2]["arguments"] == '{"a":1}' and out[2]["call_id"] == "c9"
    assert wire.status_of(t.final) == "incomplete"
    again = wire.chat_request({"model": "m", "input": [out[0], {"type": "function_call", "call_id": "c9", "name": "f",
                                                                "arguments": "{}"}]})
    assert again.messages[0].thinking == "th"


@pytest.mark.parametrize("body,field", [
    ({"input": 5}, "input"),
    ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]}, "input[0].arguments"),
    ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "tool_choice": 3}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(BadRequest) as e:
        wire.chat_request({"model": "m", **body})
    assert field in e.value.message


def test_sdk_input_tokens_count_and_no_stored_responses(gw):
    from gateway.http.common import estimate_tokens
    c = client(gw)
    # the fake Gemini counts words: the upstream's own count, not the estimate
    assert c.responses.input_tokens.count(model="gem:gemini-2.5-flash", input="three small words").input_tokens == 3
    n = c.responses.input_tokens.count(model="oai:echo", input="three small words", instructions="sys").input_tokens
    assert n == estimate_tokens(wire.chat_request({"model": "m", "input": "three small words", "instructions": "sys"}))
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve("resp_123")
    assert "stores no responses" in e.value.message


def test_format_effort_and_choice_reach_the_upstream(gw, fake_upstream):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    client(gw).responses.create(model="oai:echo", input="x", reasoning={"effort": "low"},
                                text={"format": {"type": "json_schema", "name": "r", "schema": schema}},
                                tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"})
    sent = last_upstream_body(fake_upstream)
    assert sent["response_format"]["json_schema"]["schema"] == schema
    assert sent["reasoning"] == {"effort": "low"}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
