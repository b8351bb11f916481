"""SentencePiece tokenizers with Megatron-LM's three behaviours.

    GPTSentencePieceTokenizer  the model's own ids; end of document = the model's `</s>` (eos)
    Llama2Tokenizer            the same ids with a BOS id prepended to every text
    SentencePieceTokenizer     the model's ids plus special tokens `<CLS> <SEP> <EOD> <MASK>`
                               (and `<PAD>` when the model has no pad piece) appended after the
                               model's pieces; end of document = `<EOD>`. A special token's text
                               inside the input maps to its id.

The ids match Megatron-LM's for the same model file, so datasets preprocessed by either
framework train the same way in the other.
"""

from __future__ import annotations

import sentencepiece


def _load(model_file: str) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"--tokenizer-model: {model_file} is not a SentencePiece model ({e})") from None


class GPTSentencePieceTokenizer:
    """Plain SentencePiece ids; `eod` is the model's eos id; `pad` the model's pad id (None when
    the model has no pad piece, SentencePiece's default)."""

    def __init__(self, model_file: str):
        self.processor = _load(model_file)
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self.eos = self.processor.eos_id()
        self.bos = self.processor.bos_id()
        pad = self.processor.pad_id()
        self.pad = pad if pad >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def detokenize(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Llama-2 convention: every tokenized text starts with the BOS id."""

    def tokenize(self, text: str) -> list[int]:
        return [self.bos] + self.processor.encode(text)


class SentencePieceTokenizer:
    """SentencePiece ids plus Megatron's special tokens, which the text may also contain."""

    def __init__(self, model_file: str):
        self.processor = _load(model_file)
        n = self.processor.get_piece_size()
        vocab = {self.processor.id_to_piece(i): i for i in range(n)}
        special_names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>"]
        for special_id in (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id()):
            special_names.append(self.processor.id_to_piece(special_id) if 0 <= special_id < n else None)
        special_names[4] = special_names[4] or "<PAD>"
        special_names[5] = special_names[5] or "<BOS>"
        special_names[6] = special_names[6] or "<EOS>"
        self.special_tokens: dict[str, int] = {}
        for name in special_names:
            if name not in vocab:
                vocab[name] = len(vocab)
            self.special_tokens[name] = vocab[name]
        self.special_pieces = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = len(vocab)
        self.eod = self.special_tokens["<EOD>"]
        self.pad = self.special_tokens[special_names[4]]
        self.eos = self.special_tokens[special_names[6]]

    def tokenize(self, text: str) -> list[int]:
        """SentencePiece ids of the text between special tokens, which map to their own ids."""
        ids: list[int] = []
        start = 0
        while True:
            found = [(text.find(name, start), name) for name in self.special_tokens]
            found = [(at, name) for at, name in found if at >= 0]
            if not found:
                break
            at, name = min(found, key=lambda pair: pair[0])
            ids += self.processor.encode(text[start:at])
            ids.append(self.special_tokens[name])
            start = at + len(name)
        return ids + self.processor.encode(text[start:])

    def detokenize(self, ids) -> str:
        """Inverse of `tokenize` up to SentencePiece's own normalisation."""
        pieces: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self.special_pieces:
                pieces.append(self.processor.decode(run))
                pieces.append(self.special_pieces[i])
                run = []
            else:
                run.append(i)
        pieces.append(self.processor.decode(run))
        return "".join(pieces)
