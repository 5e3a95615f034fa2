"""Which local models are loaded, who may use them, and when they go (after Ollama's
server/sched.go).

The provider only asks `acquire(model, keep_alive, num_ctx)` for a lease on a loaded
instance and releases it when its answer ends. Rules:
  * a model loads on first use, in its own native thread (see native.py);
  * an instance serves `slots` requests at once (parallel sequences in one context, see
    decoder.py); a request waits, in FIFO order, only while every slot is taken;
  * at most `max_queue` requests wait in all; the next one gets 503 at once;
  * one load at a time; before loading, the memory the model will need (weights + KV
    cache for every slot + compute buffer) must fit the budget; a model whose slot count
    is not configured gets DEFAULT_PARALLEL slots, fewer when the budget is smaller; idle
    models are evicted, shortest keep_alive first; a model with a slot in use is never
    evicted (the request waits instead); a model that could never fit is refused;
  * `max_loaded_models` caps the count the same way;
  * keep_alive counts from the end of the last request: 0 unloads when idle, negative
    keeps the model forever; a sweeper unloads expired idle models;
  * a request asking for more context than the instance has reloads it (when idle).

What it needs from outside comes in as arguments, so that its rules can be tested
without llama.cpp: `memory_probe(gpu)` (free bytes or None) and `loader(spec, n_ctx,
slots)` (runs on the model's native thread; returns the handle, closed by handle.close()).
A spec offers name, context_for(num_ctx), estimate(n_ctx, slots), vram_share(size) and
num_parallel (configured slots or None).

Synchronisation is one Condition. It is created lazily on first use so that it is the
gevent-patched kind in a gunicorn gevent worker even if the provider object was built
before monkey-patching.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Optional

from gateway.errors import GatewayError, ServiceBusy
from providers.local.native import Executor, gevent_active, release_free_memory, settled

log = logging.getLogger("gateway.local.sched")

FOREVER = float("inf")
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
_MiB = 1024 * 1024
DEFAULT_PARALLEL = 4


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vram_free() -> Optional[int]:
    """Free memory of the first NVIDIA GPU, or None (no GPU, no nvidia-smi)."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return int(out.split()[0]) * _MiB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class Runner:
    """One loaded (or loading) model instance."""

    def __init__(self, spec, n_ctx: int, size: int, size_vram: int, slots: int = 1):
        self.spec = spec
        self.name = spec.name
        self.n_ctx = n_ctx              # per slot
        self.slots = slots
        self.size = size
        self.size_vram = size_vram
        self.state = "loading"          # loading | ready | unloading
        self.handle = None              # what spec.open() returned
        self.executor: Optional[Executor] = None
        self.active = 0                 # leases held (slots in use)
        self.keep_alive = 0.0           # seconds; < 0 = forever
        self.expires_at = 0.0           # monotonic deadline while idle; FOREVER; None while busy
        self.last_used = time.monotonic()
        self.unload_requested = False

    @property
    def busy(self) -> bool:
        return self.active > 0

    def call(self, fn, *args):
        return self.executor.call(fn, *args)

    def spawn(self, fn, *args):
        return self.executor.spawn(fn, *args)


class Lease:
    """One slot of a ready runner until release()."""
    __slots__ = ("sched", "runner", "load_ns", "_released")

    def __init__(self, sched, runner, load_ns):
        self.sched, self.runner, self.load_ns = sched, runner, load_ns
        self._released = False

    @property
    def handle(self):
        return self.runner.handle

    def call(self, fn, *args):
        return self.runner.call(fn, *args)

    def spawn(self, fn, *args):
        return self.runner.spawn(fn, *args)

    @property
    def executor(self):
        return self.runner.executor

    def release(self):
        if not self._released:
            self._released = True
            self.sched._release(self.runner)


class _Ticket:
    __slots__ = ("name", "n_ctx")

    def __init__(self, name, n_ctx):
        self.name, self.n_ctx = name, n_ctx


