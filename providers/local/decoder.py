"""Slots: several conversations generated at once in one llama.cpp context.

A loaded chat model holds `n_parallel` sequences (slots) in one context with a unified
KV cache of n_ctx x n_parallel cells (each request is held to n_ctx, so the slots always
fit). Unified rather than a KV stream per slot: llama.cpp splits a batch over several
streams into micro-batches with the same token count per sequence, so a prompt chunk
beside other sequences' next tokens would go through one token per micro-batch; with one
stream a new prompt joins the running batch at once (measured on the 2-core CPU, see
README "Local models"). One decode loop per model runs on the model's native thread while
any request is active. Each step:
  * admits new requests: each takes the free slot whose cached tokens share the longest
    prefix with its prompt, keeps that prefix in the KV cache and evaluates only the rest;
  * builds one llama_batch with the next token of the generating sequences plus at most
    `n_batch` prompt tokens of the admitted ones (chunked prefill: a long prompt delays
    the others by one chunk, not by its whole length);
  * one llama_decode, then each sequence samples with its own sampler chain and its token
    goes to its request through a Channel (the hub never waits on the loop).
A request that went away is dropped at the next step; its slot keeps its cached tokens
for the next request that shares them.

Batching policy: on a small CPU a batch of a few sequences' next tokens can cost as much
as decoding them one by one (ggml's batched kernels pay off with more rows; 2-4 on the
2-core CPU here: anywhere from 0.65x to 1.5x), on a GPU batching always wins. So the loop
measures: it keeps the recent time of a next-token step per batch size, and decodes the g
generating sequences in one batch when that costs less than g single-sequence steps,
otherwise it takes turns (one sequence per step, round-robin, every other step feeding
waiting prompts); now and then it tries the other choice to keep both times current.
`batch_min` fixes the rule instead (1 with GPU offload; GATEWAY_LOCAL_BATCH_MIN).

Everything here runs on the model's native thread except submit(); a request cancels
its job by setting job.cancelled, read by the loop at its next step.
"""
from __future__ import annotations

import collections
import ctypes
import os
import time
from typing import Optional

import llama_cpp

from providers.local.native import real_lock


END = object()


class Failed:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


class Job:
    """One request's generation. Built on the request side; the loop owns the rest."""

    def __init__(self, tokens: list, max_tokens: int, stop_ids: set, sp: dict, grammar, out):
        self.tokens = list(tokens)
        self.max_tokens = max(0, int(max_tokens))
        self.stop_ids = stop_ids
        self.sp = sp
        self.grammar = grammar
        self.out = out                   # native.Channel: (token, piece, eog) items, then END
        self.cancelled = False
        self.finished = False            # END was put (set by the loop)
        self.n_cached = 0                # prompt tokens found in the slot's KV cache
        self.slot: Optional[Slot] = None
        self.todo: list = []
        self.n_past = 0
        self.n_out = 0
        self.last = -1
        self.sampler = None
        self.idx = -1                    # its row with logits in the current batch


class Slot:
    __slots__ = ("id", "cached", "job", "used")

    def __init__(self, sid: int):
        self.id = sid
        self.cached: list = []           # tokens whose KV is in sequence `id`
        self.job: Optional[Job] = None
        self.used = 0


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def batch_min_default(gpu: bool) -> Optional[int]:
    """A fixed batching rule, or None: measure (see the module's docstring)."""
    env = os.environ.get("GATEWAY_LOCAL_BATCH_MIN")
    if env and env.strip().isdigit():
        return max(1, int(env))
    return 1 if gpu else None


