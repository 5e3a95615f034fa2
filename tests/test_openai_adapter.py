"""OpenAIProvider: wire translation both ways, stream parsing and every key-rotation rule.
Upstreams are canned answers served through the production transport (tests/upstream_stub.py)."""
import base64
import json
import struct
import time

import pytest

from gateway.canonical import ChatRequest, EmbedRequest, Message, Options, ToolCall
from gateway.errors import (Passthrough, UpstreamFailed)
from providers.openai_compat import OpenAIProvider
from providers.openai_wire import sniff_mime, to_body
from providers.think import ThinkSplitter
from providers.remote import UpstreamHTTPError
from tests.helpers import sse_body
from tests.upstream_stub import UpstreamStub, has_header

BASE = "https://upstream.test/api/v1"
CHAT = BASE + "/chat/completions"
EMB = BASE + "/embeddings"
KEYS = ["sk-or-v1-KEYAAAA1111", "sk-or-v1-KEYBBBB2222", "sk-or-v1-KEYCCCC3333"]


upstream = UpstreamStub()


@pytest.fixture(autouse=True)
def _fresh_upstream():
    upstream.reset()
    yield
    upstream.reset()


def make(n_keys=2, **over):
    cfg = {"base_url": BASE, "api_keys": KEYS[:n_keys], "models": ["meta-llama/llama-4:free", "plain"],
           "headers": {"HTTP-Referer": "https://gw.test", "X-Title": "gw"},
           "timeout": 5, "cooldown": 30, "auth_cooldown": 3600, "idle_timeout": 5}
    cfg.update(over)
    return upstream.attach(OpenAIProvider("openrouter", cfg))


def delta(content=None, finish=None, **d):
    if content is not None:
        d["content"] = content
    return {"id": "g1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


USAGE = {"id": "g1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}


def add_stream(body, key=None, url=CHAT, **kw):
    match = [has_header("Authorization", f"Bearer {key}")] if key else []
    upstream.add("POST", url, body=body, status=200,
                  content_type="text/event-stream", match=match, **kw)


def add_err(status, key=None, url=CHAT, body=None, headers=None, exc=None):
    match = [has_header("Authorization", f"Bearer {key}")] if key else []
    if exc is not None:
        upstream.add("POST", url, body=exc, match=match)
        return
    if body is None:
        body = {"error": {"code": status, "message": f"upstream said {status}"}}
    upstream.add("POST", url, json=body, status=status, headers=headers or {}, match=match)


def ok_stream(key=None):
    add_stream(sse_body(delta("hi", role="assistant"), delta(finish="stop"), USAGE), key=key)


def chat(p, uid="meta-llama/llama-4:free", **kw):
    kw.setdefault("messages", [Message(role="user", content="hello")])
    return list(p.chat(ChatRequest(model="openrouter:" + uid, **kw), uid))


def joined(chunks):
    return ("".join(c.content for c in chunks), "".join(c.thinking for c in chunks),
            [t for c in chunks for t in c.tool_calls])


def sent_body(i=0):
    return json.loads(upstream.calls[i].request.body)


def auth_of(i):
    return upstream.calls[i].request.headers["Authorization"]


def key_state(p, i):
    return p.pool.snapshot()["keys"][i]


# ---- canonical -> OpenAI ----------------------------------------------------------------
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 20).decode()
GIF = base64.b64encode(b"GIF89a" + b"\0" * 20).decode()
WEBP = base64.b64encode(b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 20).decode()


@pytest.mark.parametrize("data,mime", [(PNG, "image/png"), (JPEG, "image/jpeg"),
                                       (GIF, "image/gif"), (WEBP, "image/webp"),
                                       (base64.b64encode(b"????????????").decode(), "image/png"),
                                       ("!!not base64!!", "image/png")])
def test_image_type_is_sniffed_from_its_bytes(data, mime):
    assert sniff_mime(data) == mime
    unknown = mime == "image/png" and not data.startswith(PNG[:8])
    assert sniff_mime(data, default="image/jpeg") == ("image/jpeg" if unknown else mime)


def test_messages_system_user_images():
    req = ChatRequest(model="x", messages=[
        Message(role="system", content="be terse"),
        Message(role="user", content="what is this?", images=[JPEG, "data:image/gif;base64,R0lG"]),
        Message(role="user", content="", images=[PNG]),
        Message(role="assistant", content="a cat", thinking="hmm")])
    msgs = to_body(req, "m")["messages"]
    assert msgs[0] == {"role": "system", "content": "be terse"}
    assert msgs[1] == {"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + JPEG}},
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}]}
    # No empty text part next to an image.
    assert msgs[2]["content"] == [{"type": "image_url",
                                   "image_url": {"url": "data:image/png;base64," + PNG}}]
    assert msgs[3] == {"role": "assistant", "content": "a cat"}


