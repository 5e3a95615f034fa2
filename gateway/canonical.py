"""The one request/chunk model every API surface and every provider speaks.

API surfaces (Ollama, OpenAI) translate their wire format into these objects once on the
way in and out of them once on the way out; providers translate them to and from their
upstream once. Nothing here knows about HTTP or about any provider.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class ToolCall:
    name: str
    arguments: dict                      # always an object here; /v1 serialises it
    id: Optional[str] = None
    index: int = 0
    # Opaque provider data that must survive a round trip through the client
    # (Gemini thought signatures). Surfaces never read it.
    extra: dict = field(default_factory=dict)


@dataclass
class Message:
    role: str                            # system | user | assistant | tool
    content: str = ""
    images: list[str] = field(default_factory=list)   # raw base64 strings, no data: prefix
    thinking: Optional[str] = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_name: Optional[str] = None
    tool_call_id: Optional[str] = None
    # Opaque signature of `thinking` (Anthropic): goes back upstream with it; surfaces
    # that have no place for it drop it.
    thinking_signature: Optional[str] = None


@dataclass
class Options:
    """Sampling and load options, Ollama names. None means "provider default"."""
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    repeat_last_n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    num_predict: Optional[int] = None     # None or negative: unbounded
    stop: list[str] = field(default_factory=list)
    num_ctx: Optional[int] = None
    num_batch: Optional[int] = None
    num_gpu: Optional[int] = None
    num_thread: Optional[int] = None
    mirostat: Optional[int] = None
    mirostat_tau: Optional[float] = None
    mirostat_eta: Optional[float] = None


# Options by value type: what the HTTP surfaces and a local model's config `options:` accept.
FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                 "frequency_penalty", "mirostat_tau", "mirostat_eta")
INT_OPTIONS = ("top_k", "repeat_last_n", "seed", "num_predict", "num_ctx", "num_batch", "num_gpu",
               "num_thread", "mirostat")

Format = Union[None, str, dict]          # None | "json" | JSON schema


@dataclass
class ChatRequest:
    model: str                           # the name the client asked for (echoed back)
    messages: list[Message] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    format: Format = None
    tools: list[dict] = field(default_factory=list)   # [{"type":"function","function":{name,description,parameters}}]
    tool_choice: Any = None              # OpenAI form, passed to providers that support it
    think: Union[None, bool, str] = None
    thinking_budget: Optional[int] = None  # tokens, when the client named one (Anthropic)
    keep_alive: Optional[float] = None   # seconds; None = provider default; < 0 forever
    stream: bool = True
    # /api/generate and /v1/completions: raw prompt completion. Providers without a raw
    # completion mode use `messages` (always filled by the surface as well).
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    system: Optional[str] = None
    raw: bool = False
    template: Optional[str] = None
    kind: str = "chat"                   # chat | generate
    want_usage: bool = True
    # OpenAI-surface fields as the client sent them (reasoning_effort or reasoning,
    # response_format with a json_schema), for OpenAI-type upstreams to receive unchanged;
    # think and format above are their meaning for every other provider.
    openai_fields: dict = field(default_factory=dict)


@dataclass
class Chunk:
    """One piece of an answer. The last chunk has done=True and carries usage/metrics."""
    content: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)  # each whole
    done: bool = False
    done_reason: Optional[str] = None    # stop | length | tool_calls | load | unload
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    # Durations in ns measured by a provider that knows them (local). Surfaces fill the
    # rest from their own clocks.
    load_duration: Optional[int] = None
    prompt_eval_duration: Optional[int] = None
    eval_duration: Optional[int] = None
    context: Optional[list] = None       # /api/generate token context (local only)
    thinking_signature: str = ""         # closes the thinking so far (Anthropic), opaque
    stop_sequence: Optional[str] = None  # which stop string ended the answer, when known


@dataclass
class EmbedRequest:
    model: str
    inputs: list[str]
    truncate: bool = True
    dimensions: Optional[int] = None
    keep_alive: Optional[float] = None
    options: Options = field(default_factory=Options)


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: Optional[int] = None
    load_duration: Optional[int] = None


@dataclass
class ModelCard:
    """What the lists and /api/show say about one model. `name` is the full public name."""
    name: str
    provider: str
    upstream_id: str
    size: int = 0
    digest: str = ""
    modified_at: float = 0.0             # epoch seconds
    format: str = "api"
    family: str = ""
    families: list[str] = field(default_factory=list)
    parameter_size: str = ""
    quantization_level: str = ""
    context_length: Optional[int] = None
    embedding_length: Optional[int] = None
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    template: str = ""
    parameters: str = ""
    model_info: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """An entry of /api/ps."""
    card: ModelCard
    size: int
    size_vram: int
    expires_at: float                    # epoch seconds
    context_length: int
