"""GeminiProvider: translation both ways, streaming, embeddings and key rotation, against
canned answers served through the production transport (tests/upstream_stub.py)."""
from __future__ import annotations

import base64
import io
import json
import math

import pytest

from gateway.canonical import ChatRequest, EmbedRequest, Message, Options, ToolCall
from gateway.errors import (BadRequest, Passthrough, RateLimited, UpstreamFailed)
from providers import gemini_wire as wire
from providers.gemini import GeminiProvider
from providers.remote import UpstreamHTTPError
from providers.schema_sanitize import sanitize_schema
from tests.helpers import sse_body
from tests.upstream_stub import UpstreamStub

BASE = "https://gemini.test/v1beta"
K1, K2, K3 = "AIzaKEYONE-1111", "AIzaKEYTWO-2222", "AIzaKEYTHREE-3333"
STREAM_URL = BASE + "/models/gemini-2.5-flash:streamGenerateContent"
SIG = base64.b64encode(bytes(range(200))).decode()       # has "+", "/" and padding


upstream = UpstreamStub()


@pytest.fixture(autouse=True)
def _fresh_upstream():
    upstream.reset()
    yield
    upstream.reset()


def make(keys=(K1,), **extra):
    cfg = {"base_url": BASE, "api_keys": list(keys), "models": ["gemini-2.5-flash",
                                                              "gemini-embedding-001"],
           "cooldown": 30, "auth_cooldown": 3600}
    cfg.update(extra)
    return upstream.attach(GeminiProvider("google", cfg))


def chat_req(*messages, **kw):
    msgs = [m if isinstance(m, Message) else Message(role="user", content=m) for m in messages]
    return ChatRequest(model="google:gemini-2.5-flash", messages=msgs or [Message("user", "hi")],
                       **kw)


def body_of(p, req, uid="gemini-2.5-flash"):
    return wire.build_generate_body(req, uid, p._remembered)


def sse(*events, crlf=False):
    return sse_body(*events, done=False, crlf=crlf)     # Gemini sends no [DONE]


def ev(parts=None, finish=None, usage=None):
    cand = {"content": {"role": "model", "parts": parts or []}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    out = {"candidates": [cand]}
    if usage:
        out["usageMetadata"] = usage
    return out


def err_body(code, status, message, details=()):
    return {"error": {"code": code, "status": status, "message": message, "details": list(details)}}


def run(p, req, uid="gemini-2.5-flash"):
    return list(p.chat(req, uid))


def sent_json(i=-1):
    return json.loads(upstream.calls[i].request.body)


# ---- discovery --------------------------------------------------------------------------
def test_cards_show_family_capabilities_and_a_stable_digest():
    p = make()
    cards = {c.name: c for c in p.models()}
    flash = cards["google:gemini-2.5-flash"]
    assert flash.family == "gemini" and flash.families == ["gemini"] and flash.format == "api"
    assert {"completion", "tools", "vision"} <= set(flash.capabilities)
    assert len(flash.digest) == 64 and flash.size == 0 and flash.modified_at > 0
    emb = cards["google:gemini-embedding-001"]
    assert "embedding" in emb.capabilities and "completion" not in emb.capabilities
    assert make().models()[0].modified_at == flash.modified_at        # stable
    unlisted = p.card("gemini-3-pro-preview")
    assert unlisted.name == "google:gemini-3-pro-preview" and unlisted.upstream_id == "gemini-3-pro-preview"
    assert p.offered and not make(keys=()).offered


# ---- request translation -------------------------------------------------------------------
def test_system_roles_merging_and_user_first():
    p = make()
    req = chat_req(Message("system", "Be terse."), Message("assistant", "Hello there"),
                   Message("user", "a"), Message("user", "b"), Message("system", "Use metric."),
                   Message("assistant", "ok"), system="Be terse.")
    b = body_of(p, req)
    assert b["systemInstruction"] == {"parts": [{"text": "Be terse.\n\nUse metric."}]}
    roles = [c["role"] for c in b["contents"]]
    assert roles == ["user", "model", "user", "model"]
    assert b["contents"][0]["parts"] == [{"text": " "}]
    assert b["contents"][2]["parts"] == [{"text": "a"}, {"text": "b"}]
    assert "generationConfig" not in b and "tools" not in b


def test_req_system_for_generate():
    b = body_of(make(), chat_req("hi", system="You are a poet.", kind="generate"))
    assert b["systemInstruction"]["parts"][0]["text"] == "You are a poet."


def test_tool_results_become_one_user_turn():
    p = make()
    req = chat_req(Message("user", "weather?"),
                   Message("assistant", "", tool_calls=[
                       ToolCall("get_weather", {"city": "Tokyo"}, id="call_a"),
                       ToolCall("get_time", {"tz": "JST"}, id="call_b")]),
                   Message("tool", "11 C", tool_call_id="call_a"),
                   Message("tool", '{"time": "10:00"}', tool_name="get_time"))
    c = body_of(p, req)["contents"]
    assert [x["role"] for x in c] == ["user", "model", "user"]
    assert c[2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"result": "11 C"}}},
        {"functionResponse": {"name": "get_time", "response": {"time": "10:00"}}}]
    assert c[1]["parts"][0]["functionCall"] == {"name": "get_weather", "args": {"city": "Tokyo"}}