def test_tool_results_pair_by_id_then_name_then_position():
    req = ChatRequest(model="x", messages=[
        Message(role="user", content="weather?"),
        Message(role="assistant", tool_calls=[
            ToolCall(name="get_weather", arguments={"city": "Tokyo"}),
            ToolCall(name="get_weather", arguments={"city": "Oslo"}, id="call_given"),
            ToolCall(name="get_time", arguments={})]),
        Message(role="tool", content="2 C", tool_call_id="call_given"),
        Message(role="tool", content="11 C", tool_name="get_weather"),
        Message(role="tool", content="noon", tool_call_id="unknown-id")])
    msgs = to_body(req, "m")["messages"]
    a = msgs[1]
    assert a["role"] == "assistant" and a["content"] is None
    assert a["tool_calls"] == [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}},
        {"id": "call_given", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    assert msgs[2] == {"role": "tool", "tool_call_id": "call_given", "content": "2 C"}
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "11 C"}
    # an id that names no call of the assistant message falls back to position
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_2", "content": "noon"}


def test_tool_results_without_ids_answer_the_open_calls_in_order():
    req = ChatRequest(model="x", messages=[
        Message(role="user", content="weather?"),
        Message(role="assistant", tool_calls=[ToolCall(name="w", arguments={"c": "A"}),
                                              ToolCall(name="w", arguments={"c": "B"})]),
        Message(role="tool", content="a"), Message(role="tool", content="b"),
        Message(role="assistant", content="ok"), Message(role="user", content="again"),
        Message(role="assistant", tool_calls=[ToolCall(name="w", arguments={"c": "C"})]),
        Message(role="tool", content="c")])
    msgs = to_body(req, "m")["messages"]
    ids = [tc["id"] for m in msgs for tc in m.get("tool_calls") or []]
    assert ids == ["call_1", "call_2", "call_3"]
    assert [m["tool_call_id"] for m in msgs if m["role"] == "tool"] == ids


def test_tool_result_with_no_call_to_answer_is_a_400_naming_the_message():
    from gateway.errors import BadRequest
    req = ChatRequest(model="x", messages=[
        Message(role="user", content="weather?"),
        Message(role="assistant", tool_calls=[ToolCall(name="w", arguments={})]),
        Message(role="tool", content="a"), Message(role="tool", content="extra")])
    with pytest.raises(BadRequest, match=r"messages\[3\]"):
        to_body(req, "m")


def test_options_format_tools_think():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    req = ChatRequest(model="x", messages=[Message(role="user", content="q")],
                      options=Options(temperature=0.2, top_p=0.9, top_k=40, num_predict=100,
                                      stop=["\nUser:"], seed=7, presence_penalty=0.5,
                                      frequency_penalty=0.25, num_ctx=8192, repeat_penalty=1.1),
                      format="json", tools=tools, tool_choice="auto", think=True)
    b = to_body(req, "author/model:free")
    assert b["model"] == "author/model:free"
    assert b["stream"] is True and b["stream_options"] == {"include_usage": True}
    for k, v in {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "max_tokens": 100,
                 "stop": ["\nUser:"], "seed": 7, "presence_penalty": 0.5,
                 "frequency_penalty": 0.25}.items():
        assert b[k] == v
    assert "num_ctx" not in b and "repeat_penalty" not in b
    assert b["response_format"] == {"type": "json_object"}
    assert b["tools"] == tools and b["tool_choice"] == "auto"
    assert b["reasoning"] == {"effort": "medium"}


def test_unset_options_are_not_sent():
    b = to_body(ChatRequest(model="x", messages=[Message(role="user", content="q")],
                            options=Options(num_predict=-1)), "m")
    for k in ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "response_format",
              "tools", "tool_choice", "reasoning", "presence_penalty", "frequency_penalty"):
        assert k not in b


