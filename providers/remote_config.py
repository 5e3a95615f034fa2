"""The YAML section of the remote types (`openai`, `gemini`): declared keys and their
check. Light on purpose: the config check (gunicorn master, --check-config) imports this,
not providers/remote.py and its HTTP stack."""
from __future__ import annotations

from gateway.errors import register_secret
from gateway.settings import ConfigError, check_keys, key_list, number
from providers.base import Provider

_SECONDS = ("timeout", "connect_timeout", "idle_timeout", "cooldown", "auth_cooldown")


class RemoteConfig(Provider):
    type_name = "remote"
    config_keys = Provider.config_keys | {
        "base_url", "api_keys", "models", "context_length", "headers", *_SECONDS}
    # keys of one `models:` item written as a mapping (beside a plain id)
    model_keys = frozenset({"id", "context_length"})

    @classmethod
    def check_config(cls, cfg: dict, file: str, path: str) -> dict:
        p = super().check_config(cfg, file, path)
        for key in _SECONDS:
            if key in p:
                p[key] = number(p, key, file, path, None, 0.0)
        if p.get("headers") is not None and not isinstance(p["headers"], dict):
            raise ConfigError(file, f"{path}.headers", "must be a mapping of header name to value")
        if not p.get("base_url") or not str(p["base_url"]).startswith(("http://", "https://")):
            raise ConfigError(file, f"{path}.base_url", "must be an http(s) URL")
        p["api_keys"] = key_list(p.get("api_keys"), file, f"{path}.api_keys")
        for k in p["api_keys"]:
            register_secret(k)
        if p.get("context_length") is not None:
            p["context_length"] = _context_length(p, file, path)
        models = p.get("models") or []
        if not isinstance(models, list):
            raise ConfigError(file, f"{path}.models", "must be a list of model ids or {id, context_length} mappings")
        ids, lengths = [], {}
        for i, m in enumerate(models):
            mpath = f"{path}.models[{i}]"
            if isinstance(m, dict):
                check_keys(m, cls.model_keys, file, mpath)
                if not isinstance(m.get("id"), (str, int, float)) or isinstance(m.get("id"), bool) \
                        or not str(m["id"]).strip():
                    raise ConfigError(file, f"{mpath}.id", "needs the model id")
                uid = str(m["id"])
                if m.get("context_length") is not None:
                    lengths[uid] = _context_length(m, file, mpath)
            elif isinstance(m, (str, int, float)) and not isinstance(m, bool):
                uid = str(m)
            else:
                raise ConfigError(file, mpath, "must be a model id or {id: ..., context_length: N}")
            ids.append(uid)
        # what the serving class reads: ids in order, and per-id context lengths
        p["models"] = ids
        p["context_lengths"] = lengths
        return p


def _context_length(d: dict, file: str, path: str) -> int:
    return int(number(d, "context_length", file, path, None, 1, int))
