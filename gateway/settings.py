"""Load and check the YAML config. Every problem becomes one ConfigError line naming the
file, the dotted key path and what is wrong; the process then exits non-zero."""
from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import yaml

from gateway.errors import register_secret
from providers import TYPES, config_class

DEFAULT_CONFIG = "config/gateway.yaml"
log = logging.getLogger("gateway.settings")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
KNOWN_TYPES = tuple(TYPES)
TOP_KEYS = frozenset({"server", "providers", "aliases"})
# Every server key, declared here once (unknown keys are a config error).
SERVER_KEYS = frozenset({
    "host", "port", "api_keys", "cors_origins", "allowed_hosts", "max_body_mb", "heartbeat",
    "log_prompts", "log_level", "usage_db", "version", "access_log",
    "client_header_timeout", "client_body_timeout", "keepalive_timeout", "redis", "clients"})
CLIENT_KEYS = frozenset({"name", "key", "models", "rpm", "tpm", "max_parallel", "tokens_per_day"})
# (URL scheme, form shown in errors) that server.usage_db accepts beside a plain SQLite file
# path; any other "<scheme>://" is refused, never taken for a file path.
USAGE_DB_SCHEMES = (("sqlite", "sqlite:///path"), ("postgresql", "postgresql://user:pass@host/db"),
                    ("postgres", "postgres://user:pass@host/db"))
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
REDIS_SCHEMES = ("redis", "rediss", "unix")
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
    client_header_timeout: float = 60.0   # seconds to receive a request head
    client_body_timeout: float = 60.0     # seconds to receive a request body
    keepalive_timeout: float = 75.0       # idle keep-alive connections closed after
    redis: Optional[str] = None
    clients: list = field(default_factory=list)
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


def number(d, key, file, path, default, minimum=None, kind=float):
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


def check_keys(d: dict, known, file: str, path: str) -> None:
    """Refuse a key the section does not declare, naming the nearest declared one."""
    for k in d:
        if k in known:
            continue
        where = f"{path}.{k}" if path else str(k)
        near = difflib.get_close_matches(str(k), sorted(known), n=1)
        hint = f"; did you mean `{near[0]}`?" if near else f" (known keys: {', '.join(sorted(known))})"
        raise ConfigError(file, where, "unknown key" + hint)


def usage_db_value(value, file: str):
    """server.usage_db: a SQLite file path or sqlite:///path; other URL schemes refused."""
    if value in (None, "", False) or str(value).lower() in ("false", "off", "none"):
        return None
    if not isinstance(value, str):
        raise ConfigError(file, "server.usage_db", "must be a SQLite file path, sqlite:///path or \"\" (off)")
    m = _SCHEME.match(value)
    if m and m.group(1).lower() not in dict(USAGE_DB_SCHEMES):
        forms = ", ".join(["a SQLite file path"] + [form for _, form in USAGE_DB_SCHEMES])
        raise ConfigError(file, "server.usage_db",
                          f"{m.group(1)}:// is not supported by this build (supported: {forms})")
    if m and m.group(1).lower() == "sqlite" and (not value.lower().startswith("sqlite:///")
                                                 or not value[len("sqlite:///"):].strip("/")):
        raise ConfigError(file, "server.usage_db",
                          "sqlite URLs are sqlite:///relative/path or sqlite:////absolute/path")
    return value


