"""Tool calls as every surface and provider handles them: the one parser for `arguments`
(string ⇄ object), the one rule that pairs tool results with the calls they answer, and
the ids calls carry.

Arguments policy:
- In a client's request, `arguments` is an object or a JSON string of one ("" and null
  are {}). Anything else, malformed JSON or nesting deeper than MAX_ARGUMENT_DEPTH is a
  400 naming the field.
- From a model or an upstream, arguments that are not a JSON object (malformed JSON, a
  bare list or number, too deep) never fail the answer: they are kept as the text the
  model produced under RAW_KEY, i.e. `{"_raw": "<text as produced>"}`.
"""
from __future__ import annotations

import json
import secrets
from collections import deque
from dataclasses import replace
from typing import Optional

from gateway.errors import BadRequest

MAX_ARGUMENT_DEPTH = 64
RAW_KEY = "_raw"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# ---- arguments ---------------------------------------------------------------------------
def too_deep(value, limit: int = MAX_ARGUMENT_DEPTH) -> bool:
    """Whether containers nest deeper than `limit` (iterative: no recursion to blow)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))
    return False


def arguments_from_request(value, field: str) -> dict:
    """A client's `arguments` (object or JSON string) as an object; 400 naming `field`."""
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except RecursionError:
            raise BadRequest(f'invalid value for field "{field}": nested deeper than '
                             f"{MAX_ARGUMENT_DEPTH} levels")
        except ValueError as e:
            raise BadRequest(f'invalid value for field "{field}": not valid JSON ({str(e)[:80]})')
        if value is None:
            return {}
    if not isinstance(value, dict):
        raise BadRequest(f'invalid value for field "{field}": expected a JSON object')
    if too_deep(value):
        raise BadRequest(f'invalid value for field "{field}": nested deeper than '
                         f"{MAX_ARGUMENT_DEPTH} levels")
    return value


def arguments_from_output(value) -> dict:
    """A model's or upstream's `arguments` as an object; never raises (see module doc)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        if not too_deep(value):
            return value
        try:
            return {RAW_KEY: _dumps(value)}
        except (RecursionError, ValueError, TypeError):
            return {RAW_KEY: ""}
    text = value if isinstance(value, str) else None
    if text is None:
        try:
            text = _dumps(value)
        except (RecursionError, ValueError, TypeError):
            text = str(value)[:1000]
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return {RAW_KEY: text}
    if isinstance(parsed, dict) and not too_deep(parsed):
        return parsed
    return {} if parsed is None else {RAW_KEY: text}


def arguments_text(args) -> str:
    """Arguments as the JSON string the OpenAI wire carries."""
    if isinstance(args, str):
        return args
    return _dumps(args if args is not None else {})


# ---- ids -----------------------------------------------------------------------------------
def new_call_id() -> str:
    """An id for a call that came without one (the `call_xxxxxxxx` form Ollama uses)."""
    return "call_" + secrets.token_hex(4)


# ---- pairing results with calls ------------------------------------------------------------
def pair_tool_results(messages: list) -> list:
    """Copies of `messages` in which every assistant tool call has an id and every tool
    result names the call it answers (tool_call_id and tool_name), the way Ollama pairs them:

    - calls without an id get `call_<n>`, unique within the conversation, so an assistant
      message and the results that answer it agree;
    - a result answers a call of the nearest preceding assistant message: the one its
      `tool_call_id` names, else the first unanswered call named `tool_name`, else the
      first unanswered call (position: results come in the order of the calls);
    - a result with no open call to answer is left as it came (tool_call_id may be None).
    """
    used = {tc.id for m in messages for tc in m.tool_calls if tc.id}
    counter = [0]

    def fresh() -> str:
        while True:
            counter[0] += 1
            cid = f"call_{counter[0]}"
            if cid not in used:
                used.add(cid)
                return cid

    out = []
    open_calls = _OpenCalls([])
    for m in messages:
        if m.role == "assistant":
            calls, seen = [], set()
            for tc in m.tool_calls:
                cid = tc.id if tc.id and tc.id not in seen else fresh()
                seen.add(cid)
                calls.append(tc if cid == tc.id else replace(tc, id=cid))
            open_calls = _OpenCalls(calls)
            out.append(replace(m, tool_calls=calls) if m.tool_calls else m)
        elif m.role == "tool":
            call = open_calls.answer(m.tool_call_id, m.tool_name)
            out.append(m if call is None else replace(m, tool_call_id=call.id, tool_name=call.name))
        else:
            out.append(m)
    return out


class _OpenCalls:
    """The calls of one assistant message and which are answered; each lookup is amortised
    O(1), so a conversation of many calls and results costs linear time."""

    def __init__(self, calls: list):
        self.by_id = {tc.id: tc for tc in calls}
        self.order = deque(calls)
        self.by_name: dict = {}
        for tc in calls:
            self.by_name.setdefault(tc.name, deque()).append(tc)
        self.answered: set = set()

    def _first(self, queue):
        while queue and queue[0].id in self.answered:
            queue.popleft()
        return queue[0] if queue else None

    def answer(self, call_id: Optional[str], name: Optional[str]):
        call = self.by_id.get(call_id) if call_id else None
        if call is None and name:
            call = self._first(self.by_name.get(name) or deque())
        if call is None:
            call = self._first(self.order)
        if call is not None:
            self.answered.add(call.id)
        return call
