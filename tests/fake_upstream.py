"""A fake OpenAI-compatible and Gemini upstream on 127.0.0.1, for end-to-end tests and
the benchmark. Run: python tests/fake_upstream.py --port P

Behaviour is chosen by the API key (so one server serves every scenario at once):
  ok...      answers normally          rl...    429 + Retry-After: 30
  rlnh...    429 without Retry-After   bad...   401            forbid... 403
  err...     500                       invalid... Gemini 400 API_KEY_INVALID
  slow...    waits 3 s before headers  cut...    streams 2 chunks, then drops the connection
  echokey... 500 whose body echoes the key (tests scrubbing)
  cutecho... plain-text 400 echoing the key across character 500 (scrub before cutting)
  garbage... a malformed JSON event mid-stream    nodone... stream ends with no finish, no [DONE]
  trunc...   stream cut in the middle of an event
Anthropic's /v1/messages (x-api-key): tests/fake_anthropic.py.
and by the model id:  "chunks-N-D" streams N chunks D ms apart; "missing" → 404;
"tools" / "tools-2" → one / two parallel get_weather calls ("tools-raw": with broken JSON), or, once the conversation ends
with tool results, "Results: <them, joined by '; '>"; Gemini "slow-MS" sends a first event at
once and the rest MS ms later (generateContent waits MS ms before answering);
anything else echoes the last user message.
Both check tool-call pairing as the real services do (400 with their error shape).
GET /_stats → {"requests": {key: n}, "open_streams": n, "bodies": [last 20 bodies]}.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter, deque

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
try:
    from tests import fake_anthropic  # noqa: E402  (imported as a module: bench/fake_server.py)
except ImportError:
    import fake_anthropic  # noqa: E402  (run as a script)
from gevent.pywsgi import WSGIServer  # noqa: E402

STATS = {"requests": Counter(), "open_streams": 0, "bodies": deque(maxlen=20)}
_CHUNKS = re.compile(r"chunks-(\d+)-(\d+)")


def _json(start, status, obj, headers=()):
    body = json.dumps(obj).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + list(headers))
    return [body]


def _key(environ):
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if auth.startswith("Bearer "):
        return auth[7:]
    return environ.get("HTTP_X_GOOG_API_KEY") or environ.get("HTTP_X_API_KEY", "")


def _last_user(messages):
    for m in reversed(messages or []):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            return c or ""
    return ""


def _gemini_user(contents):
    for c in reversed(contents or []):
        if c.get("role") == "user":
            return " ".join(p.get("text", "") for p in c.get("parts", []) if "text" in p)
    return ""


def _pieces(model, text):
    m = _CHUNKS.fullmatch(model or "")
    if m:
        n, delay = int(m.group(1)), int(m.group(2)) / 1000.0
        return [f"tok{i} " for i in range(n)], delay
    words = ("Echo: " + text).split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)], 0.0


def _key_failure(key, start, gemini):
    if key.startswith("rlnh"):
        return _json(start, "429 Too Many Requests", {"error": {"code": 429, "message": "rate limited"}})
    if key.startswith("rl"):
        if gemini:
            return _json(start, "429 Too Many Requests", {"error": {
                "code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}})
        return _json(start, "429 Too Many Requests", {"error": {"code": 429, "message": "rate limited"}},
                     [("Retry-After", "30")])
    if key.startswith("bad"):
        return _json(start, "401 Unauthorized", {"error": {"code": 401, "message": "invalid key"}})
    if key.startswith("forbid"):
        return _json(start, "403 Forbidden", {"error": {"code": 403, "message": "forbidden"}})
    if key.startswith("invalid"):
        return _json(start, "400 Bad Request", {"error": {
            "code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}})
    if key.startswith("cutecho"):
        body = ("x" * 490 + f" {key} rejected").encode()
        start("400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if key.startswith("echokey"):
        return _json(start, "500 Internal Server Error", {"error": {"message": f"key {key} broke"}})
    if key.startswith("err"):
        return _json(start, "500 Internal Server Error", {"error": {"message": "boom"}})
    if key.startswith("slow"):
        gevent.sleep(3)
    return None


def _sse(start, events, delay=0.0, cut_after=None):
    start("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

    def gen():
        STATS["open_streams"] += 1
        try:
            for i, ev in enumerate(events):
                if cut_after is not None and i >= cut_after:
                    raise ConnectionAbortedError("fake upstream drops the stream")
                if delay and i:
                    gevent.sleep(delay)
                yield ev.encode()
        finally:
            STATS["open_streams"] -= 1
    return gen()


_CITIES = ("Tokyo", "Paris")


def _openai_tool_order_error(messages):
    """OpenAI's own 400s for tool results that do not answer the calls before them."""
    def bad(i, text):
        return {"error": {"message": text, "type": "invalid_request_error",
                          "param": f"messages.[{i}].role", "code": None}}
    pending, asked, owner, in_block = set(), [], None, False
    for i, m in enumerate(list(messages or []) + [{"role": "end"}]):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "tool":
            if not in_block or m.get("tool_call_id") not in asked:
                return bad(i, "Invalid parameter: messages with role 'tool' must be a response to a "
                              "preceeding message with 'tool_calls'.")
            pending.discard(m.get("tool_call_id"))
            continue
        if pending:
            return bad(owner, "An assistant message with 'tool_calls' must be followed by tool messages "
                              "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                              "response messages: " + ", ".join(sorted(pending)))
        in_block = role == "assistant" and bool(m.get("tool_calls"))
        if in_block:
            owner, asked = i, [tc.get("id") for tc in m["tool_calls"]]
            pending = set(asked)
    return None


def _city(arguments):
    try:
        return json.loads(arguments).get("city")
    except (TypeError, ValueError, AttributeError):
        return None


def _tool_results(items):
    """The tool results that end a conversation as "<what was asked>: <result>" (OpenAI:
    the city of the call the tool_call_id names; Gemini: the function name)."""
    last = (items or [{}])[-1]
    if last.get("role") == "user" and last.get("parts") and all("functionResponse" in p for p in last["parts"]):
        out = []
        for p in last["parts"]:
            r = p["functionResponse"]
            resp = r.get("response")
            out.append(f"{r.get('name')}: " + (str(resp["result"]) if list(resp) == ["result"] else json.dumps(resp)))
        return out
    asked = {tc.get("id"): _city(tc.get("function", {}).get("arguments"))
             for m in items or [] for tc in m.get("tool_calls") or []}
    out = []
    for m in reversed(items or []):
        if m.get("role") != "tool":
            break
        out.append(f"{asked.get(m.get('tool_call_id'))}: {m.get('content')}")
    return out[::-1]


def openai_chat(body, key, start):
    model = body.get("model", "")
    if model == "missing":
        return _json(start, "404 Not Found", {"error": {"code": 404, "message": f"no model {model}"}})
    refused = _openai_tool_order_error(body.get("messages"))
    if refused:
        return _json(start, "400 Bad Request", refused)
    results = _tool_results(body.get("messages"))
    pieces, delay = _pieces(model, _last_user(body.get("messages")))
    calls = None
    if model.startswith("tools") and results:
        pieces = ["Results: ", "; ".join(results)]
    elif model in ("tools", "tools-2", "tools-raw"):
        calls = [{"index": i, "id": f"call_up{i}", "type": "function",
                  "function": {"name": "get_weather", "arguments": json.dumps({"city": c})}}
                 for i, c in enumerate(_CITIES[:1 if model != "tools-2" else 2])]
        if model == "tools-raw":      # a model that wrote broken JSON
            calls[0]["function"]["arguments"] = '{"city": "Tok'
    usage = {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
    if not body.get("stream"):
        msg = {"role": "assistant", "content": "".join(pieces) if not calls else ""}
        if calls:
            msg["tool_calls"] = calls
        return _json(start, "200 OK", {"id": "x", "object": "chat.completion", "created": 1, "model": model,
                                       "choices": [{"index": 0, "message": msg,
                                                    "finish_reason": "tool_calls" if calls else "stop"}],
                                       "usage": usage})
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": model}
    events = [": OPENROUTER PROCESSING\n\n"]
    if calls:
        events.append("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"tool_calls": calls},
                                                                "finish_reason": None}]}) + "\n\n")
    for p in ([] if calls else pieces):
        events.append("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": p},
                                                                "finish_reason": None}]}) + "\n\n")
    events.append("data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {},
                                         "finish_reason": "tool_calls" if calls else "stop"}]}) + "\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append("data: " + json.dumps({**base, "choices": [], "usage": usage}) + "\n\n")
    events.append("data: [DONE]\n\n")
    if key.startswith("garbage"):
        events.insert(2, "data: {this is not json\n\n")
    elif key.startswith("nodone"):
        events = events[:3]
    elif key.startswith("trunc"):
        events = events[:3] + [events[3][:25]]
    return _sse(start, events, delay, cut_after=3 if key.startswith("cut") else None)


