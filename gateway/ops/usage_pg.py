"""The usage log in PostgreSQL (`server.usage_db: postgresql://...`): the same rows and
/api/usage answers as the SQLite log (gateway/ops/usage.py), for several instances
writing to one database.

Rows go through the same in-memory queue to one writer, which sends them in batches
(COPY) through a psycopg pool; the request path never touches the database. Under gevent
psycopg waits cooperatively (it detects the monkey-patched select), so the writer is a
greenlet and no native thread is involved.

Nothing is lost while the database is down or restarts: a batch that cannot be written
goes to an on-disk spool (JSON lines, one file per process, at most MAX_SPOOL_ROWS rows;
beyond that rows are dropped and counted in gateway_usage_spool_dropped_total). The
writer tries the database again every RETRY seconds and drains the spool first once it
answers. A spool left by a process that died on this host is taken over by the next
one that starts (GATEWAY_USAGE_SPOOL_DIR, default data/usage-spool).
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.parse
from typing import Optional

from gateway.errors import ServiceBusy, register_secret, scrub
from gateway.shared_state import safe_url
from gateway.ops.usage import COLUMNS, MAX_BATCH, UsageLog, summarize

log = logging.getLogger("gateway.usage")
# The pool logs every failed connection attempt; while the database is down that is a line
# every RETRY seconds per worker. Our own warning (at most once a minute) says it instead.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

RETRY = 2.0                  # seconds between tries while the database is down
CONNECT_TIMEOUT = 3          # seconds: connecting, and waiting for a pooled connection
MAX_SPOOL_ROWS = 500_000     # about 100 MB of spool on disk
SPOOL_DIR = "data/usage-spool"

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id BIGSERIAL PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,   -- epoch seconds when the request finished
    client_key TEXT,                -- client name, or a sha256 prefix of its bearer token
    route TEXT,
    provider TEXT,
    model TEXT,
    key_index INTEGER,              -- which upstream key answered (never the key)
    status INTEGER,
    stream SMALLINT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms DOUBLE PRECISION,
    ttft_ms DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_ts_model ON usage (ts, model);
"""
_COPY = f"COPY usage ({', '.join(COLUMNS)}) FROM STDIN"
_spool_ids = itertools.count()
_active_spools: set = set()      # this process's spool files in use
_spool_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """Rows waiting on disk for the database. Used by one writer at a time."""

    def __init__(self, directory: str, max_rows: int = MAX_SPOOL_ROWS):
        self.dir = directory
        self.max_rows = max_rows
        self.host = socket.gethostname().replace("-", "_") or "host"
        self.path = os.path.join(directory, f"usage-spool-{self.host}-{os.getpid()}-{next(_spool_ids)}.jsonl")
        self.rows = 0
        self.adopted = False

    def adopt_orphans(self) -> None:
        """Take over spools of processes that died on this host (and of closed logs of
        this process)."""
        self.adopted = True
        with _spool_lock:
            _active_spools.add(self.path)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError:
            return
        for f in sorted(glob.glob(os.path.join(self.dir, f"usage-spool-{self.host}-*.jsonl"))):
            if f == self.path:
                continue
            try:
                pid = int(os.path.basename(f).rsplit("-", 2)[1])
            except (ValueError, IndexError):
                continue
            with _spool_lock:
                if f in _active_spools or (pid != os.getpid() and _pid_alive(pid)):
                    continue
            claim = f"{self.path}.claim"
            try:
                os.rename(f, claim)   # atomic: of two adopters, one wins
            except OSError:
                continue
            with open(claim, "rb") as src, open(self.path, "ab") as dst:
                for line in src:
                    if line.strip():
                        dst.write(line if line.endswith(b"\n") else line + b"\n")
                        self.rows += 1
            os.remove(claim)
        if os.path.exists(self.path) and not self.rows:
            with open(self.path, "rb") as fh:
                self.rows = sum(1 for line in fh if line.strip())

    def append(self, rows) -> int:
        """Write rows to disk; returns how many did not fit (dropped)."""
        room = max(0, self.max_rows - self.rows)
        keep, dropped = rows[:room], len(rows) - min(room, len(rows))
        if keep:
            os.makedirs(self.dir, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in keep))
            self.rows += len(keep)
        return dropped

    def read(self) -> list:
        if not self.rows:
            return []
        try:
            with open(self.path, encoding="utf-8") as fh:
                out = []
                for line in fh:
                    try:
                        out.append(tuple(json.loads(line)))
                    except ValueError:
                        continue      # a line cut by a crash mid-write
                return out
        except FileNotFoundError:
            return []

    def clear(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.rows = 0

    def release(self) -> None:
        with _spool_lock:
            _active_spools.discard(self.path)


class PgUsageLog(UsageLog):
    def __init__(self, url: str, on_error=None, on_drop=None, on_spool_drop=None,
                 spool_dir: Optional[str] = None, max_spool_rows: int = MAX_SPOOL_ROWS):
        super().__init__(safe_url(url), on_error=on_error, on_drop=on_drop)
        from psycopg_pool import ConnectionPool
        password = urllib.parse.urlsplit(url).password
        if password:
            register_secret(password)
            register_secret(urllib.parse.unquote(password))
        self.url = url
        self.spool = Spool(spool_dir or os.environ.get("GATEWAY_USAGE_SPOOL_DIR") or SPOOL_DIR,
                           max_spool_rows)
        self._on_spool_drop = on_spool_drop
        self.spool_dropped = 0
        self._retry_at = 0.0
        self._down = True            # not known to answer (yet): probe before using the pool
        self._schema_ready = False
        # check: a connection that outlived a database restart is replaced before use, not
        # found broken by a batch (one cheap round trip per batch).
        self.pool = ConnectionPool(url, min_size=0, max_size=4, open=False, timeout=CONNECT_TIMEOUT,
                                   kwargs={"connect_timeout": CONNECT_TIMEOUT}, name="gateway-usage",
                                   reconnect_timeout=0, check=ConnectionPool.check_connection)
        self._pool_opened = False
        self._pool_lock = threading.Lock()
        self._ensure_writer()     # at once: a spool left by a dead process is written soon

    def spool_rows(self) -> int:
        return self.spool.rows

    # ---- the writer -----------------------------------------------------------------------
    def _run(self):
        self.spool.adopt_orphans()
        if self.spool.rows:
            self._write_batch([])
        while True:
            try:
                item = self._q.get(timeout=RETRY if self.spool.rows else None)
            except queue.Empty:
                self._write_batch([])      # time to try the spool again
                continue
            if item is None:
                self.spool.release()
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
                self.spool.release()
                return

    def row(self, record: dict, now=None) -> tuple:
        # PostgreSQL text takes neither NUL nor lone surrogates (a client's model name may
        # hold either): a row it would refuse must never reach the spool.
        return tuple(_pg_text(v) if isinstance(v, str) else v for v in super().row(record, now))

    def _write_batch(self, batch) -> None:
        try:
            if self.spool.rows or time.monotonic() < self._retry_at:
                if time.monotonic() < self._retry_at or not self._drain():
                    self._to_spool(batch)
                    return
            if batch:
                self._insert_or_sift(batch)
        except Exception as e:
            self._retry_at = time.monotonic() + RETRY
            self._down = True
            self._failed(e, len(batch))
            self._to_spool(batch)
        finally:
            self.done += len(batch)

    def _to_spool(self, batch) -> None:
        if not batch:
            return
        try:
            dropped = self.spool.append(batch)
        except OSError as e:
            dropped = len(batch)
            log.error("usage spool %s: cannot write: %s", self.spool.path, e)
        if dropped:
            self.spool_dropped += dropped
            if self._on_spool_drop is not None:
                try:
                    self._on_spool_drop.inc(dropped)
                except Exception:
                    pass

    def _drain(self) -> bool:
        """Write the spool to the database; False (and a later retry) when it is down."""
        rows = self.spool.read()
        try:
            if rows:
                self._insert_or_sift(rows)     # one COPY, one transaction: all or nothing
        except Exception as e:
            self._retry_at = time.monotonic() + RETRY
            self._down = True
            self._failed(e, len(rows))
            return False
        self.spool.clear()
        if rows:
            log.warning("usage log %s: database is back; wrote %d spooled row(s)", self.path, len(rows))
        return True

    def _insert_or_sift(self, rows) -> None:
        """Insert rows; when the database refuses them as data, each is tried alone and the
        bad ones are dropped and counted as write errors, so one row can never hold up the
        others (or the spool). A connection failure still raises (the caller spools)."""
        import psycopg
        try:
            self._insert(rows)
            return
        except psycopg.DataError as e:
            first = e
        bad = 0
        for r in rows:
            try:
                self._insert([r])
            except psycopg.DataError:
                bad += 1
        if bad:
            self._failed(first, bad)

    def _probe(self) -> None:
        """While the database is known to be down, one direct connection tells at once
        (a refused connection fails fast, where the pool would wait its full timeout)."""
        if self._down:
            import psycopg
            psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT).close()
            self._down = False

    def _open_pool(self):
        self._probe()
        if not self._pool_opened:
            with self._pool_lock:
                if not self._pool_opened:
                    self.pool.open(wait=False)
                    self._pool_opened = True

    def _insert(self, rows) -> None:
        self._open_pool()
        with self.pool.connection() as conn:
            if not self._schema_ready:
                _ensure_schema(conn)
                self._schema_ready = True
            with conn.cursor() as cur, cur.copy(_COPY) as copy:
                for r in rows:
                    copy.write_row(r)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self.spool.release()
        if self._pool_opened:
            try:
                self.pool.close(timeout=timeout)
            except Exception:
                pass

    # ---- reading ----------------------------------------------------------------------------
    def summary(self, since: Optional[float] = None, group_by: Optional[str] = None) -> dict:
        self.flush(1.0)
        try:
            self._open_pool()
            with self.pool.connection() as conn:
                if not self._schema_ready:
                    _ensure_schema(conn)
                    self._schema_ready = True
                return summarize(lambda q, args: conn.execute(q, args).fetchall(), "%s", since, group_by)
        except Exception as e:
            self._down = True
            log.warning("usage log %s: cannot read: %s: %s", self.path, type(e).__name__, scrub(str(e))[:200])
            raise ServiceBusy(f"the usage database is unreachable ({type(e).__name__}); "
                              "rows are kept and written when it is back") from None


def _ensure_schema(conn) -> None:
    # Several workers start at once: one creates, the others wait on the lock.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(727274)")
        conn.execute(SCHEMA)


def _pg_text(v: str) -> str:
    return v.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
