"""A provider's API keys: round-robin order, rests after failures.

State is per process and shared by every greenlet of a worker (gevent switches only on
I/O, and the lock below also covers native threads). Keys are referred to by index in
logs and health output; the key strings never leave this object except to build the
upstream request's auth header.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from gateway.errors import register_secret

# Why a key rests; "rate" rests decide between 429 and 502 for the client.
RATE, AUTH, TRANSIENT = "rate_limit", "auth", "transient"


@dataclass
class KeyState:
    rest_until: float = 0.0
    reason: Optional[str] = None
    last_error: Optional[str] = None     # an error class name, never a message with a key
    uses: int = 0
    failures: int = 0


class KeyPool:
    def __init__(self, keys: list, cooldown: float = 30.0, auth_cooldown: float = 3600.0,
                 clock=time.monotonic):
        self._keys = [k for k in keys if k]
        for k in self._keys:
            register_secret(k)
        self._state = [KeyState() for _ in self._keys]
        self._next = 0
        self._lock = threading.Lock()
        self.cooldown = cooldown
        self.auth_cooldown = auth_cooldown
        self._clock = clock

    def __len__(self):
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def attempt_order(self) -> list:
        """Indices of usable keys for one request: round-robin start, resting keys left out.

        Each request advances the start by one, so load spreads across keys."""
        with self._lock:
            n = len(self._keys)
            if not n:
                return []
            start = self._next
            self._next = (self._next + 1) % n
            now = self._clock()
            order = [(start + i) % n for i in range(n)]
            return [i for i in order if self._state[i].rest_until <= now]

    def mark_ok(self, index: int) -> None:
        with self._lock:
            st = self._state[index]
            st.uses += 1
            if st.reason != AUTH:
                st.rest_until, st.reason = 0.0, None

    def rest(self, index: int, reason: str, seconds: Optional[float] = None,
             error_class: Optional[str] = None) -> None:
        if seconds is None:
            seconds = self.auth_cooldown if reason == AUTH else self.cooldown
        with self._lock:
            st = self._state[index]
            st.rest_until = max(st.rest_until, self._clock() + max(0.0, seconds))
            st.reason = reason
            st.failures += 1
            st.last_error = error_class or reason

    def resting_summary(self):
        """(any rate-limit rest?, shortest rest left in seconds) over resting keys."""
        now = self._clock()
        with self._lock:
            resting = [s for s in self._state if s.rest_until > now]
            if not resting:
                return False, 0.0
            rate = [s.rest_until - now for s in resting if s.reason == RATE]
            return bool(rate), min(rate) if rate else min(s.rest_until - now for s in resting)

    def snapshot(self) -> dict:
        now = self._clock()
        with self._lock:
            keys = []
            for i, s in enumerate(self._state):
                left = max(0.0, s.rest_until - now)
                keys.append({"index": i, "resting": left > 0, "rest_seconds_left": round(left, 1),
                             "reason": s.reason if left > 0 else None,
                             "last_error": s.last_error, "uses": s.uses, "failures": s.failures})
            return {"keys_total": len(keys), "keys_resting": sum(k["resting"] for k in keys),
                    "keys": keys}
