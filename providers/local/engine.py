"""The only module that touches llama-cpp-python. Everything here runs inside a model's
native executor (native.py), never on the gevent hub, and never two calls at once for
one Engine.

Imported lazily by the provider, so a gateway without local models never loads the
native libraries, and gunicorn's master never does (the first request in a worker does).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import logging
import os
from typing import Optional

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
    def __init__(self, path: str, *, n_ctx: int, n_gpu_layers: int, n_threads: int,
                 embedding: bool = False, pooling_in_file: bool = False,
                 n_batch: int = 512):
        kwargs = dict(model_path=path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                      n_threads=n_threads, n_threads_batch=n_threads, verbose=False,
                      embedding=embedding)
        if embedding:
            # a non-causal model must see a whole input in one micro-batch
            kwargs.update(n_batch=n_ctx, n_ubatch=n_ctx)
            if not pooling_in_file:
                # otherwise llama.cpp answers one vector per token
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        else:
            kwargs.update(n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx))
        mark = _log_mark()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        try:
            self.llama = llama_cpp.Llama(**kwargs)
        except Exception as e:
            errs = _errors_since(mark)
            lines = [t for t in (_tidy(x) for x in errs) if t != "failed to load model"]
            reason = "; ".join(lines[-2:]) or str(e)
            raise RuntimeError(reason) from None
        m = self.llama._model
        self.vocab = m.vocab
        self.n_ctx = self.llama.n_ctx()
        self.n_embd = self.llama.n_embd()
        self.add_bos = bool(m.add_bos_token())
        self.bos_id = m.token_bos()
        self.embedding = embedding
        self.pooling = self.llama.pooling_type() if embedding else None
        pre, suf, mid = m.token_prefix(), m.token_suffix(), m.token_middle()
        self.fim = (pre, suf, mid) if min(pre, suf, mid) >= 0 else None
        self._pieces: dict = {}
        self._buf = ctypes.create_string_buffer(256)

    def close(self):
        llama, self.llama = getattr(self, "llama", None), None
        if llama is not None:
            llama.close()

    # ---- tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: Optional[bool] = None, special: bool = True) -> list:
        if not text:
            return [self.bos_id] if (add_bos if add_bos is not None else self.add_bos) and self.bos_id >= 0 else []
        return self.llama.tokenize(text.encode("utf-8"),
                                   add_bos=self.add_bos if add_bos is None else add_bos,
                                   special=special)

    def piece(self, tok: int) -> bytes:
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

    def is_eog(self, tok: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))

    def special_token(self, text: str) -> Optional[int]:
        """The id of a control token spelled `text` (e.g. "<|im_end|>"), else None."""
        try:
            toks = self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
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

    # ---- generation ---------------------------------------------------------------
    def start(self, tokens: list, sp: dict, grammar: Optional[LlamaGrammar]):
        """A generator of token ids; each next() is one native step (the first one also
        evaluates the prompt). Sampling follows Ollama's option names in `sp`."""
        llama = self.llama
        seed = sp.get("seed")
        if seed is None or seed < 0:
            seed = int.from_bytes(os.urandom(4), "little")
        llama.set_seed(int(seed) & 0xFFFFFFFF)
        rln = sp.get("repeat_last_n")
        llama.last_n_tokens_size = self.n_ctx if rln is not None and rln < 0 else int(64 if rln is None else rln)
        return llama.generate(
            tokens,
            temp=sp["temperature"], top_k=sp["top_k"], top_p=sp["top_p"], min_p=sp["min_p"],
            typical_p=sp["typical_p"], repeat_penalty=sp["repeat_penalty"],
            frequency_penalty=sp["frequency_penalty"], presence_penalty=sp["presence_penalty"],
            mirostat_mode=sp["mirostat"], mirostat_tau=sp["mirostat_tau"],
            mirostat_eta=sp["mirostat_eta"], grammar=grammar)

    def step(self, gen):
        """One token: (id, bytes, end-of-generation?) or None when the generator ended."""
        tok = next(gen, None)
        if tok is None:
            return None
        tok = int(tok)
        eog = self.is_eog(tok)
        return tok, (b"" if eog else self.piece(tok)), eog

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
