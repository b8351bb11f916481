"""Megatron's NullTokenizer: text is already token ids, written as whitespace-separated integers.

With `--vocab-size N` the ids are 0..N-1 and the end of document is N, so the vocabulary has
N + 1 entries.
"""

from __future__ import annotations


class NullTokenizer:
    pad = None
    """No padding id (Megatron's NullTokenizer has none)."""
    eos = None

    def __init__(self, vocab_size: int):
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        """'3 1 4' -> [3, 1, 4]. Raises ValueError on a word that is not an integer."""
        return [int(word) for word in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)
