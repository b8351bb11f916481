"""Train a SentencePiece tokenizer (BPE or unigram) on the documents of a JSONL corpus.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix data/tok --vocab-size 4096

writes `data/tok.model` (and `data/tok.vocab`), for `--tokenizer-type GPTSentencePieceTokenizer
--tokenizer-model data/tok.model`. The model keeps text exactly: no Unicode normalisation, runs
of spaces kept (indentation survives), and byte fallback so any character can be encoded;
`detokenize(tokenize(text)) == text`. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>` (end of document).
SentencePiece learns from lines, so each document is fed line by line (newlines become byte
pieces when tokenizing whole documents).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterator, Optional

import sentencepiece

PROG = "train_tokenizer.py"


class InputError(ValueError):
    """Bad input or flags; printed as `train_tokenizer.py: error: ...`, exit status 2."""


def corpus_lines(path: str, key: str, max_line_chars: int) -> Iterator[str]:
    """Non-empty lines (cut to `max_line_chars`) of every document under `key`."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (ValueError, TypeError) as e:
                raise InputError(f"{path}:{number}: not a JSON object ({e})") from None
            except KeyError:
                raise InputError(f"{path}:{number}: no key {key!r}; set --json-key") from None
            for text_line in str(text).split("\n"):
                if text_line.strip():
                    yield text_line[:max_line_chars]


def train(input_path: str, model_prefix: str, vocab_size: int, model_type: str = "bpe", json_key: str = "text",
          max_sentences: int = 2_000_000, seed: int = 1234, threads: Optional[int] = None) -> str:
    """Train and write `<model_prefix>.model` and `.vocab`; returns the model path."""
    max_line_chars = 4096
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(seed)
    errors: list[InputError] = []

    def lines() -> Iterator[str]:  # an error raised inside SentencePiece's reader loses its message
        try:
            yield from corpus_lines(input_path, json_key, max_line_chars)
        except InputError as e:
            errors.append(e)

    try:
        _train_sentencepiece(lines(), model, vocab_size, model_type, max_line_chars, max_sentences, threads)
    except RuntimeError:
        if errors:  # the input was bad: report that, not what SentencePiece made of the part it saw
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    path = model_prefix + ".model"
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n")
    return path


def _train_sentencepiece(sentences: Iterator[str], model: io.BytesIO, vocab_size: int, model_type: str,
                         max_line_chars: int, max_sentences: int, threads: Optional[int]) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=max_line_chars * 4,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=threads or os.cpu_count() or 1,
        minloglevel=2,
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL corpus")
    p.add_argument("--json-key", default="text", help="key of the document text")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        if not os.path.isfile(args.input):
            raise InputError(f"--input: {args.input} does not exist")
        if args.vocab_size < 260:
            raise InputError("--vocab-size must be at least 260 (256 byte pieces plus specials)")
        path = train(args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_key,
                     args.max_sentences, args.seed)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # SentencePiece's own complaints, e.g. a vocabulary too large for the corpus
        print(f"{PROG}: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.model_type}, {args.vocab_size} pieces)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