def test_tool_result_without_name_or_id_takes_pending_call():
    req = chat_req(Message("user", "x"),
                   Message("assistant", tool_calls=[ToolCall("lookup", {"q": 1})]),
                   Message("tool", "[1, 2]"))
    part = body_of(make(), req)["contents"][2]["parts"][0]
    assert part == {"functionResponse": {"name": "lookup", "response": {"result": "[1, 2]"}}}


def test_unknown_signature_gets_placeholder_on_first_call_only():
    req = chat_req(Message("user", "x"), Message("assistant", tool_calls=[
        ToolCall("f", {"a": 1}, id="call_1"), ToolCall("g", {}, id="call_2")]))
    parts = body_of(make(), req)["contents"][1]["parts"]
    assert parts[0]["thoughtSignature"] == wire.PLACEHOLDER_SIGNATURE
    assert "thoughtSignature" not in parts[1]


def test_signature_from_extra_is_sent():
    req = chat_req(Message("user", "x"), Message("assistant", tool_calls=[
        ToolCall("f", {}, id="whatever", extra={"thought_signature": "c2lnbmF0dXJl"})]))
    assert body_of(make(), req)["contents"][1]["parts"][0]["thoughtSignature"] == "c2lnbmF0dXJl"


def test_call_id_codec():
    cid = wire.encode_call_id("call_1234abcd", SIG)
    assert cid.startswith("call_1234abcd_ts_") and all(ch not in cid for ch in "+/=")
    assert wire.signature_from_id(cid) == SIG
    assert wire.signature_from_id("call_1234abcd") is None
    assert wire.signature_from_id("get_ts_data") is None        # someone else's id
    assert wire.encode_call_id("call_x", "not base64!") == "call_x"


def test_thought_signature_round_trip_through_id():
    p = make()
    call_part = {"functionCall": {"name": "get_weather", "args": {"city": "Tokyo"}},
                 "thoughtSignature": SIG}
    upstream.add("POST", STREAM_URL, body=sse(ev([call_part], "STOP")),
                  content_type="text/event-stream")
    chunks = run(p, chat_req("weather in Tokyo?", think=True))
    tc = chunks[0].tool_calls[0]
    assert tc.name == "get_weather" and tc.arguments == {"city": "Tokyo"}
    assert tc.extra == {"thought_signature": SIG}
    assert chunks[-1].done and chunks[-1].done_reason == "stop"

    # The client keeps only the id (Ollama/OpenAI drop `extra`); a fresh provider
    # (restart, other worker) has no memory, so the id alone must carry it.
    echoed = ToolCall("get_weather", {"city": "Tokyo"}, id=tc.id)
    req2 = chat_req(Message("user", "weather in Tokyo?"), Message("assistant", tool_calls=[echoed]),
                    Message("tool", "11 C", tool_call_id=tc.id))
    part = body_of(make(), req2)["contents"][1]["parts"][0]
    assert part["thoughtSignature"] == SIG
    # A client that dropped the id too is served from the provider's memory.
    no_id = ToolCall("get_weather", {"city": "Tokyo"})
    req3 = chat_req(Message("user", "q"), Message("assistant", tool_calls=[no_id]))
    assert body_of(p, req3)["contents"][1]["parts"][0]["thoughtSignature"] == SIG


