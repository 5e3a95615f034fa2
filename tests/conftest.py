"""Shared fixtures: free ports, the fake upstream process, configs, and the real gateway
under gunicorn + gevent."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import yaml
from flask import Flask
from flask.testing import FlaskClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GGML_NO_BACKTRACE", "1")


class ClosingClient(FlaskClient):
    """Flask's test client that closes each response once read, as every WSGI server does
    (PEP 3333): a request's record (gateway.http.lifecycle) closes then. Pass
    buffered=False to read a stream piece by piece and close it yourself."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


Flask.test_client_class = ClosingClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc, timeout=10):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


from tests.services import postgres_service, redis_service  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="session")
def fake_upstream():
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fake_upstream.py"), "--port", str(port)],
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_stats", proc=proc)
    yield url
    stop(proc)


def remote_config(upstream: str, **over) -> dict:
    """A config with one openai-type and one gemini-type provider on the fake upstream."""
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "usage_db": ""},
        "providers": {
            "oai": {"type": "openai", "base_url": upstream + "/v1", "api_keys": ["ok-oai-1", "ok-oai-2"],
                    "models": ["echo", "chunks-32-0", "meta/llama:free"], "timeout": 5,
                    "headers": {"X-Title": "gateway-tests"}},
            "gem": {"type": "gemini", "base_url": upstream + "/v1beta", "api_keys": ["ok-gem-1"],
                    "models": ["gemini-2.5-flash", "text-embedding-004"], "timeout": 5},
            "nokeys": {"type": "openai", "base_url": upstream + "/v1", "api_keys": [], "models": ["hidden"]},
        },
        "aliases": {"fast": ["nokeys:hidden", "oai:echo", "gem:gemini-2.5-flash"]},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def write_config(cfg: dict, directory: str) -> str:
    path = os.path.join(directory, "gateway.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path


@pytest.fixture
def make_app(tmp_path):
    """make_app(cfg) → a Flask app built by create_app from that config (test client)."""
    from app import create_app
    from gateway.settings import build_settings
    apps = []

    def make(cfg):
        app = create_app(build_settings(cfg, str(tmp_path / "gateway.yaml")))
        apps.append(app)
        return app
    yield make
    for a in apps:
        a.extensions["gateway"].close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny generated GGUF files (tests/tiny_gguf.py) by model name: "tiny" (chat),
    "emb" (embedding)."""
    from tests.tiny_gguf import write_tiny_gguf
    d = tmp_path_factory.mktemp("tiny-gguf")
    return {"tiny": write_tiny_gguf(str(d / "tiny.gguf")),
            "emb": write_tiny_gguf(str(d / "emb.gguf"), embedding=True, seed=3)}


@pytest.fixture
def client(make_app, fake_upstream):
    """A test client of the gateway on remote_config (the fake upstream), fresh per test."""
    return make_app(remote_config(fake_upstream)).test_client()


@pytest.fixture(scope="module")
def module_client(fake_upstream):
    """The same, one app per module: for tests that change no state (key rests included)."""
    from app import create_app
    from gateway.settings import build_settings
    app = create_app(build_settings(remote_config(fake_upstream)))
    yield app.test_client()
    app.extensions["gateway"].close()


class Gunicorn:
    def __init__(self, cfg: dict, workers: int = 1, env=None, bind_host: str = "127.0.0.1"):
        self.dir = tempfile.mkdtemp(prefix="gw-test-")
        self.config_path = write_config(cfg, self.dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "gateway.log")
        e = dict(os.environ)
        e.update({"GATEWAY_CONFIG": self.config_path, "GATEWAY_BIND": f"{bind_host}:{self.port}",
                  "GATEWAY_WORKERS": str(workers), "HOME": self.dir, "PYTHONUNBUFFERED": "1"})
        e.update(env or {})
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"),
                                      "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=e,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/api/version", timeout=60, proc=self.proc)

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def close(self):
        stop(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def gunicorn_gateway():
    """gunicorn_gateway(cfg, workers=1) → a running Gunicorn handle (stopped after the test)."""
    started = []

    def start(cfg, workers=1, env=None, bind_host="127.0.0.1"):
        g = Gunicorn(cfg, workers, env, bind_host)
        started.append(g)
        return g
    yield start
    for g in started:
        g.close()