def check_clients(value, file: str) -> list:
    """server.clients: [{name, key, models, rpm, tpm, max_parallel, tokens_per_day}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(file, "server.clients", "must be a list of {name, key, models, ...} mappings")
    for i, c in enumerate(value):
        path = f"server.clients[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(file, path, "must be a mapping with name, key, models, ...")
        check_keys(c, CLIENT_KEYS, file, path)
        if not isinstance(c.get("key"), str) or not c["key"].strip():
            raise ConfigError(file, f"{path}.key", "must be a non-empty string (the client's bearer key)")
        register_secret(c["key"])
        if c.get("name") is not None and not isinstance(c["name"], str):
            raise ConfigError(file, f"{path}.name", "must be a string")
        key_list(c.get("models"), file, f"{path}.models")
        for k in ("rpm", "tpm", "max_parallel", "tokens_per_day"):
            number(c, k, file, path, None, 0, int)
    return list(value)


def literal_secrets(raw: dict) -> list:
    """Dotted paths of key settings written literally instead of as ${VAR}."""
    out = []
    server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
    providers = raw.get("providers") if isinstance(raw.get("providers"), dict) else {}
    places = [("server.api_keys", server.get("api_keys"))]
    places += [(f"providers.{n}.api_keys", p.get("api_keys")) for n, p in providers.items() if isinstance(p, dict)]
    clients = server.get("clients") if isinstance(server.get("clients"), list) else []
    places += [(f"server.clients[{i}].key", c.get("key")) for i, c in enumerate(clients) if isinstance(c, dict)]
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
    check_keys(raw, TOP_KEYS, file, "")
    for where in literal_secrets(raw):
        log.warning("config %s: %s holds keys written into the file; prefer ${VAR} from the "
                    "environment so the file can be shared and committed", file, where)
    raw = expand_env(raw, env)
    s = Settings(file=file, raw=raw)
    server = raw.get("server")
    server = {} if server is None else server
    if not isinstance(server, dict):
        raise ConfigError(file, "server", "must be a mapping")
    check_keys(server, SERVER_KEYS, file, "server")
    s.host = str(server.get("host", s.host))
    s.port = int(number(server, "port", file, "server", s.port, 0, int))
    if s.port > 65535:
        raise ConfigError(file, "server.port", "must be at most 65535")
    s.api_keys = key_list(server.get("api_keys"), file, "server.api_keys")
    for k in s.api_keys:
        register_secret(k)
    s.cors_origins = key_list(server.get("cors_origins"), file, "server.cors_origins")
    s.allowed_hosts = key_list(server.get("allowed_hosts"), file, "server.allowed_hosts")
    s.max_body_mb = number(server, "max_body_mb", file, "server", 10.0, 0.001)
    s.heartbeat = number(server, "heartbeat", file, "server", 10.0, 0.0)
    for key in ("client_header_timeout", "client_body_timeout"):
        setattr(s, key, number(server, key, file, "server", getattr(s, key), 0.1))
    # 0 turns keep-alive off (each connection serves one request), as in nginx.
    s.keepalive_timeout = number(server, "keepalive_timeout", file, "server", s.keepalive_timeout, 0.0)
    s.log_prompts = bool(server.get("log_prompts", False))
    s.log_level = str(server.get("log_level", "INFO")).upper()
    s.usage_db = usage_db_value(server.get("usage_db"), file)
    s.version = str(server.get("version", s.version))
    redis = env.get("GATEWAY_REDIS_URL") or server.get("redis")
    if redis not in (None, ""):
        m = _SCHEME.match(redis) if isinstance(redis, str) else None
        if not m or m.group(1).lower() not in REDIS_SCHEMES:
            raise ConfigError(file, "server.redis", "must be a redis://, rediss:// or unix:// URL")
        s.redis = redis
    from gateway.clients import parse_clients   # it imports ConfigError from here
    s.clients = parse_clients(check_clients(server.get("clients"), file), file)

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
            near = difflib.get_close_matches(str(ptype), KNOWN_TYPES, n=1)
            hint = f"; did you mean `{near[0]}`?" if near else ""
            raise ConfigError(file, f"{path}.type", f"must be one of {', '.join(KNOWN_TYPES)}, got {ptype!r}{hint}")
        # The type owns its section: its class declares the keys and checks the values.
        p = config_class(ptype).check_config(p, file, path)
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
            raise ConfigError(file, path, "must be a <provider>:<model> name or a non-empty list of them")
        for t in targets:
            prov = t.split(":", 1)[0]
            if ":" not in t or prov not in s.providers:
                raise ConfigError(file, path, f"target {t!r} does not name a configured provider")
        s.aliases[str(name)] = list(targets)
    return s
