"""File helpers: atomic whole-file writes and the append-only JSONL trial log.

The trial log is append-only: every record is one JSON object on one line, written with a
single ``write`` of the whole line (newline included), then flushed and ``fsync``-ed, so a
crash leaves at most one truncated *last* line.  :func:`read_log` skips any line that is not
a valid JSON object with a warning and keeps every good one; :func:`repair_tail`
terminates a truncated last line first, so the next record never gets glued onto it.
"""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["append_record", "atomic_write_bytes", "atomic_write_text", "decode_float", "encode_float", "read_log"]


def _final_mode(path: Path) -> int:
    """The mode the written file gets: the replaced file's, else ``0o644`` (``mkstemp`` gives 0o600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o644


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames inside folder ``path`` durable: ``os.replace`` is atomic, but until the
    folder itself is synced a power loss may bring back the old entry (POSIX). A no-op where a
    folder cannot be opened or synced (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_with`).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_bytes(p, b"hi"); p.read_bytes()
        b'hi'
    """
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Atomically create or replace ``path`` with ``write(tmp_path)`` (e.g. ``fig.savefig``): a
    temp file in the same folder, synced, given the replaced file's mode (a new one ``0o644``),
    renamed over ``path`` and the folder synced; on failure the temp file is removed and ``path``
    is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def encode_float(v: float) -> float | str:
    """JSON has no NaN/inf: non-finite values are stored as ``"nan"``, ``"inf"``, ``"-inf"``."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def decode_float(v: Any) -> float:
    """Inverse of :func:`encode_float` (``None`` reads as NaN); ``ValueError`` otherwise."""
    if v is None:
        return math.nan
    if isinstance(v, str):
        if v in ("nan", "inf", "-inf"):
            return float(v)
        raise ValueError(f"not a number: {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"not a number: {v!r}")
    try:
        return float(v)
    except OverflowError:  # a JSON integer beyond the float range
        raise ValueError(f"not a number in the float range: {v!r}") from None


def append_record(path: str | os.PathLike[str], record: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Append one record as one whole line (a list of records: a line each, in the same single
    write, so all of them reach the log or none), then flush and fsync.

    A write that fails part-way (e.g. the disk is full) is undone before the error propagates,
    so a process that goes on appends its next record on a line of its own.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> append_record(p, {"a": 1}); p.read_text()
        '{"a":1}\\n'
    """
    records = record if isinstance(record, list) else [record]
    data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            # A write that failed part-way (disk full, an interrupt) while the process goes
            # on: drop its bytes, or the next record would be glued onto them.
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def repair_tail(path: str | os.PathLike[str]) -> None:
    """If ``path`` ends in a truncated line (no final newline), terminate it with one."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last != b"\n":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)


def read_log(
    path: str | os.PathLike[str], *, torn: str = "warn", strict: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every line of ``path`` that is a JSON object.

    Blank lines are ignored.  A line that is not JSON (invalid UTF-8 or JSON: a crash's torn
    line) is skipped, with a ``UserWarning`` naming the file and line (``torn="warn"``, the
    default) or silently (``torn="skip"``, for a log whose torn lines are expected and
    harmless).  A JSON line that is not an object is skipped with a warning, or with
    ``strict=True`` refused: ``ValueError`` naming the file and line (no torn line is one:
    every prefix of a JSON object is invalid JSON).
    """
    if torn not in ("warn", "skip"):
        raise ValueError(f"torn must be 'warn' or 'skip', got {torn!r}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # too deeply nested
                if torn == "warn":
                    warnings.warn(f"{path}:{lineno}: skipping corrupt log line ({e})", stacklevel=3)
                continue
            if not isinstance(rec, dict):
                if strict:
                    raise ValueError(f"{path}:{lineno} is damaged: expected a JSON object, got a JSON "
                                     f"{type(rec).__name__}")
                warnings.warn(f"{path}:{lineno}: skipping log line that is not a JSON object", stacklevel=3)
                continue
            yield lineno, rec
