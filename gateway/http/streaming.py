"""Driving a chunk iterator to a client: timing, collecting, and ending a stream with an
error line when something fails after the first byte. Both surfaces use this."""
from __future__ import annotations

import logging
import time
from typing import Optional

from gateway.canonical import Chunk, ToolCall
from gateway.errors import GatewayError, scrub
from gateway.reqctx import more_ready

log = logging.getLogger("gateway.stream")

_MAX_HELD = 64
_active = 0      # streams being written now; a leak (a stream never closed) shows here


def active_streams() -> int:
    return _active


class Tally:
    """What a request produced so far, and the gateway's own clock for the metrics."""
    __slots__ = ("t0", "t_first", "t_end", "content", "thinking", "tool_calls", "final",
                 "error", "chunks", "signature")

    def __init__(self, t0: float):
        self.t0 = t0
        self.t_first: Optional[float] = None
        self.t_end: Optional[float] = None
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self.final: Optional[Chunk] = None
        self.error: Optional[GatewayError] = None
        self.chunks = 0
        self.signature = ""

    def add(self, ch: Chunk) -> None:
        if self.t_first is None and (ch.content or ch.thinking or ch.tool_calls or ch.done):
            self.t_first = time.perf_counter()
        self.chunks += 1
        if ch.content:
            self.content.append(ch.content)
        if ch.thinking:
            self.thinking.append(ch.thinking)
        if ch.tool_calls:
            self.tool_calls.extend(ch.tool_calls)
        if ch.thinking_signature:
            self.signature = ch.thinking_signature
        if ch.done:
            self.final = ch
            self.t_end = time.perf_counter()

    def ended(self, final: Chunk) -> None:
        """An answer that is not a stream of chunks (embeddings) is over."""
        self.final = final
        self.t_end = time.perf_counter()

    def summary(self) -> dict:
        """The fields a finished request reports to logs, metrics and the usage log."""
        f = self.final
        end = self.t_end or time.perf_counter()
        return {"status": self.error.status if self.error else 200,
                "error": self.error.message if self.error else None,
                "error_class": type(self.error).__name__ if self.error else None,
                "latency": end - self.t0, "ttft": self.ttft,
                "prompt_tokens": f.prompt_tokens if f else None,
                "completion_tokens": f.completion_tokens if f else None}

    @property
    def ttft(self):
        return None if self.t_first is None else self.t_first - self.t0

    def metrics(self) -> dict:
        """Ollama's final-chunk metrics in ns: provider-measured where it knows them
        (local), the gateway's clock otherwise."""
        end = self.t_end or time.perf_counter()
        f = self.final or Chunk(done=True)
        first = self.t_first or end
        load = f.load_duration or 0
        return {
            "total_duration": int((end - self.t0) * 1e9),
            "load_duration": int(load),
            "prompt_eval_count": int(f.prompt_tokens or 0),
            "prompt_eval_duration": int(f.prompt_eval_duration if f.prompt_eval_duration is not None
                                        else max(0.0, first - self.t0) * 1e9 - load),
            "eval_count": int(f.completion_tokens or 0),
            "eval_duration": int(f.eval_duration if f.eval_duration is not None
                                 else (end - first) * 1e9),
        }


def stream_body(chunks, tally: Tally, renderer):
    """Yield what the renderer makes of each chunk, as UTF-8 bytes (so a Response can
    pass it straight to the server: `direct_passthrough=True`); end with the renderer's
    error line on a failure. Always closes `chunks` (a client disconnect closes the
    upstream). A None item from `chunks` is a heartbeat while the answer has not started.
    Chunks that arrived together upstream go out in one piece (see
    `gateway.reqctx.more_ready`): the one seam kept for speed here (coalesced writes)."""
    global _active
    render = renderer.chunk
    beat = renderer.beat if renderer.heartbeat is not None else None
    hint = [False]
    more_ready.set(hint)
    held = []
    _active += 1
    try:
        for ch in chunks:
            if ch is None:
                if beat is not None:
                    yield beat().encode()
                continue
            tally.add(ch)
            out = render(ch)
            if out:
                held.append(out)
            if held and (ch.done or not hint[0] or len(held) >= _MAX_HELD):
                out = held[0] if len(held) == 1 else "".join(held)
                held.clear()
                yield out.encode()
            if ch.done:
                break
        else:
            # The provider ended without a final chunk: treat as a normal stop.
            ch = Chunk(done=True, done_reason="stop")
            tally.add(ch)
            out = render(ch)
            if out:
                held.append(out)
            if held:
                yield "".join(held).encode()
                held.clear()
    except GatewayError as e:
        tally.error = e
        log.warning("stream failed after %d chunk(s): %s", tally.chunks, e.message)
        held.append(renderer.error(e))
        yield "".join(held).encode()
    except Exception as e:  # never a traceback to the client; the log has it
        tally.error = GatewayError(f"internal error: {type(e).__name__}")
        log.error("stream crashed: %s", scrub(repr(e)))
        held.append(renderer.error(tally.error))
        yield "".join(held).encode()
    finally:
        _active -= 1
        more_ready.set(None)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def collect(chunks, tally: Tally) -> Tally:
    """Run a whole answer into the tally (non-streaming requests)."""
    try:
        for ch in chunks:
            tally.add(ch)
            if ch.done:
                break
        if tally.final is None:
            tally.add(Chunk(done=True, done_reason="stop"))
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return tally