def _gemini_tool_order_error(contents):
    """Gemini's 400 when a turn of function responses does not answer every call of the turn before."""
    for prev, cur in zip(contents or [], (contents or [])[1:]):
        asked = sum("functionCall" in p for p in prev.get("parts", []))
        answered = sum("functionResponse" in p for p in cur.get("parts", []))
        if (asked or answered) and asked != answered:
            return {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                              "Please ensure that the number of function response parts is equal to "
                              "the number of function call parts of the function call turn."}}
    return None


def gemini_generate(model, body, stream, key, start):
    if model == "missing":
        return _json(start, "404 Not Found", {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
    refused = _gemini_tool_order_error(body.get("contents"))
    if refused:
        return _json(start, "400 Bad Request", refused)
    results = _tool_results(body.get("contents"))
    pieces, delay = _pieces(model, _gemini_user(body.get("contents")))
    calls = []
    if model.startswith("tools") and results:
        pieces = ["Results: ", "; ".join(results)]
    elif model in ("tools", "tools-2"):
        calls = [{"functionCall": {"name": "get_weather", "args": {"city": c}}}
                 for c in _CITIES[:1 if model == "tools" else 2]]
        pieces = [""]
    slow = re.fullmatch(r"slow-(\d+)", model)
    if slow:
        pieces, delay = ["Echo: ", _gemini_user(body.get("contents"))], int(slow.group(1)) / 1000.0
        if not stream:
            gevent.sleep(delay)      # generateContent sends nothing until the answer is whole
    usage = {"promptTokenCount": 5, "candidatesTokenCount": len(pieces), "totalTokenCount": 5 + len(pieces)}

    def ev(text, finish=None, with_usage=False):
        parts = [{"text": text}] if text or not calls else []
        cand = {"content": {"role": "model", "parts": parts + (calls if finish else [])}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        out = {"candidates": [cand], "modelVersion": model}
        if with_usage:
            out["usageMetadata"] = usage
        return out
    if not stream:
        return _json(start, "200 OK", ev("".join(pieces), "STOP", True))
    events = ["data: " + json.dumps(ev(p)) + "\r\n\r\n" for p in pieces[:-1]]
    events.append("data: " + json.dumps(ev(pieces[-1], "STOP", True)) + "\r\n\r\n")
    return _sse(start, events, delay, cut_after=2 if key.startswith("cut") else None)


def app(environ, start):
    path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
    if path == "/_stats":
        return _json(start, "200 OK", {"requests": dict(STATS["requests"]), "open_streams": STATS["open_streams"],
                                       "bodies": list(STATS["bodies"])})
    if path == "/_reset":
        STATS["requests"].clear()
        STATS["bodies"].clear()
        return _json(start, "200 OK", {})
    key = _key(environ)
    STATS["requests"][key] += 1
    raw = environ["wsgi.input"].read() if method == "POST" else b""
    body = json.loads(raw) if raw else {}
    STATS["bodies"].append({"path": path, "body": body})
    gemini = path.startswith("/v1beta/")
    fail = _key_failure(key, start, gemini)
    if fail is not None:
        return fail
    if path.endswith("/chat/completions"):
        return openai_chat(body, key, start)
    if path.endswith("/messages"):          # Anthropic (tests/fake_anthropic.py)
        headers = {"anthropic-version": environ.get("HTTP_ANTHROPIC_VERSION")}
        return fake_anthropic.messages(body, key, headers, start, _json, _sse)
    if path.endswith("/messages/count_tokens"):
        return fake_anthropic.count_tokens(body, {"anthropic-version": environ.get("HTTP_ANTHROPIC_VERSION")},
                                           start, _json)
    if path.endswith("/embeddings") and not gemini:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        return _json(start, "200 OK", {"object": "list", "model": body.get("model"), "usage": {"prompt_tokens": 3, "total_tokens": 3},
                                       "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.5]}
                                                for i, t in enumerate(inputs)]})
    if path.endswith("/models") and method == "GET":
        return _json(start, "200 OK", {"object": "list", "data": [{"id": "m1", "object": "model"}]})
    m = re.match(r"^/v1beta/models/([^:]+):(\w+)$", path)
    if m:
        model, verb = m.group(1), m.group(2)
        if verb == "generateContent":
            return gemini_generate(model, body, False, key, start)
        if verb == "streamGenerateContent":
            return gemini_generate(model, body, True, key, start)
        if verb == "countTokens" and model == "missing":
            return _json(start, "404 Not Found", {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        if verb == "countTokens":   # a word count: tests can tell it from the gateway's estimate
            inner = body["generateContentRequest"]
            assert inner["model"] == "models/" + model, inner.get("model")
            words = sum(len(str(p.get("text", "")).split()) for c in inner["contents"] for p in c["parts"])
            return _json(start, "200 OK", {"totalTokens": words})
        if verb == "embedContent":
            text = body["content"]["parts"][0]["text"]
            return _json(start, "200 OK", {"embedding": {"values": [float(len(text)), 2.0]}})
        if verb == "batchEmbedContents":
            return _json(start, "200 OK", {"embeddings": [{"values": [float(len(r["content"]["parts"][0]["text"])), 2.0]}
                                                          for r in body["requests"]]})
    return _json(start, "404 Not Found", {"error": {"message": f"no route {path}"}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    WSGIServer((args.host, args.port), app, log=None, spawn=10000).serve_forever()


if __name__ == "__main__":
    main()
