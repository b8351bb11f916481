"""Tokenize a JSONL corpus into Megatron `.bin/.idx` datasets (Megatron-LM's interface).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2

Each line of `--input` is one JSON object; the string under each `--json-keys` key is one
document. For each key K the output is `<prefix>_K_document.bin/.idx`, one sequence per
document, in input order whatever `--workers` is. Files are written under temporary names and
renamed into place only when the whole input succeeded, so an interrupted run (Ctrl-C: exit
status 130) never leaves a dataset that looks valid. A malformed line, a missing key or a token
id outside the tokenizer's vocabulary stops the run with one line naming the file and line, as
does an input without documents; nothing is written then. Blank lines are skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter, optimal_dtype  # noqa: E402
from megatron.core.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

PROG = "preprocess_data.py"


class InputError(ValueError):
    """Bad input or flags; printed as `preprocess_data.py: error: ...`, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Tokenize JSONL documents into Megatron .bin/.idx files.")
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose strings are documents")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="tokenizer file (or directory for HuggingFaceTokenizer)")
    p.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: ids 0..N-1, end of document N")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (order is preserved)")
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="accepted for compatibility")
    return p


# ---------------------------------------------------------------------- tokenizing (in workers)
class DocumentEncoder:
    """Turns one JSONL line into token arrays, one per key. Built once per worker process."""

    def __init__(self, tokenizer, args: argparse.Namespace, dtype: np.dtype):
        self.tokenizer = tokenizer
        self.keys = args.json_keys
        self.append_eod = args.append_eod
        self.input = args.input
        self.dtype = dtype
        self.vocab_size = tokenizer.vocab_size

    def encode(self, numbered_line: tuple[int, bytes]) -> tuple[list[np.ndarray], int]:
        """(line number, raw line) -> (token array per key, bytes read). Raises InputError."""
        number, line = numbered_line
        where = f"{self.input}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        arrays = []
        for key in self.keys:
            if key not in record:
                raise InputError(f"{where}: no key {key!r} (the line has {sorted(record)}); set --json-keys")
            text = record[key]
            if not isinstance(text, str):
                raise InputError(f"{where}: {key!r} holds {type(text).__name__}, not a string")
            try:
                ids = self.tokenizer.tokenize(text)
            except ValueError as e:
                raise InputError(f"{where}: cannot tokenize {key!r} ({e})") from None
            if self.append_eod:
                ids = list(ids) + [self.tokenizer.eod]
            tokens = np.asarray(ids, dtype=np.int64)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                bad = int(tokens[(tokens < 0) | (tokens >= self.vocab_size)][0])
                raise InputError(f"{where}: token id {bad} in {key!r} is outside the tokenizer's vocabulary of "
                                 f"{self.vocab_size} ids (0..{self.vocab_size - 1}); fix the line or the tokenizer "
                                 f"flags; nothing written")
            arrays.append(tokens.astype(self.dtype))
        return arrays, len(line)


_worker_encoder: Optional[DocumentEncoder] = None
"""The encoder of this worker process, set once by `_init_worker`."""


def _tokenizer(args: argparse.Namespace):
    try:
        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    except ValueError as e:
        raise InputError(str(e)) from None


def _init_worker(args: argparse.Namespace, dtype: np.dtype) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _worker_encoder = DocumentEncoder(_tokenizer(args), args, dtype)


def _encode_in_worker(numbered_line: tuple[int, bytes]):
    return _worker_encoder.encode(numbered_line)


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for every non-blank line of `path`."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


# ---------------------------------------------------------------------- output files
def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


class AtomicOutputs:
    """One writer per key, on temporary files; `commit` renames them into place."""

    def __init__(self, prefix: str, keys: list[str], dtype: np.dtype):
        self.finals = [output_prefix(prefix, key) for key in keys]
        self.tag = f".tmp{os.getpid()}"
        self.writers = []
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            for p in self.finals:
                self.writers.append(IndexedDatasetWriter(p + ".bin" + self.tag, dtype))
        except OSError as e:
            self.abandon()
            raise InputError(f"--output-prefix {prefix}: {_unwritable(prefix, e)}; give a prefix in a writable "
                             f"directory") from None

    def commit(self) -> None:
        for final, writer in zip(self.finals, self.writers):
            writer.finalize(final + ".idx" + self.tag)
        for final in self.finals:
            # Remove the old index first: between the two renames no stale pair looks valid.
            if os.path.exists(final + ".idx"):
                os.unlink(final + ".idx")
            os.replace(final + ".bin" + self.tag, final + ".bin")
            os.replace(final + ".idx" + self.tag, final + ".idx")

    def abandon(self) -> None:
        for final, writer in zip(self.finals, self.writers):
            writer.close()
            for suffix in (".bin", ".idx"):
                if os.path.exists(final + suffix + self.tag):
                    os.unlink(final + suffix + self.tag)


def _unwritable(prefix: str, error: OSError) -> str:
    """Why files cannot be created at `prefix`: a parent that is a file, or the OS's reason."""
    parent = os.path.dirname(os.path.abspath(prefix))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    return f"cannot write {error.filename or parent} ({error.strerror})"


# ---------------------------------------------------------------------- main
class Progress:
    """Prints documents/s and MB/s of input every `interval` documents, to stderr."""

    def __init__(self, interval: int):
        self.interval = interval
        self.start = time.perf_counter()
        self.documents = 0
        self.bytes = 0

    def add(self, nbytes: int) -> None:
        self.documents += 1
        self.bytes += nbytes
        if self.interval > 0 and self.documents % self.interval == 0:
            print(self.line("processed"), file=sys.stderr, flush=True)

    def line(self, what: str) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{what} {self.documents} documents in {elapsed:.1f} s "
                f"({self.documents / elapsed:.0f} docs/s, {self.bytes / elapsed / 1e6:.2f} MB/s)")


def preprocess(args: argparse.Namespace) -> Progress:
    """Tokenize `args.input` into the output datasets; returns the finished progress counter."""
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if not os.path.isfile(args.input):
        raise InputError(f"--input: {args.input} does not exist")
    tokenizer = _tokenizer(args)
    dtype = optimal_dtype(tokenizer.vocab_size)
    outputs = AtomicOutputs(args.output_prefix, args.json_keys, dtype)
    progress = Progress(args.log_interval)
    pool = None
    try:
        if args.workers == 1:
            encoder = DocumentEncoder(tokenizer, args, dtype)
            encoded = map(encoder.encode, numbered_lines(args.input))
        else:
            pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args, dtype))
            encoded = pool.imap(_encode_in_worker, numbered_lines(args.input), chunksize=32)
        for arrays, nbytes in encoded:
            for writer, tokens in zip(outputs.writers, arrays):
                writer.add_document(tokens)
            progress.add(nbytes)
        if progress.documents == 0:
            raise InputError(f"{args.input}: no documents (the file is empty or holds only blank lines); "
                             f"nothing written")
        outputs.commit()
    except BaseException:
        outputs.abandon()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return progress


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        progress = preprocess(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    print(progress.line("done:"), file=sys.stderr)
    for key in args.json_keys:
        print(f"wrote {output_prefix(args.output_prefix, key)}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
