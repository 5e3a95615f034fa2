"""gunicorn server hooks for Prometheus multiprocess mode (used by gunicorn.conf.py).

Each worker keeps its own counters; with more than one, a scrape answered by one worker
would show only its share. prometheus_client's multiprocess mode has every worker write
its values to files in PROMETHEUS_MULTIPROC_DIR and /metrics sums them. The variable must
be set before any worker imports prometheus_client, so it is decided here in the master,
before the fork. Nothing here imports prometheus_client at module level: the master
imports this file at config time.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"
_created = {"dir": None}


def on_starting(server) -> None:
    path = os.environ.get(ENV)
    if path == "":
        # Set but empty would switch prometheus_client to multiprocess mode with no dir.
        del os.environ[ENV]
    if path:
        # The operator's directory: stale files from an earlier run would be summed in.
        os.makedirs(path, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):
            try:
                os.remove(f)
            except OSError:
                pass
        return
    if int(getattr(server.cfg, "workers", 1) or 1) > 1:
        path = tempfile.mkdtemp(prefix="gateway-prometheus-")
        os.environ[ENV] = path
        _created["dir"] = path
        server.log.info("prometheus multiprocess dir %s (%d workers)", path, server.cfg.workers)


def child_exit(server, worker) -> None:
    if not os.environ.get(ENV):
        return
    try:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
    except Exception as e:   # bookkeeping only: never take the master down
        server.log.warning("prometheus mark_process_dead(%s) failed: %s", worker.pid, e)


def on_exit(server) -> None:
    path = _created["dir"]
    if path:
        shutil.rmtree(path, ignore_errors=True)
        _created["dir"] = None


def worker_exit(server, worker) -> None:
    # Rows still queued for the usage log are written before the worker goes away.
    app = getattr(worker, "wsgi", None)
    usage = getattr(app, "extensions", {}).get("gateway_usage") if app is not None else None
    if usage is not None:
        try:
            usage.close(timeout=5)
        except Exception as e:
            server.log.warning("usage log close failed: %s", type(e).__name__)
