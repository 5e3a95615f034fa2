"""Slots: several requests generated at once in one llama.cpp context (real llama.cpp on
the tiny generated model). Streams are opened and read one chunk each before any is read
further, so every one of them is in its slot at the same time."""
import json
import threading
import time

import pytest

from gateway.canonical import ChatRequest, Message, Options
from gateway.errors import ServiceBusy
from tests.helpers import local_providers

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tiny(tiny_models):
    return tiny_models["tiny"]


@pytest.fixture
def make(tiny, tmp_path):
    yield from local_providers({"tiny": {"path": tiny}}, tmp_path)


def req(content="hello", messages=None, **opts):
    fmt = opts.pop("format", None)
    msgs = messages or [Message(role="user", content=content)]
    return ChatRequest(model="local:tiny", messages=msgs, options=Options(**opts), format=fmt)


def text(chunks):
    return "".join(c.content for c in chunks)


def together(p, reqs):
    """Open every stream and read its first chunk, then read them all to the end."""
    gens = [p.chat(r, "tiny") for r in reqs]
    outs = [[next(g)] for g in gens]
    assert p.health()["busy"] == ["tiny"]
    for g, out in zip(gens, outs):
        out.extend(g)
    return outs


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_concurrent_requests_each_get_their_own_options(make):
    p = make(num_parallel=4)
    reqs = [
        req("hello there", num_predict=24, temperature=0),                 # greedy
        req("tell me", num_predict=24, seed=11, temperature=0.9),          # seeded
        req("json please", format=SCHEMA, num_predict=200, seed=3),        # a grammar
        req("hello there", num_predict=40, temperature=0),                 # greedy, a stop
    ]
    alone = [list(p.chat(r, "tiny")) for r in reqs[:3]]
    full = text(alone[0])
    assert len(full) > 6
    stop = full[4:7]
    reqs[3] = req("hello there", num_predict=40, temperature=0, stop=[stop])
    outs = together(p, reqs)
    # greedy and seeded answers are the same as when each ran alone
    assert text(outs[0]) == full
    assert text(outs[1]) == text(alone[1])
    # the grammar held in its slot only
    assert isinstance(json.loads(text(outs[2]))["a"], int)
    assert text(outs[2]) == text(alone[2])
    assert not text(outs[0]).lstrip().startswith("{")
    # the stop cut its own sequence only
    assert outs[3][-1].done_reason == "stop" and stop not in text(outs[3])
    assert full.startswith(text(outs[3]))
    assert outs[0][-1].done_reason == "length" and outs[0][-1].completion_tokens == 24
    assert p.health()["busy"] == []


def test_a_request_waits_only_while_every_slot_is_busy(make):
    p = make(num_parallel=2)
    a = p.chat(req("one", num_predict=300, temperature=0), "tiny")
    b = p.chat(req("two", num_predict=300, temperature=0), "tiny")
    next(a), next(b)
    got = {}

    def third():
        got["out"] = list(p.chat(req("three", num_predict=4, temperature=0), "tiny"))

    t = threading.Thread(target=third)
    t.start()
    assert wait_for(lambda: p.queue_depth() == 1)
    time.sleep(0.2)
    assert "out" not in got
    a.close()                                   # the client went away: its slot is freed
    t.join(20)
    assert got["out"][-1].done and got["out"][-1].completion_tokens == 4
    assert next(b).content is not None          # the other stream is still going
    b.close()
    assert p.health()["busy"] == [] and p.queue_depth() == 0


def test_queue_limit_counts_only_requests_without_a_slot(make):
    p = make(num_parallel=2, max_queue=1)
    a = p.chat(req("one", num_predict=300, temperature=0), "tiny")
    b = p.chat(req("two", num_predict=300, temperature=0), "tiny")
    next(a), next(b)
    t = threading.Thread(target=lambda: list(p.chat(req("three", num_predict=2), "tiny")))
    t.start()
    assert wait_for(lambda: p.queue_depth() == 1)
    with pytest.raises(ServiceBusy) as ei:
        list(p.chat(req("four", num_predict=2), "tiny"))
    assert ei.value.status == 503
    a.close()
    b.close()
    t.join(20)
    assert p.queue_depth() == 0


