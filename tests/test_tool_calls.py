"""The shared tool-call rules: pairing results with calls, ids, and the arguments parser."""
import json

import pytest

from gateway.canonical import Message, ToolCall
from gateway.errors import BadRequest
from gateway.tool_calls import (MAX_ARGUMENT_DEPTH, arguments_from_output, arguments_from_request,
                                pair_tool_results)


def _nested(depth):
    return "[" * (depth - 1) + "{}" + "]" * (depth - 1)


def test_pairing_fills_ids_and_names_without_touching_the_input():
    msgs = [Message(role="user", content="q"),
            Message(role="assistant", tool_calls=[ToolCall(name="a", arguments={}),
                                                  ToolCall(name="b", arguments={})]),
            Message(role="tool", content="rb", tool_name="b"),
            Message(role="tool", content="ra")]
    out = pair_tool_results(msgs)
    assert [tc.id for tc in out[1].tool_calls] == ["call_1", "call_2"]
    assert (out[2].tool_call_id, out[2].tool_name) == ("call_2", "b")
    assert (out[3].tool_call_id, out[3].tool_name) == ("call_1", "a")
    assert msgs[1].tool_calls[0].id is None and msgs[3].tool_call_id is None


def test_generated_ids_skip_ids_the_client_already_uses():
    msgs = [Message(role="assistant", tool_calls=[ToolCall(name="a", arguments={}, id="call_1"),
                                                  ToolCall(name="a", arguments={}),
                                                  ToolCall(name="a", arguments={}, id="call_1")])]
    ids = [tc.id for tc in pair_tool_results(msgs)[0].tool_calls]
    assert ids[0] == "call_1" and len(set(ids)) == 3


def test_result_after_all_calls_answered_is_left_unpaired():
    msgs = [Message(role="assistant", tool_calls=[ToolCall(name="a", arguments={})]),
            Message(role="tool", content="1"), Message(role="tool", content="2", tool_name="x")]
    out = pair_tool_results(msgs)
    assert out[1].tool_call_id == "call_1"
    assert (out[2].tool_call_id, out[2].tool_name) == (None, "x")


@pytest.mark.parametrize("value, expected", [
    (None, {}), ("", {}), ("  ", {}), ("null", {}), ('{"a": 1}', {"a": 1}), ({"a": [1]}, {"a": [1]})])
def test_request_arguments_accepted(value, expected):
    assert arguments_from_request(value, "f") == expected


@pytest.mark.parametrize("value, says", [
    ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), (7, "expected a JSON object"),
    ('{"k":' + _nested(MAX_ARGUMENT_DEPTH) + "}", "nested deeper"),
    ('{"k":' + _nested(100000) + "}", "nested deeper")])
def test_request_arguments_refused_naming_the_field(value, says):
    with pytest.raises(BadRequest) as e:
        arguments_from_request(value, "messages[1].tool_calls[0].function.arguments")
    assert "messages[1].tool_calls[0].function.arguments" in e.value.message and says in e.value.message


def test_request_arguments_at_the_depth_limit_are_accepted():
    value = '{"k":' + _nested(MAX_ARGUMENT_DEPTH - 1) + "}"
    assert arguments_from_request(value, "f")["k"]


@pytest.mark.parametrize("raw", ["{not json", "[1]", "3", '{"k":' + _nested(100000) + "}"])
def test_output_arguments_that_are_not_an_object_keep_the_raw_text(raw):
    assert arguments_from_output(raw) == {"_raw": raw}


def test_output_arguments_objects_and_strings():
    assert arguments_from_output('{"a": 1}') == {"a": 1}
    assert arguments_from_output({"a": 1}) == {"a": 1}
    assert arguments_from_output("") == {} and arguments_from_output(None) == {}
    deep = json.loads('{"k":' + _nested(MAX_ARGUMENT_DEPTH + 5) + "}")
    assert set(arguments_from_output(deep)) == {"_raw"}


# ---- through the HTTP surfaces ---------------------------------------------------------------
def _call(args):
    return {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": args}}]}


@pytest.mark.parametrize("route, args, says", [
    ("/api/chat", "{not json", "not valid JSON"),
    ("/api/chat", [1], "expected a JSON object"),
    ("/api/chat", json.loads('{"k":' + _nested(MAX_ARGUMENT_DEPTH) + "}"), "nested deeper"),
    ("/v1/chat/completions", "{not json", "not valid JSON"),
    ("/v1/chat/completions", '{"k":' + _nested(100000) + "}", "nested deeper"),
    ("/v1/chat/completions", "[1]", "expected a JSON object")])
def test_bad_request_arguments_are_a_400_naming_the_field(module_client, route, args, says):
    r = module_client.post(route, json={"model": "oai:echo", "stream": False, "messages": [
        {"role": "user", "content": "q"}, _call(args), {"role": "tool", "content": "r"}]})
    assert r.status_code == 400, r.data
    err = r.json["error"] if route == "/api/chat" else r.json["error"]["message"]
    assert "messages[1].tool_calls[0].function.arguments" in err and says in err


def test_string_arguments_are_accepted_on_both_surfaces(module_client):
    for route in ("/api/chat", "/v1/chat/completions"):
        r = module_client.post(route, json={"model": "oai:tools", "stream": False, "messages": [
            {"role": "user", "content": "q"}, _call('{"city": "Tokyo"}'), {"role": "tool", "content": "r"}]})
        assert r.status_code == 200, r.data


def test_broken_arguments_from_a_model_keep_the_raw_text_on_both_surfaces(module_client):
    r = module_client.post("/api/chat", json={"model": "oai:tools-raw", "stream": False,
                                       "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 200, r.data
    assert r.json["message"]["tool_calls"][0]["function"]["arguments"] == {"_raw": '{"city": "Tok'}
    r = module_client.post("/v1/chat/completions", json={"model": "oai:tools-raw",
                                                  "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 200, r.data
    args = r.json["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(args) == {"_raw": '{"city": "Tok'}


@pytest.mark.timeout(30)     # quadratic pairing would take many minutes here
def test_pairing_many_calls_and_results_stays_linear():
    n = 50000
    msgs = [Message(role="assistant", tool_calls=[ToolCall(name=f"f{i % 7}", arguments={}) for i in range(n)])]
    msgs += [Message(role="tool", content="r", tool_name="absent") for _ in range(n)]
    out = pair_tool_results(msgs)
    assert [m.tool_call_id for m in out[1:4]] == ["call_1", "call_2", "call_3"]
