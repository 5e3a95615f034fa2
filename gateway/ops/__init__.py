"""Operations: health, Prometheus metrics, the SQLite usage log and structured access logs.

`install(app, state)` is called by create_app. Submodules are imported inside it, not
here: gunicorn.conf.py imports `gateway.ops.gunicorn_hooks` in the master, which must not
import prometheus_client before PROMETHEUS_MULTIPROC_DIR is decided.
"""
from __future__ import annotations



def install(app, state) -> None:
    from gateway.ops import accesslog, client_metrics, health, metrics, usage

    accesslog.install(app, state)
    metrics.install(app, state)
    client_metrics.install(app, state)
    usage.install(app, state)
    health.install(app, state)
