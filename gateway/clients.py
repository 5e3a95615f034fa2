"""Client keys: who calls, which models they may use, and their limits (`server.clients`).

    server:
      clients:
        - name: alice
          key: ${ALICE_KEY}
          models: ["local:*", "fast"]     # globs over model names and aliases; absent: all
          rpm: 60                         # requests per minute
          tpm: 200000                     # prompt+completion tokens per minute
          max_parallel: 4                 # requests in flight
          tokens_per_day: 2000000

`server.api_keys` stays shorthand for clients with every model and no limits; they have
no name, and logs and usage show a hash of the key for them. The guard finds the caller's
client (comparing with every key, so timing does not tell which matched) and keeps it in a
context variable for the rest of the request (a streamed answer ends in the same greenlet).
"""
from __future__ import annotations

import fnmatch
import hmac
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional

from gateway.errors import Forbidden, register_secret

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
LIMITS = ("rpm", "tpm", "max_parallel", "tokens_per_day")
_current: ContextVar = ContextVar("gateway_client", default=None)


@dataclass(frozen=True)
class Client:
    name: Optional[str]          # None: a server.api_keys key
    key: str
    models: tuple = ()           # globs; empty: every model
    rpm: int = 0                 # 0: no limit
    tpm: int = 0
    max_parallel: int = 0
    tokens_per_day: int = 0

    def __getitem__(self, field: str):
        """c["rpm"]: the checked config entry, read as the mapping it was written as."""
        if field not in self.__dataclass_fields__:
            raise KeyError(field)
        return getattr(self, field)

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel or self.tokens_per_day)

    def allows(self, name: str) -> bool:
        if not self.models:
            return True
        names = (name, name[:-7]) if name.endswith(":latest") else (name,)
        return any(fnmatch.fnmatchcase(n, g) for n in names for g in self.models)


def parse_clients(value: list, file: str) -> list:
    """Client objects from entries gateway.settings.check_clients has checked (known keys, a
    key, numbers); here: a name, unique names and keys, whole limits (0: none)."""
    from gateway.settings import ConfigError, key_list   # settings imports this module
    out, names, keys = [], set(), set()
    for i, c in enumerate(value or []):
        path = f"server.clients[{i}]"
        name = c.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(file, f"{path}.name", "is required: letters, digits, '.', '_', '-' or '@' "
                                                    "(up to 64)")
        if name in names:
            raise ConfigError(file, f"{path}.name", f"{name!r} is used by another client")
        key = c.get("key")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(file, f"{path}.key", "is required (a non-empty string, e.g. ${ALICE_KEY})")
        key = key.strip()
        if key in keys:
            raise ConfigError(file, f"{path}.key", "is the key of another client")
        models = key_list(c.get("models"), file, f"{path}.models")
        limits = {}
        for k in LIMITS:
            v = c.get(k)
            if v is None:
                limits[k] = 0
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
                raise ConfigError(file, f"{path}.{k}", f"must be a whole number (0: no limit), got {v!r}")
            limits[k] = int(v)
        register_secret(key)
        names.add(name)
        keys.add(key)
        out.append(Client(name=name, key=key, models=tuple(models), **limits))
    return out


class ClientBook:
    """Every key that may call: named clients and server.api_keys."""

    def __init__(self, settings):
        clients = list(getattr(settings, "clients", None) or [])
        named = {c.key for c in clients}
        clients += [Client(name=None, key=k) for k in settings.api_keys if k not in named]
        self._entries = [(c.key.encode(), c) for c in clients]

    def __bool__(self):
        return bool(self._entries)

    def match(self, given: bytes) -> Optional[Client]:
        found = None
        for key, c in self._entries:   # compare with every key: timing does not reveal which
            if hmac.compare_digest(given, key) and found is None:
                found = c
        return found


# ---- the current request's client ----------------------------------------------------
def set_current(client: Optional[Client]) -> None:
    _current.set(client)


def current() -> Optional[Client]:
    return _current.get()


def current_name() -> Optional[str]:
    c = _current.get()
    return c.name if c is not None else None


def check_model(name: str) -> None:
    """Forbidden (403) when the calling client may not use this model or alias."""
    c = _current.get()
    if c is not None and c.models and isinstance(name, str) and not c.allows(name):
        raise Forbidden(f'model "{name}" is not allowed for client {c.name}', code="model_not_allowed")


def visible(cards: list) -> list:
    """The model cards the calling client may use (for /api/tags and /v1/models)."""
    c = _current.get()
    if c is None or not c.models:
        return cards
    return [card for card in cards if c.allows(card.name)]
