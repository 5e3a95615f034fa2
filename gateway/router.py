"""Model names → provider targets, and alias failover.

`<provider>:<upstream id>` is split at the first colon. A name without a known provider
prefix is looked up in the aliases (with a trailing `:latest` stripped, as Open WebUI adds
it), then answered 404. An alias tries its targets in order; a stream can move to the
next target only before its first chunk.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterator, Optional

from gateway import clients
from gateway.canonical import ChatRequest, Chunk, EmbedRequest, ModelCard
from gateway.errors import BadRequest, GatewayError, model_not_found
from providers import provider_class

log = logging.getLogger("gateway.router")

# Failures after which an alias moves on to its next target. 4xx pass-throughs and "not
# supported" answers are the request's fault: another target would not help.
_FAILOVER = {404, 429, 500, 502, 503, 504}
# Characters that could steer an upstream URL built from a model id (Gemini puts the id
# in the path) or a log line: none is part of a real model id.
_STEERING = set("?#%\\") | {chr(c) for c in (*range(0x20), *range(0x7f, 0xa0))}


def check_upstream_id(uid: str) -> None:
    """A 400 before any upstream call for ids with `.`/`..`/empty path segments or
    characters that can steer a URL path."""
    bad = next((ch for ch in uid if ch in _STEERING or ch.isspace()), None)
    if bad is not None:
        raise BadRequest(f'invalid value for field "model": the model id may not contain {bad!r}')
    if any(seg in ("", ".", "..") for seg in uid.split("/")):
        raise BadRequest('invalid value for field "model": the model id may not have empty, '
                         '"." or ".." path segments')


class Target:
    __slots__ = ("provider", "upstream_id", "card")

    def __init__(self, provider, upstream_id: str, card: ModelCard):
        self.provider, self.upstream_id, self.card = provider, upstream_id, card


class Router:
    def __init__(self, settings):
        self.settings = settings
        self.providers = {}
        for name, cfg in settings.providers.items():
            self.providers[name] = provider_class(cfg["type"])(name, cfg, settings)
        self.aliases = dict(settings.aliases)
        for name, p in self.providers.items():
            if not p.offered:
                log.warning("provider %s is not offered: no API keys configured", name)

    def close(self):
        for p in self.providers.values():
            try:
                p.close()
            except Exception:  # closing must never stop the others
                log.exception("closing provider %s", p.name)

    # ---- lookup -------------------------------------------------------------------------
    def _direct(self, name: str) -> Optional[Target]:
        if ":" not in name:
            return None
        prefix, uid = name.split(":", 1)
        p = self.providers.get(prefix)
        if p is None or not p.offered or not uid:
            return None
        check_upstream_id(uid)
        card = p.card(uid)
        return Target(p, uid, card) if card is not None else None

    def alias_name(self, name: str) -> Optional[str]:
        if name in self.aliases:
            return name
        if name.endswith(":latest") and name[:-7] in self.aliases:
            return name[:-7]
        return None

    def provider_named_by(self, model) -> Optional[str]:
        """The provider a `<provider>:` prefix names, so a request that failed before any
        answer still counts against it."""
        if isinstance(model, str) and ":" in model:
            prefix = model.split(":", 1)[0]
            if prefix in self.providers:
                return prefix
        return None

    def listed(self, name) -> bool:
        """An alias or a configured model (not an unlisted id a remote provider would
        forward): the names metrics keep as labels."""
        if not isinstance(name, str) or not name:
            return False
        if self.alias_name(name) is not None:
            return True
        prefix, _, uid = name.partition(":")
        p = self.providers.get(prefix)
        try:
            return p is not None and bool(uid) and p.listed(uid)
        except Exception:   # a broken local file: not a label
            return False

    def resolve(self, name: str) -> list:
        """Targets to try in order; raises the Ollama 404 when there are none, 403 when
        the calling client may not use the name."""
        if not isinstance(name, str) or not name:
            raise model_not_found(str(name or ""))
        clients.check_model(name)
        alias = self.alias_name(name)
        if alias is None:
            t = self._direct(name)
            if t is not None:
                return [t]
            raise model_not_found(name)
        targets = [t for t in (self._direct(x) for x in self.aliases[alias]) if t is not None]
        if not targets:
            raise model_not_found(name)
        return targets

    def card(self, name: str) -> ModelCard:
        """The card a client sees for a name: an alias shows its first target's details."""
        t = self.resolve(name)[0]
        alias = self.alias_name(name)
        return replace(t.card, name=alias) if alias else t.card

    def list_cards(self) -> list:
        cards = []
        for p in self.providers.values():
            if p.offered:
                cards.extend(p.models())
        for alias in self.aliases:
            try:
                cards.append(replace(self.resolve(alias)[0].card, name=alias))
            except GatewayError:
                continue   # every target unavailable: the alias is not offered either
        return clients.visible(cards)

    def loaded(self) -> list:
        out = []
        for p in self.providers.values():
            out.extend(p.loaded())
        return out

    # ---- work ---------------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> Iterator[Chunk]:
        """A chunk iterator whose first chunk has already been fetched: any failure before
        it raises here, after trying every alias target."""
        targets = self.resolve(req.model)
        last: Optional[GatewayError] = None
        for i, t in enumerate(targets):
            gen = None
            try:
                # Inside the try: a provider may refuse before its generator starts (local:
                # queue full, model file missing), and that must fail over like any other.
                gen = t.provider.chat(req, t.upstream_id)
                first = next(gen)
            except StopIteration:
                first = Chunk(done=True, done_reason="stop")
            except GatewayError as e:
                _close(gen)
                last = e
                if len(targets) > 1 and e.status in _FAILOVER and i + 1 < len(targets):
                    log.warning("alias %s: target %s failed (%s); trying the next", req.model,
                                t.card.name, e.status)
                    continue
                raise
            except BaseException:
                _close(gen)
                raise
            return AnswerStream(first, gen, t)
        raise last  # pragma: no cover - the loop always returns or raises

    def embed(self, req: EmbedRequest):
        """(EmbedResult, the target that answered)."""
        targets = self.resolve(req.model)
        for i, t in enumerate(targets):
            try:
                return t.provider.embed(req, t.upstream_id), t
            except GatewayError as e:
                if len(targets) > 1 and e.status in _FAILOVER and i + 1 < len(targets):
                    continue
                raise

    def load(self, name: str, keep_alive) -> None:
        t = self.resolve(name)[0]
        t.provider.load(t.upstream_id, keep_alive)

    def unload(self, name: str) -> None:
        t = self.resolve(name)[0]
        t.provider.unload(t.upstream_id)


class AnswerStream:
    """The answer of the target that answered (`target`): its first chunk (already
    fetched, so a failure before it could still fail over), then the rest of the
    provider's generator. close() reaches that generator, so a client disconnect closes
    the upstream at once."""
    __slots__ = ("_first", "_gen", "target")

    def __init__(self, first, gen, target=None):
        self._first, self._gen, self.target = first, gen, target

    def __iter__(self):
        return self

    def __next__(self):
        f = self._first
        if f is not None:
            self._first = None
            return f
        return next(self._gen)

    def close(self):
        _close(self._gen)


def _close(gen):
    if gen is None:
        return
    try:
        gen.close()
    except Exception:
        log.debug("error closing a chunk generator", exc_info=True)