class Decoder:
    def __init__(self, ctx, model, vocab, *, n_parallel: int, n_ctx: int, n_batch: int,
                 n_vocab: int, batch_min: Optional[int] = None, unified: bool = False):
        self.ctx = ctx                   # llama_context_p
        self.model = model
        self.vocab = vocab
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx               # per slot
        self.n_batch = n_batch
        self.n_vocab = n_vocab
        self.batch_min = None if batch_min is None else max(1, batch_min)
        self._cost: dict = {}            # next-token batch size -> recent seconds per decode
        self._last_n = 0                 # tokens in the previous decode's batch
        self._steps = 0
        self.mix = unified               # prompts and next tokens in one batch
        self.n_swa = int(llama_cpp.llama_model_n_swa(model))
        self.slots = [Slot(i) for i in range(n_parallel)]
        self._batch = llama_cpp.llama_batch_init(max(n_batch, n_parallel), 0, 1)
        self._lock = real_lock()         # guards _pending, _running, _closed
        self._pending: list = []
        self._running = False
        self._closed = False
        self._active: list = []          # admitted jobs, in admission order
        self._rr = 0                     # round-robin cursor for interleaved steps
        self._fill_turn = False
        self._tick = 0
        self._pieces: dict = {}
        self._buf = ctypes.create_string_buffer(256)

    # ---- request side --------------------------------------------------------------
    def submit(self, job: Job, executor) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            # the scheduler grants one lease per slot; should a job still find every slot
            # taken (a request killed twice lets go of its lease early) it waits here
            self._pending.append(job)
            start = not self._running
            self._running = True
        if start:
            executor.background(lambda: self._run(executor))

    # ---- the loop (native thread) ------------------------------------------------
    def _run(self, executor):
        try:
            while True:
                with executor.step_lock():
                    with self._lock:
                        if self._closed:
                            self._running = False
                            new = self._pending
                            self._pending = []
                            closing = True
                        elif not self._pending and not self._active:
                            self._running = False
                            return
                        else:
                            free = sum(1 for s in self.slots if s.job is None)
                            new, self._pending = self._pending[:free], self._pending[free:]
                            closing = False
                    if closing:
                        err = RuntimeError("the model was unloaded")
                        for j in new + self._active:
                            self._finish(j, Failed(err))
                        return
                    for j in new:
                        self._admit(j)
                    self._step()
        except BaseException as e:  # noqa: B902 - handed to every request
            # no logging here: its handler locks may be gevent's (see engine.py); the
            # requests report the error
            with self._lock:
                new, self._pending = self._pending, []
                self._running = False
            for j in new + list(self._active):
                self._finish(j, Failed(e))

    def _finish(self, job: Job, last=None):
        if job in self._active:
            self._active.remove(job)
        if job.slot is not None and job.slot.job is job:
            job.slot.job = None
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        if not job.finished:
            job.finished = True
            if last is not None:
                job.out.put(last)
            job.out.put(END)

    def _admit(self, job: Job):
        if job.cancelled:
            self._finish(job)
            return
        try:
            job.sampler = self._sampler(job.sp, job.grammar)
        except Exception as e:
            self._finish(job, Failed(e))
            return
        tokens = job.tokens
        free = [s for s in self.slots if s.job is None]
        # The slot with the longest cached prefix, if that prefix is most of the slot's
        # cache or of the prompt (a follow-up turn); a prompt that shares only a template
        # header goes to the least recently used slot (empty ones first), so that the
        # caches of other conversations survive.
        best, best_n = None, 0
        for s in free:
            n = _common_prefix(s.cached, tokens)
            if n > best_n and (2 * n >= len(s.cached) or 2 * n >= len(tokens)):
                best, best_n = s, n
        slot = best or min(free, key=lambda s: s.used)
        n = _common_prefix(slot.cached, tokens)
        if n >= len(tokens):
            n = len(tokens) - 1          # the last prompt token is decoded again for its logits
        if n < len(slot.cached):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.id, n, -1):
                n = 0
        if n > 0 and self.n_swa > 0:
            # a sliding-window cache dropped positions a new token would attend to
            pos_min = llama_cpp.llama_memory_seq_pos_min(self.mem, slot.id)
            if pos_min > max(0, n - self.n_swa):
                n = 0
        if n == 0:
            llama_cpp.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
        del slot.cached[n:]
        self._tick += 1
        slot.used = self._tick
        slot.job = job
        job.slot = slot
        job.n_cached = job.n_past = n
        job.todo = tokens[n:]
        if job.max_tokens <= 0:
            self._finish(job)
            return
        self._active.append(job)

    def _sampler(self, sp: dict, grammar):
        L = llama_cpp
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda s: L.llama_sampler_chain_add(chain, s)  # noqa: E731
        rln = sp.get("repeat_last_n")
        last_n = self.n_ctx if rln is not None and rln < 0 else int(64 if rln is None else rln)
        add(L.llama_sampler_init_penalties(self.n_vocab, last_n, float(sp["repeat_penalty"]),
                                           float(sp["frequency_penalty"]),
                                           float(sp["presence_penalty"])))
        if grammar is not None:
            g = L.llama_sampler_init_grammar(self.vocab, grammar._grammar.encode("utf-8"),
                                             grammar._root.encode("utf-8"))
            if not g:
                L.llama_sampler_free(chain)
                raise ValueError("invalid grammar for format")
            add(g)
        seed = sp.get("seed")
        if seed is None or seed < 0:
            seed = int.from_bytes(os.urandom(4), "little")
        seed = int(seed) & 0xFFFFFFFF
        temp = float(sp["temperature"])
        if temp < 0:
            add(L.llama_sampler_init_dist(seed))
        elif temp == 0:
            add(L.llama_sampler_init_greedy())
        elif sp["mirostat"] == 1:
            add(L.llama_sampler_init_mirostat(self.n_vocab, seed, float(sp["mirostat_tau"]),
                                              float(sp["mirostat_eta"]), 100))
        elif sp["mirostat"] == 2:
            add(L.llama_sampler_init_mirostat_v2(seed, float(sp["mirostat_tau"]),
                                                 float(sp["mirostat_eta"])))
        else:
            add(L.llama_sampler_init_top_k(int(sp["top_k"])))
            add(L.llama_sampler_init_typical(float(sp["typical_p"]), 1))
            add(L.llama_sampler_init_top_p(float(sp["top_p"]), 1))
            add(L.llama_sampler_init_min_p(float(sp["min_p"]), 1))
            add(L.llama_sampler_init_temp(temp))
            add(L.llama_sampler_init_dist(seed))
        return chain

    def _pick(self):
        """(sequences whose next token goes in this batch, prompts to feed)."""
        for j in [j for j in self._active if j.cancelled]:
            self._finish(j)
        active = self._active
        if not active:
            return [], []
        gen = [j for j in active if not j.todo]
        fill = [j for j in active if j.todo]
        # every other step feeds waiting prompts (one batch of many tokens is what CPUs
        # do well), the others decode the generating sequences' next tokens
        self._fill_turn = not self._fill_turn
        fill_now = bool(fill) and (self._fill_turn or not gen)
        if self.mix:
            if gen and self._batch_pays(len(gen)):
                return gen, fill
            if fill_now:
                return [], fill
        else:
            # per-slot KV streams: llama.cpp splits a batch into micro-batches with the
            # same token count per sequence, so a prompt chunk never shares a batch
            # (it would go through one token per micro-batch)
            if fill_now:
                return [], fill[:1]
            if gen and self._batch_pays(len(gen)):
                return gen, []
        # interleave: one sequence's next token, round-robin
        self._rr = (self._rr + 1) % len(gen)
        return [gen[self._rr]], []

    def _batch_pays(self, g: int) -> bool:
        """Decode the g generating sequences' next tokens in one batch (else one of them)?"""
        if g <= 1:
            return True
        if self.batch_min is not None:
            return g >= self.batch_min
        cost_g, cost_1 = self._cost.get(g), self._cost.get(1)
        if cost_g is None:
            return True                  # not measured yet: measure it
        if cost_1 is None:
            return False
        pays = min(cost_g) <= g * min(cost_1)
        self._steps += 1
        if self._steps % 64 < 2:
            return not pays              # keep the other time current (two steps: see _step)
        return pays

    def _step(self):
        gen, fill = self._pick()
        if not gen and not fill:
            return
        b = self._batch
        n = 0
        for j in gen:
            b.token[n] = j.last
            b.pos[n] = j.n_past
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = j.slot.id
            b.logits[n] = True
            j.idx = n
            n += 1
        fed = []
        budget = self.n_batch - n
        for j in fill:
            if budget <= 0:
                break
            take = min(budget, len(j.todo))
            for k in range(take):
                b.token[n] = j.todo[k]
                b.pos[n] = j.n_past + k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = j.slot.id
                b.logits[n] = False
                n += 1
            if take == len(j.todo):
                b.logits[n - 1] = True
                j.idx = n - 1
            fed.append((j, take))
            budget -= take
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc == 0 and not fed and n == self._last_n:
            # Only a step shaped like the one before: the first after a change of batch
            # size pays for llama.cpp rebuilding its graph. The fastest of the recent
            # times: on a shared CPU other work only ever adds time, and one slow sample
            # in a moving average chose batching at 4 sequences where taking turns was
            # 1.4x faster (bench.local --decoder 4).
            self._cost.setdefault(n, collections.deque(maxlen=8)).append(time.perf_counter() - t0)
        self._last_n = 0 if fed else n
        if rc != 0:
            err = RuntimeError(f"llama_decode failed ({rc})")
            for j in gen + [j for j, _ in fed]:
                j.idx = -1
                # what part of the batch reached the cache is unknown: forget the slot's
                llama_cpp.llama_memory_seq_rm(self.mem, j.slot.id, -1, -1)
                j.slot.cached.clear()
                self._finish(j, Failed(err))
            return
        for j in gen:
            j.slot.cached.append(j.last)
            j.n_past += 1
        for j, take in fed:
            j.slot.cached.extend(j.todo[:take])
            j.n_past += take
            j.todo = j.todo[take:]
        for j in gen + [j for j, _ in fed]:
            if j.idx < 0:
                continue
            idx, j.idx = j.idx, -1
            tok = int(llama_cpp.llama_sampler_sample(j.sampler, self.ctx, idx))
            eog = bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))
            j.n_out += 1
            j.out.put((tok, b"" if eog else self._piece(tok), eog))
            if eog or tok in j.stop_ids or j.n_out >= j.max_tokens:
                self._finish(j)
            else:
                j.last = tok

    def _piece(self, tok: int) -> bytes:
        p = self._pieces.get(tok)
        if p is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, tok, self._buf, len(self._buf), 0, False)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, tok, big, -n, 0, False)
                p = big.raw[:n]
            else:
                p = self._buf.raw[:n]
            self._pieces[tok] = p
        return p

    # ---- unload (the model's thread, after the loop) --------------------------------
    def close(self):
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, []
        err = RuntimeError("the model was unloaded")
        for j in pending + list(self._active):
            self._finish(j, Failed(err))
        b, self._batch = self._batch, None
        if b is not None:
            llama_cpp.llama_batch_free(b)
