"""The `local:` provider: GGUF models in process (llama-cpp-python).

Module map: provider.py (the adapter), scheduler.py (who runs when, Ollama's sched.go),
native.py (native threads vs the gevent hub), engine.py (the only llama_cpp user),
sources.py (where GGUFs come from, cards), gguf_meta.py (header reader), prompt.py
(templates, transcript, output parsing)."""
import os

# Before anything can import llama_cpp: a ggml abort must not try to print a backtrace
# (it forks gdb) from inside the server.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")
