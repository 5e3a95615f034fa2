"""Read a GGUF file's header (key/values and tensor infos) without loading the model.

Why not gguf.GGUFReader: it materialises every array (gemma3's 262k-token vocabulary took
31 s and 735 MB). Here the file is memory-mapped and string arrays are skipped by walking
their length prefixes, so a header reads in tens of milliseconds and only the scalars and
array lengths are kept.

Format (v2/v3, little endian): "GGUF", u32 version, u64 tensor count, u64 kv count, then
kv pairs (string key, u32 type, value), then tensor infos (string name, u32 n_dims,
u64 dims[n_dims], u32 ggml type, u64 offset). v1 used u32 for every count and length.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

GGUF_MAGIC = b"GGUF"

# value type -> (struct code, size); 8 STRING and 9 ARRAY are handled separately
_SCALAR = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
           6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
T_STRING, T_ARRAY = 8, 9

# llama_ftype (general.file_type) -> the name Ollama shows as quantization_level
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4",
}

# ggml tensor type -> (block size in elements, bytes per block); used only to guess the
# file type when general.file_type is missing (older converters)
_GGML_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
                    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}

class GGUFError(ValueError):
    pass


@dataclass
class GGUFInfo:
    path: str
    version: int
    size: int                              # file bytes
    mtime: float
    kv: dict = field(default_factory=dict)  # scalars and strings; arrays -> ("array", type, n)
    tensor_count: int = 0
    tensor_params: int = 0                 # sum of tensor element counts
    tensor_types: dict = field(default_factory=dict)  # ggml type -> element count
    bos_text: Optional[str] = None         # texts of the bos / eos / eot tokens
    eos_text: Optional[str] = None
    eot_text: Optional[str] = None

    # ---- convenience views ---------------------------------------------------------
    def get(self, key, default=None):
        return self.kv.get(key, default)

    @property
    def arch(self) -> str:
        return str(self.kv.get("general.architecture") or "")

    def arch_key(self, suffix: str, default=None):
        return self.kv.get(f"{self.arch}.{suffix}", default)

    @property
    def name(self) -> str:
        return str(self.kv.get("general.name") or "")

    @property
    def parameter_count(self) -> int:
        pc = self.kv.get("general.parameter_count")
        if isinstance(pc, int) and pc > 0:
            return pc
        if self.tensor_params:
            return self.tensor_params
        # No tensor info at all (cannot happen for a valid file): guess from size at ~4.5 bits
        return int(self.size * 8 / 4.5)

    @property
    def quantization(self) -> str:
        ft = self.kv.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        if self.tensor_types:   # the type holding most weights
            t = max(self.tensor_types.items(), key=lambda kv: kv[1])[0]
            return _GGML_TYPE_NAMES.get(t, "unknown")
        return "unknown"

    @property
    def context_length(self) -> Optional[int]:
        return _int(self.arch_key("context_length"))

    @property
    def embedding_length(self) -> Optional[int]:
        return _int(self.arch_key("embedding_length"))

    @property
    def block_count(self) -> Optional[int]:
        return _int(self.arch_key("block_count"))

    @property
    def head_count(self) -> Optional[int]:
        return _int(self.arch_key("attention.head_count"))

    @property
    def head_count_kv(self) -> Optional[int]:
        v = _int(self.arch_key("attention.head_count_kv"))
        return v if v else self.head_count

    @property
    def key_length(self) -> Optional[int]:
        v = _int(self.arch_key("attention.key_length"))
        if v:
            return v
        e, h = self.embedding_length, self.head_count
        return e // h if e and h else None

    @property
    def value_length(self) -> Optional[int]:
        v = _int(self.arch_key("attention.value_length"))
        return v if v else self.key_length

    @property
    def vocab_size(self) -> Optional[int]:
        t = self.kv.get("tokenizer.ggml.tokens")
        if isinstance(t, tuple) and t and t[0] == "array":
            return t[2]
        return _int(self.arch_key("vocab_size"))

    @property
    def chat_template(self) -> str:
        t = self.kv.get("tokenizer.chat_template")
        return t if isinstance(t, str) else ""

    @property
    def pooling_type(self) -> Optional[int]:
        return _int(self.arch_key("pooling_type"))

    @property
    def has_fim(self) -> bool:
        return any(isinstance(self.kv.get(k), int) for k in (
            "tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"))

    def model_info(self) -> dict:
        """Ollama's /api/show model_info: every scalar key; arrays only by length."""
        out = {}
        for k, v in self.kv.items():
            if k == "tokenizer.chat_template":
                continue       # shown as `template`
            if isinstance(v, tuple):
                out[k] = None  # Ollama sends arrays as null unless verbose
            else:
                out[k] = v
        out["general.parameter_count"] = self.parameter_count
        if self.arch:
            out.setdefault("general.architecture", self.arch)
        return out


