"""The /v1 surface's request checks and wire shape (Flask test client, fake upstream)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import sse_data


def test_a_stream_opens_with_the_role_and_ends_with_done(client):
    r = client.post("/v1/chat/completions", json={"model": "oai:echo", "stream": True,
                                                  "messages": [{"role": "user", "content": "a b"}]})
    assert r.mimetype == "text/event-stream"
    evs = sse_data(r)
    assert evs[-1] == "[DONE]"
    objs = [json.loads(e) for e in evs[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({o["id"] for o in objs}) == 1 and len({o["created"] for o in objs}) == 1
    assert objs[-1]["choices"][0]["finish_reason"] == "stop" and objs[-1]["choices"][0]["delta"] == {}
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == "Echo: a b"


def test_without_stream_the_answer_is_one_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"model": "gem:gemini-2.5-flash",
                                                  "messages": [{"role": "user", "content": [
                                                      {"type": "text", "text": "parts"}]}]})
    j = r.json
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["content"] == "Echo: parts"
    assert j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"]


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "oai:echo"}, "messages"),
    ({"model": "oai:echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "oai:echo", "messages": [], "temperature": "warm"}, "temperature"),
    ({"model": "oai:echo", "messages": [], "temperature": 9}, "temperature"),
    ({"model": "oai:echo", "messages": [], "max_tokens": -5}, "max_tokens"),
    ({"model": "oai:echo", "messages": [], "reasoning_effort": "galactic"}, "reasoning_effort"),
    ({"model": "oai:echo", "messages": [], "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": "oai:echo", "messages": [], "stop": 5}, "stop"),
    ({"model": "oai:echo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "image_url"),
])
def test_bad_input_openai_error_shape(client, body, needle):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.data
    err = r.json["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert "code" in err


def test_unknown_model_and_route(client):
    r = client.post("/v1/chat/completions", json={"model": "x:y", "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 404 and r.json["error"]["type"] == "not_found_error"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json


def test_embeddings_validation(client):
    r = client.post("/v1/embeddings", json={"model": "oai:echo", "input": [1, 2]})
    assert r.status_code == 400 and "input" in r.json["error"]["message"]
    r = client.post("/v1/embeddings", json={"model": "oai:echo", "input": "a", "encoding_format": "hex"})
    assert r.status_code == 400 and "encoding_format" in r.json["error"]["message"]


def test_upstream_body_receives_translated_fields(client, fake_upstream):
    import requests
    r = client.post("/v1/chat/completions", json={
        "model": "oai:echo", "max_tokens": 12, "temperature": 0.5, "stop": "END", "seed": 3,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "u"}]})
    assert r.status_code == 200
    body = requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]
    assert body["model"] == "echo" and body["max_tokens"] == 12 and body["temperature"] == 0.5
    assert body["stop"] == ["END"] and body["seed"] == 3
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][0] == {"role": "system", "content": "sys"}


def _sent(client, fake_upstream, **fields):
    import requests
    r = client.post("/v1/chat/completions", json={"model": "oai:echo", **fields,
                                                  "messages": [{"role": "user", "content": "u"}]})
    assert r.status_code == 200, r.data
    return requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh"])
def test_reasoning_effort_reaches_an_openai_upstream_as_sent(client, fake_upstream, effort):
    body = _sent(client, fake_upstream, reasoning_effort=effort)
    assert body["reasoning_effort"] == effort and "reasoning" not in body


def test_reasoning_object_reaches_an_openai_upstream_as_sent(client, fake_upstream):
    reasoning = {"effort": "minimal", "exclude": True}
    body = _sent(client, fake_upstream, reasoning=reasoning)
    assert body["reasoning"] == reasoning and "reasoning_effort" not in body


def test_json_schema_name_and_strict_reach_an_openai_upstream(client, fake_upstream):
    rf = {"type": "json_schema", "json_schema": {
        "name": "weather_report", "strict": True, "description": "d",
        "schema": {"type": "object", "properties": {"t": {"type": "number"}}, "required": ["t"],
                   "additionalProperties": False}}}
    assert _sent(client, fake_upstream, response_format=rf)["response_format"] == rf


def test_ollama_think_and_format_still_map_for_an_openai_upstream(client, fake_upstream):
    import requests
    schema = {"type": "object", "properties": {"t": {"type": "number"}}}
    r = client.post("/api/chat", json={"model": "oai:echo", "stream": False, "think": "high", "format": schema,
                                       "messages": [{"role": "user", "content": "u"}]})
    assert r.status_code == 200, r.data
    body = requests.get(fake_upstream + "/_stats").json()["bodies"][-1]["body"]
    assert body["reasoning"] == {"effort": "high"} and "reasoning_effort" not in body
    assert body["response_format"]["json_schema"]["schema"] == schema


@pytest.mark.parametrize("effort", [["low"], {"a": 1}, 3])
def test_reasoning_effort_of_the_wrong_type_is_a_400(client, effort):
    r = client.post("/v1/chat/completions", json={"model": "oai:echo", "reasoning_effort": effort,
                                                  "messages": [{"role": "user", "content": "u"}]})
    assert r.status_code == 400 and "reasoning_effort" in r.json["error"]["message"]
