"""The scheduler with real llama.cpp loads (tiny models): keep_alive, load/unload,
eviction, busy models, the queue, concurrency, disconnects and failed loads.

A lease taken straight from `provider.sched.acquire()` is what a running request holds,
so "busy" is exact here rather than timed."""
import threading
import time

import pytest

from gateway.canonical import ChatRequest, Message, Options
from gateway.errors import GatewayError, ServiceBusy
from tests.helpers import local_providers
from tests.tiny_gguf import write_corrupt_gguf, write_tiny_gguf

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    return {
        "a": write_tiny_gguf(str(d / "a.gguf"), seed=1),
        "b": write_tiny_gguf(str(d / "b.gguf"), seed=2),
        "c": write_tiny_gguf(str(d / "c.gguf"), seed=3),
        "corrupt": write_corrupt_gguf(str(d / "corrupt.gguf")),
    }


@pytest.fixture
def make(paths, tmp_path):
    yield from local_providers({k: {"path": v} for k, v in paths.items()}, tmp_path)


def req(model, n=8, **kw):
    opts = kw.pop("options", None) or Options(num_predict=n, seed=1)
    return ChatRequest(model=f"local:{model}", messages=[Message(role="user", content="hello")],
                       options=opts, **kw)


def answer(p, model, **kw):
    return list(p.chat(req(model, **kw), model))


def names(p):
    return sorted(m.card.upstream_id for m in p.loaded())


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_keep_alive_expiry_unloads(make):
    p = make()
    answer(p, "a", keep_alive=1)
    (lm,) = p.loaded()
    assert lm.card.upstream_id == "a" and lm.context_length == 512
    assert time.time() < lm.expires_at <= time.time() + 1.1
    assert lm.size > lm.card.size and lm.size_vram == 0
    assert wait_for(lambda: not p.loaded(), 3.0)


def test_keep_alive_zero_unloads_after_request(make):
    p = make()
    out = answer(p, "a", keep_alive=0)
    assert out[-1].done
    assert p.loaded() == []


def test_default_and_forever_keep_alive(make):
    p = make(keep_alive_seconds=120)
    answer(p, "a")
    (lm,) = p.loaded()
    assert lm.expires_at == pytest.approx(time.time() + 120, abs=2)
    answer(p, "a", keep_alive=-1)
    (lm,) = p.loaded()
    assert lm.expires_at > time.time() + 100 * 365 * 86400


def test_load_and_unload(make):
    p = make()
    p.load("a", None)
    assert names(p) == ["a"]
    p.load("b", 60)
    assert names(p) == ["a", "b"]
    # /api/ps order: latest expiry first
    assert [m.card.upstream_id for m in p.loaded()] == ["a", "b"]
    p.unload("a")
    assert names(p) == ["b"]
    p.unload("nothing-loaded")
    with pytest.raises(GatewayError) as ei:
        p.load("nope", None)
    assert ei.value.status == 404


def test_eviction_under_memory_budget(make):
    p = make()
    est = p._model("a").estimate(512)
    p2 = make(memory_budget_bytes=int(est * 1.5))            # room for one tiny model
    p2.load("a", None)
    p2.load("b", None)
    assert names(p2) == ["b"]
    out = answer(p2, "a")
    assert out[-1].done and names(p2) == ["a"]
    assert p2.health()["memory_used"] <= int(est * 1.5)


def test_evicts_shortest_keep_alive_first(make):
    p = make()
    est = p._model("a").estimate(512)
    p2 = make(memory_budget_bytes=int(est * 2.5), num_parallel=1)   # room for two
    p2.load("a", 600)
    p2.load("b", 30)
    p2.load("c", 300)
    assert names(p2) == ["a", "c"]


def test_max_loaded_models(make):
    p = make(max_loaded_models=1)
    p.load("a", None)
    p.load("b", None)
    assert names(p) == ["b"]


def test_model_that_can_never_fit(make):
    p = make(memory_budget_bytes=1000)
    with pytest.raises(GatewayError) as ei:
        answer(p, "a")
    assert ei.value.status == 500 and "requires more system memory" in ei.value.message
    assert p.health()["loading"] == [] and p.queue_depth() == 0


