"""Errors that carry their HTTP status. Surfaces render them in their own shape.

Messages must never contain an API key: providers build them from upstream text passed
through `scrub()`, which removes every configured key.
"""
from __future__ import annotations

import re
import threading
from typing import Optional


class GatewayError(Exception):
    status = 500
    kind = "api_error"                 # OpenAI error type

    def __init__(self, message: str, status: Optional[int] = None,
                 retry_after: Optional[float] = None, code: Optional[str] = None):
        super().__init__(scrub(message))
        self.message = scrub(message)
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.code = code
        # Set only where the exact unscrubbed text must reach the caller (model_not_found).
        self.client_message: Optional[str] = None

    def __str__(self):
        return self.message


class BadRequest(GatewayError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    kind = "authentication_error"


class Forbidden(GatewayError):
    status = 403
    kind = "permission_error"


class NotFound(GatewayError):
    status = 404
    kind = "not_found_error"


def model_not_found(name: str) -> NotFound:
    # Exact Ollama wording: Continue parses the quoted name out of the second word.
    text = f'model "{name}" not found, try pulling it first'
    e = NotFound(text)
    # The caller gets back the name it sent, verbatim: were a configured key in it
    # scrubbed to ***, the answer would confirm a guessed key. Logs keep the scrubbed text.
    e.client_message = text
    return e


class TooLarge(GatewayError):
    status = 413
    kind = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    kind = "rate_limit_error"


class UpstreamFailed(GatewayError):
    status = 502


class ServiceBusy(GatewayError):
    status = 503


class UpstreamTimeout(GatewayError):
    status = 504


class Passthrough(GatewayError):
    """An upstream 4xx that is the request's fault: goes back with its own status."""

    @property
    def kind(self):
        return {400: "invalid_request_error", 404: "not_found_error",
                403: "permission_error", 413: "invalid_request_error",
                422: "invalid_request_error"}.get(self.status, "api_error")


# ---- key scrubbing -------------------------------------------------------------------
_secrets: set = set()
_secrets_lock = threading.Lock()
_pattern: Optional[re.Pattern] = None


def register_secret(value: str) -> None:
    """Every API key the process knows is registered so no message can carry it."""
    global _pattern
    if not value or len(value) < 4:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))


def contains_secret(text) -> bool:
    pat = _pattern
    return bool(text) and pat is not None and pat.search(str(text)) is not None


def scrub(text) -> str:
    text = "" if text is None else str(text)
    pat = _pattern
    if pat is not None:
        text = pat.sub("***", text)
    return text
