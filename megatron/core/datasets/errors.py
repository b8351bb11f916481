"""The one exception type of the data pipeline that users see.

`pretrain_gpt.py` prints a `DataError` as a single line, `pretrain_gpt.py: error: <message>`,
and exits with status 2. Messages name the file (or flag) first and end with what to do.
"""

from __future__ import annotations

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "Original Traceback"


class DataError(ValueError):
    """A dataset that cannot be read or served as asked: one line, file or flag first.

    An exception raised inside a DataLoader worker reaches the main process re-raised as
    `type(text)`, where text is the worker's whole formatted traceback. The constructor
    recognises that text and keeps only the original message (its last line), so the error
    still prints as one line.
    """

    def __init__(self, message: str):
        super().__init__(_original_message(str(message)))


def _original_message(message: str) -> str:
    if not (message.startswith(_WORKER_PREFIX) and _WORKER_MARK in message):
        return message
    last = message.rstrip().splitlines()[-1]  # "package.module.ClassName: original message"
    head, separator, original = last.partition(": ")
    return original if separator and " " not in head else message
