"""Where llama.cpp calls run: native threads, never the gevent hub.

The GIL is released during inference, yet a greenlet that calls llama directly holds the
hub for the whole call: every other request stalls (1.5 s seen). Under gevent each loaded
model therefore gets its own one-thread gevent ThreadPool, and greenlets wait on it
cooperatively (a few ms of hub latency per token). Without monkey-patching (the Flask
test client, pytest, a threaded server) calls run in the caller's thread under a real
lock.

Either way one model's calls are strictly serialised: a llama context is not thread-safe
and two threads inside one abort the process (SIGABRT). With a one-thread pool this holds
even when a greenlet is killed while its call is still running natively: the next call
queues behind it. A chat model's decode loop (decoder.py) runs there as one long job
(Executor.background) and hands each token to its request through a Channel: the loop
computes the next token while the request's greenlet renders and sends this one.
"""
from __future__ import annotations

import os
import threading

from gateway.concurrency import gevent_active, run_blocking  # noqa: F401 (used by siblings)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _Done:
    """A finished call, shaped like gevent's AsyncResult for the few methods used."""
    __slots__ = ("value", "exc")

    def __init__(self, value=None, exc=None):
        self.value, self.exc = value, exc

    def ready(self):
        return True

    def successful(self):
        return self.exc is None

    def wait(self, timeout=None):
        return self.value

    def get(self):
        if self.exc is not None:
            raise self.exc
        return self.value


_libc_trim = None


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; elsewhere nothing happens).

    Each llama.cpp context mallocs tens of MB of compute buffers; once freed, glibc keeps
    those pages in its per-thread arenas, so a worker that loads and unloads models grew by
    ~30-45 % in the 10-minute soak (bench/soak.py) with a flat Python heap and flat
    malloc in-use bytes. malloc_trim after an unload returns them."""
    global _libc_trim
    if _libc_trim is None:
        try:
            import ctypes
            _libc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            _libc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


def settled(res):
    """res.get(). Interrupted (greenlet killed) while the native call still runs, it waits
    for the call before re-raising, so that whatever the caller does next (close, release)
    comes after it."""
    try:
        return res.get()
    except BaseException:
        if not res.ready():
            try:
                res.wait()
            except BaseException:
                pass
        raise


def real_lock():
    """A lock that both a native thread and the hub may take (briefly): the OS kind even
    when gevent has patched threading."""
    if gevent_active():
        from gevent.monkey import get_original
        return get_original("_thread", "allocate_lock")()
    return threading.Lock()


class Channel:
    """Items from a native thread to one consumer (a greenlet or a thread). put() never
    blocks the producer; get() waits cooperatively under gevent (an async watcher wakes
    the hub) and on a real Event otherwise."""

    def __init__(self):
        import collections
        self.items = collections.deque()     # append/popleft are atomic across threads
        self._watcher = None
        if gevent_active():
            import gevent
            from gevent.event import Event
            self._event = Event()
            self._watcher = gevent.get_hub().loop.async_()
            # started for the whole stream: a send() before start() would be lost
            self._watcher.start(self._event.set)
            self._wake = self._watcher.send
        else:
            self._event = threading.Event()
            self._wake = self._event.set

    def put(self, item):
        self.items.append(item)
        self._wake()

    def get(self):
        items = self.items
        while not items:
            self._event.clear()
            if items:
                break
            self._event.wait()
        return items.popleft()

    def close(self):
        w, self._watcher = self._watcher, None
        if w is not None:
            w.stop()
            w.close()


class Executor:
    """Serialises every native call for one model."""

    def __init__(self):
        self.gevent = gevent_active()
        if self.gevent:
            from gevent.threadpool import ThreadPool
            self._pool = ThreadPool(1)
        else:
            self._lock = threading.Lock()

    def spawn(self, fn, *args):
        """Start fn(*args); returns something with get()/ready()/successful()/wait().
        Without gevent the call has already finished when this returns."""
        if self.gevent:
            return self._pool.spawn(fn, *args)
        with self._lock:
            try:
                return _Done(fn(*args))
            except BaseException as e:  # noqa: B902 - handed back to get()
                return _Done(exc=e)

    def call(self, fn, *args):
        if not self.gevent:
            with self._lock:
                return fn(*args)
        return settled(self._pool.spawn(fn, *args))

    def background(self, fn):
        """Run fn() on the model's native thread (under gevent: behind any call already
        queued there; otherwise a thread of its own that takes step_lock() around each
        native step)."""
        if self.gevent:
            self._pool.spawn(fn)
        else:
            threading.Thread(target=fn, name="local-decode", daemon=True).start()

    def step_lock(self):
        """What a background loop holds around one native step so that call()s (a close)
        never overlap it. Under gevent the one-thread pool already serialises them."""
        if self.gevent:
            import contextlib
            return contextlib.nullcontext()
        return self._lock

    def close(self):
        if self.gevent:
            try:
                self._pool.kill()
            except Exception:  # pragma: no cover
                pass
