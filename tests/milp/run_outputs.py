"""What a CLI run left in its output folder, file by file, for comparing a stopped-and-resumed
run with one never stopped (tests/milp/test_train.py, test_evaluate.py): tensors and JSON by
value, without what may differ between two runs of the same settings."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

#: timing fields, at any depth of a JSON file (metrics, search summaries, trial log lines, cost tables)
TIMINGS = frozenset({"wall_s", "timings_s", "elapsed_s", "timestamp", "invocation_wall_s", "train_s", "compute_s",
                     "wall_s_total"})


def untimed(data: object) -> object:
    """``data`` without :data:`TIMINGS` keys, at any depth."""
    if isinstance(data, dict):
        return {k: untimed(v) for k, v in data.items() if k not in TIMINGS}
    if isinstance(data, list):
        return [untimed(v) for v in data]
    return data


def run_outputs(out: Path, text_lines: Callable[[list[str]], list[str]] = lambda lines: lines) -> dict[str, object]:
    """``{relative path: content}`` of the files under ``out``: safetensors as (metadata, tensors)
    (their header order varies), JSON and JSONL :func:`untimed`, other text as its lines through
    ``text_lines``; the output folder's path reads ``OUT``; run files and plots are left out."""
    from safetensors import safe_open

    res: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name == "run.json" or p.suffix == ".png":
            continue
        key = str(p.relative_to(out))
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                res[key] = (f.metadata(), {n: f.get_tensor(n).tolist() for n in sorted(f.keys())})
            continue
        text = p.read_text().replace(str(out), "OUT")
        if p.suffix == ".json":
            res[key] = untimed(json.loads(text))
        elif p.suffix == ".jsonl":
            res[key] = [untimed(json.loads(x)) for x in text.splitlines()]
        else:
            res[key] = text_lines([x for x in text.splitlines() if not x.startswith("wall time:")])
    return res
