"""Append-only JSON-lines files that survive a crash (pseudo-labels, synthesised requests, training metrics).

Every line is written whole and fsynced. The one damage a kill mid-write leaves is a torn last line (no
newline, not valid JSON): readers leave it out and `repair_jsonl` cuts it off before appending again. A bad line
anywhere before the last is damage this writer cannot cause, so it is an error naming the file, the line and
the fix instead of a guess.

    rows = read_jsonl(path, repair=True, fix="delete it to regenerate")      # torn last line cut off
    records, end = parse(path, data, fix=...)                                 # end < len(data): data[end:] torn
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from l2m_jax.data.chat import DataError


def _record(path: Path, n: int, line: bytes, fix: str, error: type[Exception]) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} line {n} is not valid JSON ({e}); the file is damaged before its last line, which "
                    f"a cut-off write cannot cause: {fix}") from e


def parse(path: str | os.PathLike, data: bytes, *, fix: str, error: type[Exception] = DataError
          ) -> tuple[list[Any], int]:
    """(records, end): the records of `data`'s lines and how many bytes of `data` hold them.

    A last line without its newline that does not parse is a torn write: left out, data[end:] is it. A bad
    line before the last raises `error` with `fix`.
    """
    path = Path(path)
    lines = data.split(b"\n")
    tail = lines.pop()                               # b"" when data ends with a newline
    records = [_record(path, n, line, fix, error) for n, line in enumerate(lines, 1) if line.strip()]
    if not tail.strip():
        return records, len(data)
    try:
        records.append(json.loads(tail))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return records, len(data) - len(tail)
    return records, len(data)


def repair_jsonl(path: str | os.PathLike, *, fix: str, error: type[Exception] = DataError) -> bytes:
    """Make `path` safe to append to: cut a torn last line (returned; b"" if none), end the file with a newline.

    A missing file is fine (nothing to repair); a bad line before the last raises `error`.
    """
    path = Path(path)
    if not path.exists():
        return b""
    data = path.read_bytes()
    _, end = parse(path, data, fix=fix, error=error)
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
        return data[end:]
    if data and not data.endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return b""


def read_jsonl(path: str | os.PathLike, *, repair: bool, fix: str, error: type[Exception] = DataError) -> list[Any]:
    """The records of `path` ([] if it does not exist), a torn last line left out (and cut off if repair)."""
    path = Path(path)
    if not path.exists():
        return []
    if repair:
        repair_jsonl(path, fix=fix, error=error)
    return parse(path, path.read_bytes(), fix=fix, error=error)[0]


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append one line per row, flushed and fsynced: a line once written survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (a temporary file renamed over `path`): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))    # keys in insertion order: reports keep theirs
    os.replace(tmp, path)


def check_settings(out_dir: str | os.PathLike, settings: dict[str, Any], what: str, name: str = "meta.json") -> None:
    """Record `settings` in out_dir/name on a first run; on a later one refuse settings that differ (DataError
    naming each key), so that a resumed run never mixes the outputs of two configurations."""
    out_dir = Path(out_dir)
    path = out_dir / name
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
        if diff:
            raise DataError(f"{out_dir} holds {what} made with different {diff} "
                            f"({ {k: old.get(k) for k in diff} } vs { {k: settings.get(k) for k in diff} }); "
                            "use a fresh out_dir or the original settings to resume")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)
