"""Everything one app instance owns, built from one Settings object."""
from __future__ import annotations

import logging

from gateway.router import Router

log = logging.getLogger("gateway")


class GatewayState:
    def __init__(self, settings):
        self.settings = settings
        self.router = Router(settings)
        # Called with one dict per finished request (logs, metrics, usage log), from
        # gateway.http.lifecycle. Each observer must be cheap and must never raise into a request.
        self.observers = []

    def finished(self, record: dict) -> None:
        for obs in self.observers:
            try:
                obs(record)
            except Exception:
                log.exception("request observer failed")

    def close(self) -> None:
        self.router.close()
