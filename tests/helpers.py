"""Reading the gateway's answers and writing upstream ones, shared by the tests (fixtures
are in conftest.py)."""
from __future__ import annotations

import json


def ndjson(resp) -> list:
    """An NDJSON answer's objects; a blank line (never valid NDJSON) fails."""
    text = resp.get_data(as_text=True)
    assert "\n\n" not in text, "NDJSON must never contain a blank line"
    assert text.endswith("\n")
    return [json.loads(x) for x in text.splitlines()]


def sse_data(resp) -> list:
    """Each SSE event's data as text, `[DONE]` included."""
    return [e[len("data: "):] for e in resp.get_data(as_text=True).split("\n\n") if e.startswith("data: ")]


def sse_json(resp) -> list:
    """The JSON events of an OpenAI stream, which must end with `data: [DONE]`."""
    events = sse_data(resp)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def sse_body(*events, done=True, crlf=False, comments=False) -> bytes:
    """An upstream's SSE body: each event a JSON object (or text), then `[DONE]` unless
    done=False; `comments` interleaves OpenRouter's keep-alive comments."""
    nl = "\r\n" if crlf else "\n"
    out = [": OPENROUTER PROCESSING" + nl + nl] if comments else []
    for e in events:
        out.append("data: " + (e if isinstance(e, str) else json.dumps(e)) + nl + nl)
        if comments:
            out.append(": OPENROUTER PROCESSING" + nl + nl)
    if done:
        out.append("data: [DONE]" + nl + nl)
    return "".join(out).encode()


def with_tiny_local(cfg: dict, tmp_path) -> dict:
    """cfg plus a `local` provider serving the tiny generated GGUF as `local:tiny`."""
    from tests.tiny_gguf import write_tiny_gguf     # here: only the tests that use it load numpy
    cfg["providers"]["local"] = {"type": "local", "keep_alive": "5m", "n_threads": 1,
                                 "cache_dir": str(tmp_path / "cache"),
                                 "models": {"tiny": {"path": write_tiny_gguf(str(tmp_path / "tiny.gguf"))}}}
    return cfg


def local_providers(models: dict, tmp_path):
    """A fixture body: yields make(**cfg) building LocalProviders over `models` (a cfg may
    override them) with a cache under tmp_path, and closes every one afterwards."""
    import copy

    from providers.local.provider import LocalProvider
    made = []

    def make(**cfg):
        cfg.setdefault("models", copy.deepcopy(models))
        cfg.setdefault("cache_dir", str(tmp_path / "cache"))
        p = LocalProvider("local", cfg)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
