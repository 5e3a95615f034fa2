"""End to end: the real gateway under gunicorn + gevent, driven by the official `ollama`
and `openai` client libraries and raw HTTP, against the fake upstreams on 127.0.0.1."""
from __future__ import annotations

import json

import ollama
import openai
import pytest
import requests

from tests.conftest import Gunicorn, remote_config


@pytest.fixture(scope="module")
def gw(fake_upstream):
    g = Gunicorn(remote_config(fake_upstream))
    yield g
    g.close()


def test_ollama_client_list_show_ps(gw):
    c = ollama.Client(host=gw.url)
    names = [m.model for m in c.list().models]
    assert "oai:echo" in names and "gem:gemini-2.5-flash" in names and "fast" in names
    info = c.show("gem:gemini-2.5-flash")
    assert info.modelinfo is not None and "completion" in info.capabilities
    assert c.ps().models == []


def test_ollama_client_chat_stream_and_not(gw):
    c = ollama.Client(host=gw.url)
    parts = list(c.chat(model="oai:echo", messages=[{"role": "user", "content": "hello world"}], stream=True))
    assert "".join(p.message.content for p in parts) == "Echo: hello world"
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 3
    r = c.chat(model="gem:gemini-2.5-flash", messages=[{"role": "user", "content": "hey"}])
    assert r.message.content == "Echo: hey" and r.message.role == "assistant"
    r = c.chat(model="fast", messages=[{"role": "user", "content": "alias"}])
    assert r.message.content == "Echo: alias"


def test_ollama_client_generate_embed_and_errors(gw):
    c = ollama.Client(host=gw.url)
    assert c.generate(model="oai:echo", prompt="p").response == "Echo: p"
    assert "".join(x.response for x in c.generate(model="oai:echo", prompt="q r", stream=True)) == "Echo: q r"
    assert c.embed(model="gem:text-embedding-004", input=["a", "bb"]).embeddings == [[1.0, 2.0], [2.0, 2.0]]
    assert c.embeddings(model="oai:echo", prompt="xyz").embedding == [3.0, 1.0, 0.5]
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="nope:x", messages=[{"role": "user", "content": "a"}])
    assert e.value.status_code == 404 and "try pulling it first" in e.value.error


def test_ollama_client_tool_calls(gw):
    c = ollama.Client(host=gw.url)
    r = c.chat(model="oai:tools", messages=[{"role": "user", "content": "weather?"}],
               tools=[{"type": "function", "function": {"name": "get_weather", "description": "w",
                                                         "parameters": {"type": "object", "properties": {}}}}])
    assert r.message.tool_calls[0].function.name == "get_weather"
    assert r.message.tool_calls[0].function.arguments == {"city": "Tokyo"}


def test_ollama_client_mid_stream_error_raises(fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["cut-e2e"]
    g = Gunicorn(cfg)
    try:
        c = ollama.Client(host=g.url)
        got = []
        with pytest.raises(ollama.ResponseError):
            for p in c.chat(model="oai:chunks-32-0", messages=[{"role": "user", "content": "a"}], stream=True):
                got.append(p)
        assert got, "partial output arrives before the error line"
    finally:
        g.close()


def test_openai_sdk_chat_stream_usage_and_models(gw):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    r = c.chat.completions.create(model="oai:echo", messages=[{"role": "user", "content": "sdk"}])
    assert r.choices[0].message.content == "Echo: sdk" and r.usage.prompt_tokens == 7
    assert r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="gem:gemini-2.5-flash", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "s t"}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Echo: s t"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    no_usage = list(c.chat.completions.create(model="oai:echo", stream=True,
                                              messages=[{"role": "user", "content": "x"}]))
    assert all(ch.usage is None for ch in no_usage)
    ids = [m.id for m in c.models.list().data]
    assert "oai:meta/llama:free" in ids and "fast" in ids
    assert c.models.retrieve("oai:meta/llama:free").id == "oai:meta/llama:free"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope:nothing")


def test_openai_sdk_tools_completions_embeddings(gw):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    r = c.chat.completions.create(model="oai:tools", messages=[{"role": "user", "content": "w"}],
                                  tools=[{"type": "function", "function": {"name": "get_weather",
                                                                           "parameters": {"type": "object"}}}])
    call = r.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert r.choices[0].finish_reason == "tool_calls"
    comp = c.completions.create(model="oai:echo", prompt="complete me")
    assert comp.choices[0].text == "Echo: complete me"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="oai:echo", prompt="a b", stream=True)
                       if ch.choices)
    assert streamed == "Echo: a b"
    e = c.embeddings.create(model="oai:echo", input=["abcd"])
    assert e.data[0].embedding == [4.0, 1.0, 0.5]
    e64 = c.embeddings.create(model="oai:echo", input="abcd", encoding_format="base64")
    assert e64.data[0].embedding is not None


def test_openai_sdk_errors(fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["rl-e2e-1", "rl-e2e-2"]
    g = Gunicorn(cfg)
    try:
        c = openai.OpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="oai:echo", messages=[{"role": "user", "content": "x"}])
        assert "rl-e2e" not in str(e.value)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="oai:echo", messages="nope")
    finally:
        g.close()


def test_raw_sse_framing_and_mid_stream_error(fake_upstream):
    cfg = remote_config(fake_upstream)
    cfg["providers"]["oai"]["api_keys"] = ["cut-raw"]
    g = Gunicorn(cfg)
    try:
        r = requests.post(g.url + "/v1/chat/completions", stream=True, json={
            "model": "oai:chunks-32-0", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers.get("X-Accel-Buffering") == "no"
        body = r.content.decode()
        events = [e for e in body.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert "[DONE]" not in body
        last = json.loads(events[-1][6:])
        assert set(last["error"]) >= {"message", "type", "code"}
    finally:
        g.close()


def test_raw_ndjson_framing_and_stream_default(gw):
    r = requests.post(gw.url + "/api/chat", stream=True, json={
        "model": "oai:chunks-32-0", "messages": [{"role": "user", "content": "x"}]})
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    raw = r.content
    assert b"\n\n" not in raw and raw.endswith(b"\n")
    objs = [json.loads(line) for line in raw.split(b"\n") if line]
    assert len(objs) == 33 and objs[-1]["done"] is True
    r = requests.post(gw.url + "/v1/chat/completions", json={
        "model": "oai:chunks-32-0", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert r.text.endswith("data: [DONE]\n\n")


def test_cors_preflight_and_origins(gw):
    for origin in ("chrome-extension://abc", "http://localhost:3000", "app://obsidian.md"):
        r = requests.options(gw.url + "/api/chat", headers={"Origin": origin,
                                                            "Access-Control-Request-Method": "POST"})
        assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == origin
    r = requests.options(gw.url + "/api/chat", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
