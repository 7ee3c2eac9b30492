"""The sweep's files: results.jsonl (one row a line, appended as each model finishes, read back for a resume),
and the text files the user names (--list, --readme), read as UTF-8 with one-line errors."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from vitparity.errors import UserError

from .step import Row


def read_text(path: str, flag: str) -> str:
    """A text file the user named, as UTF-8; a one-line error when it is missing, unreadable or not text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: {error.strerror or error}") from None


ROW_TYPES = {"model": str, "module": str, "params": int, "input": str, "export_s": (int, float, type(None)),
             "verify_cosine": (int, float, type(None)), "attention": str, "compare": str, "layers": str, "error": str,
             "seconds": (int, float), "node": str, "sizes": str}



def row_of(found) -> Row | None:
    """A Row from one JSONL record, or None when any field is missing, unknown or of the wrong type."""
    if not (isinstance(found, dict) and {"model", "module", "params", "input"} <= set(found) <= set(ROW_TYPES)):
        return None
    if any(isinstance(value, bool) or not isinstance(value, ROW_TYPES[key]) for key, value in found.items()):
        return None
    return Row(**found)



def read_rows(path: Path) -> list[Row]:
    """The rows a JSONL file holds; a line cut short by a killed sweep, or one that is not a row (wrong
    types, other fields), is ignored: that model runs again."""
    rows = []
    if path.is_file():
        for line in path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                row = row_of(json.loads(line))
            except ValueError:
                continue
            if row is not None:
                rows.append(row)
    return rows



def append_row(path: Path, row: Row) -> None:
    """Append one row as a line of its own: after a line cut short (a crash mid-write), on a fresh line."""
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        fresh = b""
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            fresh = b"" if handle.read(1) == b"\n" else b"\n"
        handle.write(fresh + (json.dumps(asdict(row)) + "\n").encode())
        handle.flush()
        os.fsync(handle.fileno())