def test_refused_signature_is_retried_once_with_placeholders():
    p = make(keys=(K1, K2))
    tc = ToolCall("f", {"a": 1}, id=wire.encode_call_id("call_00000000", SIG))
    req = chat_req(Message("user", "x"), Message("assistant", tool_calls=[tc, ToolCall("g", {})]),
                   Message("tool", "1", tool_name="f"), Message("tool", "2", tool_name="g"))

    def cb(request):
        parts = json.loads(request.body)["contents"][1]["parts"]
        if parts[0]["thoughtSignature"] == SIG:
            return 400, {}, json.dumps(err_body(400, "INVALID_ARGUMENT",
                                                "Corrupted thought signature."))
        assert [x["thoughtSignature"] for x in parts] == [wire.PLACEHOLDER_SIGNATURE] * 2
        return 200, {}, sse(ev([{"text": "ok"}], "STOP"))
    upstream.add_callback("POST", STREAM_URL, callback=cb)
    assert run(p, req)[0].content == "ok" and len(upstream.calls) == 2


def test_other_400_is_not_retried_for_signatures():
    upstream.add("POST", STREAM_URL, status=400,
                  json=err_body(400, "INVALID_ARGUMENT", "Function call is missing a thought_signature"))
    # No real signature was sent, so a retry could not change anything.
    with pytest.raises(Passthrough):
        run(make(), chat_req(Message("user", "x"),
                             Message("assistant", tool_calls=[ToolCall("f", {})])))
    assert len(upstream.calls) == 1


def test_images_inline_data_with_sniffed_mime():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()
    jpg = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 20).decode()
    gif = base64.b64encode(b"GIF89a" + b"\0" * 20).decode()
    webp = base64.b64encode(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20).decode()
    req = chat_req(Message("user", "what?", images=[png, jpg, gif, webp,
                                                    "data:image/png;base64," + jpg]))
    parts = body_of(make(), req)["contents"][0]["parts"]
    assert parts[0] == {"text": "what?"}
    mimes = [x["inlineData"]["mimeType"] for x in parts[1:]]
    assert mimes == ["image/png", "image/jpeg", "image/gif", "image/webp", "image/png"]
    assert parts[1]["inlineData"]["data"] == png and parts[5]["inlineData"]["data"] == jpg


def test_options_to_generation_config():
    o = Options(temperature=0.2, top_p=0.9, top_k=40, num_predict=256, seed=7,
                stop=["a", "b", "c", "d", "e", "f"], presence_penalty=0.5, frequency_penalty=0.0,
                repeat_penalty=1.1, num_ctx=4096)
    g = body_of(make(), chat_req("x", options=o))["generationConfig"]
    assert g == {"temperature": 0.2, "topP": 0.9, "topK": 40, "maxOutputTokens": 256,
                 "stopSequences": ["a", "b", "c", "d", "e"], "seed": 7, "presencePenalty": 0.5}
    g = body_of(make(), chat_req("x", options=Options(num_predict=-1)))
    assert "generationConfig" not in g


