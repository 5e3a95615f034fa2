"""Prompts in, answers out: chat templates, the plain transcript for template-less base
models, and the streaming parser that turns generated text into content, thinking and
tool calls while holding back anything that might be the start of a stop string."""
from __future__ import annotations

import json
import re
from typing import Optional

from gateway.canonical import ToolCall
from providers.think import THINK_CLOSE, THINK_OPEN, partial_suffix
from gateway.tool_calls import arguments_from_output, new_call_id, pair_tool_results

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

_formatters: dict = {}


def jinja_messages(messages) -> list:
    """Canonical messages as the dicts HF-style chat templates expect."""
    out = []
    for m in pair_tool_results(messages):
        d = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "id": tc.id,
                                "function": {"name": tc.name, "arguments": tc.arguments}}
                               for tc in m.tool_calls]
        if m.role == "tool":
            if m.tool_name:
                d["name"] = m.tool_name
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def render_template(template: str, messages: list, *, bos: str, eos: str,
                    tools: Optional[list] = None, think=None) -> str:
    """Render a Jinja2 chat template the way llama-cpp-python (and transformers) do."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    key = (template, bos, eos)
    fmt = _formatters.get(key)
    if fmt is None:
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        if len(_formatters) > 64:
            _formatters.clear()
        _formatters[key] = fmt
    extra = {}
    if think is not None:
        extra["enable_thinking"] = bool(think)
    return fmt(messages=messages, tools=tools or None, **extra).prompt


# A base model continues whatever text it is given: without examples of short answers a
# small one repeats the question and rambles to num_predict. Three worked turns set the
# format (gemma3-270m then answers "What is the capital of France? Answer in one word."
# with "Paris." and stops); TRANSCRIPT_STOPS end the answer where the examples do.
FEW_SHOT = ("A conversation between a user and a helpful, knowledgeable assistant. "
            "The assistant answers correctly and briefly.\n\n"
            "User: What is the capital of Italy? Answer in one word.\n"
            "Assistant: Rome.\n"
            "User: How many legs does a spider have?\n"
            "Assistant: A spider has eight legs.\n"
            "User: Say good morning.\n"
            "Assistant: Good morning!\n")
TRANSCRIPT_STOPS = ["\nUser:", "\n\n"]


def transcript(messages, few_shot: bool = True) -> str:
    """For base models without a chat template: system text first, the few-shot
    examples, then `User:` / `Assistant:` lines, ending with `Assistant:` (generation
    stops at TRANSCRIPT_STOPS)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
    lines = []
    for m in messages:
        if m.role == "system":
            continue
        label = {"user": "User", "assistant": "Assistant", "tool": "Tool"}.get(m.role, m.role.title())
        content = (m.content or "").strip()
        if m.role == "assistant" and m.tool_calls and not content:
            content = " ".join(json.dumps({"name": tc.name, "arguments": tc.arguments})
                               for tc in m.tool_calls)
        lines.append(f"{label}: {content}")
    head = system.strip() + "\n\n" if system.strip() else ""
    if few_shot:
        head += FEW_SHOT
    return head + "\n".join(lines) + ("\n" if lines else "") + "Assistant:"


class OutputParser:
    """Feed decoded text; get back [(kind, text)] with kind "content" or "thinking".
    Tool-call blocks are captured whole and parsed at the end. `stopped` turns true when a
    stop string appears (the text before it is returned, the rest dropped)."""

    def __init__(self, stops: list, tools: bool = False, thinking: bool = False,
                 start_thinking: bool = False, lstrip: bool = False):
        self.stops = [s for s in stops if s]
        self.tools = tools
        self.thinking = thinking
        self.mode = "thinking" if start_thinking else "content"
        self.lstrip = lstrip
        self.pending = ""
        self.captured = ""
        self.stopped = False
        self._started = {"content": False, "thinking": False}
        self._after_think = False       # content after </think> starts without blanks

    def _markers(self):
        if self.mode == "content":
            m = list(self.stops)
            if self.tools:
                m.append(TOOL_OPEN)
            if self.thinking:
                m.append(THINK_OPEN)
            return m
        if self.mode == "thinking":
            return list(self.stops) + [THINK_CLOSE]
        return list(self.stops)

    def _emit(self, out, kind, text):
        if not text:
            return
        if not self._started[kind]:
            if (kind == "content" and self.lstrip) or kind == "thinking" or self._after_think:
                text = text.lstrip()
                if not text:
                    return
            self._started[kind] = True
        out.append((kind, text))

    def feed(self, text: str) -> list:
        out: list = []
        if self.stopped or not text:
            return out
        if self.mode == "tool":
            self.captured += text
            self._check_stop_in_capture()
            return out
        self.pending += text
        while self.pending and not self.stopped:
            markers = self._markers()
            hit, pos = None, -1
            for m in markers:
                i = self.pending.find(m)
                if i >= 0 and (pos < 0 or i < pos):
                    hit, pos = m, i
            if hit is None:
                hold = partial_suffix(self.pending, markers)
                cut = len(self.pending) - hold
                self._emit(out, self.mode, self.pending[:cut])
                self.pending = self.pending[cut:]
                break
            before, after = self.pending[:pos], self.pending[pos + len(hit):]
            self._emit(out, self.mode, before)
            if hit in self.stops:
                self.stopped = True
                self.pending = ""
            elif hit == TOOL_OPEN:
                self.mode = "tool"
                self.captured = TOOL_OPEN + after
                self.pending = ""
                self._check_stop_in_capture()
            elif hit == THINK_OPEN:
                self.mode = "thinking"
                self.pending = after
            elif hit == THINK_CLOSE:
                self.mode = "content"
                self._after_think = True
                self.pending = after
        return out

    def _check_stop_in_capture(self):
        for s in self.stops:
            i = self.captured.find(s)
            if i >= 0:
                self.captured = self.captured[:i]
                self.stopped = True

    def finish(self):
        """([(kind, text)], [ToolCall]) for whatever is left when generation ends."""
        out: list = []
        if self.pending:
            self._emit(out, self.mode if self.mode != "tool" else "content", self.pending)
            self.pending = ""
        calls: list = []
        if self.captured:
            calls, rest = parse_tool_calls(self.captured)
            if rest.strip():
                self._emit(out, "content", rest)
            self.captured = ""
        return out, calls


_TOOL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_calls(text: str):
    """Hermes/Qwen style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    blocks -> ([ToolCall], text that was not a valid call)."""
    calls, leftovers = [], []
    last = 0
    for m in _TOOL_BLOCK.finditer(text):
        leftovers.append(text[last:m.start()])
        last = m.end()
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            leftovers.append(m.group(0))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            leftovers.append(m.group(0))
            continue
        args = arguments_from_output(obj.get("arguments", obj.get("parameters")))
        calls.append(ToolCall(name=obj["name"], arguments=args, id=new_call_id(), index=len(calls)))
    leftovers.append(text[last:])
    return calls, "".join(leftovers)