def test_busy_model_is_never_evicted(make):
    p = make()
    est = p._model("a").estimate(512)
    p2 = make(memory_budget_bytes=int(est * 1.5))
    lease = p2.sched.acquire(p2._model("a"))                 # "a" is mid-request
    got = {}

    def other():
        got["out"] = answer(p2, "b")
        got["t"] = time.monotonic()

    t = threading.Thread(target=other)
    t.start()
    assert wait_for(lambda: p2.queue_depth() == 1)
    time.sleep(0.3)
    assert "out" not in got and names(p2) == ["a"]           # b waits; a stays
    released = time.monotonic()
    lease.release()
    t.join(10)
    assert got["out"][-1].done and got["t"] >= released
    assert names(p2) == ["b"]


def test_requests_for_a_busy_model_wait_in_order(make):
    p = make(num_parallel=1)                                 # its one slot is taken
    lease = p.sched.acquire(p._model("a"))
    order = []

    def worker(i):
        answer(p, "a", n=2)
        order.append(i)

    threads = []
    for i in range(3):
        th = threading.Thread(target=worker, args=(i,))
        th.start()
        threads.append(th)
        assert wait_for(lambda: p.queue_depth() == i + 1)
    lease.release()
    for th in threads:
        th.join(10)
    assert order == [0, 1, 2]


def test_queue_full_is_503_at_once(make):
    p = make(max_queue=1, num_parallel=1)
    lease = p.sched.acquire(p._model("a"))
    t = threading.Thread(target=lambda: answer(p, "a"))
    t.start()
    assert wait_for(lambda: p.queue_depth() == 1)
    t0 = time.monotonic()
    with pytest.raises(ServiceBusy) as ei:
        list(p.chat(req("b"), "b"))
    assert time.monotonic() - t0 < 0.5
    assert ei.value.status == 503
    assert ei.value.message == "server busy, please try again.  maximum pending requests exceeded"
    with pytest.raises(ServiceBusy):
        p.sched.acquire(p._model("c"))
    lease.release()
    t.join(10)
    assert p.queue_depth() == 0


def test_eight_concurrent_requests(make):
    p = make()
    results, errors = [], []

    def worker(i):
        try:
            model = "ab"[i % 2]
            out = answer(p, model, options=Options(num_predict=16, seed=i))
            results.append(out[-1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert len(results) == 8 and all(f.done and f.completion_tokens for f in results)
    assert p.health()["busy"] == [] and p.queue_depth() == 0


def test_disconnect_stops_generation_and_frees_the_model(make):
    p = make()
    gen = p.chat(req("a", options=Options(num_predict=400, temperature=0)), "a")
    got = []
    for ch in gen:
        if ch.content:
            got.append(ch)
        if len(got) == 2:
            break
    assert p.health()["busy"] == ["a"]
    gen.close()                                              # the client went away
    assert p.health()["busy"] == []
    assert names(p) == ["a"]
    t0 = time.monotonic()
    out = answer(p, "a", n=3)
    assert out[-1].done and time.monotonic() - t0 < 2


def test_corrupt_gguf_is_a_clear_error_naming_the_model_and_logging_the_reason(make, caplog):
    p = make()
    assert p.card("corrupt") is not None
    with pytest.raises(GatewayError) as ei:
        answer(p, "corrupt")
    e = ei.value
    assert e.status == 500
    assert e.message.startswith("failed to load model corrupt: ")
    assert "corrupt.gguf" not in e.message and "/" not in e.message    # the path stays in the log
    assert "corrupted or incomplete" in caplog.text
    h = p.health()
    assert h["loading"] == [] and h["queue_depth"] == 0 and h["loaded"] == []
    assert answer(p, "a")[-1].done                           # still serving
    with pytest.raises(GatewayError):                        # and still refusing it
        answer(p, "corrupt")


def test_bigger_num_ctx_reloads(make):
    p = make()
    answer(p, "a", options=Options(num_predict=2, num_ctx=256))
    assert p.loaded()[0].context_length == 256
    answer(p, "a", options=Options(num_predict=2, num_ctx=512))
    assert p.loaded()[0].context_length == 512
    answer(p, "a", options=Options(num_predict=2, num_ctx=128))
    assert p.loaded()[0].context_length == 512               # smaller fits: no reload
    answer(p, "a", options=Options(num_predict=2, num_ctx=100000))
    assert p.loaded()[0].context_length == 512               # capped at the trained context


def test_unload_while_busy_unloads_after(make):
    p = make()
    lease = p.sched.acquire(p._model("a"))
    p.unload("a")
    assert names(p) == ["a"]
    lease.release()
    assert names(p) == []


def test_health(make):
    p = make()
    h = p.health()
    assert h["type"] == "local" and h["offered"] is True
    assert h["queue_depth"] == 0 and h["max_queue"] == 512
    assert h["memory_budget"] > 0