def test_format_json_and_schema():
    g = body_of(make(), chat_req("x", format="json"))["generationConfig"]
    assert g == {"responseMimeType": "application/json"}
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "Person",
              "type": "object", "additionalProperties": False,
              "properties": {"name": {"type": "string", "title": "Name", "default": "x"},
                             "age": {"type": ["integer", "null"], "examples": [3]},
                             "pet": {"$ref": "#/$defs/Pet"},
                             "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "pet", "ghost"],
              "$defs": {"Pet": {"type": "object", "properties": {
                  "kind": {"enum": ["cat", "dog"]}, "n": {"enum": [1, 2]}}}}}
    g = body_of(make(), chat_req("x", format=schema))["generationConfig"]
    assert g["responseMimeType"] == "application/json"
    assert g["responseSchema"] == {
        "type": "OBJECT",
        "properties": {
            "name": {"type": "STRING"},
            "age": {"type": "INTEGER", "nullable": True},
            "pet": {"type": "OBJECT", "properties": {
                "kind": {"type": "STRING", "enum": ["cat", "dog"]},
                "n": {"type": "STRING", "enum": ["1", "2"]}}},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 3}},
        "required": ["name", "pet"]}


def test_sanitizer_edge_cases():
    s = sanitize_schema({"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}],
                         "description": "d"})
    assert s == {"type": "STRING", "nullable": True, "description": "d"}
    s = sanitize_schema({"type": ["string", "number"]})
    assert s == {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]}
    node = {"type": "object", "properties": {"child": {"$ref": "#"}}}
    # A recursive type is unrolled once, then cut to a bare OBJECT.
    assert sanitize_schema(node)["properties"]["child"] == {
        "type": "OBJECT", "properties": {"child": {"type": "OBJECT"}}}
    a = {"type": "object", "properties": {"a": {"type": "integer", "format": "int64"}}}
    s = sanitize_schema({"allOf": [{"$ref": "#/definitions/A"},
                                   {"properties": {"b": {"type": "boolean"}}}],
                         "definitions": {"A": a}})
    assert s["properties"] == {"a": {"type": "INTEGER", "format": "int64"}, "b": {"type": "BOOLEAN"}}


