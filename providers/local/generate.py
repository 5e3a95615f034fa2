"""Running a Plan (plan.py) in a slot of a loaded model: the request's Job goes to the
model's decode loop (decoder.py), its tokens come back through a Channel (native.py) and
become content, thinking and tool-call chunks. Runs on the request side."""
from __future__ import annotations

import codecs
import logging
import time
from typing import Iterator

from gateway.canonical import Chunk
from gateway.errors import GatewayError

log = logging.getLogger("gateway.local")


def generate(lease, plan, grammar, *, with_context: bool) -> Iterator[Chunk]:
    from providers.local import engine as E
    from providers.local.decoder import END, Failed, Job
    from providers.local.native import Channel
    eng = lease.handle
    t_start = time.perf_counter()
    parser = plan.parser()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = Channel()
    job = Job(plan.tokens, plan.max_tokens, plan.stop_ids, plan.sampling, grammar, out)
    try:
        eng.decoder.submit(job, lease.executor)
    except Exception as e:
        out.close()
        raise GatewayError(f"local generation failed: {e}", status=500) from None
    ended = False
    try:
        n_out, out_tokens, t_first, reason = 0, [], None, "length"
        while True:
            item = out.get()
            if t_first is None:
                t_first = time.perf_counter()
            if item is END:
                ended = True
                break
            if isinstance(item, Failed):
                raise GatewayError(f"local generation failed: {item.exc}", status=500)
            tok, piece, eog = item
            if eog or tok in plan.stop_ids:
                reason = "stop"
                break
            n_out += 1
            out_tokens.append(tok)
            for kind, text in parser.feed(decoder.decode(piece)):
                yield _chunk(kind, text)
            if parser.stopped:
                reason = "stop"
                break
        t_end = time.perf_counter()
        if t_first is None:
            t_first = t_end
        rest = [] if parser.stopped else parser.feed(decoder.decode(b"", final=True))
        for kind, text in rest:
            yield _chunk(kind, text)
        tail, calls = parser.finish()
        for kind, text in tail:
            yield _chunk(kind, text)
        if calls:
            yield Chunk(tool_calls=calls)
        E.drain_log(log)
        # prompt_eval_count: what was evaluated, not what the slot's cache already held
        yield Chunk(done=True, done_reason=reason, prompt_tokens=len(plan.tokens) - job.n_cached,
                    completion_tokens=n_out, load_duration=lease.load_ns,
                    prompt_eval_duration=int((t_first - t_start) * 1e9),
                    eval_duration=int((t_end - t_first) * 1e9),
                    context=(plan.tokens + out_tokens) if with_context else None)
    finally:
        # a disconnect lands here (GeneratorExit at a yield): the loop drops the
        # sequence at its next step; the slot goes back to the scheduler after that
        _settle(job, ended, END)


def _settle(job, ended: bool, END) -> None:
    """Wait until the loop has let go of the job (it drops a cancelled one at its next
    step and then puts END), then close its channel: the slot is only given back, and
    the channel's watcher only closed, once the loop no longer touches them."""
    if not ended:
        job.cancelled = True
        while True:
            try:
                if job.out.get() is END:
                    break
            except BaseException:   # killed again while waiting
                while END not in job.out.items:   # the loop ends it within a step
                    time.sleep(0.005)
                break
    job.out.close()


def _chunk(kind, text) -> Chunk:
    return Chunk(thinking=text) if kind == "thinking" else Chunk(content=text)