class Scheduler:
    def __init__(self, *, keep_alive: float = 300.0, max_loaded: int = 0, max_queue: int = 512,
                 budget: Optional[int] = None, gpu: bool = False, margin: Optional[int] = None,
                 memory_probe=None, loader=None, default_parallel: Optional[int] = None):
        self.default_keep_alive = float(keep_alive)
        self.max_loaded = int(max_loaded or 0)
        self.max_queue = int(max_queue if max_queue is not None else 512) or (1 << 62)  # 0: no limit
        self.fixed_budget = budget
        self.gpu = gpu
        self.margin = margin
        self.memory_probe = memory_probe or _free_memory
        self.loader = loader or _open_spec
        self.default_parallel = default_parallel or DEFAULT_PARALLEL
        self._cond = None
        self._owner = None
        self._mode = None
        self._init_lock = threading.Lock()
        self._runners: dict = {}
        self._queue: deque = deque()
        self._loading = False
        self._sweeper = None
        self._closed = False
        self._budget_cache = (0.0, None)

    # ---- synchronisation ------------------------------------------------------------
    @property
    def cond(self):
        c = self._cond
        if c is None or (self._owner != (os.getpid(), gevent_active()) and not self._runners
                         and not self._queue):
            # first use, or first use after a fork / monkey-patching (a health check in
            # gunicorn's master must not leave a native lock for the gevent worker)
            with self._init_lock:
                owner = (os.getpid(), gevent_active())
                if self._cond is None or self._owner != owner:
                    self._cond = threading.Condition(threading.Lock())
                    self._owner = owner
                    self._mode = "gevent" if owner[1] else "threads"
                    self._sweeper = None
                c = self._cond
        return c

    def _start_sweeper(self):
        if self._sweeper is None and not self._closed:
            t = threading.Thread(target=self._sweep_loop, name="local-model-sweeper", daemon=True)
            self._sweeper = t
            t.start()

    # ---- memory ---------------------------------------------------------------------
    def budget(self) -> int:
        """Bytes the loaded models may use in all."""
        if self.fixed_budget:
            return int(self.fixed_budget)
        now = time.monotonic()
        at, value = self._budget_cache
        if value is not None and now - at < 1.0:
            return value
        free = self.memory_probe(self.gpu)
        if free is None:
            free = 8 * 1024 * _MiB       # nothing to ask: assume a modest machine
        # what loaded models hold is available to them again once evicted
        held = sum(r.size for r in self._runners.values())
        margin = self.margin if self.margin is not None else min(512 * _MiB, free // 4)
        value = max(0, free + held - margin)
        self._budget_cache = (now, value)
        return value

    def used(self) -> int:
        return sum(r.size for r in self._runners.values())

    # ---- the public face ------------------------------------------------------------
    def acquire(self, spec, keep_alive: Optional[float] = None,
                num_ctx: Optional[int] = None) -> Lease:
        """Block until `spec` is loaded and free; raise ServiceBusy when the queue is
        full, GatewayError when it cannot load."""
        cond = self.cond
        want_ctx = spec.context_for(num_ctx)
        ka = self.default_keep_alive if keep_alive is None else float(keep_alive)
        with cond:
            if self._closed:
                raise GatewayError("the local provider is shutting down", status=503)
            if len(self._queue) >= self.max_queue:
                raise ServiceBusy(BUSY_MESSAGE)
            ticket = _Ticket(spec.name, want_ctx)
            self._queue.append(ticket)
            self._start_sweeper()
            try:
                while True:
                    action, runner = self._decide(ticket, spec)
                    if action == "use":
                        self._queue.remove(ticket)
                        self._grant(runner, ka)
                        cond.notify_all()       # the next ticket may take another slot
                        return Lease(self, runner, 0)
                    if action == "evict":
                        self._unload_locked(runner, reason="to make room")
                        continue
                    if action == "load":
                        break
                    cond.wait(1.0)
            except BaseException:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                cond.notify_all()
                raise
        # load outside the lock; the placeholder runner (state loading) holds the place
        return self._load(ticket, spec, runner, ka)

    def load(self, spec, keep_alive: Optional[float] = None) -> None:
        self.acquire(spec, keep_alive).release()

    def unload(self, name: str) -> None:
        """Unload now if idle; a busy (or queued-for) model goes when its request ends."""
        with self.cond:
            r = self._runners.get(name)
            if r is None:
                return
            if r.state == "ready" and not r.busy and not self._waiting_for(name):
                self._unload_locked(r, reason="unload requested")
            else:
                r.unload_requested = True
                r.keep_alive = 0.0
                self.cond.notify_all()

    def loaded(self) -> list:
        """[(runner, expires_at epoch seconds or FOREVER)] for /api/ps."""
        out = []
        with self.cond:
            now_m, now_w = time.monotonic(), time.time()
            for r in self._runners.values():
                if r.state == "unloading":
                    continue
                if r.busy or r.state == "loading" or r.expires_at is None:
                    exp = FOREVER if r.keep_alive < 0 else now_w + r.keep_alive
                elif r.expires_at == FOREVER:
                    exp = FOREVER
                else:
                    exp = now_w + max(0.0, r.expires_at - now_m)
                out.append((r, exp))
        out.sort(key=lambda x: x[1], reverse=True)
        return out

    def queue_depth(self) -> int:
        return len(self._queue)

    def health(self) -> dict:
        with self.cond:
            return {
                "mode": self._mode,
                "loaded": sorted(n for n, r in self._runners.items() if r.state == "ready"),
                "busy": sorted(n for n, r in self._runners.items() if r.busy),
                # [in use, total] per loaded model
                "slots": {n: [r.active, r.slots] for n, r in self._runners.items()
                          if r.state == "ready"},
                "loading": sorted(n for n, r in self._runners.items() if r.state == "loading"),
                "queue_depth": len(self._queue),
                "max_queue": self.max_queue,
                "memory_used": self.used(),
                "memory_budget": self.budget(),
            }

    def close(self) -> None:
        """Stop the sweeper and unload idle models (busy ones unload when they finish)."""
        if self._cond is None:
            self._closed = True
            return
        with self.cond:
            self._closed = True
            for r in list(self._runners.values()):
                if r.state == "ready" and not r.busy:
                    self._unload_locked(r, reason="shutting down")
                else:
                    r.unload_requested = True
            self.cond.notify_all()

    # ---- decisions (called with the lock held) ----------------------------------------
    def _waiting_for(self, name) -> bool:
        return any(t.name == name for t in self._queue)

    def _decide(self, ticket, spec):
        name = ticket.name
        for t in self._queue:           # FIFO per model: the earliest ticket goes first
            if t is ticket:
                break
            if t.name == name:
                return "wait", None
        r = self._runners.get(name)
        if r is not None:
            if r.state != "ready":
                return "wait", None
            if r.n_ctx >= ticket.n_ctx:
                return ("use", r) if r.active < r.slots else ("wait", None)
            if r.busy:
                return "wait", None
            log.info("reloading %s: context %d -> %d", name, r.n_ctx, ticket.n_ctx)
            return "evict", r
        if self._loading:
            return "wait", None
        for t in self._queue:           # loads also go in arrival order
            if t is ticket:
                break
            if t.name not in self._runners:
                return "wait", None
        budget = self.budget()
        slots = self._slots_for(spec, ticket.n_ctx, budget)
        need = spec.estimate(ticket.n_ctx, slots)
        if need > budget:
            raise GatewayError(
                f"model {name} requires more {'GPU' if self.gpu else 'system'} memory "
                f"({fmt_bytes(need)}) than is available ({fmt_bytes(budget)})", status=500)
        room = self.used() + need <= budget
        count_ok = self.max_loaded <= 0 or len(self._runners) < self.max_loaded
        if room and count_ok:
            r = Runner(spec, ticket.n_ctx, need, spec.vram_share(need), slots)
            self._runners[name] = r
            self._loading = True
            return "load", r
        victim = self._pick_victim()
        if victim is not None:
            return "evict", victim
        return "wait", None             # everything in the way is busy: wait for it

    def _slots_for(self, spec, n_ctx: int, budget: int) -> int:
        """The configured slot count, else the default, halved until it fits the budget."""
        n = getattr(spec, "num_parallel", None)
        if n:
            return max(1, int(n))
        n = self.default_parallel
        while n > 1 and spec.estimate(n_ctx, n) > budget:
            n //= 2
        return max(1, n)

    def _pick_victim(self):
        idle = [r for r in self._runners.values()
                if r.state == "ready" and not r.busy and not self._waiting_for(r.name)]
        if not idle:
            return None
        # shortest keep_alive first (forever last), then least recently used
        idle.sort(key=lambda r: (FOREVER if r.keep_alive < 0 else r.keep_alive, r.last_used))
        return idle[0]

    def _grant(self, r: Runner, ka: float):
        r.active += 1
        r.keep_alive = ka
        r.expires_at = None
        r.unload_requested = False

    # ---- load / unload --------------------------------------------------------------
    def _load(self, ticket, spec, runner: Runner, ka: float) -> Lease:
        t0 = time.perf_counter()
        handle, err = None, None
        try:
            runner.executor = Executor()
            res = runner.spawn(self.loader, spec, runner.n_ctx, runner.slots)
            try:
                handle = settled(res)
            except BaseException:
                if res.ready() and res.successful() and res.value is not None:
                    # the load finished after all; nobody will use it
                    runner.spawn(_close_handle, res.value)
                raise
        except BaseException as e:
            err = e
        load_ns = int((time.perf_counter() - t0) * 1e9)
        with self.cond:
            self._loading = False
            if ticket in self._queue:
                self._queue.remove(ticket)
            if err is not None or handle is None:
                self._runners.pop(runner.name, None)
                self.cond.notify_all()
            else:
                runner.handle = handle
                runner.state = "ready"
                self._grant(runner, ka)
                self.cond.notify_all()
        if err is not None or handle is None:
            if runner.executor is not None:
                runner.executor.close()
            if isinstance(err, GatewayError) or not isinstance(err, Exception):
                raise err if err is not None else GatewayError(f"failed to load model {spec.name}")
            # llama.cpp's text names the file and quotes its first bytes: the log keeps it,
            # the client is told only which model failed.
            log.error("failed to load model %s: %s", spec.name, err)
            raise GatewayError(f"failed to load model {spec.name}: the file could not be loaded "
                               "(details in the server log)", status=500) from err
        log.info("loaded %s (ctx %d x %d slots, ~%s) in %.2f s", spec.name, runner.n_ctx,
                 runner.slots, fmt_bytes(runner.size), load_ns / 1e9)
        return Lease(self, runner, load_ns)

    def _unload_locked(self, r: Runner, reason: str):
        """Called with the lock held; drops it while the native close runs."""
        r.state = "unloading"
        cond = self.cond
        cond.release()
        try:
            try:
                if r.handle is not None:
                    # Freed pages go back to the OS, except when a load is about to
                    # take them again (re-faulting them costs a switch ~50 ms).
                    r.call(_close_handle, r.handle, reason != "to make room")
            except Exception:
                log.exception("error unloading %s", r.name)
            finally:
                r.handle = None
                if r.executor is not None:
                    r.executor.close()
        finally:
            cond.acquire()
        if self._runners.get(r.name) is r:
            del self._runners[r.name]
        self._budget_cache = (0.0, None)
        log.info("unloaded %s (%s)", r.name, reason)
        cond.notify_all()

    def _release(self, r: Runner):
        with self.cond:
            r.active = max(0, r.active - 1)
            r.last_used = time.monotonic()
            if r.active:
                self.cond.notify_all()          # a slot is free
                return
            if r.unload_requested or self._closed:
                r.keep_alive = 0.0
            if r.keep_alive < 0:
                r.expires_at = FOREVER
            else:
                r.expires_at = r.last_used + r.keep_alive
            if r.keep_alive == 0 and not self._waiting_for(r.name) and r.state == "ready":
                # keep_alive 0: gone before the client sees the end of the answer
                self._unload_locked(r, reason="keep_alive 0")
            self.cond.notify_all()

    def _sweep_loop(self):
        cond = self.cond
        while True:
            with cond:
                if self._closed:
                    return
                now = time.monotonic()
                due, nxt = None, None
                for r in self._runners.values():
                    if r.state != "ready" or r.busy or r.expires_at in (None, FOREVER):
                        continue
                    if self._waiting_for(r.name):
                        continue
                    if r.expires_at <= now:
                        due = r
                        break
                    nxt = r.expires_at if nxt is None else min(nxt, r.expires_at)
                if due is not None:
                    self._unload_locked(due, reason="keep_alive expired")
                    continue
                wait = 0.5 if nxt is None else min(0.5, max(0.01, nxt - now))
                cond.wait(wait)


def _free_memory(gpu: bool) -> Optional[int]:
    free = vram_free() if gpu else None
    return mem_available() if free is None else free


def _open_spec(spec, n_ctx: int, slots: int):
    return spec.open(n_ctx, slots)


def _close_handle(handle, trim: bool = True):
    close = getattr(handle, "close", None)
    if close is not None:
        close()
    if trim:
        release_free_memory()