def test_tools_and_tool_choice():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"city": {"type": "string", "title": "City"}},
                       "required": ["city"]}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    b = body_of(make(), chat_req("x", tools=tools, tool_choice="required"))
    assert b["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather",
         "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}},
                        "required": ["city"]}},
        {"name": "now"}]}]
    assert b["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    for choice, mode in (("none", "NONE"), ("auto", "AUTO")):
        b = body_of(make(), chat_req("x", tools=tools, tool_choice=choice))
        assert b["toolConfig"]["functionCallingConfig"]["mode"] == mode
    b = body_of(make(), chat_req("x", tools=tools,
                                 tool_choice={"type": "function", "function": {"name": "now"}}))
    assert b["toolConfig"]["functionCallingConfig"] == {"mode": "ANY", "allowedFunctionNames": ["now"]}
    assert "toolConfig" not in body_of(make(), chat_req("x", tools=tools))


@pytest.mark.parametrize("think,expected", [
    (True, {"includeThoughts": True, "thinkingBudget": -1}),
    ("low", {"includeThoughts": True, "thinkingBudget": 1024}),
    ("medium", {"includeThoughts": True, "thinkingBudget": 8192}),
    ("high", {"includeThoughts": True, "thinkingBudget": 24576}),
    (False, {"thinkingBudget": 0}),
])
def test_think_levels_map_to_thinking_budgets(think, expected):
    g = body_of(make(), chat_req("x", think=think))["generationConfig"]
    assert g["thinkingConfig"] == expected


def test_think_none_and_pro_cannot_disable():
    assert "generationConfig" not in body_of(make(), chat_req("x"))
    g = body_of(make(), chat_req("x", think=False), uid="gemini-2.5-pro")["generationConfig"]
    assert g["thinkingConfig"] == {"thinkingBudget": 128}
    # A model that never thinks gets no thinkingConfig for think:false.
    assert "generationConfig" not in body_of(make(), chat_req("x", think=False), uid="gemini-2.0-flash")
    assert "thinking" in make().card("gemini-2.5-flash").capabilities
    assert "thinking" not in make().card("gemini-2.0-flash").capabilities


def test_gemma_gets_system_in_first_user_turn():
    b = body_of(make(), chat_req(Message("system", "Be brief."), Message("user", "hi")),
                uid="gemma-3-27b-it")
    assert "systemInstruction" not in b
    assert b["contents"][0]["parts"] == [{"text": "Be brief.\n\n"}, {"text": "hi"}]


def test_generate_prompt_without_messages():
    req = ChatRequest(model="m", messages=[], prompt="Once upon", kind="generate")
    assert body_of(make(), req)["contents"] == [{"role": "user", "parts": [{"text": "Once upon"}]}]


# ---- streaming -------------------------------------------------------------------------------
def test_stream_text_thinking_usage_and_request_shape():
    p = make()
    upstream.add("POST", STREAM_URL, content_type="text/event-stream", body=sse(
        ev([{"text": "Let me think", "thought": True}], usage={"promptTokenCount": 5}),
        ev([{"text": "Hello"}], usage={"promptTokenCount": 5, "candidatesTokenCount": 1}),
        ev([{"text": " world"}], "STOP", usage={"promptTokenCount": 5, "candidatesTokenCount": 2,
                                                "thoughtsTokenCount": 10})))
    gen = p.chat(chat_req("hi", think=True), "gemini-2.5-flash")
    assert len(upstream.calls) == 0           # lazy: nothing sent before the first next()
    chunks = list(gen)
    assert [c.thinking for c in chunks[:-1]] == ["Let me think", "", ""]
    assert "".join(c.content for c in chunks) == "Hello world"
    last = chunks[-1]
    assert last.done and last.done_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (5, 12)
    assert not any(c.done for c in chunks[:-1])
    call = upstream.calls[0]
    assert call.request.headers["x-goog-api-key"] == K1
    assert "alt=sse" in call.request.url and K1 not in call.request.url and "key=" not in call.request.url
    assert sent_json()["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_stream_crlf_framing_and_function_call():
    p = make()
    upstream.add("POST", STREAM_URL, content_type="text/event-stream", body=sse(
        ev([{"text": "Checking. "}]),
        ev([{"functionCall": {"name": "a", "args": {"x": 1}}, "thoughtSignature": SIG},
            {"functionCall": {"name": "b", "args": {}}}], "STOP"), crlf=True))
    chunks = run(p, chat_req("x"))
    assert chunks[0].content == "Checking. "
    calls = chunks[1].tool_calls
    assert [(c.name, c.arguments, c.index) for c in calls] == [("a", {"x": 1}, 0), ("b", {}, 1)]
    assert calls[0].id != calls[1].id and calls[1].extra == {}
    assert chunks[-1].done_reason == "stop"


def test_max_tokens_is_length_and_safety_is_stop():
    p = make()
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse(ev([{"text": "partial"}], "MAX_TOKENS")))
    assert run(p, chat_req("x"))[-1].done_reason == "length"
    upstream.replace("POST", STREAM_URL, content_type="text/event-stream",
                      body=sse(ev([{"text": "so"}], "SAFETY")))
    assert run(p, chat_req("x"))[-1].done_reason == "stop"


def test_malformed_function_call_is_upstream_error():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse(ev([], "MALFORMED_FUNCTION_CALL")))
    with pytest.raises(UpstreamHTTPError) as e:
        run(make(), chat_req("x"))
    assert e.value.status == 502


def test_blocked_prompt_is_400():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse({"promptFeedback": {"blockReason": "SAFETY"},
                            "usageMetadata": {"promptTokenCount": 3}}))
    with pytest.raises(BadRequest) as e:
        run(make(), chat_req("x"))
    assert e.value.status == 400 and "prompt blocked: SAFETY" in str(e.value)


def test_mid_stream_error_event_is_scrubbed():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse(ev([{"text": "a"}]), err_body(500, "INTERNAL", f"boom for key {K1}")))
    gen = make().chat(chat_req("x"), "gemini-2.5-flash")
    assert next(gen).content == "a"
    with pytest.raises(UpstreamHTTPError) as e:
        next(gen)
    assert "boom" in str(e.value) and K1 not in str(e.value)


