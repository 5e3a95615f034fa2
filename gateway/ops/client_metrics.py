"""Metrics by client name (server.clients; keys from server.api_keys have no name and are
left out, so the label values are bounded by the config), and gauges for shared state
and the usage spool, read at scrape time."""
from __future__ import annotations

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily


class SharedCollector:
    def __init__(self, app, state):
        self.app, self.state = app, state

    def describe(self):
        return []

    def collect(self):
        out = []
        shared = self.state.shared
        if shared is not None:
            up = GaugeMetricFamily("gateway_shared_state_up",
                                   "1 when Redis (shared key rests, round-robin, limits) answers; "
                                   "0 while serving with per-process state")
            up.add_metric([], 1.0 if shared.check() else 0.0)
            out.append(up)
        usage = self.app.extensions.get("gateway_usage")
        spooled = getattr(usage, "spool_rows", None)
        if spooled is not None:
            g = GaugeMetricFamily("gateway_usage_spool_rows",
                                  "Usage rows waiting on disk for the database (this worker)")
            g.add_metric([], float(spooled()))
            out.append(g)
        return out


def install(app, state) -> None:
    m = app.extensions.get("gateway_metrics")
    if m is None:
        return
    r = m.registry
    requests = Counter("gateway_client_requests", "Finished requests by client",
                       ["client", "status"], registry=r)
    tokens = Counter("gateway_client_tokens", "Tokens by client (kind=prompt|completion)",
                     ["client", "kind"], registry=r)
    limited = Counter("gateway_client_limited", "Requests refused (429) by a client limit",
                      ["client", "limit"], registry=r)
    m.usage_spool_dropped = Counter("gateway_usage_spool_dropped",
                                    "Usage rows dropped because the on-disk spool was full",
                                    registry=r)

    def observe(record: dict) -> None:
        ticket = record.get("limit_ticket")
        from gateway.clients import current_name
        name = ticket.client.name if ticket is not None else current_name()
        if not name:
            return
        requests.labels(name, str(record.get("status") or 0)).inc()
        if record.get("prompt_tokens"):
            tokens.labels(name, "prompt").inc(record["prompt_tokens"])
        if record.get("completion_tokens"):
            tokens.labels(name, "completion").inc(record["completion_tokens"])

    state.observers.append(observe)
    state.limits.on_limited = lambda client, limit: limited.labels(client.name, limit).inc()
    m.add_collector(SharedCollector(app, state))
