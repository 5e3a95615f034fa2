"""The usage log: one SQLite row per finished request, and GET /api/usage to sum it up.

Rows go through a queue to one writer that inserts them in batches, so a request (or a
stream's last chunk) never waits on the disk. Under gevent the writer is a greenlet and
each batch's SQLite work runs on gevent's native thread pool: sqlite3 blocks the whole
process otherwise, while the queue, logging and metrics stay in greenlet land (gevent
locks and queues are not meant to be shared with foreign native threads). Without gevent
(Flask test client, plain threads) the writer is an ordinary thread.

Any write failure (full disk, locked or read-only file) is logged, counted in
gateway_usage_write_errors_total, and the batch is dropped; the connection is reopened
for the next batch. No request ever fails because of the usage log.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import queue
import re
import sqlite3
import threading
import time
from typing import Optional

from gateway.concurrency import run_blocking as _blocking
from gateway.errors import BadRequest, NotFound, scrub

log = logging.getLogger("gateway.usage")

DEFAULT_PATH = "data/usage.sqlite3"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")   # gateway/ops/usage_pg.py
BUSY_TIMEOUT = 2.0          # seconds a write waits for another process's lock
MAX_QUEUE = 10000           # rows held in memory while the disk is slow; beyond: dropped
MAX_BATCH = 500
ERROR_LOG_EVERY = 60.0      # at most one log line a minute while writes keep failing
# client_key holds the client's name (server.clients) or a hash of its key (server.api_keys)
GROUPS = {"model": "model", "provider": "provider", "client": "client_key", "key": "client_key"}
# Clients choose model names: rows keep at most this much of one, and /api/usage lists at
# most MAX_GROUPS groups (the busiest), the rest summed as one "other" group.
MAX_TEXT = 512
MAX_GROUPS = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,               -- epoch seconds when the request finished
    client_key TEXT,                -- client name, or a sha256 prefix of its bearer token
    route TEXT,
    provider TEXT,
    model TEXT,
    key_index INTEGER,              -- which upstream key answered (never the key)
    status INTEGER,
    stream INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms REAL,
    ttft_ms REAL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""
COLUMNS = ("ts", "client_key", "route", "provider", "model", "key_index", "status", "stream",
           "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")
_INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def db_path(settings) -> Optional[str]:
    """server.usage_db: absent → the default file; "" / false / null-ish → disabled;
    sqlite:///path (SQLAlchemy's form: three slashes, then the path) → path."""
    server = settings.raw.get("server") or {}
    if "usage_db" not in server:
        return DEFAULT_PATH
    value = settings.usage_db     # checked by gateway/settings.py (no other scheme gets here)
    if not value:
        return None
    value = str(value)
    return value[len("sqlite:///"):] if value.lower().startswith("sqlite:///") else value


def _int(v):
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _text(v):
    return None if v is None else str(v)[:MAX_TEXT]


def _ms(v):
    try:
        return None if v is None else round(float(v) * 1000.0, 3)
    except (TypeError, ValueError):
        return None


class UsageLog:
    def __init__(self, path: str, on_error=None, on_drop=None, busy_timeout: Optional[float] = None,
                 max_queue: int = MAX_QUEUE):
        self.path = path
        self.busy_timeout = BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        self._on_error = on_error or (lambda: None)
        self._on_drop = on_drop or (lambda: None)
        self._q = queue.Queue(maxsize=max_queue)
        self._conn = None
        self._writer = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.queued = 0           # rows accepted
        self.done = 0             # rows written or given up on
        self.errors = 0
        self._last_error_log = 0.0
        self._suppressed = 0

    # ---- the request side: never blocks ---------------------------------------------------
    def row(self, record: dict, now=None) -> tuple:
        return (time.time() if now is None else now, _text(record.get("client")), _text(record.get("route")),
                _text(record.get("provider")), _text(record.get("model")), _int(record.get("key_index")),
                _int(record.get("status")), 1 if record.get("stream") else 0,
                _int(record.get("prompt_tokens")), _int(record.get("completion_tokens")),
                _ms(record.get("latency")), _ms(record.get("ttft")))

    def record(self, record: dict) -> None:
        if self._closed:
            return
        self._ensure_writer()
        try:
            self._q.put_nowait(self.row(record))
            self.queued += 1
        except queue.Full:
            self._on_drop()

    def _ensure_writer(self):
        # Started on the first row, not at app creation: an app that serves nothing (and
        # every test app) costs no thread.
        if self._writer is not None:
            return
        with self._start_lock:
            if self._writer is None:
                t = threading.Thread(target=self._run, name="usage-writer", daemon=True)
                t.start()
                self._writer = t

    # ---- the writer ---------------------------------------------------------------------
    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write_batch(batch)
            if stop:
                return

    def _write_batch(self, batch) -> None:
        try:
            _blocking(self._write, batch)
        except Exception as e:
            self._failed(e, len(batch))
        finally:
            self.done += len(batch)

    def _open(self):
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False,
                               isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")    # readers never block the writer
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL makes this crash-safe enough
            conn.executescript(SCHEMA)
        except Exception:
            conn.close()
            raise
        return conn

    def _write(self, rows):
        # Runs on the writer (or a pool thread): no logging or metrics from here.
        try:
            if self._conn is None:
                self._conn = self._open()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_INSERT, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
        except BaseException:
            conn, self._conn = self._conn, None   # reopen next time: the file may recover
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            raise

    def _failed(self, e, n):
        self.errors += 1
        try:
            self._on_error()
        except Exception:
            pass
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY or self._last_error_log == 0.0:
            more = f" ({self._suppressed} earlier failure(s) not logged)" if self._suppressed else ""
            log.error("usage log %s: could not write %d row(s): %s: %s%s", self.path, n,
                      type(e).__name__, scrub(str(e)), more)
            self._last_error_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    # ---- flushing, closing ---------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row queued so far is written (or given up on)."""
        target = self.queued
        deadline = time.monotonic() + timeout
        while self.done < target:
            if time.monotonic() >= deadline or self._writer is None:
                return self.done >= target
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            try:
                self._q.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._writer.join(timeout)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # ---- reading ------------------------------------------------------------------------
    def summary(self, since: Optional[float] = None, group_by: Optional[str] = None) -> dict:
        self.flush(1.0)   # what just finished should be in the answer
        return _blocking(self._summary, since, group_by)

    def _summary(self, since, group_by):
        if not os.path.exists(self.path):
            return {"total": _row_dict(None), "groups": []}
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout)
        try:
            return summarize(lambda q, args: conn.execute(q, args).fetchall(), "?", since, group_by)
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return {"total": _row_dict(None), "groups": []}
        finally:
            conn.close()


