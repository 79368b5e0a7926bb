"""Test-wide setup: without a GPU, Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before triton decorates any kernel, so it is set here,
before the packages under test are imported.

Benchmarks (see bench/README.md): on CPU every op runs its torch path
(``kernels.use_backend("torch")``, autouse below) on the small workload grid; the session's
measured peaks go into the JSON's ``machine_info["milp"]``; once all benchmarks have run, the
ratios between implementations of a workload are added to each ``extra_info``
(``ratio_vs_<impl>``) and a summary table is printed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import math  # noqa: E402

import _util  # noqa: E402
import pytest  # noqa: E402

import kernels  # noqa: E402


@pytest.fixture(scope="session")
def peaks():
    """Compute and bandwidth ceilings measured once in this run (see ``_util.Peaks``)."""
    if _util.PEAKS is None:
        _util.PEAKS = _util.Peaks.measure()
    return _util.PEAKS


@pytest.fixture(autouse=True)
def _torch_backend_on_cpu():
    """On CPU the Triton interpreter is far too slow to benchmark: run the ops' torch path."""
    if torch.cuda.is_available():
        yield
    else:
        with kernels.use_backend("torch"):
            yield


def pytest_report_header(config):
    pk = _util.PEAKS
    return [
        f"milp bench: device={'cuda:' + torch.cuda.get_device_name() if _util.CUDA else 'cpu'} "
        f"size={_util.SIZE} dtype={_util.DTYPE} graphs={_util.GRAPHS}"
    ] + ([str(pk)] if pk else [])


# ----------------------------------------------------------------------------- JSON + ratios
def _entries(config):
    bs = getattr(config, "_benchmarksession", None)
    return [b.extra_info for b in (bs.benchmarks if bs else []) if getattr(b, "extra_info", None) is not None]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["milp"] = _util.machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _util.fill_ratios(_entries(config))
    _util.fill_ratios([b.get("extra_info") for b in output_json.get("benchmarks", [])])


# ----------------------------------------------------------------------------- summary
def _fmt(v, spec="{:.3g}"):
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return spec.format(v)
    return str(v)


_COLS = [
    ("impl", "impl", "{}"),
    ("time_ms", "ms", "{:.4g}"),
    ("graph_ms", "graph ms", "{:.4g}"),
    ("tokens_per_s", "tok/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("gbs", "GB/s", "{:.3g}"),
    ("pct_roofline", "%roof", "{:.1f}"),
    ("ratio_vs_base", "x base", "{:.2f}"),
    ("ratio_vs_loop", "x loop", "{:.2f}"),
    ("ratio_vs_padded", "x padded", "{:.2f}"),
    ("ratio_vs_peft", "x peft", "{:.2f}"),
    ("ratio_vs_milp", "x milp", "{:.2f}"),
]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    benches = [b for b in (bs.benchmarks if bs else []) if getattr(b, "extra_info", None) is not None]
    if not benches:
        return
    _util.fill_ratios([b.extra_info for b in benches])
    tr = terminalreporter
    pk = _util.PEAKS
    tr.write_sep("=", "milp benchmark summary")
    dev = torch.cuda.get_device_name() if _util.CUDA else "cpu"
    tr.write_line(
        f"device {dev} | dtype {str(_util.DTYPE).replace('torch.', '')} | size {_util.SIZE} "
        f"| commit {_util.git_commit()}"
    )
    if pk:
        tr.write_line(
            f"peaks measured in this run: {pk.tflops:.3g} TFLOP/s ({pk.matmul}), "
            f"{pk.gbs:.4g} GB/s ({pk.copy})"
        )
    if not _util.CUDA:
        shapes = "small shapes" if _util.SIZE == "small" else "full shapes"
        tr.write_line(f"CPU run: torch path of the ops at {shapes}; times say nothing of the GPU targets.")
    tr.write_line(
        "ms: CUDA-event median, L2 flushed (CPU: host-clock minimum); x <impl>: this time / that impl's "
        "time (< 1 = faster); %roof: roofline bound / time"
    )
    ours = [b for b in benches if {"workload", "impl", "time_ms"} <= b.extra_info.keys()]
    others = [b for b in benches if b not in ours]
    if ours:
        cols = [c for c in _COLS if any(b.extra_info.get(c[0]) is not None for b in ours)]
        rows = [["workload"] + [c[1] for c in cols]]
        last = None
        for b in ours:
            e = b.extra_info
            wl = e["workload"] if e["workload"] != last else ""
            last = e["workload"]
            rows.append([wl] + [_fmt(e.get(key), spec) for key, _, spec in cols])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, r in enumerate(rows):
            pairs = enumerate(zip(r, widths, strict=True))
            cells = (c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in pairs)
            tr.write_line("  ".join(cells))
            if i == 0:
                tr.write_line("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if others:
        tr.write_line("")
        tr.write_line("other benchmarks (median; extra_info):")
        for b in others:
            med = b.stats.median * 1e3 if getattr(b, "stats", None) and b.stats else None
            extra = ", ".join(f"{k}={_fmt(v)}" for k, v in list(b.extra_info.items())[:8])
            tr.write_line(f"  {b.fullname}  {_fmt(med, '{:.4g}')} ms  {extra}")