def test_raw_json_error_line_without_data_prefix():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse(ev([{"text": "a"}])) + b'{"error": {"code": 503, "message": "overloaded"}}\n')
    with pytest.raises(UpstreamHTTPError, match="overloaded"):
        run(make(), chat_req("x"))


def test_stream_cut_without_finish_reason():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=sse(ev([{"text": "half"}])))
    gen = make().chat(chat_req("x"), "gemini-2.5-flash")
    assert next(gen).content == "half"
    with pytest.raises(UpstreamHTTPError, match="ended early"):
        next(gen)


def test_malformed_json_in_stream():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream",
                  body=b"data: {not json\n\n")
    with pytest.raises(UpstreamHTTPError, match="malformed"):
        run(make(), chat_req("x"))


class _FakeResp:
    def __init__(self, data: bytes):
        self.raw = io.BufferedReader(io.BytesIO(data))
        self.closed = False

    def close(self):
        self.closed = True


def test_client_disconnect_closes_upstream():
    p = make()
    fake = _FakeResp(sse(ev([{"text": "a"}]), ev([{"text": "b"}], "STOP")))
    p.send = lambda *a, **kw: fake
    gen = p.chat(chat_req("x"), "gemini-2.5-flash")
    assert next(gen).content == "a"
    gen.close()
    assert fake.closed


# ---- non-stream --------------------------------------------------------------------------------
def test_non_stream_request_streams_upstream_and_gathers():
    upstream.add("POST", STREAM_URL, content_type="text/event-stream", body=sse(
        ev([{"text": "hm", "thought": True}, {"text": "Hi"}]),
        ev([{"text": "!"}, {"functionCall": {"name": "f", "args": {"q": "x"}, "id": "fc-9"}}], "STOP",
           {"promptTokenCount": 4, "candidatesTokenCount": 3})))
    chunks = run(make(), chat_req("x", stream=False))
    assert len(chunks) == 2
    assert (chunks[0].content, chunks[0].thinking) == ("Hi!", "hm")
    assert chunks[0].tool_calls[0].id == "fc-9"
    assert chunks[1].done and chunks[1].done_reason == "stop"
    assert (chunks[1].prompt_tokens, chunks[1].completion_tokens) == (4, 3)
    assert "alt=sse" in upstream.calls[0].request.url


# ---- embeddings ---------------------------------------------------------------------------------
def test_embed_single_with_dimensions_normalised():
    url = BASE + "/models/gemini-embedding-001:embedContent"
    upstream.add("POST", url, json={"embedding": {"values": [3.0, 4.0]}})
    r = make().embed(EmbedRequest(model="m", inputs=["hello"], dimensions=2), "gemini-embedding-001")
    assert r.embeddings == [[0.6, 0.8]]
    assert sent_json() == {"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 2}


def test_embed_batches_of_100_in_order():
    url = BASE + "/models/gemini-embedding-001:batchEmbedContents"

    def answer(request):
        reqs = json.loads(request.body)["requests"]
        assert all(r["model"] == "models/gemini-embedding-001" for r in reqs)
        return 200, {}, json.dumps({"embeddings": [
            {"values": [float(r["content"]["parts"][0]["text"]), 1.0]} for r in reqs]})

    upstream.add_callback("POST", url, callback=answer)
    texts = [str(i) for i in range(150)]
    r = make().embed(EmbedRequest(model="m", inputs=texts), "gemini-embedding-001")
    assert len(upstream.calls) == 2
    assert [len(json.loads(c.request.body)["requests"]) for c in upstream.calls] == [100, 50]
    assert [v[0] for v in r.embeddings] == [float(i) for i in range(150)]
    assert r.embeddings[3] == [3.0, 1.0]                 # no dimensions: untouched


def test_embed_count_mismatch_is_502():
    upstream.add("POST", BASE + "/models/gemini-embedding-001:batchEmbedContents",
                  json={"embeddings": [{"values": [1.0]}]})
    with pytest.raises(UpstreamFailed):
        make().embed(EmbedRequest(model="m", inputs=["a", "b"]), "gemini-embedding-001")


# ---- errors and key rotation ------------------------------------------------------------------
def by_key(answers):
    """A callback answering per x-goog-api-key: answers[key] = (status, body dict)."""
    def cb(request):
        key = request.headers.get("x-goog-api-key")
        assert "key=" not in request.url
        status, body = answers[key]
        headers = {}
        if isinstance(body, tuple):
            body, headers = body
        if status == 200:
            return 200, {"Content-Type": "text/event-stream"}, sse(ev([{"text": "ok"}], "STOP"))
        return status, headers, json.dumps(body)
    return cb


def rest_left(p, idx):
    return p.pool.snapshot()["keys"][idx]


def key_invalid():
    return err_body(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                      "domain": "googleapis.com"}])


