"""Load and check the YAML config. Every problem becomes one ConfigError line naming the
file, the dotted key path and what is wrong; the process then exits non-zero."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import yaml

from gateway.canonical import FLOAT_OPTIONS, INT_OPTIONS
from gateway.errors import register_secret

DEFAULT_CONFIG = "config/gateway.yaml"
log = logging.getLogger("gateway.settings")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
KNOWN_TYPES = ("local", "openai", "gemini", "anthropic")
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


class ConfigError(Exception):
    def __init__(self, file: str, path: str, what: str):
        self.file, self.path, self.what = file, path, what
        super().__init__(f"config error in {file}: {path}: {what}")


@dataclass
class Settings:
    file: str
    host: str = "127.0.0.1"
    port: int = 11434
    api_keys: list = field(default_factory=list)
    cors_origins: list = field(default_factory=list)
    allowed_hosts: list = field(default_factory=list)
    max_body_mb: float = 10.0
    heartbeat: float = 10.0
    log_prompts: bool = False
    log_level: str = "INFO"
    usage_db: Optional[str] = None
    version: str = "0.12.6"
    providers: dict = field(default_factory=dict)   # name -> checked dict (has "type")
    aliases: dict = field(default_factory=dict)     # name -> [full model names]
    raw: dict = field(default_factory=dict)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def expand_env(value, env):
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    return value


def parse_size(value, file, path) -> Optional[int]:
    """Bytes from 123, "24GiB", "512MB"; None for auto."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise ConfigError(file, path, "must be bytes, a size such as 24GiB, or auto")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(file, path, "must be positive")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(file, path, f"cannot read size {value!r} (use bytes, 24GiB, 512MB or auto)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def key_list(value, file, path) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [k.strip() for k in value.split(",") if k.strip()]
    if isinstance(value, list) and all(isinstance(k, (str, int)) for k in value):
        out = []
        for k in value:
            out.extend(x.strip() for x in str(k).split(",") if x.strip())
        return out
    raise ConfigError(file, path, "must be a list of strings or a comma-separated string")


