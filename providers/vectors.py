"""Embedding vectors: the one L2 normaliser (a vector cut to `dimensions` is no longer unit
length, and cosine users expect it to be)."""
from __future__ import annotations

import math


def l2_normalise(vec: list) -> list:
    """`vec` scaled to unit length, as floats; an all-zero vector stays as it is."""
    norm = math.sqrt(sum(float(x) * float(x) for x in vec))
    return [float(x) / norm for x in vec] if norm > 0 else [float(x) for x in vec]
