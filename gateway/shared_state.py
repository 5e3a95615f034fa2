"""State shared by every worker of every instance, in Redis (`server.redis`, env
GATEWAY_REDIS_URL): key rests, round-robin positions and client limits.

Fail open: every Redis call has a short socket timeout and no retries. A failed call
marks Redis down for RETRY_AFTER seconds, during which callers get None at once and use
their per-process state; then one call tries again, and shared state resumes when it
answers. A warning is logged at most once a minute while Redis stays down; /health/ready
and the gauge gateway_shared_state_up say so.

Keys live under a prefix (env GATEWAY_REDIS_PREFIX, default "gw:") so several gateways,
or test runs, can share one Redis.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from typing import Optional

from gateway.errors import scrub

log = logging.getLogger("gateway.shared")

TIMEOUT = 0.25          # seconds: connect and each command; a slow Redis costs at most this
RETRY_AFTER = 1.0       # seconds of per-process state after a failure before trying again
WARN_EVERY = 60.0
DEFAULT_PREFIX = "gw:"
_instances: dict = {}
_instances_lock = threading.Lock()


def redis_url(settings) -> Optional[str]:
    return getattr(settings, "redis", None) or None


def for_settings(settings) -> Optional["SharedState"]:
    """The process's SharedState for these settings (one per URL and prefix), or None
    when no Redis is configured."""
    url = redis_url(settings) if settings is not None else None
    if not url:
        return None
    prefix = os.environ.get("GATEWAY_REDIS_PREFIX") or DEFAULT_PREFIX
    with _instances_lock:
        st = _instances.get((url, prefix))
        if st is None:
            st = _instances[(url, prefix)] = SharedState(url, prefix)
        return st


def safe_url(url: str) -> str:
    """The URL without user or password, for health output and logs."""
    try:
        u = urllib.parse.urlsplit(url)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
        return f"{u.scheme}://{host}{port}{u.path}"
    except ValueError:
        return "(unreadable URL)"


class SharedState:
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, timeout: float = TIMEOUT):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = safe_url(url)
        self.prefix = prefix
        self._errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.up = True             # until a call says otherwise
        self._down_until = 0.0
        self._probing = False
        self._last_warn = 0.0
        self._failures = 0
        self.last_error: Optional[str] = None
        self._lock = threading.Lock()

    def key(self, *parts) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def script(self, source: str):
        """A Lua script run with EVALSHA (EVAL the first time): one round trip."""
        return self.client.register_script(source)

    def call(self, fn):
        """fn(redis client)'s result, or None when Redis is down, slow or failing."""
        probe = False
        if not self.up:
            now = time.monotonic()
            with self._lock:
                if now < self._down_until or self._probing:
                    return None
                self._probing = probe = True   # one caller tries; the others keep local state
        try:
            out = fn(self.client)
        except self._errors as e:
            self._failed(e)
            return None
        finally:
            if probe:
                self._probing = False
        if not self.up:
            self._recovered()
        return out

    def _failed(self, e) -> None:
        now = time.monotonic()
        with self._lock:
            was_up = self.up
            self.up = False
            self._down_until = now + RETRY_AFTER
            self._failures += 1
            self.last_error = type(e).__name__
            warn = was_up or now - self._last_warn >= WARN_EVERY
            if warn:
                self._last_warn = now
                n, self._failures = self._failures, 0
        if warn:
            log.warning("shared state: Redis %s unreachable (%s: %s; %d failure(s)); serving with "
                        "per-process state until it is back", self.url, type(e).__name__,
                        scrub(str(e))[:200], n)

    def _recovered(self) -> None:
        with self._lock:
            if self.up:
                return
            self.up = True
            self.last_error = None
        log.warning("shared state: Redis %s is back; shared state resumed", self.url)

    def check(self) -> bool:
        """Ping (used by /health/ready, so a quiet gateway still notices an outage)."""
        self.call(lambda r: r.ping())
        return self.up

    def report(self) -> dict:
        return {"configured": True, "up": self.check(), "url": self.url,
                "last_error": self.last_error}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