def test_schema_format_and_think_levels():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    b = to_body(ChatRequest(model="x", format=schema, think="high"), "m")
    assert b["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": schema, "strict": False}}
    assert b["reasoning"] == {"effort": "high"}
    assert to_body(ChatRequest(model="x", think="max"), "m")["reasoning"] == {"effort": "high"}
    assert "reasoning" not in to_body(ChatRequest(model="x", think=False), "m")
    assert "response_format" not in to_body(ChatRequest(model="x", format=""), "m")


# ---- OpenAI -> canonical: streams ---------------------------------------------------------
def test_stream_content_usage_and_headers():
    add_stream(sse_body(delta("", role="assistant"), delta("Hel"), delta("lo"), delta(finish="stop"),
                   USAGE, comments=True))
    p = make()
    chunks = chat(p)
    assert [c.content for c in chunks] == ["Hel", "lo", ""]   # empty role chunk skipped
    final = chunks[-1]
    assert final.done and final.done_reason == "stop"
    assert (final.prompt_tokens, final.completion_tokens) == (11, 7)
    assert all(not c.done for c in chunks[:-1])
    h = upstream.calls[0].request.headers
    assert h["Authorization"] == f"Bearer {KEYS[0]}"
    assert h["HTTP-Referer"] == "https://gw.test" and h["X-Title"] == "gw"


def test_crlf_framed_stream_with_comments_parses():
    add_stream(sse_body(delta("a"), delta("b", finish="stop"), USAGE, crlf=True, comments=True))
    chunks = chat(make())
    assert joined(chunks)[0] == "ab" and chunks[-1].done_reason == "stop"


def test_stream_reasoning_fields():
    add_stream(sse_body(delta(reasoning="step 1, "), delta(reasoning_content="step 2"),
                   delta("answer"), delta(finish="stop")))
    content, thinking, _ = joined(chat(make()))
    assert (content, thinking) == ("answer", "step 1, step 2")


def test_stream_think_tags_split_across_chunks():
    parts = ["\n<thi", "nk>Let me", " think</th", "ink>\n\nAns", "wer <think> stays"]
    add_stream(sse_body(*[delta(x) for x in parts], delta(finish="stop")))
    content, thinking, _ = joined(chat(make(), uid="DeepSeek-R1"))
    assert thinking == "Let me think"
    assert content == "Answer <think> stays"


def test_think_splitter_edges():
    s = ThinkSplitter()
    assert s.feed("Plain <think>not a tag</think>") == ("Plain <think>not a tag</think>", "")
    s = ThinkSplitter()
    assert s.feed("<think>never closed </thi") == ("", "never closed ")
    assert s.flush() == ("", "</thi")
    s = ThinkSplitter()
    assert s.feed("<th") == ("", "")
    assert s.flush() == ("<th", "")


