"""Hypothesis-generated bodies for every route: never a 500, never a hang."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull",
          "/api/copy", "/api/create", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
MODELS = st.sampled_from(["oai:echo", "gem:gemini-2.5-flash", "fast", "nope:x", "", "oai:", ":x", "local:none"])
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 5]),
                                 "content": values}, optional={"images": values, "tool_calls": values})
body = st.fixed_dictionaries({}, optional={
    "model": MODELS | values, "messages": st.lists(message, max_size=3) | values, "prompt": values,
    "input": values, "options": st.dictionaries(st.sampled_from(["temperature", "num_predict", "stop", "seed",
                                                                 "top_k", "num_ctx", "junk"]), values) | values,
    "stream": st.just(False) | values, "format": values, "keep_alive": values, "think": values,
    "tools": values, "max_tokens": values, "temperature": values, "response_format": values,
    "stop": values, "source": values, "unknown": values})


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), payload=body)
def test_generated_bodies_never_500(module_client, route, payload):
    data = json.dumps(payload, allow_nan=True)
    r = module_client.post(route, data=data, content_type="application/json")
    assert r.status_code < 500 or r.status_code in (502, 504), (route, data, r.data)
    r.get_data()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), raw=st.binary(max_size=200))
def test_garbage_bytes_never_500(module_client, route, raw):
    r = module_client.post(route, data=raw, content_type="application/json")
    assert r.status_code == 400 or r.status_code == 404, (route, raw, r.data)


def test_deep_nesting_and_huge_numbers(module_client):
    deep = "[" * 100000 + "]" * 100000
    r = module_client.post("/api/chat", data=deep)
    assert r.status_code == 400
    r = module_client.post("/api/chat", data='{"model": "oai:echo", "messages": [], "options": {"seed": 1e400}}')
    assert r.status_code == 400
    r = module_client.post("/api/chat", data='{"model": "oai:echo", "messages": [], "options": {"num_predict": 99999999999999999999999}}')
    assert r.status_code == 400
