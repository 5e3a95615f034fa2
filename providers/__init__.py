"""Provider types by the `type:` they answer to in YAML. Imported lazily so that a
gateway with only remote providers never imports llama.cpp."""
from __future__ import annotations

import importlib

_TYPES = {
    "openai": ("providers.openai_compat", "OpenAIProvider"),
    "gemini": ("providers.gemini", "GeminiProvider"),
    "anthropic": ("providers.anthropic", "AnthropicProvider"),
    "local": ("providers.local.provider", "LocalProvider"),
}


def provider_class(type_name: str):
    module, cls = _TYPES[type_name]
    return getattr(importlib.import_module(module), cls)
