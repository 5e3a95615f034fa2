"""The adapter interface. One small class per provider type; the core never names one.

A provider is built from its YAML section (`name`, `cfg` dict) and offers:
  models()            -> [ModelCard]          what the lists show
  card(upstream_id)   -> ModelCard | None     None: unknown (a 404 for the client)
  chat(req, uid)      -> iterator of Chunk    raises GatewayError before the first chunk
                                              when the request cannot be served at all
  embed(req, uid)     -> EmbedResult
  count_tokens(req, uid) -> int | None        the prompt's input tokens; None: cannot count
  load(uid, keep_alive) / unload(uid) -> None (local models; remote ones do nothing)
  loaded()            -> [LoadedModel]         /api/ps
  health()            -> dict                  its /health/ready entry, never a key
  gauges()            -> Gauges                its /metrics numbers at scrape time
  close()
Only `type_name` and `chat` are required (abstract); the rest are optional hooks with
the defaults below.

Config: each class declares the YAML keys of its section in `config_keys` (a subclass adds
its own to its base's) and checks them in the classmethod `check_config`; an undeclared key
is a config error. That check lives in a light class per type (providers/__init__.py).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterator, Optional

from gateway.canonical import ChatRequest, Chunk, EmbedRequest, EmbedResult, ModelCard
from gateway.errors import BadRequest
from gateway.settings import check_keys


@dataclass
class Gauges:
    """What /metrics shows of one provider at scrape time; None: not this type's."""
    keys_total: Optional[int] = None
    keys_resting: dict[str, int] = field(default_factory=dict)   # rest reason -> keys resting now
    queue_depth: Optional[int] = None                           # requests waiting for a model
    loaded: Optional[list] = None                               # [LoadedModel] held now


class Provider(abc.ABC):
    type_name: str        # the `type:` of its config section; each type declares its own
    # YAML keys of this type's section; subclasses extend it. Each key declared once.
    config_keys = frozenset({"type"})
    # True: this type holds per-process state a second worker would duplicate (loaded
    # models), so gunicorn.conf.py defaults to one worker when it is configured.
    single_worker = False

    @classmethod
    def check_config(cls, cfg: dict, file: str, path: str) -> dict:
        """The section checked and normalised (what __init__ gets as `cfg`); raises
        ConfigError naming the key path. Subclasses call this first, then check values."""
        check_keys(cfg, cls.config_keys, file, path)
        return dict(cfg)

    def __init__(self, name: str, cfg: dict, settings=None):
        # `settings` (the server's) is passed to every type; the built-in ones need none of it.
        self.name = name
        self.cfg = cfg

    # --- discovery -------------------------------------------------------------------
    @property
    def offered(self) -> bool:
        """False when the provider cannot serve anything (a remote one with no keys)."""
        return True

    def models(self) -> list:
        return []

    def card(self, upstream_id: str) -> Optional[ModelCard]:
        for c in self.models():
            if c.upstream_id == upstream_id:
                return c
        return None

    def listed(self, upstream_id: str) -> bool:
        """Configured here (not merely forwarded): what metrics may name as a label."""
        return self.card(upstream_id) is not None

    # --- work ------------------------------------------------------------------------
    @abc.abstractmethod
    def chat(self, req: ChatRequest, upstream_id: str) -> Iterator[Chunk]:
        ...

    def embed(self, req: EmbedRequest, upstream_id: str) -> EmbedResult:
        raise BadRequest(f'"{req.model}" does not support embeddings')

    def count_tokens(self, req: ChatRequest, upstream_id: str) -> Optional[int]:
        return None

    def load(self, upstream_id: str, keep_alive: Optional[float]) -> None:
        return None

    def unload(self, upstream_id: str) -> None:
        return None

    def loaded(self) -> list:
        return []

    # --- operations --------------------------------------------------------------------
    def health(self) -> dict:
        """This provider's /health/ready entry: anything its type knows, never a key."""
        return {"type": self.type_name, "offered": self.offered}

    def gauges(self) -> Gauges:
        return Gauges()

    def close(self) -> None:
        return None
