"""BENCHMARKS.md is written by several bench modules: bench.run owns the file's head and
the gateway-relay tables; other modules (bench.local, bench.soak) own one marked section
each, which survives when bench.run rewrites the rest."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "BENCHMARKS.md")
_BLOCK = re.compile(r"<!-- section:(?P<name>[\w-]+) -->\n.*?<!-- /section:(?P=name) -->\n", re.S)


def kept_sections(path: str = PATH) -> str:
    """Every marked section currently in the file, in order (to re-append after a rewrite)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return ""
    return "".join(m.group(0) for m in _BLOCK.finditer(text))


def write_section(name: str, body: str, path: str = PATH) -> None:
    """Replace section `name` (or append it) with `body`, leaving the rest of the file."""
    block = f"<!-- section:{name} -->\n{body.rstrip()}\n<!-- /section:{name} -->\n"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        text = "# Benchmarks\n\n"
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->\n.*?<!-- /section:{re.escape(name)} -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
