"""A provider's API keys: round-robin order, rests after failures.

State is per process and shared by every greenlet of a worker (gevent switches only on
I/O, and the lock below also covers native threads). With shared state (Redis, see
gateway/shared_state.py) rests and the round-robin position are also shared by every
worker of every instance: attempt_order() reads them in one round trip (a Lua script),
rest() writes one. Redis names a key by a hash of it, never the key. When Redis is
unreachable the per-process state carries on alone.

Keys are referred to by index in logs and health output; the key strings never leave
this object except to build the upstream request's auth header.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Optional

from gateway.errors import register_secret

# Why a key rests; "rate" rests decide between 429 and 502 for the client.
RATE, AUTH, TRANSIENT = "rate_limit", "auth", "transient"

# KEYS[1]: the round-robin counter (advanced unless ARGV[1] is "0"), KEYS[2..]: one rest
# per key. Returns {position, value_1, pttl_1, value_2, pttl_2, ...} (false: no rest).
_READ = """
local pos = 0
if ARGV[1] ~= '0' then pos = redis.call('INCR', KEYS[1]) end
local out = {pos}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  out[#out + 1] = v or false
  out[#out + 1] = v and redis.call('PTTL', KEYS[i]) or 0
end
return out
"""
# A rest only ever grows: a shorter one never cuts a longer one short.
_REST = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


@dataclass
class KeyState:
    rest_until: float = 0.0
    reason: Optional[str] = None
    last_error: Optional[str] = None     # an error class name, never a message with a key
    uses: int = 0
    failures: int = 0


class KeyPool:
    def __init__(self, keys: list, cooldown: float = 30.0, auth_cooldown: float = 3600.0,
                 clock=time.monotonic, shared=None, scope: str = ""):
        self._keys = [k for k in keys if k]
        for k in self._keys:
            register_secret(k)
        self._state = [KeyState() for _ in self._keys]
        self._next = 0
        self._lock = threading.Lock()
        self.cooldown = cooldown
        self.auth_cooldown = auth_cooldown
        self._clock = clock
        self._shared = shared if self._keys else None
        if self._shared is not None:
            ids = [hashlib.sha256(k.encode()).hexdigest()[:16] for k in self._keys]
            self._shared_keys = [shared.key("rr", scope)] + [shared.key("rest", scope, i) for i in ids]
            self._read = shared.script(_READ)
            self._write = shared.script(_REST)

    def __len__(self):
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def _pull(self, advance: bool):
        """Read the shared position and rests into the local state (one round trip);
        the shared position, or None when there is no shared state to read."""
        if self._shared is None:
            return None
        out = self._shared.call(lambda r: self._read(keys=self._shared_keys, args=["1" if advance else "0"],
                                                     client=r))
        if not out:
            return None
        now = self._clock()
        with self._lock:
            for i, st in enumerate(self._state):
                value, pttl = out[1 + 2 * i], out[2 + 2 * i]
                if not value or pttl is None or int(pttl) <= 0:
                    continue
                reason, _, err = (value.decode() if isinstance(value, bytes) else str(value)).partition("|")
                until = now + int(pttl) / 1000.0
                if until > st.rest_until + 0.05:
                    st.rest_until, st.reason, st.last_error = until, reason, err or reason
        return int(out[0])

    def attempt_order(self) -> list:
        """Indices of usable keys for one request: round-robin start, resting keys left out.

        Each request advances the start by one, so load spreads across keys."""
        pos = self._pull(advance=True)
        with self._lock:
            n = len(self._keys)
            if not n:
                return []
            if pos is not None:
                start = (pos - 1) % n
            else:
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
        if self._shared is not None and seconds > 0:
            ms = max(1, int(seconds * 1000))
            value = f"{reason}|{error_class or reason}"
            self._shared.call(lambda r: self._write(keys=[self._shared_keys[1 + index]], args=[value, ms],
                                                    client=r))

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
        """Rests as every instance sees them when shared state is up (read fresh), else
        this process's own."""
        self._pull(advance=False)
        now = self._clock()
        with self._lock:
            keys = []
            for i, s in enumerate(self._state):
                left = max(0.0, s.rest_until - now)
                keys.append({"index": i, "resting": left > 0, "rest_seconds_left": round(left, 1),
                             "reason": s.reason if left > 0 else None,
                             "last_error": s.last_error, "uses": s.uses, "failures": s.failures})
            out = {"keys_total": len(keys), "keys_resting": sum(k["resting"] for k in keys),
                   "keys": keys}
        if self._shared is not None:
            out["rests_shared"] = self._shared.up
        return out
