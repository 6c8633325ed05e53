"""The Trainer's metrics.jsonl: one JSON object a line, appended and flushed once per step.

A kill can cut the last write short, leaving a partial last line; that is expected and repaired (the step it
held is logged again when the run resumes). A bad line anywhere else is an error naming the file and the line
(`l2m_jax.data.jsonl` does both, for every append-only file of the project).

    records, end = parse(path, path.read_bytes())       # end < len(data): data[end:] is a torn last line
    torn = repair(path)                                 # truncate a torn last line in place, before appending
"""
from __future__ import annotations

import os

from l2m_jax.data import jsonl

FIX = "delete that line (the curve loses one step) or move the file away"


class MetricsFileError(ValueError):
    """A metrics.jsonl damaged before its last line."""


def parse(path: str | os.PathLike, data: bytes) -> tuple[list[dict], int]:
    """(records, end): the records of `data`'s lines and how many bytes of `data` hold them."""
    return jsonl.parse(path, data, fix=FIX, error=MetricsFileError)


def repair(path: str | os.PathLike) -> bytes:
    """Make `path` safe to append to: cut a torn last line (returned; b"" if none)."""
    return jsonl.repair_jsonl(path, fix=FIX, error=MetricsFileError)
