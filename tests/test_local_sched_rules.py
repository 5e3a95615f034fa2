"""The scheduler's rules on their own: a loader and a memory probe passed in, no
llama.cpp. What a spec must offer is what providers.local.sources.LocalModel offers."""
import threading
import time

import pytest

from gateway.errors import GatewayError, ServiceBusy
from providers.local.scheduler import Scheduler

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024


class Spec:
    """Weights 100 MiB, 10 MiB of KV cache per slot at n_ctx 1024."""

    def __init__(self, name, num_parallel=None):
        self.name, self.num_parallel = name, num_parallel

    def context_for(self, num_ctx):
        return num_ctx or 1024

    def estimate(self, n_ctx, slots=1):
        return 100 * MiB + slots * 10 * MiB * n_ctx // 1024

    def vram_share(self, size):
        return 0


class Handle:
    def __init__(self, spec, n_ctx, slots):
        self.spec, self.n_ctx, self.slots, self.closed = spec, n_ctx, slots, False

    def close(self):
        self.closed = True


def make(free=1024 * MiB, **kw):
    loads = []

    def loader(spec, n_ctx, slots):
        h = Handle(spec, n_ctx, slots)
        loads.append(h)
        return h

    s = Scheduler(memory_probe=lambda gpu: free, loader=loader, margin=0, **kw)
    return s, loads


def wait_for(cond, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_default_is_four_slots_in_one_load():
    s, loads = make()
    spec = Spec("m")
    leases = [s.acquire(spec) for _ in range(4)]
    assert len(loads) == 1 and loads[0].slots == 4
    (r, _), = s.loaded()
    assert r.size == spec.estimate(1024, 4)              # /api/ps counts every slot
    assert s.health()["slots"] == {"m": [4, 4]}
    for lease in leases:
        lease.release()
    assert s.health()["slots"] == {"m": [0, 4]} and s.health()["busy"] == []
    s.close()


def test_a_fifth_request_waits_for_a_free_slot_in_order():
    s, _ = make()
    spec = Spec("m")
    leases = [s.acquire(spec) for _ in range(4)]
    order = []

    def later(i):
        s.acquire(spec).release()
        order.append(i)

    threads = []
    for i in range(2):
        t = threading.Thread(target=later, args=(i,))
        t.start()
        threads.append(t)
        assert wait_for(lambda: s.queue_depth() == i + 1)
    time.sleep(0.1)
    assert order == []
    leases[0].release()
    for t in threads:
        t.join(5)
    assert order == [0, 1] and s.queue_depth() == 0
    for lease in leases[1:]:
        lease.release()
    s.close()


def test_default_slots_halve_until_they_fit():
    spec = Spec("m")
    s, loads = make(free=spec.estimate(1024, 2) + MiB)
    s.acquire(spec).release()
    assert loads[0].slots == 2
    s.close()


def test_configured_slots_are_kept_or_refused():
    s, loads = make(free=115 * MiB)
    s.acquire(Spec("one", num_parallel=1)).release()
    assert loads[0].slots == 1
    with pytest.raises(GatewayError) as ei:
        s.acquire(Spec("big", num_parallel=8))
    assert ei.value.status == 500 and "requires more system memory" in ei.value.message
    s.close()


def test_queue_limit_counts_requests_without_a_slot():
    s, _ = make(max_queue=1)
    spec = Spec("m", num_parallel=2)
    held = [s.acquire(spec), s.acquire(spec)]
    t = threading.Thread(target=lambda: s.acquire(spec).release())
    t.start()
    assert wait_for(lambda: s.queue_depth() == 1)
    with pytest.raises(ServiceBusy):
        s.acquire(spec)
    held[0].release()
    t.join(5)
    held[1].release()
    s.close()


def test_a_model_with_a_slot_in_use_is_never_evicted():
    a, b = Spec("a", num_parallel=2), Spec("b", num_parallel=2)
    s, loads = make(free=a.estimate(1024, 2) + MiB)            # room for one
    la = s.acquire(a)
    got = []
    t = threading.Thread(target=lambda: got.append(s.acquire(b)))
    t.start()
    assert wait_for(lambda: s.queue_depth() == 1)
    time.sleep(0.1)
    assert not got and not loads[0].closed
    la.release()
    t.join(5)
    assert loads[0].closed and [r.name for r, _ in s.loaded()] == ["b"]
    got[0].release()
    s.close()