def _int(v) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class _Cursor:
    __slots__ = ("buf", "pos", "v1", "end")

    def __init__(self, buf, v1: bool):
        self.buf, self.pos, self.v1, self.end = buf, 0, v1, len(buf)

    def need(self, n):
        if self.pos + n > self.end:
            raise GGUFError("file is truncated inside its header")

    def unpack(self, code, size):
        self.need(size)
        v = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += size
        return v

    def count(self):
        return self.unpack("I", 4) if self.v1 else self.unpack("Q", 8)

    def string(self) -> str:
        n = self.count()
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def skip_string(self):
        n = self.count()
        self.need(n)
        self.pos += n


def _read_value(cur: _Cursor, vtype: int, key: str, want_strings: set):
    if vtype in _SCALAR:
        code, size = _SCALAR[vtype]
        v = cur.unpack(code, size)
        return bool(v) if vtype == 7 else v
    if vtype == T_STRING:
        return cur.string()
    if vtype == T_ARRAY:
        etype = cur.unpack("I", 4)
        n = cur.count()
        start = cur.pos
        if etype in _SCALAR:
            size = _SCALAR[etype][1]
            cur.need(n * size)
            # short numeric arrays (per-layer head counts) are worth keeping
            if n <= 4096 and key not in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                code = _SCALAR[etype][0]
                vals = struct.unpack_from(f"<{n}{code}", cur.buf, cur.pos)
                cur.pos += n * size
                return ("array", etype, n, vals)
            cur.pos += n * size
        elif etype == T_STRING:
            # walk the length prefixes; nothing is decoded
            buf, pos, end = cur.buf, cur.pos, cur.end
            lfmt, lsize = ("<I", 4) if cur.v1 else ("<Q", 8)
            unpack_from = struct.unpack_from
            for _ in range(n):
                if pos + lsize > end:
                    raise GGUFError("file is truncated inside its header")
                pos += lsize + unpack_from(lfmt, buf, pos)[0]
            if pos > end:
                raise GGUFError("file is truncated inside its header")
            cur.pos = pos
        elif etype == T_ARRAY:
            raise GGUFError(f"nested arrays are not supported (key {key})")
        else:
            raise GGUFError(f"unknown array element type {etype} (key {key})")
        if key in want_strings:
            return ("array", etype, n, start)
        return ("array", etype, n)
    raise GGUFError(f"unknown value type {vtype} (key {key})")


def _nth_string(buf, start: int, index: int, v1: bool) -> Optional[str]:
    lfmt, lsize = ("<I", 4) if v1 else ("<Q", 8)
    pos = start
    for _ in range(index):
        pos += lsize + struct.unpack_from(lfmt, buf, pos)[0]
    n = struct.unpack_from(lfmt, buf, pos)[0]
    return bytes(buf[pos + lsize:pos + lsize + n]).decode("utf-8", errors="replace")