def test_api_key_invalid_rotates_and_rests_long():
    p = make(keys=(K1, K2))
    upstream.add_callback("POST", STREAM_URL, callback=by_key(
        {K1: (400, key_invalid()), K2: (200, None)}))
    chunks = run(p, chat_req("x"))
    assert chunks[0].content == "ok" and len(upstream.calls) == 2
    st = rest_left(p, 0)
    assert st["resting"] and st["reason"] == "auth" and st["rest_seconds_left"] > 3000


def test_failed_precondition_and_403_rest_as_auth():
    p = make(keys=(K1, K2, K3))
    upstream.add_callback("POST", STREAM_URL, callback=by_key({
        K1: (400, err_body(400, "FAILED_PRECONDITION", "User location is not supported")),
        K2: (403, err_body(403, "PERMISSION_DENIED", "denied")), K3: (200, None)}))
    assert run(p, chat_req("x"))[0].content == "ok"
    assert rest_left(p, 0)["reason"] == "auth" and rest_left(p, 1)["reason"] == "auth"


def quota_429(delay=None, quota_id="GenerateRequestsPerMinutePerProjectPerModel-FreeTier"):
    details = [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": quota_id}]}]
    if delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    return err_body(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota", details)


def test_429_retry_delay_rests_that_long():
    p = make(keys=(K1, K2))
    upstream.add_callback("POST", STREAM_URL, callback=by_key(
        {K1: (429, quota_429("37s")), K2: (200, None)}))
    assert run(p, chat_req("x"))[0].content == "ok"
    st = rest_left(p, 0)
    assert st["reason"] == "rate_limit" and 35 <= st["rest_seconds_left"] <= 37.1


def test_all_keys_429_is_rate_limited_with_retry_after():
    p = make(keys=(K1, K2))
    upstream.add_callback("POST", STREAM_URL, callback=by_key(
        {K1: (429, quota_429("0.5s")), K2: (429, (quota_429(), {"Retry-After": "12"}))}))
    with pytest.raises(RateLimited) as e:
        run(p, chat_req("x"))
    assert e.value.status == 429 and e.value.retry_after >= 1
    assert 11 <= rest_left(p, 1)["rest_seconds_left"] <= 12.1       # Retry-After header
    assert "google" in str(e.value)


def test_per_day_quota_rests_until_pacific_midnight():
    p = make(keys=(K1, K2))
    upstream.add_callback("POST", STREAM_URL, callback=by_key({
        K1: (429, quota_429("37s", "GenerateRequestsPerDayPerProjectPerModel-FreeTier")),
        K2: (200, None)}))
    run(p, chat_req("x"))
    left = rest_left(p, 0)["rest_seconds_left"]
    assert 0 < left <= 86400
    assert abs(left - wire.seconds_to_pacific_midnight()) < 5


def test_pacific_midnight_across_dst():
    import datetime
    # 2025-03-09 is the spring-forward day in Los Angeles: 23 hours long.
    start = datetime.datetime(2025, 3, 9, 8, 0, tzinfo=datetime.timezone.utc)   # 00:00 PST
    assert wire.seconds_to_pacific_midnight(start) == 23 * 3600


def test_retry_delays_parse_from_text_and_proto_durations():
    assert wire.parse_duration("37s") == 37 and wire.parse_duration("0.5s") == 0.5
    assert wire.parse_duration({"seconds": "3", "nanos": 500000000}) == 3.5
    assert wire.parse_duration("soon") is None


def test_invalid_argument_passes_through_after_one_call():
    p = make(keys=(K1, K2))
    upstream.add_callback("POST", STREAM_URL, callback=by_key({
        K1: (400, err_body(400, "INVALID_ARGUMENT", f"Unknown name \"foo\" (key {K1})")),
        K2: (400, err_body(400, "INVALID_ARGUMENT", f"Unknown name \"foo\" (key {K2})"))}))
    with pytest.raises(Passthrough) as e:
        run(p, chat_req("x"))
    assert e.value.status == 400 and len(upstream.calls) == 1
    assert "Unknown name" in str(e.value) and K1 not in str(e.value) and K2 not in str(e.value)
    assert not rest_left(p, 0)["resting"]


def test_404_passes_through():
    p = make(keys=(K1, K2))
    upstream.add("POST", BASE + "/models/nope:streamGenerateContent", status=404,
                  json=err_body(404, "NOT_FOUND", "models/nope is not found"))
    with pytest.raises(Passthrough) as e:
        run(p, chat_req("x"), uid="nope")
    assert e.value.status == 404 and len(upstream.calls) == 1


def test_embed_rotates_too():
    p = make(keys=(K1, K2))
    url = BASE + "/models/gemini-embedding-001:embedContent"

    def cb(request):
        if request.headers["x-goog-api-key"] == K1:
            return 429, {}, json.dumps(quota_429("5s"))
        return 200, {}, json.dumps({"embedding": {"values": [1.0, 0.0]}})
    upstream.add_callback("POST", url, callback=cb)
    r = p.embed(EmbedRequest(model="m", inputs=["a"]), "gemini-embedding-001")
    assert r.embeddings == [[1.0, 0.0]] and len(upstream.calls) == 2
    # Non-streamed calls must still see the error body (RetryInfo here).
    assert 4 <= rest_left(p, 0)["rest_seconds_left"] <= 5.1


def test_non_stream_key_invalid_rotates():
    p = make(keys=(K1, K2))

    def cb(request):
        if request.headers["x-goog-api-key"] == K1:
            return 400, {}, json.dumps(key_invalid())
        return 200, {"Content-Type": "text/event-stream"}, sse(ev([{"text": "fine"}], "STOP"))
    upstream.add_callback("POST", STREAM_URL, callback=cb)
    assert run(p, chat_req("x", stream=False))[0].content == "fine"
    assert rest_left(p, 0)["reason"] == "auth"


def test_non_stream_passthrough_keeps_message():
    upstream.add("POST", STREAM_URL, status=400,
                  json=err_body(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
    with pytest.raises(Passthrough, match="Invalid JSON payload"):
        run(make(), chat_req("x", stream=False))


def test_embeddings_are_scaled_to_unit_length_and_zero_stays_zero():
    from providers.vectors import l2_normalise
    v = l2_normalise([1.0, 1.0, 1.0, 1.0])
    assert math.isclose(sum(x * x for x in v), 1.0)
    assert l2_normalise([0.0, 0.0]) == [0.0, 0.0]


def test_proxies_from_the_environment_never_reroute_a_call(monkeypatch, fake_upstream):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")      # nothing listens there
    p = GeminiProvider("google", {"base_url": fake_upstream + "/v1beta", "api_keys": ["ok-proxy-1"],
                                  "models": ["gemini-2.5-flash"], "timeout": 5})
    try:
        assert "".join(c.content for c in run(p, chat_req("straight through"))) == "Echo: straight through"
    finally:
        p.close()
