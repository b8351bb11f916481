"""Hugging Face tokenizers from local files (`--tokenizer-type HuggingFaceTokenizer`).

`--tokenizer-model` is a directory holding `tokenizer.json` (and usually
`tokenizer_config.json`), or the `tokenizer.json` file itself. With `transformers` installed
the directory is loaded by `AutoTokenizer` as Megatron-LM does; otherwise the `tokenizers`
library reads `tokenizer.json`. Either way nothing is downloaded, and `tokenize` adds the
special tokens the tokenizer's post-processor adds (as `AutoTokenizer(text).input_ids` does).

The end of document is the tokenizer's eos token: `eos_token` in `tokenizer_config.json`, or
else the first of a few common names present in the vocabulary. `pad` is the `pad_token`'s id
(None without one), as Megatron-LM reads it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

COMMON_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


class HuggingFaceTokenizer:
    def __init__(self, path: str):
        self.path = path
        directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
        self._auto = _auto_tokenizer(directory) if os.path.isdir(path) else None
        self._fast = None
        if self._auto is not None:
            self.vocab_size = len(self._auto)
            eos = self._auto.eos_token
            self.pad = self._auto.pad_token_id
        else:
            self._fast = _tokenizers_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            eos = _configured_token(directory, "eos_token")
            pad = _configured_token(directory, "pad_token")
            self.pad = self._fast.token_to_id(pad) if pad else None
        self._eod = self._resolve_eos(eos)
        self.eos = self._eod

    def _token_id(self, token: str) -> Optional[int]:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        token_id = self._auto.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == self._auto.unk_token_id else token_id

    def _resolve_eos(self, eos: Optional[str]) -> Optional[int]:
        for name in ([eos] if eos else []) + list(COMMON_EOS):
            token_id = self._token_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"--tokenizer-model: {self.path} names no eos token; set eos_token in tokenizer_config.json")
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text).ids
        return list(self._auto(text).input_ids)

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids)


def _auto_tokenizer(directory: str):
    """transformers' AutoTokenizer on a local directory, or None when transformers is absent."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _tokenizers_file(json_file: str):
    try:
        import tokenizers
    except ImportError:
        raise ValueError("--tokenizer-type HuggingFaceTokenizer needs the `tokenizers` package "
                         "(pip install 'moetron[hf]')") from None
    if not os.path.isfile(json_file):
        raise ValueError(f"--tokenizer-model: {json_file} does not exist; give a directory with tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(json_file)
    except Exception as e:  # noqa: BLE001 - the library raises plain Exception on bad files
        raise ValueError(f"--tokenizer-model: cannot read {json_file} ({e})") from None


def _configured_token(directory: str, key: str) -> Optional[str]:
    """`key` (eos_token, pad_token) from tokenizer_config.json (a string or {"content": ...}), if any."""
    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        token = json.load(f).get(key)
    return token.get("content") if isinstance(token, dict) else token
