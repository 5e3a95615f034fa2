"""Provider types by the `type:` they answer to in YAML. Imported lazily so that a
gateway with only remote providers never imports llama.cpp.

Each type names two classes: the one that serves, and the light class (a base of it) that
declares and checks the type's YAML keys. The config check (also run in the gunicorn master)
imports only the latter, so it never pulls in HTTP clients or llama.cpp."""
from __future__ import annotations

import importlib

# type: (serving class, config class it derives from), as "module:Class"
TYPES = {
    "openai": ("providers.openai_compat:OpenAIProvider", "providers.remote_config:RemoteConfig"),
    "gemini": ("providers.gemini:GeminiProvider", "providers.remote_config:RemoteConfig"),
    "anthropic": ("providers.anthropic:AnthropicProvider", "providers.anthropic_config:AnthropicConfig"),
    "local": ("providers.local.provider:LocalProvider", "providers.local.config:LocalConfig"),
}


def _load(spec: str):
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def provider_class(type_name: str):
    return _load(TYPES[type_name][0])


def config_class(type_name: str):
    """The class whose `check_config` owns this type's YAML section (cheap to import)."""
    return _load(TYPES[type_name][1])
