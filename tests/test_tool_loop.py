"""The agent loop (tool call, then its result) through the real gateway under gunicorn,
driven by the official `ollama` and `openai` clients, against the strict fake upstreams:
results without ids pair with the open calls by position, ids and names when given win,
parallel calls included."""
from __future__ import annotations

import json

import ollama
import openai
import pytest
import requests

from tests.conftest import Gunicorn, remote_config

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# What the fakes answer once the conversation ends with results: OpenAI's fake names the
# city of the call each tool_call_id answers, Gemini's the function of each response.
EXPECT = {"oai": {"tools": "Results: Tokyo: 11 C", "tools-2": "Results: Tokyo: 11 C; Paris: 20 C"},
          "gem": {"tools": "Results: get_weather: 11 C",
                  "tools-2": "Results: get_weather: 11 C; get_weather: 20 C"}}
RESULTS = ["11 C", "20 C"]


@pytest.fixture(scope="module")
def gw(fake_upstream):
    g = Gunicorn(remote_config(fake_upstream))
    yield g
    g.close()


@pytest.mark.parametrize("provider", ["oai", "gem"])
@pytest.mark.parametrize("model", ["tools", "tools-2"])
def test_ollama_client_agent_loop_with_results_without_ids(gw, provider, model):
    c = ollama.Client(host=gw.url)
    messages = [{"role": "user", "content": "weather in Tokyo and Paris?"}]
    r = c.chat(model=f"{provider}:{model}", messages=messages, tools=WEATHER)
    calls = r.message.tool_calls
    assert [tc.function.name for tc in calls] == ["get_weather"] * len(calls)
    assert [tc.function.arguments["city"] for tc in calls] == ["Tokyo", "Paris"][:len(calls)]
    # the client drops ids; results carry neither tool_call_id nor tool_name
    messages += [r.message] + [{"role": "tool", "content": RESULTS[i]} for i in range(len(calls))]
    r = c.chat(model=f"{provider}:{model}", messages=messages, tools=WEATHER)
    assert r.message.content == EXPECT[provider][model]
    streamed = "".join(p.message.content for p in c.chat(model=f"{provider}:{model}", messages=messages,
                                                          tools=WEATHER, stream=True))
    assert streamed == EXPECT[provider][model]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider", ["oai", "gem"])
def test_ollama_answers_carry_call_ids_and_indexes(gw, provider, stream):
    r = requests.post(gw.url + "/api/chat", json={"model": f"{provider}:tools-2", "stream": stream, "tools": WEATHER,
                                                  "messages": [{"role": "user", "content": "w"}]}, timeout=30)
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    calls = [tc for line in lines for tc in line["message"].get("tool_calls") or []]
    assert [tc["function"]["index"] for tc in calls] == [0, 1]
    ids = [tc["id"] for tc in calls]
    assert all(isinstance(i, str) and i.startswith("call_") for i in ids) and len(set(ids)) == 2
    if provider == "oai":
        assert ids == ["call_up0", "call_up1"]      # the upstream's own ids, carried back


def test_tool_call_id_and_tool_name_are_honoured_over_position(gw):
    first = requests.post(gw.url + "/api/chat", json={
        "model": "oai:tools-2", "stream": False, "tools": WEATHER,
        "messages": [{"role": "user", "content": "w"}]}, timeout=30).json()["message"]
    a, b = first["tool_calls"]
    # results in the reverse order, each naming its call: the ids win over position
    messages = [{"role": "user", "content": "w"}, first,
                {"role": "tool", "content": "20 C", "tool_call_id": b["id"]},
                {"role": "tool", "content": "11 C", "tool_call_id": a["id"]}]
    r = requests.post(gw.url + "/api/chat", json={"model": "oai:tools-2", "stream": False, "tools": WEATHER,
                                                  "messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"] == "Results: Paris: 20 C; Tokyo: 11 C"
    # ids stripped from the assistant message, tool_name given: name, then position
    stripped = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "lookup", "arguments": {"city": "Tokyo"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    messages = [{"role": "user", "content": "w"}, stripped,
                {"role": "tool", "content": "20 C", "tool_name": "get_weather"},
                {"role": "tool", "content": "11 C"}]
    r = requests.post(gw.url + "/api/chat", json={"model": "oai:tools-2", "stream": False, "tools": WEATHER,
                                                  "messages": messages}, timeout=30)
    assert r.json()["message"]["content"] == "Results: Paris: 20 C; Tokyo: 11 C"


@pytest.mark.parametrize("provider", ["oai", "gem"])
def test_openai_sdk_agent_loop_with_parallel_calls(gw, provider):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "weather in Tokyo and Paris?"}]
    r = c.chat.completions.create(model=f"{provider}:tools-2", messages=messages, tools=WEATHER)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 2
    assert len({tc.id for tc in msg.tool_calls}) == 2
    messages.append(msg.model_dump(exclude_none=True))
    for tc, result in zip(msg.tool_calls, RESULTS):
        messages.append({"role": "tool", "tool_call_id": tc.id, "content": result})
    r = c.chat.completions.create(model=f"{provider}:tools-2", messages=messages, tools=WEATHER)
    assert r.choices[0].message.content == EXPECT[provider]["tools-2"]


def test_tool_result_answering_no_call_is_a_400(gw, fake_upstream):
    before = requests.get(fake_upstream + "/_stats").json()["requests"]
    r = requests.post(gw.url + "/v1/chat/completions", json={"model": "oai:tools", "messages": [
        {"role": "user", "content": "w"}, {"role": "tool", "content": "1"}]}, timeout=30)
    assert r.status_code == 400 and "messages[1]" in r.json()["error"]["message"]
    assert requests.get(fake_upstream + "/_stats").json()["requests"] == before, "refused before any upstream call"
    # an id the client chose is sent as it came: the upstream's own 400 comes back
    r = requests.post(gw.url + "/v1/chat/completions", json={"model": "oai:tools", "messages": [
        {"role": "user", "content": "w"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, timeout=30)
    assert r.status_code == 400 and "must be a response to a preceeding message" in r.json()["error"]["message"]


@pytest.mark.parametrize("messages, param, says", [
    ([{"role": "user", "content": "w"}, {"role": "tool", "tool_call_id": "c1", "content": "1"}],
     "messages.[1].role", "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'"),
    ([{"role": "user", "content": "w"},
      {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                            "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_tool", "content": "1"}],
     "messages.[2].role", "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'"),
    ([{"role": "user", "content": "w"},
      {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                            "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "user", "content": "never mind"}],
     "messages.[1].role", "The following tool_call_ids did not have response messages: c1")])
def test_fake_openai_upstream_refuses_unpaired_tool_messages_like_openai(fake_upstream, messages, param, says):
    r = requests.post(fake_upstream + "/v1/chat/completions", headers={"Authorization": "Bearer ok-x"},
                      json={"model": "echo", "messages": messages}, timeout=10)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["code"] is None
    assert err["param"] == param and says in err["message"]
