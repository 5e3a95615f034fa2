"""gevent or plain threads: the one place that asks which one runs this process.

gunicorn's gevent worker (and app.py's development server) monkey-patch threading; tests
and tools run without it. Code that must not block the hub, or that spawns background
work, asks here."""
from __future__ import annotations

import sys

_patched = False     # once patched, always patched: the answer is cached only when True


def gevent_active() -> bool:
    """True when gevent has monkey-patched threading."""
    global _patched
    if _patched:
        return True
    if "gevent" not in sys.modules:
        return False
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover
        return False
    _patched = bool(monkey.is_module_patched("threading"))
    return _patched


def run_blocking(fn, *args):
    """fn(*args), on gevent's thread pool when the hub would otherwise be blocked (file
    hashing, SQLite, importing llama.cpp); directly otherwise."""
    if gevent_active():
        import gevent
        return gevent.get_hub().threadpool.apply(fn, args)
    return fn(*args)
