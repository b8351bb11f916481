"""Tokenizers behind one small interface, chosen by Megatron-LM's `--tokenizer-type` names.

Every tokenizer has
    vocab_size           int, the unpadded number of ids
    eod                  int, the end-of-document id (`--append-eod`, `--eod-mask-loss`)
    pad                  int or None, the padding id Megatron-Core's tokenizer reports (GPT
                         datasets drop the loss where the label is this id; see gpt_dataset)
    eos                  int or None, the end-of-sentence id (None where there is none)
    tokenize(text)       -> list[int]
    detokenize(ids)      -> str

    build_tokenizer("GPTSentencePieceTokenizer", "tok.model")
    build_tokenizer("NullTokenizer", None, vocab_size=512)
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

TOKENIZER_TYPES = (
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)
"""`--tokenizer-type` values this framework implements (Megatron-LM semantics)."""


class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    pad: Optional[int]
    eos: Optional[int]

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def needs_model_file(tokenizer_type: str) -> bool:
    """Whether `--tokenizer-model` must name a file or directory for this type."""
    return tokenizer_type != "NullTokenizer"


def check_tokenizer_args(tokenizer_type: Optional[str], tokenizer_model: Optional[str],
                         vocab_size: Optional[int] = None) -> None:
    """Raise ValueError naming the flag when the tokenizer cannot be built from these values."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type} is not supported; use one of {', '.join(TOKENIZER_TYPES)}")
    if needs_model_file(tokenizer_type):
        if tokenizer_model is None:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH")
        if not os.path.exists(tokenizer_model):
            raise ValueError(f"--tokenizer-model: {tokenizer_model} does not exist")
    elif vocab_size is None or vocab_size <= 0:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (ids 0..N-1; N is the end of document)")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """The tokenizer named by `--tokenizer-type`, loaded from local files only.

    `vocab_size` is `--vocab-size`, used by NullTokenizer alone. Raises ValueError naming the
    flag when the type is unknown or its model file is missing.
    """
    check_tokenizer_args(tokenizer_type, tokenizer_model, vocab_size)
    if tokenizer_type == "NullTokenizer":
        from megatron.core.tokenizer.null_tokenizer import NullTokenizer

        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megatron.core.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(tokenizer_model)
    from megatron.core.tokenizer import sentencepiece_tokenizer as sp

    cls = {"GPTSentencePieceTokenizer": sp.GPTSentencePieceTokenizer,
           "SentencePieceTokenizer": sp.SentencePieceTokenizer,
           "Llama2Tokenizer": sp.Llama2Tokenizer}[tokenizer_type]
    return cls(tokenizer_model)
