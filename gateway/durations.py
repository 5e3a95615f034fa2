"""Ollama's keep_alive values and RFC 3339 timestamps with exactly 9 fractional digits."""
from __future__ import annotations

import re
import time

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds ("1h30m", "-1m", "0", "2.5s")."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value):
    """Seconds from a number or duration string; None when absent. Negative = forever.
    A unit-less numeric string is taken as seconds (Ollama refuses it; leniency is harmless)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a duration string or a number of seconds")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("keep_alive must be a finite number")
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return parse_duration(value)
    raise ValueError("keep_alive must be a duration string or a number of seconds")


def rfc3339(ts: float | None = None) -> str:
    """UTC, 9 fractional digits, Z suffix: 2025-05-10T08:06:48.639712648Z."""
    if ts is None:
        ns = time.time_ns()
    else:
        ns = int(ts * 1e9)
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"
