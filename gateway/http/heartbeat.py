"""Keeping a client connection alive while a slow upstream has sent nothing yet.

The first chunk is awaited for up to one heartbeat interval before the response starts,
so fast failures still get a real HTTP status. After that the response starts and a
heartbeat goes out every interval until the first chunk (or a failure, then written as
an error line) arrives."""
from __future__ import annotations

import contextvars
import threading

from gateway.concurrency import gevent_active


def _green():
    """The gevent module when threading is monkey-patched (gunicorn's worker), else None."""
    if gevent_active():
        import gevent
        import gevent.event
        return gevent
    return None


def _background(fn, *args):
    """Run fn(*args) concurrently: a bare greenlet under gevent (a patched Thread costs
    several times more per request: its own locks, Event and bookkeeping), else a thread."""
    g = _green()
    if g:
        g.spawn(fn, *args)
    else:
        threading.Thread(target=fn, args=args, daemon=True).start()


def _event():
    g = _green()
    return g.event.Event() if g else threading.Event()


class FirstChunk:
    def __init__(self, start):
        self._done = _event()
        self.chunks = None
        self.error = None
        ctx = contextvars.copy_context()   # the request record travels with the work
        _background(ctx.run, self._run, start)

    def _run(self, start):
        try:
            self.chunks = start()
        except BaseException as e:  # handed to the request greenlet, which renders it
            self.error = e
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(seconds)


def await_first(start, interval: float):
    """(chunks, None) when the answer began within `interval`; else (None, FirstChunk)
    to be polled while heartbeats go out. Raises start()'s error if it failed in time."""
    fc = FirstChunk(start)
    if fc.wait(interval):
        if fc.error is not None:
            raise fc.error
        return fc.chunks, None
    return None, fc


class Deferred:
    """A chunk iterator that emits heartbeats (None items) until the real one is ready."""

    def __init__(self, pending: FirstChunk, interval: float):
        self.pending, self.interval, self.chunks = pending, interval, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.chunks is None:
            if not self.pending.wait(self.interval):
                return None
            if self.pending.error is not None:
                raise self.pending.error
            self.chunks = self.pending.chunks
        return next(self.chunks)

    def close(self):
        if self.chunks is not None:
            close = getattr(self.chunks, "close", None)
            if close:
                close()
        elif self.pending is not None:
            # The answer is still starting: close it as soon as it arrives.
            _background(self._close_later)

    def _close_later(self):
        self.pending.wait(None)
        if self.pending.chunks is not None:
            close = getattr(self.pending.chunks, "close", None)
            if close:
                close()
