"""Turn saved ``pytest bench --benchmark-json=...`` files into a markdown table and PNG plots.

    python bench/report.py RESULTS.json [MORE.json ...] [--out bench/results] [--name NAME] [--readme README.md]

writes ``<out>/<name>.md`` (header: device, dtype, torch/triton/peft versions, git commit,
the peaks measured in the run; the issue-3 speed targets and issue 5's runtime targets; one
table per op; other benchmarks), ``<out>/<name>_speedup_vs_users.png`` and
``<out>/<name>_pct_peak_vs_tokens.png``; with ``--readme``, a GPU run's summary (device,
versions, commit, the target tables, a link to the report) between the README's
``bench:gpu`` markers.
Several JSON files (one per ``gpu_run.sh`` stage) are merged: a benchmark measured in several is
taken from the newest run, and the header notes that and any device/dtype/version/commit the
files differ in. A time that is no measurement (missing, zero, NaN: a stage cut short, a failed
benchmark) gives no ratio, and a target without one says "no measurement". ``<name>`` defaults to
``gpu_<device>`` or ``cpu``. Works on CPU JSON too; its header then says that CPU times mean
nothing for the GPU targets. Needs only the standard library and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPS = OrderedDict(
    [
        ("fwd", "Forward `lora_linear` (inference)"),
        ("fwdbwd", "Forward + backward `lora_linear` (training: W frozen; dx, dA, dB)"),
        ("shrink", "`lora_shrink`"),
        ("expand", "`lora_expand_`"),
        ("layer-fwd", "Whole LLaMA decoder layer, forward (`test_decoder_layer.py`)"),
        ("layer-fwdbwd", "Whole LLaMA decoder layer, forward + backward"),
    ]
)
BASELINES = ("loop", "padded", "peft")
#: issue 3's speed targets: (label, op, predicate on extra_info, limit on milp time / base time)
TARGETS = [
    (
        "fused forward ≤ 1.10× base `x Wᵀ`, 4096–16384 tokens, 32 users, mixed ranks, 7B FFN",
        "fwd",
        lambda e: (
            e.get("phase") == "prefill"
            and e.get("shape") in ("7b-up", "7b-down")
            and 4096 <= e.get("T", 0) <= 16384
            and e.get("users") == 32
            and e.get("ranks") == "mix"
            and e.get("none_share", 0) <= 0.1
        ),
        1.10,
    ),
    (
        "decode ≤ 1.15× base GEMV, 32–256 users, mixed ranks, 7B FFN",
        "fwd",
        lambda e: (
            e.get("phase") == "decode"
            and e.get("shape") in ("7b-up", "7b-down")
            and 32 <= e.get("users", 0) <= 256
            and e.get("ranks") == "mix"
            and not e.get("none_share")
        ),
        1.15,
    ),
    (
        "forward+backward ≤ 1.25× base forward+backward, 32 users, mixed ranks, 7B FFN",
        "fwdbwd",
        lambda e: (
            e.get("shape") in ("7b-up", "7b-down")
            and e.get("users") == 32
            and e.get("ranks") == "mix"
            and e.get("none_share", 0) <= 0.1
        ),
        1.25,
    ),
]


# ----------------------------------------------------------------------------- loading
#: ``machine_info["milp"]`` fields that must agree across merged files (a note says where they do not)
SAME_RUN = ("device", "dtype", "bench_size", "backend", "torch", "triton", "git_commit")


def _read(path: str) -> dict:
    """One pytest-benchmark JSON; ``ValueError`` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list); "
                         "pass the files of `pytest bench --benchmark-json=...`")
    return data


