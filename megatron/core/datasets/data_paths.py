"""`--data-path`-style lists: optional weights before dataset prefixes."""

from __future__ import annotations


def dataset_prefixes(paths: list[str], flag: str = "--data-path") -> list[str]:
    """The dataset prefixes of a `[weight] prefix ...` list (weights optional, all or none)."""
    return [prefix for _, prefix in parse_weighted_paths(paths, flag)]


def parse_weighted_paths(paths: list[str], flag: str = "--data-path") -> list[tuple[float, str]]:
    """`['0.3', 'a', '0.7', 'b']` -> [(0.3, 'a'), (0.7, 'b')]; `['a', 'b']` -> equal weights."""
    if not paths:
        return []

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(paths) == 1 or not is_number(paths[0]):
        if any(is_number(p) for p in paths):
            raise ValueError(f"{flag}: give a weight before every prefix or before none")
        return [(1.0, p) for p in paths]
    if len(paths) % 2:
        raise ValueError(f"{flag}: weights and prefixes must come in pairs: 0.3 A 0.7 B")
    pairs = [(paths[i], paths[i + 1]) for i in range(0, len(paths), 2)]
    if not all(is_number(w) for w, _ in pairs) or any(is_number(p) for _, p in pairs):
        raise ValueError(f"{flag}: weights and prefixes must alternate: 0.3 A 0.7 B")
    out = [(float(w), p) for w, p in pairs]
    if any(w < 0 for w, _ in out) or sum(w for w, _ in out) <= 0:
        raise ValueError(f"{flag}: weights must be non-negative and not all zero")
    return out
