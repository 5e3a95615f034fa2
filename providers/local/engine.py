"""Loading models with llama-cpp-python (with decoder.py, the only modules that touch
it). Everything here runs inside a model's native executor (native.py), never on the
gevent hub, and never two calls at once for one Engine; tokenising only reads the
vocabulary and may run on any thread.

Imported lazily by the provider, so a gateway without local models never loads the
native libraries, and gunicorn's master never does (the first request in a worker does).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
from typing import Any, Optional

# A crash inside ggml would otherwise try to attach gdb/print a backtrace from inside the
# server process; it must be set before the library is loaded.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402
import llama_cpp._internals as _internals  # noqa: E402
import llama_cpp.llama as _llama_mod  # noqa: E402
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf  # noqa: E402

log = logging.getLogger("gateway.local.engine")


# ---- llama.cpp's log -------------------------------------------------------------------
# The callback runs on native threads. It only appends to a deque (atomic under the GIL):
# logging's handler locks may be gevent-patched and must not be taken from a native thread.
# The provider drains it on the request side (drain_log) and the load error message is
# built from the error lines a failed load left here.
_LOG: collections.deque = collections.deque(maxlen=400)
_LOG_SEQ = itertools.count()
_pending = {"level": 1, "text": ""}


@llama_cpp.llama_log_callback
def _log_callback(level, text, user_data):  # pragma: no cover - called from C
    try:
        s = text.decode("utf-8", errors="replace") if text else ""
    except Exception:
        return
    if level == 5:              # continuation of the previous line
        level = _pending["level"]
    buf = _pending["text"] + s
    while "\n" in buf:
        line, buf = buf.split("\n", 1)
        if line.strip():
            _LOG.append((next(_LOG_SEQ), level, line))
    _pending["level"], _pending["text"] = level, buf


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class _NoRedirect:
    """llama-cpp-python silences loads (verbose=False) by dup2-ing /dev/null over fds 1
    and 2 and swapping sys.stdout/stderr: process-wide, so it swallows every other
    thread's log lines for the duration of a load and races with them. The log callback
    above already owns llama.cpp's output, so the redirection is turned off."""

    def __init__(self, disable: bool = True):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_internals.suppress_stdout_stderr = _NoRedirect
_llama_mod.suppress_stdout_stderr = _NoRedirect

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_drained = [-1]


def drain_log(logger: logging.Logger = log) -> None:
    """Forward llama.cpp warnings and errors to Python logging (request side)."""
    last = _drained[0]
    for seq, level, line in list(_LOG):
        if seq <= last:
            continue
        last = seq
        if level in _LEVELS:
            logger.log(_LEVELS[level], "llama.cpp: %s", line)
    _drained[0] = last


def _errors_since(mark: int) -> list:
    return [line for seq, level, line in list(_LOG) if seq > mark and level == 4]


def _log_mark() -> int:
    return _LOG[-1][0] if _LOG else -1


def gpu_offload_supported() -> bool:
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # pragma: no cover
        return False


class InputTooLong(ValueError):
    pass


