"""The YAML section of `type: anthropic`: the remote keys plus Anthropic's own. Light, like
providers/remote_config.py (the config check imports it, not the HTTP stack)."""
from __future__ import annotations

from gateway.settings import ConfigError, number
from providers.remote_config import RemoteConfig


class AnthropicConfig(RemoteConfig):
    type_name = "anthropic"
    # max_tokens: sent when the client names none (Anthropic requires one);
    # anthropic_version: the anthropic-version header; prompt_cache: cache breakpoints on
    config_keys = RemoteConfig.config_keys | {"max_tokens", "anthropic_version", "prompt_cache"}

    @classmethod
    def check_config(cls, cfg: dict, file: str, path: str) -> dict:
        p = super().check_config(cfg, file, path)
        if p.get("max_tokens") is not None:
            p["max_tokens"] = int(number(p, "max_tokens", file, path, None, 1, int))
        if p.get("prompt_cache") is not None and not isinstance(p["prompt_cache"], bool):
            raise ConfigError(file, f"{path}.prompt_cache", "must be true or false")
        v = p.get("anthropic_version")
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(file, f"{path}.anthropic_version", 'must be a version string such as "2023-06-01"')
        return p
