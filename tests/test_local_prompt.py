"""Prompt building and the streaming output parser (pure Python, no model)."""
import pytest

from gateway.canonical import Message, ToolCall
from providers.local.prompt import FEW_SHOT, OutputParser, jinja_messages, parse_tool_calls, render_template, transcript
from tests.tiny_gguf import CHATML, CHATML_TOOLS

pytestmark = pytest.mark.timeout(30)


def feed_all(parser, pieces):
    out = []
    for p in pieces:
        out += parser.feed(p)
    tail, calls = parser.finish()
    return out + tail, calls


def text_of(out, kind="content"):
    return "".join(t for k, t in out if k == kind)


def test_transcript():
    msgs = [Message(role="system", content="You are terse."),
            Message(role="user", content="What is the capital of France?"),
            Message(role="assistant", content="Paris."),
            Message(role="user", content="And of Italy?")]
    assert transcript(msgs, few_shot=False) == (
        "You are terse.\n\nUser: What is the capital of France?\n"
        "Assistant: Paris.\nUser: And of Italy?\nAssistant:")
    assert transcript([Message(role="user", content="hi")], few_shot=False) == "User: hi\nAssistant:"
    # by default worked examples of short answers come after the system text
    assert transcript(msgs) == ("You are terse.\n\n" + FEW_SHOT + "User: What is the capital of France?\n"
                                "Assistant: Paris.\nUser: And of Italy?\nAssistant:")


def test_chatml_render():
    msgs = jinja_messages([Message(role="user", content="hi")])
    text = render_template(CHATML, msgs, bos="<s>", eos="</s>")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = render_template(CHATML_TOOLS, msgs, bos="<s>", eos="</s>", tools=tools)
    assert '"name": "f"' in with_tools


def test_tool_messages_for_templates():
    msgs = jinja_messages([
        Message(role="assistant", tool_calls=[ToolCall(name="f", arguments={"a": 1})]),
        Message(role="tool", content="42", tool_name="f", tool_call_id="call_1")])
    assert msgs[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert msgs[1]["name"] == "f" and msgs[1]["tool_call_id"] == "call_1"


def test_stop_split_across_pieces_is_held_back():
    p = OutputParser(["\nUser:"], lstrip=True)
    out, _ = feed_all(p, [" The capital", " is Paris.", "\n", "Us", "er:", " more"])
    assert text_of(out) == "The capital is Paris."
    assert p.stopped


def test_partial_stop_released_when_not_a_stop():
    p = OutputParser(["\nUser:"])
    out, _ = feed_all(p, ["a\n", "Use", "ful"])
    assert text_of(out) == "a\nUseful"
    assert not p.stopped


def test_tool_calls_parsed():
    p = OutputParser([], tools=True)
    pieces = ["Let me check. <tool", '_call>{"name": "get_weather", ',
              '"arguments": {"city": "Tokyo"}}</tool_call>']
    out, calls = feed_all(p, pieces)
    assert text_of(out) == "Let me check. "
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Tokyo"})]
    assert calls[0].id.startswith("call_")


def test_bad_tool_call_comes_back_as_text():
    calls, rest = parse_tool_calls("<tool_call>not json</tool_call>")
    assert calls == [] and "not json" in rest
    calls, rest = parse_tool_calls('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
                                   '<tool_call>{"name": "b"}')
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert [c.index for c in calls] == [0, 1]


def test_thinking_split():
    p = OutputParser([], thinking=True)
    out, _ = feed_all(p, ["<thi", "nk>\nhmm, ", "Paris</th", "ink>\n\nParis."])
    assert text_of(out, "thinking") == "hmm, Paris"
    assert text_of(out) == "Paris."
    p = OutputParser([], thinking=True, start_thinking=True)   # template opened <think>
    out, _ = feed_all(p, ["a", "</think>", "b"])
    assert (text_of(out, "thinking"), text_of(out)) == ("a", "b")
