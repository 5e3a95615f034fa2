"""Write tiny GGUF models for the local-provider tests in a fraction of a second.

A 2-layer llama with 64-wide random f32 weights and a ~330-token SentencePiece vocabulary
(<unk>/<s>/</s>, ChatML control tokens, 256 byte-fallback tokens, letters and a few
words). It loads in llama.cpp and generates gibberish, which is all the scheduler and
streaming tests need. `embedding=True` adds llama.pooling_type = mean.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Hermes/Qwen-style template that knows about tools (for capability detection).
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    + CHATML
)

WORDS = ["the", "and", "is", "of", "to", "in", "it", "you", "that", "he", "was", "for",
         "on", "are", "with", "as", "Paris", "France", "hello", "world", "capital"]

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 128, 2


def _vocab():
    tokens, scores, types = [], [], []

    def add(text, score, ttype):
        tokens.append(text)
        scores.append(score)
        types.append(ttype)

    add("<unk>", 0.0, 2)
    add("<s>", 0.0, 3)
    add("</s>", 0.0, 3)
    add("<|im_start|>", 0.0, 3)
    add("<|im_end|>", 0.0, 3)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, 6)
    add("\u2581", -1.0, 1)
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:!?{}[]\"'"):
        add(ch, -2.0 - i * 0.01, 1)
    for i, w in enumerate(WORDS):
        add("\u2581" + w, -1.5 + i * 0.01, 1)
    return tokens, scores, types


def write_tiny_gguf(path: str, *, embedding: bool = False, template: Optional[str] = CHATML,
                    n_ctx_train: int = 512, seed: int = 0, name: str = "tiny") -> str:
    """Write the model to `path` and return it. template=None writes no chat template."""
    import gguf  # the writer only; reading goes through providers.local.gguf_meta

    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(0)  # all F32
    if embedding:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if template:
        w.add_chat_template(template)

    def t(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    # numpy shapes are (rows, cols) = ggml (ne1, ne0): a weight mapping in -> out is (out, in)
    w.add_tensor("token_embd.weight", t(n_vocab, N_EMBD, scale=0.5))
    w.add_tensor("output_norm.weight", ones.copy())
    w.add_tensor("output.weight", t(n_vocab, N_EMBD, scale=0.5))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones.copy())
        w.add_tensor(p + "attn_q.weight", t(N_HEAD * head_dim, N_EMBD))
        w.add_tensor(p + "attn_k.weight", t(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_v.weight", t(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_output.weight", t(N_EMBD, N_HEAD * head_dim))
        w.add_tensor(p + "ffn_norm.weight", ones.copy())
        w.add_tensor(p + "ffn_gate.weight", t(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", t(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", t(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_corrupt_gguf(path: str, source: Optional[str] = None, keep: float = 0.6) -> str:
    """A truncated copy of a valid GGUF (header intact, tensor data cut short): the
    header reader accepts it, llama.cpp refuses to load it."""
    if source is None:
        source = write_tiny_gguf(path + ".src")
    with open(source, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])
    if source == path + ".src":
        os.unlink(source)
    return path


if __name__ == "__main__":   # handy for poking at it by hand
    import sys
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny.gguf"
    print(write_tiny_gguf(out, embedding="--embedding" in sys.argv))
