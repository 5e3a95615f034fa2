"""Building one local generation's prompt, apart from running it (as Ollama splits the
scheduler's request from the runner's completion): the chat template or the plain
transcript, tokens, cutting a prompt that does not fit, stops, the answer's token budget
and the sampling settings. generate.py runs the result in a slot.

Runs on the request side; tokenising goes off the hub (run_blocking) and only reads the
model's vocabulary, so it never waits for the model's decode loop.
"""
from __future__ import annotations

import dataclasses
import logging

from gateway.canonical import ChatRequest
from gateway.errors import BadRequest
from providers.local import prompt as P
from providers.local.native import run_blocking
from providers.local.sources import LocalModel, stop_strings

log = logging.getLogger("gateway.local")

# Ollama's defaults (api/types.go DefaultOptions)
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, typical_p=1.0,
                repeat_penalty=1.0, repeat_last_n=64, frequency_penalty=0.0,
                presence_penalty=0.0, mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1)


@dataclasses.dataclass
class Plan:
    tokens: list                 # the whole prompt (a slot's cache may hold a prefix)
    stop_ids: set                # control tokens that end the answer
    stops: list                  # stop strings
    max_tokens: int
    sampling: dict               # Ollama option names -> values (see DEFAULTS)
    tools: bool                  # parse tool calls out of the answer
    thinking: bool
    start_thinking: bool         # the prompt opened a <think> block
    lstrip: bool                 # the transcript's "Assistant:" leaves a leading space

    def parser(self) -> P.OutputParser:
        return P.OutputParser(self.stops, tools=self.tools, thinking=self.thinking,
                              start_thinking=self.start_thinking, lstrip=self.lstrip)


def build(m: LocalModel, req: ChatRequest, caps: list, eng) -> Plan:
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
        tokens = run_blocking(_fim_tokens, eng, req.prompt or "", req.suffix)
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
            text, add_bos = render(m, info, template, msgs, *render_args)
            stops += [s for s in stop_strings(m, info, template) if s not in stops]
        else:
            plain = True
            text = P.transcript(msgs)
            stops += [s for s in stop_strings(m, info, "") if s not in stops]
    tokens, stop_ids = run_blocking(eng.prepare, text, tokens, add_bos, stops)
    if not tokens:
        raise BadRequest("the prompt is empty")
    tokens = fit(eng, m, req, tokens, template, info, render_args)
    room = eng.n_ctx - len(tokens)
    npred = req.options.num_predict
    max_tokens = room if npred is None or npred < 0 else min(npred, room)
    start_thinking = thinking and text is not None and text.rstrip().endswith(P.THINK_OPEN)
    return Plan(tokens=tokens, stop_ids=stop_ids, stops=stops, max_tokens=max_tokens,
                sampling=sampling(req), tools=tools_ok and bool(req.tools), thinking=thinking,
                start_thinking=start_thinking, lstrip=plain)


def prompt_length(m: LocalModel, req: ChatRequest, caps: list, eng) -> int:
    """The chat prompt's tokens before any cut (count_tokens): the template or transcript
    build() renders, tokenised with the model's own vocabulary."""
    if m.template:
        text, add_bos = render(m, m.info(), m.template, req.messages,
                               req.tools if "tools" in caps else None,
                               req.think if "thinking" in caps else None)
    else:
        text, add_bos = P.transcript(req.messages), None
    tokens, _ = run_blocking(eng.prepare, text, None, add_bos, [])
    return len(tokens)


def render(m, info, template, msgs, tools, think):
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


def fit(eng, m, req, tokens, template, info, render_args):
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
                text, ab = render(m, info, template, msgs, *render_args)
            else:
                text, ab = P.transcript(msgs), None
            tokens, _ = run_blocking(eng.prepare, text, None, ab, [])
    if len(tokens) > limit:
        keep_bos = tokens[:1] if tokens and tokens[0] == eng.bos_id else []
        tokens = keep_bos + tokens[len(tokens) - (limit - len(keep_bos)):]
    log.info("local:%s: prompt truncated to %d tokens to fit num_ctx %d", m.name,
             len(tokens), n_ctx)
    return tokens


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


def sampling(req: ChatRequest) -> dict:
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

