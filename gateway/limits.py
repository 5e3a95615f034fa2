"""Client limits: rpm, tpm, max_parallel, tokens_per_day (see gateway/clients.py).

Windows are fixed: a calendar minute for rpm and tpm, a UTC day for tokens_per_day. A
request is admitted before it is routed (one round trip to Redis when shared state is
configured, none for a client without limits); its tokens are counted from the real usage
when the answer ends (a stream that overruns its budget is finished; the next request
waits). With Redis every worker of every instance counts in the same window, read off
Redis' own clock (TIME), so instances with skewed clocks still agree where a minute ends.
Without Redis, or while it is unreachable, each process counts on its own.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Optional

from gateway.errors import RateLimited

LEASE = 600.0    # seconds an in-flight slot is held at most (a worker that died frees it then)

# KEYS: none (the window keys depend on Redis' clock). ARGV: prefix, rpm, tpm,
# tokens_per_day, max_parallel, ticket id, lease ms.
# Returns {"ok", 0} or {limit name, seconds until the window ends}.
_ADMIT = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute, day = math.floor(sec / 60), math.floor(sec / 86400)
local p = ARGV[1]
local rpm, tpm, tpd, par = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if tpm > 0 and tonumber(redis.call('GET', p .. 'tpm:' .. minute) or '0') >= tpm then
  return {'tpm', (minute + 1) * 60 - sec}
end
if tpd > 0 and tonumber(redis.call('GET', p .. 'day:' .. day) or '0') >= tpd then
  return {'tokens_per_day', (day + 1) * 86400 - sec}
end
local pk = p .. 'par'
if par > 0 then
  redis.call('ZREMRANGEBYSCORE', pk, '-inf', now_ms)
  if redis.call('ZCARD', pk) >= par then return {'max_parallel', 1} end
end
if rpm > 0 then
  local rk = p .. 'rpm:' .. minute
  local n = redis.call('INCR', rk)
  if n == 1 then redis.call('EXPIRE', rk, 120) end
  if n > rpm then return {'rpm', (minute + 1) * 60 - sec} end
end
if par > 0 then
  redis.call('ZADD', pk, now_ms + tonumber(ARGV[7]), ARGV[6])
  redis.call('PEXPIRE', pk, tonumber(ARGV[7]))
end
return {'ok', 0}
"""
# ARGV: prefix, tokens, ticket id ('' for none).
_FINISH = """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local p = ARGV[1]
local n = tonumber(ARGV[2])
if n > 0 then
  local mk, dk = p .. 'tpm:' .. math.floor(sec / 60), p .. 'day:' .. math.floor(sec / 86400)
  redis.call('INCRBY', mk, n)
  redis.call('EXPIRE', mk, 120)
  redis.call('INCRBY', dk, n)
  redis.call('EXPIRE', dk, 172800)
end
if ARGV[3] ~= '' then redis.call('ZREM', p .. 'par', ARGV[3]) end
return 1
"""

_WHAT = {"rpm": "requests per minute", "tpm": "tokens per minute",
         "tokens_per_day": "tokens per day", "max_parallel": "requests in flight"}


def over_limit(client, limit: str, retry_after: float) -> RateLimited:
    value = getattr(client, limit)
    retry_after = max(1.0, float(retry_after))
    return RateLimited(f"client {client.name}: limit {limit} reached ({value} {_WHAT[limit]}); "
                       f"retry in {retry_after:.0f}s", retry_after=retry_after, code=f"limit_{limit}")


class Ticket:
    __slots__ = ("client", "id", "shared", "done")

    def __init__(self, client, id_: str, shared: bool):
        self.client, self.id, self.shared, self.done = client, id_, shared, False