def _num(d, key, file, path, default, minimum=None, kind=float):
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = kind(v)
        except (TypeError, ValueError):
            raise ConfigError(file, f"{path}.{key}", f"must be a number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(file, f"{path}.{key}", f"must be at least {minimum}, got {v!r}")
    return kind(v)


_OPTION_KINDS = {**dict.fromkeys(FLOAT_OPTIONS, float), **dict.fromkeys(INT_OPTIONS, int), "stop": list}


def check_model_options(opts, file: str, path: str) -> None:
    """A local model's default `options:` (as Ollama's Modelfile PARAMETER lines)."""
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise ConfigError(file, path, "must be a mapping of option name to value")
    for k, v in opts.items():
        kind = _OPTION_KINDS.get(k)
        if kind is None:
            raise ConfigError(file, f"{path}.{k}", f"unknown option (known: {', '.join(sorted(_OPTION_KINDS))})")
        if kind is list:
            if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ConfigError(file, f"{path}.{k}", "must be a list of strings")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise ConfigError(file, f"{path}.{k}", f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")


def literal_secrets(raw: dict) -> list:
    """Dotted paths of api_keys settings written literally instead of as ${VAR}."""
    out = []
    server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
    providers = raw.get("providers") if isinstance(raw.get("providers"), dict) else {}
    places = [("server.api_keys", server.get("api_keys"))]
    places += [(f"providers.{n}.api_keys", p.get("api_keys")) for n, p in providers.items() if isinstance(p, dict)]
    for where, value in places:
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and v.strip() and "${" not in v for v in values):
            out.append(where)
    return out


def load_settings(file: Optional[str] = None, env=None) -> Settings:
    env = os.environ if env is None else env
    file = file or env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG
    try:
        with open(file, "r", encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(file, "(file)", f"cannot read: {e.strerror or e}")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise ConfigError(file, where, f"invalid YAML: {getattr(e, 'problem', None) or e}")
    return build_settings(raw, file, env)


def build_settings(raw, file: str = "<dict>", env=None) -> Settings:
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError(file, "(top level)", "must be a mapping with server/providers/aliases")
    for where in literal_secrets(raw):
        log.warning("config %s: %s holds keys written into the file; prefer ${VAR} from the "
                    "environment so the file can be shared and committed", file, where)
    raw = expand_env(raw, env)
    s = Settings(file=file, raw=raw)
    server = raw.get("server")
    server = {} if server is None else server
    if not isinstance(server, dict):
        raise ConfigError(file, "server", "must be a mapping")
    s.host = str(server.get("host", s.host))
    s.port = int(_num(server, "port", file, "server", s.port, 0, int))
    if s.port > 65535:
        raise ConfigError(file, "server.port", "must be at most 65535")
    s.api_keys = key_list(server.get("api_keys"), file, "server.api_keys")
    for k in s.api_keys:
        register_secret(k)
    s.cors_origins = key_list(server.get("cors_origins"), file, "server.cors_origins")
    s.allowed_hosts = key_list(server.get("allowed_hosts"), file, "server.allowed_hosts")
    s.max_body_mb = _num(server, "max_body_mb", file, "server", 10.0, 0.001)
    s.heartbeat = _num(server, "heartbeat", file, "server", 10.0, 0.0)
    s.log_prompts = bool(server.get("log_prompts", False))
    s.log_level = str(server.get("log_level", "INFO")).upper()
    s.usage_db = server.get("usage_db")
    s.version = str(server.get("version", s.version))

    providers = raw.get("providers")
    providers = {} if providers is None else providers
    if not isinstance(providers, dict):
        raise ConfigError(file, "providers", "must be a mapping of provider name to settings")
    for name, p in providers.items():
        path = f"providers.{name}"
        if not isinstance(name, str) or not _NAME.match(name) or ":" in name:
            raise ConfigError(file, path, "provider names are letters, digits, '-', '_' or '.'")
        if not isinstance(p, dict):
            raise ConfigError(file, path, "must be a mapping")
        ptype = p.get("type")
        if ptype not in KNOWN_TYPES:
            raise ConfigError(file, f"{path}.type", f"must be one of {', '.join(KNOWN_TYPES)}, got {ptype!r}")
        p = dict(p)
        for key in ("timeout", "idle_timeout", "cooldown", "auth_cooldown", "connect_timeout"):
            if key in p:
                p[key] = _num(p, key, file, path, None, 0.0)
        if p.get("headers") is not None and not isinstance(p["headers"], dict):
            raise ConfigError(file, f"{path}.headers", "must be a mapping of header name to value")
        if ptype != "local":
            if not p.get("base_url") or not str(p["base_url"]).startswith(("http://", "https://")):
                raise ConfigError(file, f"{path}.base_url", "must be an http(s) URL")
            p["api_keys"] = key_list(p.get("api_keys"), file, f"{path}.api_keys")
            for k in p["api_keys"]:
                register_secret(k)
            models = p.get("models") or []
            if not isinstance(models, list) or not all(isinstance(m, (str, int, float)) for m in models):
                raise ConfigError(file, f"{path}.models", "must be a list of model ids")
            p["models"] = [str(m) for m in models]
        else:
            models = p.get("models") or {}
            if not isinstance(models, dict):
                raise ConfigError(file, f"{path}.models", "must be a mapping of model name to {path|package: ...}")
            for mname, m in models.items():
                mpath = f"{path}.models.{mname}"
                if not isinstance(m, dict) or not (m.get("path") or m.get("package")):
                    raise ConfigError(file, mpath, "needs path: (a .gguf file) or package: (a PyPI package shipping one)")
                check_model_options(m.get("options"), file, f"{mpath}.options")
            if "memory_budget" in p:
                p["memory_budget_bytes"] = parse_size(p.get("memory_budget"), file, f"{path}.memory_budget")
            for key in ("max_loaded_models", "max_queue"):
                if key in p:
                    p[key] = int(_num(p, key, file, path, 0, 0, int))
            if "keep_alive" in p:
                from gateway.durations import parse_keep_alive
                try:
                    p["keep_alive_seconds"] = parse_keep_alive(p["keep_alive"])
                except ValueError as e:
                    raise ConfigError(file, f"{path}.keep_alive", str(e))
        p["type"] = ptype
        s.providers[name] = p

    aliases = raw.get("aliases")
    aliases = {} if aliases is None else aliases
    if not isinstance(aliases, dict):
        raise ConfigError(file, "aliases", "must be a mapping of alias to a list of model names")
    for name, targets in aliases.items():
        path = f"aliases.{name}"
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(file, path, "must be a non-empty list of <provider>:<model> names")
        for t in targets:
            prov = t.split(":", 1)[0]
            if ":" not in t or prov not in s.providers:
                raise ConfigError(file, path, f"target {t!r} does not name a configured provider")
        s.aliases[str(name)] = list(targets)
    return s