def summarize(query, ph: str, since, group_by) -> dict:
    """/api/usage's answer from any SQL database: query(sql, args) -> rows; `ph` is the
    driver's placeholder (SQLite "?", psycopg "%s")."""
    col = GROUPS[group_by] if group_by else None
    where, args = (f"WHERE ts >= {ph}", [since]) if since is not None else ("", [])
    select = ("COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
              "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
              "AVG(latency_ms), AVG(ttft_ms)")
    total = _row_dict(query(f"SELECT {select} FROM usage {where}", args)[0])
    groups = []
    if col:
        rows = query(f"SELECT {col}, {select} FROM usage {where} GROUP BY {col} "
                     f"ORDER BY COUNT(*) DESC, {col} IS NULL, {col} LIMIT {MAX_GROUPS + 1}", args)
        for r in rows[:MAX_GROUPS]:
            d = {group_by: r[0]}
            d.update(_row_dict(r[1:]))
            groups.append(d)
        if len(rows) > MAX_GROUPS:
            # Every row outside the groups shown, as one "other" group.
            shown = [r[0] for r in rows[:MAX_GROUPS]]
            named = [v for v in shown if v is not None]
            cond = [f"{col} NOT IN ({', '.join([ph] * len(named))})"] if named else []
            if None in shown:
                cond.append(f"{col} IS NOT NULL")
            clause = (where + " AND " if where else "WHERE ") + " AND ".join(cond)
            d = {group_by: "other"}
            d.update(_row_dict(query(f"SELECT {select} FROM usage {clause}", list(args) + named)[0]))
            groups.append(d)
    return {"total": total, "groups": groups}


def _row_dict(r) -> dict:
    r = r or (0, 0, 0, 0, None, None)
    return {"requests": int(r[0] or 0), "errors": int(r[1] or 0),
            "prompt_tokens": int(r[2] or 0), "completion_tokens": int(r[3] or 0),
            "avg_latency_ms": None if r[4] is None else round(r[4], 1),
            "avg_ttft_ms": None if r[5] is None else round(r[5], 1)}


def parse_since(value: Optional[str]) -> Optional[float]:
    """Epoch seconds or RFC 3339 (a time without an offset is taken as UTC)."""
    if value is None or value == "":
        return None
    v = value.strip()
    try:
        epoch = float(v)
    except ValueError:
        epoch = None
    if epoch is not None:
        if math.isfinite(epoch):
            return epoch
        v = ""   # nan/inf: falls through to the error below
    # An unencoded "+01:00" in a query string arrives as " 01:00".
    v = re.sub(r" (\d\d:?\d\d)$", r"+\1", v)
    try:
        when = dt.datetime.fromisoformat(v.replace("z", "Z").replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.timestamp()
    except (ValueError, OverflowError):
        raise BadRequest(f'invalid value for "since": {scrub(value)[:64]!r} '
                         "(use RFC 3339 such as 2025-01-31T00:00:00Z, or epoch seconds)") from None


def install(app, state) -> None:
    from flask import Response, request

    path = db_path(state.settings)
    metrics = app.extensions.get("gateway_metrics")
    usage: Optional[UsageLog] = None
    if path:
        on_error = metrics.usage_write_errors.inc if metrics else None
        on_drop = metrics.usage_dropped.inc if metrics else None
        if path.lower().startswith(POSTGRES_SCHEMES):
            from gateway.ops.usage_pg import PgUsageLog
            usage = PgUsageLog(path, on_error=on_error, on_drop=on_drop,
                               on_spool_drop=getattr(metrics, "usage_spool_dropped", None))
        else:
            usage = UsageLog(path, on_error=on_error, on_drop=on_drop)
        app.extensions["gateway_usage"] = usage
        state.observers.append(usage.record)
        _close_with(state, usage)

    @app.route("/api/usage", methods=["GET"])
    def usage_view():
        since = parse_since(request.args.get("since"))
        group_by = request.args.get("group_by") or None
        if group_by is not None and group_by not in GROUPS:
            raise BadRequest(f'invalid value for "group_by": {scrub(group_by)[:64]!r} '
                             "(use model, provider, client or key)")
        if usage is None:
            raise NotFound("the usage log is disabled (server.usage_db)")
        out = {"since": since, "group_by": group_by}
        out.update(usage.summary(since, group_by))
        return Response(json.dumps(out), mimetype="application/json")


def _close_with(state, usage):
    # GatewayState has no close hooks: chain ours onto its close().
    inner = state.close

    def close():
        try:
            usage.close()
        finally:
            inner()
    state.close = close