def test_follow_up_turn_evaluates_only_the_new_tokens(make):
    p = make(num_parallel=2)
    history = [Message(role="system", content="you are a helpful assistant " * 8),
               Message(role="user", content="what is the capital of france")]
    first = list(p.chat(req(messages=history, num_predict=12, temperature=0), "tiny"))
    n_first = first[-1].prompt_tokens
    assert n_first > 200
    # another conversation comes in between: it takes the other slot
    list(p.chat(req("something else entirely", num_predict=4, temperature=0), "tiny"))
    turn = history + [Message(role="assistant", content=text(first)),
                      Message(role="user", content="and of spain")]
    second = list(p.chat(req(messages=turn, num_predict=4, temperature=0), "tiny"))
    # only the answer and the new question were evaluated, not the whole history
    assert 0 < second[-1].prompt_tokens < n_first // 3


def test_loaded_size_counts_every_slot(make):
    p = make(num_parallel=3)
    list(p.chat(req(num_predict=2), "tiny"))
    (lm,) = p.loaded()
    m = p._model("tiny")
    assert lm.size == m.estimate(lm.context_length, 3) > m.estimate(lm.context_length, 1)
    assert p.health()["slots"] == {"tiny": [0, 3]}


def test_default_slots_shrink_to_fit_the_memory_budget(make):
    p = make()
    m = p._model("tiny")
    assert m.num_parallel is None
    budget = int(m.estimate(512, 2) * 1.05)                  # room for two slots, not four
    p2 = make(memory_budget_bytes=budget)
    list(p2.chat(req(num_predict=2), "tiny"))
    assert p2.health()["slots"] == {"tiny": [0, 2]}


def test_env_sets_the_default_slot_count(make, monkeypatch):
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "3")
    p = make()
    assert p._model("tiny").num_parallel == 3
    p2 = make(models={"tiny": {"path": p._model("tiny").path(), "num_parallel": 1}})
    assert p2._model("tiny").num_parallel == 1                 # a model's own setting wins


def test_every_sampling_option_builds_its_chain(make):
    p = make(num_parallel=3)
    reqs = [req("a", num_predict=8, seed=2, mirostat=1, mirostat_tau=4.0, mirostat_eta=0.2),
            req("b", num_predict=8, seed=2, mirostat=2),
            req("c", num_predict=8, seed=2, top_k=5, top_p=0.5, min_p=0.1, typical_p=0.9,
                repeat_penalty=1.3, repeat_last_n=-1, presence_penalty=0.5, frequency_penalty=0.5)]
    outs = together(p, reqs)
    assert all(o[-1].done and o[-1].completion_tokens == 8 for o in outs)
    assert text(outs[2]) == text(list(p.chat(reqs[2], "tiny")))       # seeded: reproducible


def test_batching_follows_the_measured_step_times():
    """The loop batches g next tokens only while one batch costs less than g single
    steps (the fastest of their recent times), and looks at the other choice now and then
    (the rule alone, no model)."""
    from providers.local.decoder import Decoder
    d = Decoder.__new__(Decoder)
    d.batch_min, d._cost, d._steps = None, {}, 0
    assert d._batch_pays(4)                      # a batch of 4 not timed yet: try it
    d._cost[4] = [0.10]
    assert not d._batch_pays(4)                  # a single step not timed yet: try it
    d._cost[1] = [0.09, 0.03]                    # 4 single steps: 0.12 s > one batch
    assert sum(d._batch_pays(4) for _ in range(128)) == 124
    d._cost[1] = [0.02, 0.05]                    # the fastest: 0.08 s < one batch
    assert sum(d._batch_pays(4) for _ in range(128)) == 4
    d.batch_min = 1                              # a fixed rule (GPU offload)
    assert all(d._batch_pays(g) for g in (2, 4, 8))