def read_gguf(path: str, tensors: bool = True) -> GGUFInfo:
    """Parse the header of `path`. Raises GGUFError (a ValueError) on anything malformed."""
    st = os.stat(path)
    if st.st_size < 24:
        raise GGUFError(f"{os.path.basename(path)} is too small to be a GGUF file")
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if mm[:4] != GGUF_MAGIC:
            raise GGUFError(f"{os.path.basename(path)} is not a GGUF file (bad magic)")
        version = struct.unpack_from("<I", mm, 4)[0]
        if version not in (1, 2, 3):
            if struct.unpack_from(">I", mm, 4)[0] in (2, 3):
                raise GGUFError("big-endian GGUF files are not supported")
            raise GGUFError(f"unsupported GGUF version {version}")
        cur = _Cursor(mm, v1=(version == 1))
        cur.pos = 8
        n_tensors = cur.count()
        n_kv = cur.count()
        if n_kv > 1_000_000 or n_tensors > 10_000_000:
            raise GGUFError("implausible header counts; the file is corrupt")
        info = GGUFInfo(path=path, version=version, size=st.st_size, mtime=st.st_mtime,
                        tensor_count=n_tensors)
        want = {"tokenizer.ggml.tokens"}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("I", 4)
            info.kv[key] = _read_value(cur, vtype, key, want)

        # texts of the special tokens (templates need bos/eos, `stop` shows eos/eot)
        tok = info.kv.get("tokenizer.ggml.tokens")
        if isinstance(tok, tuple) and len(tok) == 4:
            info.kv["tokenizer.ggml.tokens"] = tok[:3]
            for attr, key in (("bos_text", "tokenizer.ggml.bos_token_id"),
                              ("eos_text", "tokenizer.ggml.eos_token_id"),
                              ("eot_text", "tokenizer.ggml.eot_token_id")):
                tid = info.kv.get(key)
                if isinstance(tid, int) and 0 <= tid < tok[2]:
                    try:
                        setattr(info, attr, _nth_string(mm, tok[3], tid, cur.v1))
                    except struct.error:
                        pass
        # keep the short numeric arrays as tuples ("array", type, n) for a uniform shape,
        # except per-layer values whose first element is a fine scalar summary
        for k, v in list(info.kv.items()):
            if isinstance(v, tuple) and len(v) == 4:
                vals = v[3]
                if k.startswith(f"{info.arch}.attention.head_count") and vals:
                    info.kv[k] = max(vals)
                else:
                    info.kv[k] = v[:3]

        if tensors:
            total = 0
            types: dict = {}
            for _ in range(n_tensors):
                cur.skip_string()
                nd = cur.unpack("I", 4)
                if nd > 8:
                    raise GGUFError("implausible tensor rank; the file is corrupt")
                cur.need(8 * nd)
                dims = struct.unpack_from(f"<{nd}{'I' if cur.v1 else 'Q'}", mm, cur.pos)
                cur.pos += (4 if cur.v1 else 8) * nd
                ttype = cur.unpack("I", 4)
                cur.unpack("Q", 8)       # data offset
                n = 1
                for d in dims:
                    n *= d
                total += n
                types[ttype] = types.get(ttype, 0) + n
            info.tensor_params = total
            info.tensor_types = types
        return info
    except struct.error as e:
        raise GGUFError(f"file is truncated or corrupt ({e})")
    finally:
        mm.close()


def human_params(n: int) -> str:
    """268098176 -> "268M", 1543714304 -> "1.5B", 7241732096 -> "7.2B", 70e9 -> "70B"."""
    if n >= 1e9:
        s = f"{n / 1e9:.1f}"
        return (s[:-2] if s.endswith(".0") else s) + "B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return str(n)


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, bytes_per_elem: int = 2) -> int:
    """f16 K and V for every layer: n_ctx x layers x kv_heads x (key_len + value_len) x 2."""
    layers = info.block_count or 0
    kv_heads = info.head_count_kv or 1
    kl = info.key_length or 0
    vl = info.value_length or kl
    return int(n_ctx) * layers * kv_heads * (kl + vl) * bytes_per_elem

