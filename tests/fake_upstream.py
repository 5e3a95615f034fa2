"""A fake OpenAI-compatible and Gemini upstream on 127.0.0.1, for end-to-end tests and
the benchmark. Run: python tests/fake_upstream.py --port P

Behaviour is chosen by the API key (so one server serves every scenario at once):
  ok...      answers normally          rl...    429 + Retry-After: 30
  rlnh...    429 without Retry-After   bad...   401            forbid... 403
  err...     500                       invalid... Gemini 400 API_KEY_INVALID
  slow...    waits 3 s before headers  cut...    streams 2 chunks, then drops the connection
  echokey... 500 whose body echoes the key (tests scrubbing)
  garbage... a malformed JSON event mid-stream    nodone... stream ends with no finish, no [DONE]
  trunc...   stream cut in the middle of an event
Anthropic's /v1/messages (x-api-key): tests/fake_anthropic.py.
and by the model id:  "chunks-N-D" streams N chunks D ms apart; "missing" → 404;
"tools" → answers with a tool call; anything else echoes the last user message.
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


def openai_chat(body, key, start):
    model = body.get("model", "")
    if model == "missing":
        return _json(start, "404 Not Found", {"error": {"code": 404, "message": f"no model {model}"}})
    pieces, delay = _pieces(model, _last_user(body.get("messages")))
    usage = {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
    calls = None
    if model == "tools":
        calls = [{"index": 0, "id": "call_1", "type": "function",
                  "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]
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


def gemini_generate(model, body, stream, key, start):
    if model == "missing":
        return _json(start, "404 Not Found", {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
    pieces, delay = _pieces(model, _gemini_user(body.get("contents")))
    usage = {"promptTokenCount": 5, "candidatesTokenCount": len(pieces), "totalTokenCount": 5 + len(pieces)}

    def ev(text, finish=None, with_usage=False):
        cand = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
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
