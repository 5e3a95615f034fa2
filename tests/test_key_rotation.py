"""Key rotation, tested once: the key pool on its own (order, rests, what it shows), then
the attempt loop every remote adapter shares (RemoteProvider.send), driven through one
adapter over the production transport. Each adapter's own tests cover only how it
classifies its upstream's errors."""
import time

import pytest
import requests

from gateway.errors import RateLimited, UpstreamFailed, UpstreamTimeout
from providers.keypool import AUTH, RATE, TRANSIENT, KeyPool
from tests.test_openai_adapter import (KEYS, _fresh_upstream, add_err, auth_of, chat, joined, key_state, make,  # noqa: F401
                                       ok_stream, upstream)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ---- the key pool ------------------------------------------------------------------------
def test_each_request_starts_at_the_next_key():
    pool = KeyPool(["a", "b", "c"], clock=Clock())
    assert [pool.attempt_order() for _ in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_a_resting_key_is_left_out_until_its_rest_ends():
    clock = Clock()
    pool = KeyPool(["a", "b"], cooldown=30, auth_cooldown=3600, clock=clock)
    pool.rest(0, RATE, 10)
    pool.rest(1, AUTH)
    assert pool.attempt_order() == []
    assert pool.resting_summary() == (True, 10.0)
    clock.now += 10
    assert pool.attempt_order() == [0]
    clock.now += 3590
    assert sorted(pool.attempt_order()) == [0, 1]


def test_default_rests_and_a_success_ends_all_but_an_auth_rest():
    clock = Clock()
    pool = KeyPool(["a", "b"], cooldown=30, auth_cooldown=3600, clock=clock)
    pool.rest(0, TRANSIENT)
    pool.rest(1, AUTH)
    snap = pool.snapshot()["keys"]
    assert (snap[0]["rest_seconds_left"], snap[1]["rest_seconds_left"]) == (30.0, 3600.0)
    pool.mark_ok(0)
    pool.mark_ok(1)
    snap = pool.snapshot()
    assert not snap["keys"][0]["resting"] and snap["keys"][1]["resting"] and snap["keys_resting"] == 1


def test_the_pool_shows_keys_by_index_only():
    pool = KeyPool(["sk-secret-one", "sk-secret-two"], clock=Clock())
    pool.rest(1, RATE, 5, "HTTP429")
    text = repr(pool.snapshot())
    assert "sk-secret" not in text and "HTTP429" in text


# ---- the attempt loop ----------------------------------------------------------------------
def test_round_robin_across_requests():
    ok_stream(), ok_stream(), ok_stream()
    p = make()
    for _ in range(3):
        chat(p)
    assert [auth_of(i) for i in range(3)] == [f"Bearer {k}" for k in (KEYS[0], KEYS[1], KEYS[0])]


def test_429_retry_after_rests_key_and_next_answers():
    add_err(429, key=KEYS[0], headers={"Retry-After": "120"})
    ok_stream(key=KEYS[1])
    p = make()
    assert joined(chat(p))[0] == "hi"
    st = key_state(p, 0)
    assert st["resting"] and st["reason"] == "rate_limit" and 100 < st["rest_seconds_left"] <= 120
    assert not key_state(p, 1)["resting"]
    chat(p), chat(p)                           # key 0 rests: both go to key 1
    assert [auth_of(i) for i in (2, 3)] == [f"Bearer {KEYS[1]}"] * 2


def test_all_keys_429_is_rate_limited_with_retry_after():
    add_err(429, key=KEYS[0], headers={"Retry-After": "40"})
    add_err(429, key=KEYS[1], headers={"X-RateLimit-Reset": str(int((time.time() + 90) * 1000))})
    p = make()
    with pytest.raises(RateLimited) as ei:
        chat(p)
    assert ei.value.status == 429 and 30 < ei.value.retry_after <= 40
    assert 80 < key_state(p, 1)["rest_seconds_left"] <= 90     # ms epoch honoured
    assert len(upstream.calls) == 2


def test_all_keys_resting_answers_429_without_calling():
    add_err(429, headers={"Retry-After": "60"})
    p = make()
    with pytest.raises(RateLimited):
        chat(p)
    n = len(upstream.calls)
    with pytest.raises(RateLimited) as ei:
        chat(p)
    assert len(upstream.calls) == n
    assert ei.value.status == 429 and 50 < ei.value.retry_after <= 60


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_transient_errors_rotate(status):
    add_err(status, key=KEYS[0])
    ok_stream(key=KEYS[1])
    p = make()
    assert joined(chat(p))[0] == "hi"
    st = key_state(p, 0)
    assert st["reason"] == "transient" and st["rest_seconds_left"] <= 30


def test_all_5xx_is_502_naming_provider_without_key():
    add_err(500, key=KEYS[0], body={"error": {"message": f"boom {KEYS[0]}"}})
    add_err(503, key=KEYS[1], body={"error": {"message": f"down {KEYS[1]}"}})
    p = make()
    with pytest.raises(UpstreamFailed) as ei:
        chat(p)
    assert ei.value.status == 502 and "openrouter" in str(ei.value)
    assert all(k not in str(ei.value) for k in KEYS)


def test_connection_error_rotates():
    add_err(0, key=KEYS[0], exc=requests.exceptions.ConnectionError(f"refused {KEYS[0]}"))
    ok_stream(key=KEYS[1])
    p = make()
    assert joined(chat(p))[0] == "hi"
    assert key_state(p, 0)["reason"] == "transient"


def test_all_timeouts_is_504():
    add_err(0, key=KEYS[0], exc=requests.exceptions.ConnectTimeout())
    add_err(0, key=KEYS[1], exc=requests.exceptions.ReadTimeout())
    with pytest.raises(UpstreamTimeout) as ei:
        chat(make())
    assert ei.value.status == 504 and "openrouter" in str(ei.value)


def test_mixed_failures_are_502():
    add_err(429, key=KEYS[0])
    add_err(0, key=KEYS[1], exc=requests.exceptions.ConnectionError())
    with pytest.raises(UpstreamFailed) as ei:
        chat(make())
    assert ei.value.status == 502 and not isinstance(ei.value, RateLimited)


def test_key_never_in_any_error_message():
    for st, key in ((429, KEYS[0]), (401, KEYS[1]), (502, KEYS[2])):
        add_err(st, key=key, body={"error": {"message": f"key {key} rejected; all: {KEYS}"}})
    with pytest.raises(UpstreamFailed) as ei:
        chat(make(n_keys=3))
    text = str(ei.value) + ei.value.message + repr(ei.value.args)
    assert all(k not in text for k in KEYS)
