"""The YAML section of `type: local`: declared keys (provider level and per model) and
their check. Imports neither llama.cpp nor the scheduler: the config check (gunicorn
master, --check-config) runs it."""
from __future__ import annotations

from gateway.canonical import FLOAT_OPTIONS, INT_OPTIONS
from gateway.settings import ConfigError, check_keys, number, parse_size
from providers.base import Provider

_OPTION_KINDS = {**dict.fromkeys(FLOAT_OPTIONS, float), **dict.fromkeys(INT_OPTIONS, int), "stop": list}


class LocalConfig(Provider):
    type_name = "local"
    single_worker = True    # each worker process would load its own copies of the models
    # keys a model may set and the provider may set as a default for all its models
    shared_keys = frozenset({"n_ctx", "n_threads", "n_gpu_layers", "num_parallel"})
    config_keys = Provider.config_keys | shared_keys | {
        "models", "models_dir", "cache_dir", "keep_alive", "max_loaded_models", "max_queue",
        "memory_budget"}
    model_keys = shared_keys | {"path", "package", "options", "embedding", "template"}

    @classmethod
    def check_config(cls, cfg: dict, file: str, path: str) -> dict:
        p = super().check_config(cfg, file, path)
        models = p.get("models") or {}
        if not isinstance(models, dict):
            raise ConfigError(file, f"{path}.models", "must be a mapping of model name to {path|package: ...}")
        for mname, m in models.items():
            mpath = f"{path}.models.{mname}"
            if isinstance(m, dict):
                check_keys(m, cls.model_keys, file, mpath)
            if not isinstance(m, dict) or not (m.get("path") or m.get("package")):
                raise ConfigError(file, mpath, "needs path: (a .gguf file) or package: (a PyPI package shipping one)")
            check_model_options(m.get("options"), file, f"{mpath}.options")
            _num_parallel(m, file, mpath)
        _num_parallel(p, file, path)
        if "memory_budget" in p:
            p["memory_budget_bytes"] = parse_size(p.get("memory_budget"), file, f"{path}.memory_budget")
        for key in ("max_loaded_models", "max_queue"):
            if key in p:
                p[key] = int(number(p, key, file, path, 0, 0, int))
        if "keep_alive" in p:
            from gateway.durations import parse_keep_alive
            try:
                p["keep_alive_seconds"] = parse_keep_alive(p["keep_alive"])
            except ValueError as e:
                raise ConfigError(file, f"{path}.keep_alive", str(e))
        return p


def _num_parallel(d: dict, file: str, path: str) -> None:
    """num_parallel: an integer >= 1 (requests one model decodes at once), kept as given."""
    v = d.get("num_parallel")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError(file, f"{path}.num_parallel", f"must be an integer of at least 1, got {v!r}")


def check_model_options(opts, file: str, path: str) -> None:
    """A local model's default `options:` (as Ollama's Modelfile PARAMETER lines)."""
    if opts is None:
        return
    if not isinstance(opts, dict):
        raise ConfigError(file, path, "must be a mapping of option name to value")
    check_keys(opts, _OPTION_KINDS, file, path)
    for k, v in opts.items():
        kind = _OPTION_KINDS[k]
        if kind is list:
            if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ConfigError(file, f"{path}.{k}", "must be a list of strings")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise ConfigError(file, f"{path}.{k}", f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
