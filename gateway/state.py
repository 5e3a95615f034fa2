"""Everything one app instance owns, built from one Settings object."""
from __future__ import annotations

import logging

from gateway import shared_state
from gateway.limits import Limiter
from gateway.router import Router

log = logging.getLogger("gateway")


class GatewayState:
    def __init__(self, settings):
        self.settings = settings
        self.router = Router(settings)
        # Called with one dict per finished request (logs, metrics, usage log), from
        # gateway.http.lifecycle. Each observer must be cheap and must never raise into a request.
        self.observers = []
        self.shared = shared_state.for_settings(settings)   # None without Redis
        self.limits = Limiter(self.shared)
        self.observers.append(self.limits.on_finished)

    def finished(self, record: dict) -> None:
        for obs in self.observers:
            try:
                obs(record)
            except Exception:
                log.exception("request observer failed")

    def close(self) -> None:
        self.router.close()