def _when(data: dict) -> datetime:
    """When a file's run ended (``datetime``; the earliest possible time when it does not say)."""
    try:
        t = datetime.fromisoformat(str(data.get("datetime")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _key(b: dict) -> tuple:
    """What makes two benchmarks the same measurement: the workload and impl of ours, else the test."""
    if _ours(b):
        return ("ours", b["extra_info"]["workload"], b["extra_info"]["impl"])
    return ("other", b.get("fullname") or b.get("name") or id(b))


def load(paths: list[str]) -> tuple[dict, list[dict], list[str]]:
    """``(machine_info, all benchmarks, notes)`` from pytest-benchmark JSONs.

    ``machine_info`` is the first file's that has the bench's ``milp`` section (the header shows
    it; a note names every field of :data:`SAME_RUN` in which the files differ). A benchmark
    measured in several files is taken from the newest run (the file's ``datetime``; the later
    file on a tie), in the place it first appeared; a note says which.
    """
    runs = [(path, _read(path)) for path in paths]
    infos = [(path, data.get("machine_info") or {}) for path, data in runs]
    first = next((i for i, (_, mi) in enumerate(infos) if isinstance(mi.get("milp"), dict)), 0)
    data = runs[first][1] if runs else {}
    machine = dict(infos[first][1] if runs else {}, datetime=data.get("datetime"),
                   commit_info=data.get("commit_info") or {})
    notes = []
    for field in SAME_RUN:
        seen = {os.path.basename(path): (mi.get("milp") or {}).get(field) for path, mi in infos}
        seen = {p: v for p, v in seen.items() if v is not None}
        if len(set(seen.values())) > 1:
            notes.append(f"the files differ in {field}: " + ", ".join(f"{p} {v}" for p, v in seen.items())
                         + ("; do not compare across them" if field == "device" else "")
                         + f" (the header shows {os.path.basename(runs[first][0])}'s)")
    benches: list[dict] = []
    where: dict[tuple, tuple[int, datetime]] = {}  # key -> (index in benches, its run's time)
    dups: dict[tuple, list[str]] = {}
    for path, data in runs:
        when = _when(data)
        for b in data["benchmarks"]:
            if not isinstance(b, dict):
                continue
            b = dict(b, source=os.path.basename(path))
            key = _key(b)
            if key not in where:
                where[key] = (len(benches), when)
                benches.append(b)
                continue
            i, old_when = where[key]
            if benches[i]["source"] != b["source"]:
                dups.setdefault(key, [benches[i]["source"]]).append(b["source"])
            if when >= old_when:
                where[key] = (i, when)
                benches[i] = b
    if dups:
        shown = "; ".join(
            f"`{k[1]}` {k[2]} in {', '.join(files)}: {benches[where[k][0]]['source']}'s" if k[0] == "ours"
            else f"`{k[1]}` in {', '.join(files)}: {benches[where[k][0]]['source']}'s"
            for k, files in list(dups.items())[:5]
        )
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        notes.append(f"{len(dups)} benchmark(s) ran in several files; the newest run's is shown: {shown}{more}")
    return machine, benches, notes


def op_of(e: dict) -> str:
    """The op of an entry: ``extra_info["op"]``, else the workload key's prefix."""
    return e.get("op") or e["workload"].split(":", 1)[0]


def _ours(b: dict) -> bool:
    """A benchmark of ``_util.run`` (its ``time_ms`` may be missing: a run cut short)."""
    e = b.get("extra_info")
    return isinstance(e, dict) and isinstance(e.get("workload"), str) and isinstance(e.get("impl"), str)


def _ms(e: dict, key: str = "time_ms") -> float | None:
    """``e[key]`` where it is a measurement (a finite number > 0), else None."""
    v = e.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def fill_ratios(benches: list[dict]) -> None:
    """Same rule as ``bench/_util.fill_ratios``, recomputed (files may have been merged): a ratio
    the JSON holds against an entry not shown here, or from a time that is no measurement
    (missing, zero, NaN), is dropped."""
    for impls in workloads(benches).values():
        for name, e in impls.items():
            for k in [k for k in e if k.startswith(("ratio_vs_", "graph_ratio_vs_"))]:
                del e[k]
            for other, o in impls.items():
                if other == name:
                    continue
                if _ms(e) and _ms(o):
                    e[f"ratio_vs_{other}"] = _ms(e) / _ms(o)
                if _ms(e, "graph_ms") and _ms(o, "graph_ms"):
                    e[f"graph_ratio_vs_{other}"] = _ms(e, "graph_ms") / _ms(o, "graph_ms")


def workloads(benches: list[dict]) -> OrderedDict[str, dict[str, dict]]:
    """``workload -> impl -> extra_info`` in first-seen order."""
    out: OrderedDict[str, dict[str, dict]] = OrderedDict()
    for b in benches:
        if _ours(b):
            e = b["extra_info"]
            out.setdefault(e["workload"], {})[e["impl"]] = e
    return out


# ----------------------------------------------------------------------------- markdown
def _f(v, spec="{:.3g}") -> str:
    if v is None or isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return str(v)
    return spec.format(v) if isinstance(v, (int, float)) else str(v)


def _row(cells) -> str:
    """A markdown table row: a ``|`` inside a cell escaped, a line break made a space."""
    return "| " + " | ".join(" ".join(str(c).splitlines()).replace("|", "\\|") for c in cells) + " |"


def _speedup(impls: dict, other: str) -> float | None:
    m, o = impls.get("milp"), impls.get(other)
    if not m or not o or not _ms(m) or not _ms(o):
        return None
    return _ms(o) / _ms(m)


def _run_info(machine: dict) -> tuple[dict, str, str]:
    """``(machine_info["milp"], device, git commit)`` of a run, ``"unknown"`` where the JSON does not say."""
    mi = _obj(machine.get("milp"))
    commit = mi.get("git_commit") or _obj(machine.get("commit_info")).get("id") or "unknown"
    return mi, str(mi.get("device") or "unknown"), str(commit)


def _q(v):
    return "?" if v is None or v == "" else v


def _recorded(mi: dict, key: str, kind: type, show) -> str:
    """``show(mi[key])`` for a field newer bench files record (``None`` or a ``kind``); older files
    lack it, a damaged one reads ``?``."""
    if key not in mi:
        return "not recorded (older bench files)"
    v = mi[key]
    return show(v) if v is None or isinstance(v, kind) else "?"


def _obj(v) -> dict:
    """``v`` if it is a JSON object, else ``{}``: a damaged field of a saved run reads as unknown."""
    return v if isinstance(v, dict) else {}


def header(machine: dict, paths: list[str], notes: list[str]) -> list[str]:
    mi, dev, commit = _run_info(machine)
    cpu = dev == "cpu"
    pk = _obj(mi.get("peaks"))
    title = "CPU example run (not a GPU result)" if cpu else dev
    lines = [f"# milp-toolkit benchmarks — {' '.join(title.splitlines())}", ""]
    if cpu:
        lines += [
            "> **CPU run.** The ops ran their torch path at small shapes (LLaMA-7B FFN / 16) on a shared",
            "> CPU. Absolute times and ratios here say nothing about the GPU speed targets; this file",
            "> shows what `pytest bench` and `bench/report.py` produce.",
            "",
        ]
    rows = [
        ("device", dev + (f" (CUDA {mi['cuda']})" if mi.get("cuda") else "")),
        ("backend", _q(mi.get("backend"))),
        ("dtype", _q(mi.get("dtype"))),
        ("torch / triton / peft", f"{_q(mi.get('torch'))} / {_q(mi.get('triton'))} / {_q(mi.get('peft'))}"),
        ("python", _q(machine.get("python_version"))),
        ("git commit", commit),
        ("date (UTC)", _q(machine.get("datetime"))),
        ("workload grid", _q(mi.get("bench_size"))),
        ("config files", _recorded(mi, "config_files", list,
                                   lambda v: ", ".join(map(str, v or [])) or "none (heuristics)")),
        ("dispatch knobs", _recorded(mi, "dispatch", dict,
                                     lambda v: ", ".join(f"{k}={x}" for k, x in (v or {}).items()) or "?")),
        ("peak compute (measured this run)", f"{_f(pk.get('tflops'))} TFLOP/s — {_q(pk.get('matmul'))}"),
        ("peak bandwidth (measured this run)", f"{_f(pk.get('gbs'), '{:.4g}')} GB/s — {_q(pk.get('copy'))}"),
        ("sources", ", ".join(os.path.basename(p) for p in paths)),
    ]
    lines += ["| | |", "|---|---|"] + [_row(r) for r in rows] + [""]
    lines += [f"> note: {' '.join(n.splitlines())}" for n in notes] + ([""] if notes else [])
    lines += [
        "Times: median of CUDA-event timings with the L2 cache flushed before each repetition (CPU:",
        "host-clock minimum). `graph ms`: the same over CUDA-graph replays (decode, forward + backward). "
        "`milp/base`: our time",
        "over the base linear's (the floor; the targets' ratio). `×loop`, `×padded`, `×peft`: speedup of",
        "ours over that baseline (its time / ours; > 1 = ours faster); `×milp-split` etc.: the same for",
        "our op with its path forced (`MILP_BENCH_PATHS=1`; > 1 = the automatic choice was faster).",
        "TFLOP/s and GB/s count the useful FLOPs and minimum bytes (bench/README.md); `%roof` =",
        "roofline bound (max of FLOPs/peak, bytes/peak) / time.",
        "",
    ]
    return lines


def targets_section(wls: OrderedDict[str, dict[str, dict]], cpu: bool) -> list[str]:
    lines = ["## Speed targets (issue 3)", ""]
    if cpu:
        lines += [
            "Not applicable on CPU (the targets are H100/A100 bf16); rows listed where the grid has them.",
            "",
        ]
    lines += [
        "`floor`: the roofline bound of the problem over that of the base alone (what no kernel beats).",
        "",
        "| target | workload | milp/base | graph milp/base | floor | limit | met |",
        "|---|---|---|---|---|---|---|",
    ]
    found = False
    for label, op, pred, limit in TARGETS:
        rows = [(wl, impls) for wl, impls in wls.items() if _matches(op, pred, impls)]
        if not rows and not cpu:  # cut short, or not in the files given: say so, do not drop the target
            lines.append(_row([label, "–", "–", "–", "–", f"≤ {limit:.2f}", "no measurement"]))
        for wl, impls in rows:
            found = True
            m, b = impls.get("milp") or {}, impls.get("base") or {}
            r = m.get("ratio_vs_base")
            g = m.get("graph_ratio_vs_base")
            measured = [x for x in (r, g) if x is not None]
            met = ("n/a (CPU)" if cpu else "no measurement" if not measured
                   else "yes" if min(measured) <= limit else "**no**")
            roof_m, roof_b = _ms(m, "roofline_ms"), _ms(b, "roofline_ms")
            floor = roof_m / roof_b if roof_m and roof_b else None
            lines.append(_row([label, f"`{wl.split(':', 1)[-1]}`", _f(r, "{:.3f}"), _f(g, "{:.3f}"),
                               _f(floor, "{:.3f}"), f"≤ {limit:.2f}", met]))
    if not found and cpu:
        lines.append("| (no workload of this run matches a target) | | | | | | |")
    return lines + [""]


def _matches(op: str, pred, impls: dict[str, dict]) -> bool:
    """Whether a workload is one of a target's: its fields (milp's entry, else any) are the op's
    and pass ``pred``; a field of the wrong type (an older or damaged JSON) does not match."""
    e = impls.get("milp") or next(iter(impls.values()))
    try:
        return op_of(e) == op and bool(pred(e))
    except (TypeError, ValueError):
        return False


#: issue 5's runtime targets: (label, the prefix of its workloads, the extra_info key of the target,
#: of the measured value, the baseline whose time ratio gives the value when files were merged,
#: the target where the JSON does not hold it; at least)
RUNTIME_TARGETS = [
    ("joint training of 16 users ≥ 4× sequential per-user training (tokens/s)", "runtime-train-",
     "target_speedup_vs_sequential", "speedup_vs_sequential", "loop", 4.0),
    ("mixed-user decode of 32 users ≥ 0.85× the base model's tokens/s", "runtime-decode-",
     "target_tokens_per_s_vs_base", "tokens_per_s_vs_base", "base", 0.85),
]


def runtime_targets_section(wls: OrderedDict[str, dict[str, dict]], cpu: bool) -> list[str]:
    """Issue 5's targets from the ``bench/test_runtime.py`` workloads: a row per workload of a
    target, measured or not; on a GPU also a row for a target no workload of the run has."""
    rows = []
    for label, prefix, target_key, value_key, other, default in RUNTIME_TARGETS:
        matched = False
        for wl, impls in wls.items():
            m = impls.get("milp") or {}
            if not wl.startswith(prefix) and target_key not in m:
                continue
            matched = True
            value = _ms(m, value_key)
            if value is None and m.get(f"ratio_vs_{other}"):
                value = 1.0 / m[f"ratio_vs_{other}"]  # other's time / ours
            target = _ms(m, target_key) or default
            met = ("n/a (CPU)" if cpu else "no measurement" if value is None
                   else "yes" if value >= target else "**no**")
            ceiling = m.get("bytes_floor_vs_base") if value_key == "tokens_per_s_vs_base" else None
            rows.append(_row([label, f"`{wl.split(':', 1)[-1]}`", _f(value, "{:.2f}"), _f(ceiling, "{:.3f}"),
                              f"≥ {target:.2f}", met]))
        if not matched and not cpu:
            rows.append(_row([label, "–", "–", "–", f"≥ {default:.2f}", "no measurement"]))
    if not rows:
        return []
    return [
        "## Runtime targets (issue 5)",
        "",
        "`ceiling`: for decode, the model's weights over weights + every user's adapters (the bytes",
        "bound of a memory-bound step: no implementation reaches a higher ratio).",
        "",
        "| target | workload | measured | ceiling | target | met |",
        "|---|---|---|---|---|---|",
    ] + rows + [""]


def op_section(op: str, title: str, wls: OrderedDict[str, dict[str, dict]]) -> list[str]:
    rows = [(wl, impls) for wl, impls in wls.items() if op_of(next(iter(impls.values()))) == op]
    if not rows:
        return []
    present = [b for b in BASELINES if any(b in impls for _, impls in rows)]
    # other implementations of the same workloads (e.g. milp-split: our op with a forced path)
    present += sorted({i for _, impls in rows for i in impls} - set(BASELINES) - {"milp", "base"})
    graph = any(_ms(impls.get("milp", {}), "graph_ms") for _, impls in rows)
    cols = (
        ["workload", "milp ms"] + (["graph ms"] if graph else []) + ["base ms"] + [f"{b} ms" for b in present]
    )
    cols += ["milp/base"] + [f"×{b}" for b in present] + ["TFLOP/s", "GB/s", "%roof", "bound", "rel err"]
    lines = [f"## {title}", "", _row(cols), "|" + "---|" * len(cols)]
    for wl, impls in rows:
        m = impls.get("milp", {})
        timed = _ms(m) is not None  # figures derived from a time that is no measurement are not shown
        cells = [f"`{wl.split(':', 1)[-1]}`", _f(_ms(m), "{:.4g}")]
        if graph:
            cells.append(_f(_ms(m, "graph_ms"), "{:.4g}"))
        cells.append(_f(_ms(impls.get("base", {})), "{:.4g}"))
        cells += [_f(_ms(impls.get(b, {})), "{:.4g}") for b in present]
        cells.append(_f(m.get("ratio_vs_base"), "{:.3f}"))
        cells += [_f(_speedup(impls, b), "{:.2f}") for b in present]
        err = m.get("rel_err", m.get("rel_err_dx"))
        cells += [
            _f(m.get("tflops") if timed else None),
            _f(m.get("gbs") if timed else None, "{:.4g}"),
            _f(m.get("pct_roofline") if timed else None, "{:.1f}"),
            _f(m.get("bound")),
            _f(err, "{:.1e}"),
        ]
        lines.append(_row(cells))
    return lines + [""]


def others_section(benches: list[dict]) -> list[str]:
    rest = [b for b in benches if not _ours(b)]
    if not rest:
        return []
    lines = [
        "## Other benchmarks",
        "",
        "| benchmark | median ms | rounds | extra_info |",
        "|---|---|---|---|",
    ]
    for b in rest:
        st = b.get("stats") if isinstance(b.get("stats"), dict) else {}
        med = st.get("median")
        extra = b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}
        lines.append(_row([
            f"`{b.get('fullname') or b.get('name') or '?'}`",
            _f(med * 1e3 if isinstance(med, (int, float)) else None, "{:.4g}"),
            _f(st.get("rounds"), "{}"),
            ", ".join(f"{k}={_f(v) if isinstance(v, float) else v}" for k, v in extra.items()),
        ]))
    return lines + [""]


# ----------------------------------------------------------------------------- plots
def _series(wls, key_fn, x_field):
    out: OrderedDict[tuple, list[tuple[float, dict]]] = OrderedDict()
    for impls in wls.values():
        m = impls.get("milp")
        if not m:
            continue
        try:
            key = key_fn(m)
            hash(key)
        except (KeyError, TypeError):  # an entry without the workload fields (another benchmark)
            key = None
        x = _ms(m, x_field)  # a log axis: a positive number
        if key is None or x is None:
            continue
        out.setdefault(key, []).append((x, impls))
    order = {op: i for i, op in enumerate(OPS)}
    keys = sorted(
        (k for k, v in out.items() if len({x for x, _ in v}) >= 2), key=lambda k: order.get(k[0], 99)
    )
    return OrderedDict((k, sorted(out[k], key=lambda t: t[0])) for k in keys)


def _none_label(share) -> str:
    """A panel title's `` none<pct>%`` for a workload's share of tokens without an adapter; nothing
    when there are none, or when the field is no number (an older or damaged JSON)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or not share:
        return ""
    return f" none{round(share * 100)}%"


def _grid(n):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, axes.flat


def plot_speedup_vs_users(wls, path: Path, title: str, max_panels: int = 16) -> bool:
    def key(e):
        extra = () if e["phase"] == "decode" else (f"T{e['T']}",)
        return (e["op"], e["shape"], e["phase"], e["ranks"], e.get("none_share", 0)) + extra

    series = list(_series(wls, key, "users").items())[:max_panels]
    if not series:
        return False
    plt, fig, axes = _grid(len(series))
    for ax, (k, pts) in zip(axes, series, strict=False):
        xs = [x for x, _ in pts]
        for b, style in (("loop", "o-"), ("padded", "s-"), ("peft", "^-")):
            ys = [_speedup(impls, b) for _, impls in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=f"vs {b}")
        fl = [_speedup(impls, "base") for _, impls in pts]
        if any(y is not None for y in fl):
            ax.plot(xs, [y if y is not None else float("nan") for y in fl], "k--", label="base/milp (≤1)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel("speedup of milp (×)")
        none = _none_label(k[4])
        ax.set_title(f"{k[0]} {k[1]} {k[2]} {k[3]}{none} {' '.join(k[5:])}".strip(), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Speedup of milp over each baseline vs number of users — {title}", fontsize=10)
    fig.tight_layout()
    _save(fig, path, plt)
    return True


def plot_pct_peak_vs_tokens(wls, path: Path, title: str, max_panels: int = 16) -> bool:
    def key(e):
        if e["phase"] != "prefill":
            return None
        return (e["op"], e["shape"], e["ranks"], e["users"], e.get("none_share", 0))

    series = list(_series(wls, key, "T").items())[:max_panels]
    if not series:
        return False
    plt, fig, axes = _grid(len(series))
    for ax, (k, pts) in zip(axes, series, strict=False):
        xs = [x for x, _ in pts]
        for impl, style in (
            ("milp", "o-"),
            ("base", "k--"),
            ("loop", "s:"),
            ("padded", "d:"),
            ("peft", "^:"),
        ):
            ys = [_ms(impls.get(impl, {}), "pct_roofline") if _ms(impls.get(impl, {})) else None for _, impls in pts]
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("% of roofline bound")
        none = _none_label(k[4])
        ax.set_title(f"{k[0]} {k[1]} {k[2]} U{k[3]}{none}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"% of the measured peak (roofline bound / time) vs tokens — {title}", fontsize=10)
    fig.tight_layout()
    _save(fig, path, plt)
    return True


def _save(fig, path: Path, plt) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".md", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- README
README_START = "<!-- bench:gpu:start (bench/report.py --readme writes between these lines) -->"
README_END = "<!-- bench:gpu:end -->"


def readme_block(machine: dict, wls: OrderedDict[str, dict[str, dict]], report_link: str) -> list[str]:
    """The README's summary of a GPU run: where, with what, at which commit; the targets."""
    mi, dev, commit = _run_info(machine)
    lines = [
        f"Latest GPU run: **{dev}**, {_q(mi.get('dtype'))}, torch {_q(mi.get('torch'))}, "
        f"triton {_q(mi.get('triton'))}, commit `{commit[:12]}`, {_q(machine.get('datetime'))} (UTC). "
        f"Every table and plot: [{report_link}]({report_link}).",
        "",
    ]
    body = targets_section(wls, cpu=False) + runtime_targets_section(wls, cpu=False)
    return lines + ["#" + ln if ln.startswith("## ") else ln for ln in body]  # sections one level down


def _readme_text(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(
            README_END):
        raise ValueError(f"{readme} must hold the line {README_START!r}, then {README_END!r}, once each")
    return text


def _readme_with(readme: Path, block: list[str]) -> str:
    """``readme``'s text with ``block`` between :data:`README_START` and :data:`README_END`."""
    text = _readme_text(readme)
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    return head + README_START + "\n" + "\n".join(block).rstrip("\n") + "\n" + README_END + tail


def update_readme(readme: Path, block: list[str]) -> None:
    """Replace what stands between :data:`README_START` and :data:`README_END` in ``readme``."""
    _write_text(readme, _readme_with(readme, block))


# ----------------------------------------------------------------------------- main
def build(paths: list[str], out: Path, name: str | None = None, readme: Path | None = None) -> list[Path]:
    """Write the report (markdown + plots) to ``out``; with ``readme``, also its summary between
    the README's markers (GPU runs only). Returns the files written."""
    machine, benches, notes = load(paths)
    fill_ratios(benches)
    wls = workloads(benches)
    _, dev, _ = _run_info(machine)
    cpu = dev == "cpu"
    if readme is not None:  # refuse before writing anything
        if cpu:
            raise ValueError("--readme takes a GPU run: the README shows GPU results only (this run is a CPU run)")
        if dev == "unknown":
            raise ValueError("--readme takes a GPU run: the JSON does not say which device it ran on "
                             "(no machine_info['milp']['device'])")
        _readme_text(readme)
    if name is None:
        name = "cpu" if cpu else "gpu_" + re.sub(r"[^a-z0-9]+", "_", dev.lower()).strip("_")
    out.mkdir(parents=True, exist_ok=True)
    # every file is made in a staging folder first (the plots take seconds) and moved into place
    # at the end, the README last: a report stopped or failing part-way leaves the old files, not
    # new plots beside an old table
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        title = "CPU (torch path, small shapes)" if cpu else dev
        made = []
        plots = []
        for plot, stem, alt in ((plot_speedup_vs_users, "speedup_vs_users", "speedup vs users"),
                                (plot_pct_peak_vs_tokens, "pct_peak_vs_tokens", "% of peak vs tokens")):
            p = stage / f"{name}_{stem}.png"
            if plot(wls, p, title):
                made.append(p)
                plots.append(f"![{alt}]({p.name})")
        lines = header(machine, paths, notes) + targets_section(wls, cpu) + runtime_targets_section(wls, cpu)
        for op, t in OPS.items():
            lines += op_section(op, t, wls)
        for op in dict.fromkeys(op_of(next(iter(i.values()))) for i in wls.values()):
            if op not in OPS:  # e.g. a decoder-layer or runtime benchmark that uses _util.run
                lines += op_section(op, f"`{op}`", wls)
        lines += others_section(benches)
        lines += (["## Plots", ""] + plots + [""]) if plots else []
        md = out / f"{name}.md"
        _write_text(stage / md.name, "\n".join(lines))
        readme_text = None
        if readme is not None:
            link = os.path.relpath(md.resolve(), readme.resolve().parent).replace(os.sep, "/")
            readme_text = _readme_with(readme, readme_block(machine, wls, link))
        written = [out / p.name for p in made]
        for p in made + [stage / md.name]:  # the plots, then the table that shows them
            os.replace(p, out / p.name)
        if readme_text is not None:
            _write_text(readme, readme_text)
            written.append(readme)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [md] + written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "json", nargs="+", help="pytest-benchmark JSON file(s) from `pytest bench --benchmark-json=...`"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    ap.add_argument("--name", default=None, help="file stem (default: gpu_<device> or cpu)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="also write the run's summary (device, versions, commit, the targets) between the "
                         "bench:gpu markers of this README (GPU runs only)")
    args = ap.parse_args(argv)
    missing = [p for p in args.json if not os.path.isfile(p)]
    if missing:
        ap.error(f"no such JSON file: {', '.join(missing)}")
    if args.readme is not None and not args.readme.is_file():
        ap.error(f"--readme: no such file: {args.readme}")
    if args.name is not None and (not args.name or args.name in (".", "..") or "/" in args.name
                                  or os.sep in args.name):
        ap.error(f"--name is a file stem (the files are <out>/<name>.md and its PNGs), got {args.name!r}; "
                 "put the folder in --out")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out must be a folder, got the file {args.out}")
    try:
        for p in build(args.json, args.out, args.name, args.readme):
            print(p)
    except ValueError as exc:
        ap.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