class LocalCounts:
    """One process's windows (no Redis, or Redis unreachable)."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._windows = {}     # (client name, kind) -> [window number, count]
        self._inflight = {}    # client name -> count

    def _get(self, name, kind, window) -> list:
        w = self._windows.get((name, kind))
        if w is None or w[0] != window:
            w = self._windows[(name, kind)] = [window, 0]
        return w

    def admit(self, c):
        now = self._clock()
        minute, day = int(now // 60), int(now // 86400)
        to_minute, to_day = (minute + 1) * 60 - now, (day + 1) * 86400 - now
        with self._lock:
            if c.tpm and self._get(c.name, "tpm", minute)[1] >= c.tpm:
                return "tpm", to_minute
            if c.tokens_per_day and self._get(c.name, "day", day)[1] >= c.tokens_per_day:
                return "tokens_per_day", to_day
            if c.max_parallel and self._inflight.get(c.name, 0) >= c.max_parallel:
                return "max_parallel", 1.0
            if c.rpm:
                w = self._get(c.name, "rpm", minute)
                if w[1] >= c.rpm:
                    return "rpm", to_minute
                w[1] += 1
            if c.max_parallel:
                self._inflight[c.name] = self._inflight.get(c.name, 0) + 1
        return None

    def finish(self, c, tokens: int, release: bool) -> None:
        now = self._clock()
        with self._lock:
            if tokens:
                self._get(c.name, "tpm", int(now // 60))[1] += tokens
                self._get(c.name, "day", int(now // 86400))[1] += tokens
            if release and c.max_parallel:
                self._inflight[c.name] = max(0, self._inflight.get(c.name, 0) - 1)


class Limiter:
    def __init__(self, shared=None):
        self.shared = shared
        self.local = LocalCounts()
        self._ids = itertools.count()
        self._id_base = f"{os.getpid()}-{id(self):x}-"
        if shared is not None:
            self._admit = shared.script(_ADMIT)
            self._finish = shared.script(_FINISH)
        self.on_limited = None      # callback(client, limit name): metrics

    def _prefix(self, c) -> str:
        return self.shared.key("lim", c.name, "")

    def admit(self, client) -> Optional[Ticket]:
        """A ticket to hand to finish(), or None for a client without limits; raises
        RateLimited (429, Retry-After, the limit named) when a limit is reached."""
        if client is None or not client.limited:
            return None
        tid = self._id_base + str(next(self._ids))
        verdict = None
        shared = False
        if self.shared is not None:
            args = [self._prefix(client), client.rpm, client.tpm, client.tokens_per_day,
                    client.max_parallel, tid, int(LEASE * 1000)]
            out = self.shared.call(lambda r: self._admit(keys=[], args=args, client=r))
            if out is not None:
                shared = True
                name = out[0].decode() if isinstance(out[0], bytes) else str(out[0])
                verdict = None if name == "ok" else (name, float(out[1]))
        if not shared:
            verdict = self.local.admit(client)
        if verdict is not None:
            if self.on_limited is not None:
                self.on_limited(client, verdict[0])
            raise over_limit(client, verdict[0], verdict[1])
        return Ticket(client, tid, shared)

    def finish(self, ticket: Optional[Ticket], tokens: int) -> None:
        """Count the answer's tokens and free its in-flight slot (once)."""
        if ticket is None or ticket.done:
            return
        ticket.done = True
        c = ticket.client
        count = tokens if (c.tpm or c.tokens_per_day) else 0
        if not count and not c.max_parallel:
            return
        if self.shared is not None:
            args = [self._prefix(c), count, ticket.id if ticket.shared and c.max_parallel else ""]
            if self.shared.call(lambda r: self._finish(keys=[], args=args, client=r)) is not None:
                if not ticket.shared:
                    self.local.finish(c, 0, True)
                return
        self.local.finish(c, count, release=not ticket.shared)

    def on_finished(self, record: dict) -> None:
        """Request observer: the finished request's tokens and slot."""
        ticket = record.get("limit_ticket")
        if ticket is not None:
            tokens = (record.get("prompt_tokens") or 0) + (record.get("completion_tokens") or 0)
            self.finish(ticket, int(tokens))


def admit_request(st, record: dict) -> None:
    """Before routing a generation or embedding: the client's model access (403), then
    its limits (429). The ticket rides in the record to the observers (on_finished), which
    every request reaches once (gateway.http.lifecycle), crashed or not."""
    from gateway import clients
    clients.check_model(record.get("model") or "")
    ticket = st.limits.admit(clients.current())
    if ticket is not None:
        record["limit_ticket"] = ticket
