"""`--data-path`-style lists (optional weights before dataset prefixes) and weight normalising.

    parse_blend(["0.3", "a", "0.7", "b"]) -> Blend(["a", "b"], [0.3, 0.7])
    parse_blend(["a", "b"])               -> Blend(["a", "b"], None)    (Megatron: blend by length)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np


class Blend(NamedTuple):
    """Dataset prefixes and their weights as given (None when the list has no weights)."""

    prefixes: list[str]
    weights: Optional[list[float]]


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum in float64, as Megatron-Core does (the exact floats matter:
    they decide split boundaries and blend order)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_blend(paths: list[str], flag: str = "--data-path") -> Blend:
    """`[weight] prefix ...` -> Blend. Weights go before every prefix or before none."""
    if not paths:
        return Blend([], None)
    if len(paths) == 1 or not _is_number(paths[0]):
        if any(_is_number(p) for p in paths):
            raise ValueError(f"{flag}: give a weight before every prefix or before none")
        return Blend(list(paths), None)
    if len(paths) % 2:
        raise ValueError(f"{flag}: weights and prefixes must come in pairs: 0.3 A 0.7 B")
    pairs = [(paths[i], paths[i + 1]) for i in range(0, len(paths), 2)]
    if not all(_is_number(w) for w, _ in pairs) or any(_is_number(p) for _, p in pairs):
        raise ValueError(f"{flag}: weights and prefixes must alternate: 0.3 A 0.7 B")
    weights = [float(w) for w, _ in pairs]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{flag}: weights must be non-negative and not all zero")
    return Blend([p for _, p in pairs], weights)


def dataset_prefixes(paths: list[str], flag: str = "--data-path") -> list[str]:
    """The dataset prefixes of a `[weight] prefix ...` list."""
    return parse_blend(paths, flag).prefixes
