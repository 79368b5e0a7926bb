"""Counting the host work of a call, for tests of how it grows (the project's rule: no timings)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any


def lines_run(fn: Callable[..., Any], *args: Any, files: Iterable[str], **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), lines)``: the Python lines executed in ``files`` while ``fn`` runs
    (each loop iteration, comprehensions' and generators' included, counts): a loop over every
    user runs a line per user."""
    count = 0
    files = set(files)

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in files else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        out = fn(*args, **kwargs)
    finally:
        sys.settrace(old)
    return out, count
