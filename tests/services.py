"""Real Redis and PostgreSQL for the tests that need them.

GATEWAY_TEST_REDIS_URL (default redis://127.0.0.1:6379/0) and GATEWAY_TEST_DATABASE_URL
(default postgresql://127.0.0.1:5432/test, trust auth). Each test run uses its own Redis
key prefix and its own PostgreSQL schema, removed afterwards. A service that does not
answer skips its tests, saying how to provide it, unless GATEWAY_TEST_REQUIRE_SERVICES=1
(CI), where it fails them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from tests.conftest import free_port

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
DATABASE_URL = os.environ.get("GATEWAY_TEST_DATABASE_URL") or "postgresql://127.0.0.1:5432/test"
RUN = uuid.uuid4().hex[:10]


def _unavailable(what: str, how: str):
    if os.environ.get("GATEWAY_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (GATEWAY_TEST_REQUIRE_SERVICES=1) but unreachable: {how}")
    pytest.skip(f"{what} unreachable: {how}")


@pytest.fixture(scope="session")
def redis_service():
    """(url, prefix): the test Redis and this run's key prefix (its keys deleted after)."""
    import redis
    r = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        r.ping()
    except (redis.RedisError, OSError) as e:
        _unavailable("Redis", f"{REDIS_URL} ({type(e).__name__}); start redis-server on 127.0.0.1:6379 "
                              "or set GATEWAY_TEST_REDIS_URL")
    prefix = f"gwtest-{RUN}:"
    yield REDIS_URL, prefix
    for k in r.scan_iter(match=prefix + "*", count=1000):
        r.delete(k)
    r.close()


def _schema_url(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def postgres_service():
    """(url with search_path set to this run's schema, admin connection factory)."""
    import psycopg
    try:
        conn = psycopg.connect(DATABASE_URL, connect_timeout=3, autocommit=True)
    except psycopg.Error as e:
        _unavailable("PostgreSQL", f"{DATABASE_URL} ({type(e).__name__}); start PostgreSQL on "
                                   "127.0.0.1:5432 with trust auth and a database 'test', or set "
                                   "GATEWAY_TEST_DATABASE_URL")
    schema = f"gwtest_{RUN}"
    conn.execute(f'CREATE SCHEMA "{schema}"')
    yield _schema_url(DATABASE_URL, schema), schema
    conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    conn.close()


class RedisServer:
    """A redis-server of the test's own, on a free port, to stop and start mid-run."""

    def __init__(self):
        exe = shutil.which("redis-server")
        if not exe:
            _unavailable("redis-server", "install it (apt-get install redis-server) to run outage tests")
        self.exe = exe
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        r = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.time() + 10
        while True:
            try:
                r.ping()
                return
            except (redis.RedisError, OSError):
                if time.time() > deadline:
                    raise RuntimeError("own redis-server did not start")
                time.sleep(0.05)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self):
        self.proc.send_signal(19)    # SIGSTOP: a Redis that accepts but never answers

    def resume(self):
        self.proc.send_signal(18)    # SIGCONT

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """127.0.0.1:port → target, which the test can cut (every connection closed, new ones
    refused) and restore: a database that goes away and comes back."""

    def __init__(self, target_host: str, target_port: int):
        import threading
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks = []
        self._listener = None
        self.restore()

    def restore(self):
        import socket
        import threading
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls):
        import socket
        import threading
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        import socket
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        import socket
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() (Linux)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.cut()
