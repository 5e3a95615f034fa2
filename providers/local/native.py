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
queues behind it.
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


_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


def _piped(pool, step, limit, last):
    import collections

    import gevent
    from gevent.event import Event

    hub = gevent.get_hub()
    items = collections.deque()          # append/popleft are atomic across threads
    arrived = Event()
    stop = [False]
    watcher = hub.loop.async_()
    # started for the whole stream: a send() before start() would be lost
    watcher.start(arrived.set)

    def produce():
        try:
            for _ in range(limit):
                if stop[0]:
                    break
                item = step()
                items.append(item)
                watcher.send()
                if last(item):
                    break
        except BaseException as e:  # noqa: B902 - re-raised in the greenlet
            items.append(_Failed(e))
        finally:
            items.append(_END)
            watcher.send()

    job = pool.spawn(produce)
    try:
        while True:
            while not items:
                arrived.clear()
                if items:
                    break
                arrived.wait()
            item = items.popleft()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop[0] = True
        try:
            settled(job)     # the lease must not be released while a step still runs
        except BaseException:
            pass
        watcher.stop()
        watcher.close()


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

    def stream(self, step, limit: int, last):
        """Yield step() up to `limit` times, stopping after an item for which last(item)
        is true. Under gevent the model's thread runs the steps back to back and hands
        each result over through a queue, so the next token is being computed while the
        request greenlet renders and sends this one (one round trip per token put the
        greenlet's work and a hub wake-up on every token's critical path). Closing the
        iterator stops the thread at its next step and waits for it."""
        if not self.gevent:
            for _ in range(limit):
                with self._lock:
                    item = step()
                yield item
                if last(item):
                    return
            return
        yield from _piped(self._pool, step, limit, last)

    def close(self):
        if self.gevent:
            try:
                self._pool.kill()
            except Exception:  # pragma: no cover
                pass
