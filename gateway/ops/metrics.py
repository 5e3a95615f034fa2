"""GET /metrics: Prometheus text.

Counters and histograms are updated by a request observer. Under gunicorn with several
workers they live in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set
up by gunicorn.conf.py), so a scrape sums every worker whichever one answers.

State that already exists elsewhere (key rests, local queue, loaded models) is read at
scrape time by a custom collector instead of being mirrored into counters: nothing can
drift. Its numbers are the answering worker's own; key rests are per worker anyway, and
local models belong in a one-worker setup.
"""
from __future__ import annotations

import logging
import os
import threading

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from gateway.http.streaming import active_streams

log = logging.getLogger("gateway.ops")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# A client picks the model string, and remote providers forward unlisted ids: only
# configured models and aliases are labels (anything else is "other"), and their count is
# capped too, so no name a client sends can grow the output.
MAX_MODEL_LABELS = 200
REST_REASONS = ("rate_limit", "auth", "transient")


def multiprocess_dir():
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    def __init__(self, state, registry=None):
        self.state = state
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.mp_dir = multiprocess_dir()
        if self.mp_dir:
            os.makedirs(self.mp_dir, exist_ok=True)
        r = self.registry
        self.requests = Counter("gateway_requests", "Finished generation/embedding requests",
                                ["route", "provider", "model", "status"], registry=r)
        self.latency = Histogram("gateway_request_duration_seconds",
                                 "Time from request start to the last byte of the answer",
                                 ["route", "provider", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds",
                              "Time from request start to the first content chunk",
                              ["route", "provider", "model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens (input)",
                                     ["provider", "model"], registry=r)
        self.completion_tokens = Counter("gateway_completion_tokens", "Completion tokens (output)",
                                         ["provider", "model"], registry=r)
        self.usage_write_errors = Counter("gateway_usage_write_errors",
                                          "Usage-log batches that could not be written", registry=r)
        self.usage_dropped = Counter("gateway_usage_dropped",
                                     "Usage-log rows dropped because the write queue was full",
                                     registry=r)
        self._models = set()
        self.app = None            # set by install(): its URL rules are the route labels
        self._routes = None
        self._lock = threading.Lock()
        self.collector = StateCollector(state)
        self.extra_collectors = []
        if not self.mp_dir:
            self.registry.register(self.collector)

    def add_collector(self, collector) -> None:
        """A scrape-time collector of another module (answered with this worker's view)."""
        self.extra_collectors.append(collector)
        if not self.mp_dir:
            self.registry.register(collector)

    def _model_label(self, model) -> str:
        if not model:
            return ""
        model = str(model)
        with self._lock:
            if model in self._models:
                return model
        if not self.state.router.listed(model):
            return "other"
        with self._lock:
            if len(self._models) >= MAX_MODEL_LABELS:
                return "other"
            self._models.add(model)
            return model

    def _route_label(self, route) -> str:
        """The app's own routes; any other path (a 404 scan) is "other"."""
        route = str(route or "")
        if self.app is None:        # a bare Metrics (unit use): no URL map to check against
            return route[:200]
        if self._routes is None:
            self._routes = {r.rule for r in self.app.url_map.iter_rules()}
        return route if route in (self._routes or ()) else "other"

    def observe(self, record: dict) -> None:
        route = self._route_label(record.get("route"))
        provider = str(record.get("provider") or "none")
        model = self._model_label(record.get("model"))
        self.requests.labels(route, provider, model, str(record.get("status") or 0)).inc()
        if record.get("latency") is not None:
            self.latency.labels(route, provider, model).observe(max(0.0, record["latency"]))
        if record.get("ttft") is not None:
            self.ttft.labels(route, provider, model).observe(max(0.0, record["ttft"]))
        if record.get("prompt_tokens"):
            self.prompt_tokens.labels(provider, model).inc(record["prompt_tokens"])
        if record.get("completion_tokens"):
            self.completion_tokens.labels(provider, model).inc(record["completion_tokens"])

    def render(self) -> bytes:
        if not self.mp_dir:
            return generate_latest(self.registry)
        # Multiprocess: the files of every worker (dead ones too, so totals never drop),
        # plus this worker's live view of provider state.
        from prometheus_client import multiprocess
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=self.mp_dir)
        reg.register(self.collector)
        for c in self.extra_collectors:
            reg.register(c)
        return generate_latest(reg)


class StateCollector:
    """Gauges computed at scrape time from what each provider reports (Provider.gauges).
    Never raises: a provider whose report fails is left out of this scrape and logged."""

    def __init__(self, state):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        offered = GaugeMetricFamily("gateway_provider_offered",
                                    "1 when the provider can serve (a remote one has keys)",
                                    labels=["provider", "type"])
        keys = GaugeMetricFamily("gateway_provider_keys", "API keys configured", labels=["provider"])
        resting = GaugeMetricFamily("gateway_provider_keys_resting",
                                    "API keys resting now after a failure, by reason (shared by every "
                                    "instance with server.redis, else this worker's)",
                                    labels=["provider", "reason"])
        queue = GaugeMetricFamily("gateway_local_queue_depth", "Requests waiting for a local model",
                                  labels=["provider"])
        loaded = GaugeMetricFamily("gateway_local_models_loaded", "Local models loaded now",
                                   labels=["provider"])
        mem = GaugeMetricFamily("gateway_local_model_memory_bytes",
                                "Memory a loaded local model holds (kind=total|vram)",
                                labels=["provider", "model", "kind"])
        streams = GaugeMetricFamily("gateway_active_streams",
                                    "Streamed answers being written now (this worker)")
        streams.add_metric([], float(active_streams()))
        for name, p in list(self.state.router.providers.items()):
            try:
                g = p.gauges()      # each type reports what it has (keys, a queue, loaded models)
                offered.add_metric([name, p.type_name], 1.0 if p.offered else 0.0)
                if g.keys_total is not None:
                    keys.add_metric([name], float(g.keys_total))
                    for reason, n in {**dict.fromkeys(REST_REASONS, 0), **g.keys_resting}.items():
                        resting.add_metric([name, reason], float(n))
                if g.queue_depth is not None:
                    queue.add_metric([name], float(g.queue_depth))
                if g.loaded is not None:
                    loaded.add_metric([name], float(len(g.loaded)))
                    for lm in g.loaded:
                        mname = str(lm.card.upstream_id or lm.card.name or "")
                        mem.add_metric([name, mname, "total"], float(lm.size or 0))
                        mem.add_metric([name, mname, "vram"], float(lm.size_vram or 0))
            except Exception as e:
                log.warning("metrics: provider %s gauges failed: %s", name, type(e).__name__)
        return [offered, keys, resting, queue, loaded, mem, streams]


def install(app, state) -> None:
    from flask import Response

    # *_created series double the output and nobody here graphs them.
    disable_created_metrics()
    m = Metrics(state)
    m.app = app
    app.extensions["gateway_metrics"] = m
    state.observers.append(m.observe)

    @app.route("/metrics", methods=["GET"])
    def metrics_view():
        return Response(m.render(), mimetype=None, headers={"Content-Type": CONTENT_TYPE_LATEST})
