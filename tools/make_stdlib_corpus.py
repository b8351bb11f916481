"""Write the running Python's standard-library sources as a JSONL corpus, one file a document.

    python tools/make_stdlib_corpus.py --output data/stdlib.jsonl --max-mb 8

A real text corpus that is on every machine with Python, so the quick start needs no download.
Files are taken in sorted path order (deterministic for a given Python installation) until
`--max-mb` of source is collected; test suites, `site-packages` and files that are not UTF-8
(and the generated codec tables of `encodings`) are left out. Each line is {"text": <source>, "path": <path relative to the stdlib>}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from typing import Optional

PROG = "make_stdlib_corpus.py"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}
"""Test suites, installed packages, and generated codec tables."""


def sorted_sources(root: str) -> list[str]:
    """Paths, relative to `root`, of every `.py` file outside SKIP_DIRS, sorted as strings."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
        found += [os.path.relpath(os.path.join(directory, n), root) for n in files if n.endswith(".py")]
    return sorted(found)


def write_corpus(root: str, output: str, max_bytes: int) -> tuple[int, int]:
    """Write documents until `max_bytes` of source; returns (documents, bytes)."""
    documents = total = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for rel in sorted_sources(root):
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            size = len(text.encode("utf-8"))
            if not text.strip():
                continue
            if total + size > max_bytes:
                break
            out.write(json.dumps({"text": text, "path": rel}) + "\n")
            documents += 1
            total += size
    os.replace(tmp, output)
    return documents, total


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-mb", type=float, default=8.0, help="stop after this many MB of source")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="source directory (default: this Python's)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.stdlib):
        print(f"{PROG}: error: --stdlib: {args.stdlib} is not a directory", file=sys.stderr)
        return 2
    if args.max_mb <= 0:
        print(f"{PROG}: error: --max-mb must be positive", file=sys.stderr)
        return 2
    documents, total = write_corpus(args.stdlib, args.output, int(args.max_mb * 1e6))
    if documents == 0:
        print(f"{PROG}: error: no Python sources found under {args.stdlib}", file=sys.stderr)
        return 2
    print(f"wrote {documents} documents ({total / 1e6:.2f} MB) from {args.stdlib} to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