def grammar_for(fmt) -> Optional[LlamaGrammar]:
    """format "json" -> llama.cpp's JSON grammar; a schema dict -> a grammar for it."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if isinstance(fmt, dict):
        import json
        return LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(fmt)), verbose=False)
    raise ValueError(f"invalid format {fmt!r}: use \"json\" or a JSON schema object")


# ---- one loaded model ------------------------------------------------------------------
class Engine:
    """A loaded model. Chat models: one context holding `n_parallel` sequences, served by
    a Decoder (decoder.py). Embedding models: llama-cpp-python's Llama, one input at a
    time."""

    def __init__(self, path: str, *, n_ctx: int, n_gpu_layers: int, n_threads: int,
                 embedding: bool = False, pooling_in_file: bool = False,
                 n_batch: int = 512, n_parallel: int = 1, batch_min: Optional[int] = None,
                 kv_unified: bool = True):
        mark = _log_mark()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        # llama_cpp's objects, set by the loader below (typed Any: the library is untyped)
        self.llama: Any = None
        self._ctx: Any = None
        self._model: Any = None
        self.decoder: Any = None
        try:
            if embedding:
                self._load_embedding(path, n_ctx, n_gpu_layers, n_threads, pooling_in_file)
            else:
                self._load_chat(path, n_ctx, n_gpu_layers, n_threads, n_batch,
                                max(1, int(n_parallel)), batch_min, kv_unified)
        except Exception as e:
            self.close()
            errs = _errors_since(mark)
            lines = [t for t in (_tidy(x) for x in errs) if t != "failed to load model"]
            reason = "; ".join(lines[-2:]) or str(e)
            raise RuntimeError(reason) from None
        m: Any = self._model   # set by the loader above
        self.vocab = m.vocab
        self.n_embd = m.n_embd()
        self.add_bos = bool(m.add_bos_token())
        self.bos_id = m.token_bos()
        self.embedding = embedding
        pre, suf, mid = m.token_prefix(), m.token_suffix(), m.token_middle()
        self.fim = (pre, suf, mid) if min(pre, suf, mid) >= 0 else None

    def _load_embedding(self, path, n_ctx, n_gpu_layers, n_threads, pooling_in_file):
        kwargs = dict(model_path=path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                      n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
                      embedding=True)
        # a non-causal model must see a whole input in one micro-batch
        kwargs.update(n_batch=n_ctx, n_ubatch=n_ctx)
        if not pooling_in_file:
            # otherwise llama.cpp answers one vector per token
            kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.llama = llama_cpp.Llama(**kwargs)
        self._model = self.llama._model
        self.n_ctx = self.llama.n_ctx()
        self.n_parallel = 1
        self.pooling = self.llama.pooling_type()

    def _load_chat(self, path, n_ctx, n_gpu_layers, n_threads, n_batch, n_parallel, batch_min,
                   kv_unified):
        from providers.local.decoder import Decoder, batch_min_default
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self._model = _internals.LlamaModel(path_model=path, params=mp, verbose=False)
        cp = llama_cpp.llama_context_default_params()
        n_batch = min(n_batch, n_ctx)
        # n_ctx cells per slot: llama.cpp splits the context evenly between sequences
        cp.n_ctx = n_ctx * n_parallel
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_parallel
        cp.kv_unified = kv_unified
        # Sliding-window layers keep only their window (swa_full off): full-size ones
        # would make every token of every slot attend over the whole unified cache
        # (single-chat decode measured 0.94x raw with them, 1.05x without). A follow-up
        # turn still reuses its history when it diverges only after the cached tokens,
        # as chat turns do; the decoder re-reads a prompt otherwise.
        cp.swa_full = False
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx)) if n_parallel > 1 else \
            int(llama_cpp.llama_n_ctx(self._ctx.ctx))
        self.n_ctx = min(self.n_ctx, n_ctx)
        self.n_parallel = n_parallel
        self.pooling = None
        if batch_min is None:
            batch_min = batch_min_default(n_gpu_layers != 0 and gpu_offload_supported())
        self.decoder = Decoder(self._ctx.ctx, self._model.model, self._model.vocab,
                               n_parallel=n_parallel, n_ctx=self.n_ctx, n_batch=n_batch,
                               n_vocab=self._model.n_vocab(), batch_min=batch_min,
                               unified=kv_unified)

    def close(self):
        dec, self.decoder = getattr(self, "decoder", None), None
        if dec is not None:
            dec.close()
        # an embedding model's Llama owns its context and model; a chat model's context
        # goes before its model
        llama, ctx, model = (getattr(self, k, None) for k in ("llama", "_ctx", "_model"))
        self.llama = self._ctx = self._model = None
        for obj in ((llama,) if llama is not None else (ctx, model)):
            if obj is not None:
                obj.close()

    # ---- tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: Optional[bool] = None, special: bool = True) -> list:
        if not text:
            return [self.bos_id] if (add_bos if add_bos is not None else self.add_bos) and self.bos_id >= 0 else []
        # llama_tokenize only reads the vocabulary: safe beside a decode on another thread
        return self._model.tokenize(text.encode("utf-8"),
                                    add_bos=self.add_bos if add_bos is None else add_bos,
                                    special=special)

    def is_eog(self, tok: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))

    def special_token(self, text: str) -> Optional[int]:
        """The id of a control token spelled `text` (e.g. "<|im_end|>"), else None."""
        try:
            toks = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        except Exception:
            return None
        if len(toks) == 1 and llama_cpp.llama_vocab_is_control(self.vocab, toks[0]):
            return toks[0]
        return None

    def prepare(self, prompt: Optional[str], tokens: Optional[list], add_bos: Optional[bool],
                stops: list):
        """Tokenise the prompt (unless given tokens) and find token-level stops."""
        if tokens is None:
            tokens = self.tokenize(prompt or "", add_bos=add_bos)
        stop_ids = set()
        for s in stops:
            t = self.special_token(s)
            if t is not None:
                stop_ids.add(t)
        return tokens, stop_ids

    # ---- embeddings ---------------------------------------------------------------
    def embed(self, texts: list, truncate: bool):
        """([vector], prompt tokens): L2-normalised, one per input."""
        llama = self.llama
        if not self.embedding:
            raise RuntimeError("not loaded for embeddings")
        out, total = [], 0
        for text in texts:
            toks = llama.tokenize(text.encode("utf-8"), add_bos=True, special=False) if text else []
            if len(toks) > self.n_ctx:
                if not truncate:
                    raise InputTooLong("input length exceeds the context length")
                toks = toks[:self.n_ctx]
            total += len(toks)
            if not toks:
                out.append([0.0] * self.n_embd)
                continue
            ctx, batch = llama._ctx, llama._batch
            ctx.kv_cache_clear()
            batch.reset()
            batch.add_sequence(toks, 0, True)
            ctx.decode(batch)
            if self.pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                ptr = llama_cpp.llama_get_embeddings(ctx.ctx)
                arr = np.ctypeslib.as_array(ptr, shape=(len(toks) * self.n_embd,))
                vec = arr.reshape(len(toks), self.n_embd).mean(axis=0)
            else:
                ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)
                vec = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()
            vec = vec.astype(np.float64)
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec = vec / norm
            out.append(vec.tolist())
            batch.reset()
        llama._ctx.kv_cache_clear()
        llama.reset()
        return out, total


def _tidy(line: str) -> str:
    line = line.strip()
    for prefix in ("llama_model_load: error loading model: ", "gguf_init_from_file_impl: ",
                   "llama_model_load_from_file_impl: "):
        if line.startswith(prefix):
            return line[len(prefix):]
    return line
