"""Derive the path-dispatch thresholds of ``kernels.choose_path`` from a GPU benchmark run.

    python bench/dispatch.py RESULTS.json [MORE.json ...]            # print the proposal
    python bench/dispatch.py RESULTS.json --write                    # and merge it into
                                                                     # kernels/configs/<gpu>.json

Reads the forward entries of a ``pytest bench`` JSON made with ``MILP_BENCH_PATHS=1`` (as
``bench/gpu_run.sh quick`` does): for each workload, our op with every path forced
(``milp-split``, ``milp-fused``, ``milp-fused_t``). Then:

* ``decode_max_tokens`` — the largest token count ``T`` such that ``split`` is within
  ``--tolerance`` of the fastest path in every measured workload with at most ``T`` tokens
  (the split path: cuBLAS base + shrink + expand; ``choose_path`` takes it up to this ``T``).
  When that holds at the largest measured ``T`` too, and that size is a prefill workload, there
  is no upper bound (:data:`UNBOUNDED`): past the largest size the base is more of the same
  compute-bound GEMM, so cuBLAS's lead over our fused kernels' GEMM, which made the split path
  win, stays. When the largest measured size is a decode one (a run cut short before its
  prefill workloads), the run says nothing of where the split path stops winning: the
  threshold is left out;
* ``fused_max_rank`` — the largest bank rank at which ``fused`` (one launch, ``t`` in
  registers) is within tolerance of ``fused_t`` in every measured workload above
  ``decode_max_tokens``; 0 when it never is.

Thresholds the run has no data for are left out, so ``choose_path`` keeps its defaults
(or what ``python -m kernels.autotune`` wrote) for them. ``--write`` merges the proposal into
the ``"dispatch"`` object of the GPU's config file (atomically), with the evidence under
``"_dispatch_measured"``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

from kernels.tuning import PATHS, config_path_for

#: ``decode_max_tokens`` when the split path wins at every measured size (an int32's maximum)
UNBOUNDED = 2**31 - 1


def path_times(paths: list[str]) -> tuple[str | None, dict[str, dict]]:
    """``(device, {workload: {"T", "max_rank", "<path>": ms, ...}})`` from bench JSON files."""
    device = None
    rows: dict[str, dict] = defaultdict(dict)
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON (a file cut off while written), bad UTF-8
            raise SystemExit(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise SystemExit(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list)")
        mi = (data.get("machine_info") or {}).get("milp") or {}
        dev = mi.get("device")
        if device is None:
            device = dev
        elif dev != device:
            raise SystemExit(f"{path} ran on {dev!r}, the first file on {device!r}: one GPU at a time")
        for b in data.get("benchmarks") or []:
            e = (b.get("extra_info") if isinstance(b, dict) else None) or {}
            impl = e.get("impl", "")
            if e.get("op") != "fwd" or not impl.startswith("milp-") or impl[5:] not in PATHS:
                continue
            if not _measured(e.get("time_ms")):  # missing, zero, NaN, inf: no measurement
                continue
            row = rows[e["workload"]]
            row.update(T=int(e["T"]), max_rank=int(e["max_rank"]), phase=e.get("phase"))
            row[impl[5:]] = float(e["time_ms"])
    return device, dict(rows)


def _measured(ms) -> bool:
    """A time that is a measurement: a finite number > 0 (``bench/_util._measured``'s rule)."""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms) and ms > 0


def propose(rows: dict[str, dict], tolerance: float = 0.02) -> tuple[dict, dict]:
    """``(dispatch, evidence)`` by the rules of the module docstring."""
    complete = {w: r for w, r in rows.items() if all(p in r for p in PATHS)}
    evidence = {w: {k: r[k] for k in ("T", "max_rank", *PATHS)} for w, r in sorted(complete.items())}
    dispatch: dict[str, int] = {}
    if not complete:
        return dispatch, evidence

    def split_ok(r):
        return r["split"] <= (1 + tolerance) * min(r[p] for p in PATHS)

    decode_max = 0
    for T in sorted({r["T"] for r in complete.values()}):
        if all(split_ok(r) for r in complete.values() if r["T"] <= T):
            decode_max = T
        else:
            break
    largest = max(r["T"] for r in complete.values())
    if decode_max == largest:
        if not any(r.get("phase") == "prefill" for r in complete.values() if r["T"] == largest):
            return dispatch, evidence  # decode sizes only: no data on where split stops winning
        decode_max = UNBOUNDED  # split fastest up to the largest (prefill) size measured: no bound above
    dispatch["decode_max_tokens"] = decode_max
    above = [r for r in complete.values() if r["T"] > decode_max]
    if above:
        fused_rank = 0
        for R in sorted({r["max_rank"] for r in above}):
            if all(r["fused"] <= (1 + tolerance) * r["fused_t"] for r in above if r["max_rank"] <= R):
                fused_rank = R
            else:
                break
        dispatch["fused_max_rank"] = fused_rank
    return dispatch, evidence


def write(device: str, dispatch: dict, evidence: dict, out: Path | None = None) -> Path:
    """Merge ``dispatch`` into the GPU's config JSON (other keys kept), atomically."""
    path = Path(out) if out else config_path_for(device)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"device": device, "ops": {}}
    # every other knob stays, with the autotuner's evidence for it ("_measured…" keys)
    data["dispatch"] = {**(data.get("dispatch") or {}), **dispatch}
    data["_dispatch_measured"] = evidence
    from milp.config import atomic_write_text  # the project's atomic writer

    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) made with MILP_BENCH_PATHS=1 on a GPU")
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="a path within this fraction of the fastest counts as fastest (default 0.02)")
    ap.add_argument("--write", action="store_true", help="merge the proposal into kernels/configs/<gpu>.json")
    ap.add_argument("--out", type=Path, default=None, help="config JSON to write instead of kernels/configs/<gpu>.json")
    args = ap.parse_args(argv)
    missing = [p for p in args.json if not os.path.isfile(p)]
    if missing:
        ap.error(f"no such JSON file: {', '.join(missing)}")
    if not 0 <= args.tolerance < 1:
        ap.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if args.out is not None and not args.write:
        ap.error("--out names the config JSON that --write writes: pass --write too")
    if args.out is not None and args.out.is_dir():
        ap.error(f"--out must be a JSON file, got the directory {args.out}")
    device, rows = path_times(args.json)
    dispatch, evidence = propose(rows, args.tolerance)
    if not evidence:
        print("no workload has all of milp-split, milp-fused, milp-fused_t: run the forward benchmarks on a GPU "
              "with MILP_BENCH_PATHS=1 (bench/gpu_run.sh quick does)", file=sys.stderr)
        return 1
    if device is None or device == "cpu":
        ap.error("the runs are not from a GPU: thresholds from CPU times would mean nothing")
    print(f"{device}: {len(evidence)} workloads with every path timed")
    for w, r in evidence.items():
        best = min(PATHS, key=lambda p: r[p])
        print(f"  {w}: " + ", ".join(f"{p} {r[p]:.4g} ms" for p in PATHS) + f"  -> {best}")
    print("dispatch:", json.dumps(dispatch))
    if dispatch.get("decode_max_tokens") == UNBOUNDED:
        print("  (split within tolerance of the fastest at every measured size, the largest included: "
              "decode_max_tokens has no upper bound)")
    if not dispatch:
        print("  (split within tolerance of the fastest at every measured size, all of them decode sizes: the run "
              "says nothing of where split stops winning, so no threshold is proposed; time the prefill workloads too)")
        if args.write:
            print("nothing written", file=sys.stderr)
            return 1
    if args.write:
        print(f"wrote {write(device, dispatch, evidence, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