def test_stream_tool_call_fragments_assembled():
    add_stream(sse_body(
        delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": '{"ci'}}]),
        delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                           "function": {"name": "get_time", "arguments": "{not json"}}]),
        delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Tokyo"}'}}]),
        delta(finish="tool_calls"), USAGE))
    chunks = chat(make(), tools=[{"type": "function", "function": {"name": "get_weather"}}])
    with_calls = [c for c in chunks if c.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    a, b = with_calls[0].tool_calls
    assert (a.id, a.name, a.arguments, a.index) == ("call_a", "get_weather", {"city": "Tokyo"}, 0)
    assert (b.id, b.name, b.arguments, b.index) == ("call_b", "get_time", {"_raw": "{not json"}, 1)
    assert chunks[-1].done_reason == "tool_calls" and chunks[-1].prompt_tokens == 11


@pytest.mark.parametrize("upstream,ours", [("stop", "stop"), ("length", "length"),
                                           ("tool_calls", "tool_calls"),
                                           ("content_filter", "stop")])
def test_upstream_finish_reasons_map_to_ours(upstream, ours):
    add_stream(sse_body(delta("x"), delta(finish=upstream)))
    assert chat(make())[-1].done_reason == ours


def test_done_without_finish_reason_is_a_stop():
    add_stream(sse_body(delta("x")))
    chunks = chat(make())
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


def test_finish_without_done_is_accepted():
    add_stream(sse_body(delta("x", finish="stop"), done=False))
    assert chat(make())[-1].done_reason == "stop"


def test_stream_ended_early_raises():
    add_stream(sse_body(delta("partial"), done=False))
    gen = make().chat(ChatRequest(model="m", messages=[Message(role="user", content="q")]), "m")
    assert next(gen).content == "partial"
    with pytest.raises(UpstreamHTTPError, match="ended early") as ei:
        next(gen)
    assert ei.value.status == 502


def test_mid_stream_error_event_is_raised_scrubbed():
    err = {"id": "g1", "object": "chat.completion.chunk", "provider": "X",
           "error": {"code": "server_error",
                     "message": f"Provider disconnected (key {KEYS[0]})"},
           "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
    add_stream(sse_body(delta("first"), err))
    gen = make().chat(ChatRequest(model="m", messages=[Message(role="user", content="q")]), "m")
    assert next(gen).content == "first"
    with pytest.raises(UpstreamHTTPError) as ei:
        next(gen)
    assert "Provider disconnected" in str(ei.value) and KEYS[0] not in str(ei.value)


def test_malformed_json_in_stream_raises():
    add_stream(sse_body(delta("ok"), "{broken"))
    with pytest.raises(UpstreamHTTPError, match="malformed"):
        chat(make())


def test_non_stream_request_gathers_one_chunk_plus_final():
    add_stream(sse_body(delta(reasoning="r"), delta("a"), delta("b"), delta(finish="length"), USAGE))
    chunks = chat(make(), stream=False)
    assert len(chunks) == 2
    assert (chunks[0].content, chunks[0].thinking, chunks[0].done) == ("ab", "r", False)
    assert chunks[1].done and chunks[1].done_reason == "length"
    assert chunks[1].completion_tokens == 7
    assert sent_body()["stream"] is True   # upstream streams anyway (first-byte timeout)


def test_upstream_that_ignores_stream_answers_json():
    upstream.add("POST", CHAT, json={
        "id": "c1", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "<think>hm</think>ok", "tool_calls": [
                {"id": "call_9", "type": "function",
                 "function": {"name": "f", "arguments": '{"a": 1}'}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    chunks = chat(make(), stream=False)
    content, thinking, calls = joined(chunks)
    assert (content, thinking) == ("ok", "hm")
    assert calls[0].arguments == {"a": 1} and calls[0].id == "call_9"
    assert chunks[-1].done_reason == "tool_calls" and chunks[-1].prompt_tokens == 3


def test_send_is_lazy_and_close_closes_upstream():
    ok_stream()
    p = make()
    gen = p.chat(ChatRequest(model="m", messages=[Message(role="user", content="q")]), "m")
    assert len(upstream.calls) == 0          # nothing sent before the first next()
    opened = []
    real_send = p.send

    def spy(*a, **kw):
        opened.append(real_send(*a, **kw))
        return opened[-1]
    p.send = spy
    assert next(gen).content == "hi"
    gen.close()                                # client disconnect
    assert opened[0].raw.closed


# ---- embeddings -----------------------------------------------------------------------------
def test_embeddings_in_index_order():
    packed = base64.b64encode(struct.pack("<2f", 0.5, -1.0)).decode()
    upstream.add("POST", EMB, json={
        "object": "list", "usage": {"prompt_tokens": 9, "total_tokens": 9},
        "data": [{"index": 1, "embedding": [0.3, 0.4]}, {"index": 0, "embedding": [0.1, 0.2]},
                 {"index": 2, "embedding": packed}]})
    res = make().embed(EmbedRequest(model="m", inputs=["a", "b", "c"], dimensions=2), "bge")
    assert res.embeddings == [[0.1, 0.2], [0.3, 0.4], [0.5, -1.0]]
    assert res.prompt_tokens == 9
    assert sent_body() == {"model": "bge", "input": ["a", "b", "c"], "dimensions": 2}


def test_embeddings_count_mismatch_is_502():
    upstream.add("POST", EMB, json={"data": [{"index": 0, "embedding": [1.0]}]})
    with pytest.raises(UpstreamFailed) as ei:
        make().embed(EmbedRequest(model="m", inputs=["a", "b"]), "bge")
    assert ei.value.status == 502


def test_embeddings_rotate_too():
    add_err(429, key=KEYS[0], url=EMB)
    upstream.add("POST", EMB, json={"data": [{"index": 0, "embedding": [1.0]}]},
                 match=[has_header("Authorization", f"Bearer {KEYS[1]}")])
    assert make().embed(EmbedRequest(model="m", inputs=["a"]), "bge").embeddings == [[1.0]]


# ---- models ----------------------------------------------------------------------------------
def test_cards_name_the_family_and_unlisted_ids_are_forwarded():
    p = make()
    cards = p.models()
    assert [c.name for c in cards] == ["openrouter:meta-llama/llama-4:free", "openrouter:plain"]
    c = cards[0]
    assert c.provider == "openrouter" and c.upstream_id == "meta-llama/llama-4:free"
    assert c.family == "meta-llama" and c.families == ["meta-llama"]
    assert cards[1].family == "openrouter"
    assert c.format == "api" and c.size == 0 and len(c.digest) == 64
    assert c.capabilities == ["completion", "tools"]
    assert p.models()[0].modified_at == c.modified_at
    unlisted = p.card("some/other-model")
    assert unlisted.name == "openrouter:some/other-model"   # forwarded; upstream decides
    assert p.card("plain") == cards[1]
    assert p.offered and not make(n_keys=0).offered


# ---- this upstream's key errors (the attempt loop itself: tests/test_key_rotation.py) -------


@pytest.mark.parametrize("status", [401, 402, 403])
def test_auth_failures_rotate_and_rest_long(status):
    add_err(status, key=KEYS[0])
    ok_stream(key=KEYS[1])
    p = make()
    assert joined(chat(p))[0] == "hi"
    st = key_state(p, 0)
    assert st["reason"] == "auth" and st["rest_seconds_left"] > 3000


def test_moderation_403_goes_back_to_client():
    add_err(403, body={"error": {"code": 403, "message": "Input was flagged",
                                 "metadata": {"reasons": ["violence"], "flagged_input": "x",
                                              "provider_name": "p", "model_slug": "m"}}})
    p = make()
    with pytest.raises(Passthrough) as ei:
        chat(p)
    assert ei.value.status == 403 and "flagged" in str(ei.value)
    assert len(upstream.calls) == 1 and not key_state(p, 0)["resting"]


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_request_errors_pass_through_without_rotation(status):
    add_err(status, body={"error": {"code": status, "message": f"bad request {KEYS[0]}"}})
    p = make()
    with pytest.raises(Passthrough) as ei:
        chat(p)
    assert ei.value.status == status and "bad request" in str(ei.value)
    assert KEYS[0] not in str(ei.value) and KEYS[0] not in ei.value.message
    assert len(upstream.calls) == 1
    assert not any(k["resting"] for k in p.pool.snapshot()["keys"])


# ---- classify details ------------------------------------------------------------------------
def test_each_upstream_error_gets_its_rotate_rest_or_pass_verdict():
    p = make()
    now = time.time()
    assert p.classify(400, {"error": {"code": "429", "message": "rate"}}, "", {})[0] == "rate"
    assert p.classify(500, {"error": {"code": "401"}}, "", {})[0] == "auth"
    assert p.classify(400, {"error": {"message": "Incorrect API key provided"}}, "", {})[0] == "auth"
    assert p.classify(402, {}, "", {"Retry-After": "5"}) == ("transient", 5.0)
    assert p.classify(402, {}, "", {}) == ("auth", None)
    assert p.classify(403, {"error": {"message": "Blocked by moderation"}}, "", {})[0] == "pass"
    assert p.classify(403, {"error": {"message": "forbidden"}}, "", {})[0] == "auth"
    verdict, secs = p.classify(429, {}, "", {"X-RateLimit-Reset": str(int(now + 50))})
    assert verdict == "rate" and 45 < secs <= 50
    assert p.classify(429, {}, "", {"X-RateLimit-Reset": str(int(now - 50))}) == ("rate", None)
    assert p.classify(429, {}, "", {}) == ("rate", None)
    assert p.classify(529, {}, "", {})[0] == "transient"
    assert p.classify(409, {}, "", {})[0] == "pass"
