"""The CPU-testable logic of the tools a rare GPU session runs or feeds: bench/dispatch.py
(thresholds from forced-path times, merged into kernels/configs/<gpu>.json), bench/profile_step.py
(arguments, the CUDA branch of its host/device verdict, host time by package), bench/report.py
(CLI refusals, plots of damaged entries), bench/_util.py (environment knobs, FLOP/byte counts and
the derived figures by hand) and bench/gpu_run.sh (a dry run with a stand-in python: what comes
back from $OUT). What fails there only on the GPU wastes a 15-minute lease."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_bench_tools import ROOT, _module

dispatch = _module("dispatch")
report = _module("report")

H100 = "NVIDIA H100 80GB HBM3"


def _bench(workload, impl, T, max_rank, ms, phase=None):
    phase = phase or ("decode" if T <= 256 else "prefill")
    return {"extra_info": {"workload": workload, "impl": impl, "op": "fwd", "T": T, "max_rank": max_rank,
                           "phase": phase, "time_ms": ms}}


def _run(tmp_path, times, name="run.json", device=H100):
    """``times``: {(T, max_rank): (split, fused, fused_t)} -> a pytest-benchmark JSON path."""
    benches = []
    for (T, R), per_path in times.items():
        wl = f"fwd:7b-up-T{T}-R{R}"
        benches.append(_bench(wl, "milp", T, R, 1.0))
        benches += [_bench(wl, f"milp-{p}", T, R, ms) for p, ms in zip(dispatch.PATHS, per_path, strict=True)]
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {"milp": {"device": device}}, "benchmarks": benches}))
    return path


# =========================================================================== bench/dispatch.py
def test_a_run_cut_short_after_its_decode_workloads_proposes_no_unbounded_split(tmp_path, capsys):
    """The quick stage runs the forward's decode workloads before its prefill ones: cut short
    there, split won at every (decode) size measured. That says nothing of prefill, yet the
    proposal was 'split at any size' (decode_max_tokens = UNBOUNDED), which --write committed."""
    run = _run(tmp_path, {(32, 96): (0.10, 0.50, 0.40), (256, 96): (0.20, 0.90, 0.60)})
    rows = dispatch.path_times([str(run)])[1]
    proposal, evidence = dispatch.propose(rows)
    assert proposal == {} and len(evidence) == 2
    cfg = tmp_path / "gpu.json"
    before = json.dumps({"device": "x", "ops": {}, "dispatch": {"decode_max_tokens": 64}})
    cfg.write_text(before)
    assert dispatch.main([str(run), "--write", "--out", str(cfg)]) == 1
    assert cfg.read_text() == before  # neither a threshold nor evidence that does not back it
    assert "says nothing of where split stops winning" in capsys.readouterr().out
    # the same run with a prefill size where split still wins: no bound above, as documented
    more = _run(tmp_path, {(32, 96): (0.10, 0.50, 0.40), (4096, 96): (1.0, 2.0, 1.5)}, name="more.json")
    assert dispatch.propose(dispatch.path_times([str(more)])[1])[0] == {"decode_max_tokens": dispatch.UNBOUNDED}
    # split losing at a decode size bounds it there, prefill measured or not
    lost = _run(tmp_path, {(32, 96): (0.10, 0.50, 0.40), (256, 96): (0.90, 0.50, 0.40)}, name="lost.json")
    assert dispatch.propose(dispatch.path_times([str(lost)])[1])[0] == {"decode_max_tokens": 32,
                                                                       "fused_max_rank": 0}


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0, True])
@pytest.mark.parametrize("path", dispatch.PATHS)
def test_a_forced_path_time_that_is_no_measurement_leaves_its_workload_out(tmp_path, bad, path):
    """A zero time made split 'fastest' at that size; a NaN one passed min() and landed in the
    committed evidence. Such a workload counts as not measured (report.py's rule too)."""
    good = {(32, 96): (0.10, 0.50, 0.40), (4096, 96): (1.40, 1.50, 1.20), (16384, 96): (5.0, 6.0, 4.5)}
    times = dict(good)
    per = list(times[(4096, 96)])
    per[dispatch.PATHS.index(path)] = bad
    times[(4096, 96)] = tuple(per)
    got = dispatch.propose(dispatch.path_times([str(_run(tmp_path, times))])[1])
    without = {k: v for k, v in good.items() if k != (4096, 96)}
    want = dispatch.propose(dispatch.path_times([str(_run(tmp_path, without, name="without.json"))])[1])
    assert got == want and "fwd:7b-up-T4096-R96" not in got[1]


def test_dispatch_cli_refuses_before_reading_what_it_cannot_use(tmp_path, capsys):
    run = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4), (4096, 96): (2.0, 1.5, 1.2)})
    cfg = tmp_path / "gpu.json"
    with pytest.raises(SystemExit):  # --out alone wrote nothing and said nothing
        dispatch.main([str(run), "--out", str(cfg)])
    assert "pass --write too" in capsys.readouterr().err and not cfg.exists()
    with pytest.raises(SystemExit):  # a folder: refused up front, not after the proposal was printed
        dispatch.main([str(run), "--write", "--out", str(tmp_path)])
    assert "--out must be a JSON file" in capsys.readouterr().err
    for content in ('{"machine_info": {"milp": {"device": "x"}}, "benchmarks": [', "[]", b"\xff\xfe"):
        cut = tmp_path / "bench_cut.json"  # a stage killed while its JSON was written
        cut.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(SystemExit, match="bench_cut.json: not a"):
            dispatch.main([str(run), str(cut)])


def test_dispatch_write_keeps_a_config_whose_dispatch_is_null(tmp_path):
    cfg = tmp_path / "gpu.json"
    cfg.write_text(json.dumps({"device": "x", "ops": {}, "dispatch": None, "_note": "kept"}))
    dispatch.write("x", {"decode_max_tokens": 256}, {}, cfg)
    data = json.loads(cfg.read_text())
    assert data["dispatch"] == {"decode_max_tokens": 256} and data["_note"] == "kept"


TS = {32: "decode", 256: "decode", 512: "prefill", 4096: "prefill", 16384: "prefill"}
WORKLOADS = st.dictionaries(st.tuples(st.sampled_from(sorted(TS)), st.sampled_from([16, 96, 256])),
                            st.tuples(*[st.floats(0.01, 10.0)] * 3), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=WORKLOADS, tolerance=st.sampled_from([0.0, 0.02, 0.1]))
def test_a_written_proposal_is_read_back_as_measured_and_keeps_every_other_knob(tmp_path, times, tolerance):
    """Whatever the times: the strict reader accepts the merged file, keeps the knobs and entries
    the file had, and choose_path sends every measured size up to decode_max_tokens to split,
    where split was within tolerance; above it, fused only where fused was within tolerance of
    fused_t."""
    import torch

    import kernels.tuning as tuning

    rows = {f"fwd:w-T{T}-R{R}": {"T": T, "max_rank": R, "phase": TS[T], **dict(zip(dispatch.PATHS, t, strict=True))}
            for (T, R), t in times.items()}
    proposal, evidence = dispatch.propose(rows, tolerance)
    assert set(evidence) == set(rows)
    cfg = tmp_path / "gpu.json"
    entry = {"max_tokens": 64, "block_m": 16}
    cfg.write_text(json.dumps({"device": "x", "ops": {"shrink": [entry]},
                               "dispatch": {"split_expand_first_max_tokens": 512, "fused_max_rank": 7,
                                            "_measured_split_order": [1]}}))
    dispatch.write("x", proposal, evidence, cfg)
    old = os.environ.get("MILP_KERNEL_CONFIGS")
    os.environ["MILP_KERNEL_CONFIGS"] = str(cfg)
    tuning._load_table.cache_clear()
    try:
        table = tuning._load_table(str(cfg))  # raises on an unknown key or knob, a bad value
        knobs = dict(tuning._dispatch_knobs(torch.device("cpu")))
        paths = {w: tuning.choose_path(r["T"], r["max_rank"], device=torch.device("cpu")) for w, r in rows.items()}
    finally:
        if old is None:
            os.environ.pop("MILP_KERNEL_CONFIGS")
        else:
            os.environ["MILP_KERNEL_CONFIGS"] = old
        tuning._load_table.cache_clear()
    assert table["shrink"] == [entry] and knobs["split_expand_first_max_tokens"] == 512
    assert table["__dispatch__"]["_measured_split_order"] == [1]
    for name, value in proposal.items():
        assert knobs[name] == value
    def split_within(r):
        return r["split"] <= (1 + tolerance) * min(r[q] for q in dispatch.PATHS)

    if "decode_max_tokens" not in proposal:  # only when every size is a decode one, split within tolerance
        assert all(TS[r["T"]] == "decode" and split_within(r) for r in rows.values())
        return
    for w, r in rows.items():
        if r["T"] <= proposal["decode_max_tokens"]:
            assert paths[w] == "split" and split_within(r)
        elif paths[w] == "fused":
            assert r["fused"] <= (1 + tolerance) * r["fused_t"]


# =========================================================================== bench/profile_step.py
@pytest.fixture
def profile_step(monkeypatch):
    monkeypatch.setenv("MILP_BENCH_SIZE", "small")
    monkeypatch.setenv("MILP_NVTX", "1")  # what the script sets by default, undone after the test
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ first
    mod = _module("profile_step")

    def built(*a, **k):
        raise AssertionError("the problem was built before the arguments were refused")

    monkeypatch.setattr(mod.U, "problem", built)
    return mod


def test_profile_step_refuses_more_users_than_adapter_tokens(profile_step, tmp_path, capsys):
    """--tokens 32 --users 32 passed the check, then _util.Problem raised a ValueError: 10% of
    a prefill batch's tokens carry no adapter, which leaves 29 for 32 users."""
    with pytest.raises(SystemExit):
        profile_step.main(["--tokens", "32", "--users", "32", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--tokens 32 has 29 adapter tokens" in err and "--users 32" in err


def test_profile_step_refuses_an_out_that_is_a_file_before_profiling(profile_step, tmp_path, capsys):
    """The folder was made after the profile: a file there crashed the run at its very end."""
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit):
        profile_step.main(["--tokens", "40", "--users", "4", "--out", str(afile)])
    assert "--out" in capsys.readouterr().err


def test_host_time_by_package_names_an_installed_file_by_its_site_packages_folder():
    """On the device Python is /opt/torch/.venv: every installed package's path holds '/torch/',
    so numpy's or typing_extensions' host time was summed as torch's."""
    ps = _module("profile_step")
    site = "/opt/torch/.venv/lib/python3.12/site-packages"
    assert ps._package(f"{site}/numpy/_core/fromnumeric.py") == "other"
    assert ps._package(f"{site}/typing_extensions.py") == "other"
    assert ps._package(f"{site}/torch/autograd/function.py") == "torch"
    assert ps._package(f"{site}/triton/runtime/jit.py") == "triton"
    assert ps._package(f"{site}/kernels/library.py") == "kernels"  # a non-editable install
    assert ps._package("/usr/lib/python3/dist-packages/torch/nn/functional.py") == "torch"
    assert ps._package("/root/repo/kernels/library.py") == "kernels"  # the editable checkout
    assert ps._package("/root/repo/milp/runtime.py") == "milp"
    assert ps._package("/usr/lib/python3.12/contextlib.py") == "other"
    assert ps._package("~") == "C calls" and ps._package("<frozen importlib._bootstrap>") == "other"


def test_host_profile_cuda_branch_reports_device_time_per_step_and_the_bound(monkeypatch):
    """The CUDA-only lines of the verdict, with stand-in events: elapsed ms over the steps in µs."""
    ps = _module("profile_step")
    elapsed = {"ms": 0.0}

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            pass

        def elapsed_time(self, other):
            return elapsed["ms"]

    monkeypatch.setattr(ps.U, "CUDA", True)
    monkeypatch.setattr(ps.U, "_sync", lambda: None)
    monkeypatch.setattr(ps.torch.cuda, "Event", Event)
    calls = []
    elapsed["ms"] = 4000.0  # 4 s of device time for 4 steps: the host issued far faster
    text = ps.host_profile(lambda: calls.append(1), 4)
    assert "device 1000000.0 us/step between events -> device-bound" in text
    assert len(calls) == 8  # the timed steps, then the cProfile'd ones
    elapsed["ms"] = 0.0  # the device idle: all of the time was the host's
    assert "-> host-bound: the device waited for the host" in ps.host_profile(lambda: None, 2)


# =========================================================================== bench/report.py
def _fwd(impl, users, ms, **over):
    e = {"workload": f"fwd:d-U{users}", "impl": impl, "op": "fwd", "shape": "7b-up", "phase": "decode",
         "ranks": "mix", "none_share": 0.0, "T": users, "users": users, "time_ms": ms, "pct_roofline": 50.0}
    e.update(over)
    return {"extra_info": e}


@pytest.mark.parametrize("share", ["0.5", float("nan"), float("inf")])
def test_plots_of_entries_whose_none_share_is_no_number(tmp_path, share):
    """A panel title took round(none_share * 100): a string or NaN there crashed the report
    (TypeError, ValueError, OverflowError) after its tables were built."""
    benches = [_fwd(i, u, ms, none_share=share) for u in (8, 32) for i, ms in (("milp", 1.0), ("loop", 3.0))]
    benches += [_fwd(i, 64, ms, phase="prefill", T=T, workload=f"fwd:p-T{T}", none_share=share)
                for T in (512, 4096) for i, ms in (("milp", 1.0), ("base", 0.9))]
    report.fill_ratios(benches)
    wls = report.workloads(benches)
    assert report.plot_speedup_vs_users(wls, tmp_path / "u.png", "t")
    assert report.plot_pct_peak_vs_tokens(wls, tmp_path / "t.png", "t")
    assert report._none_label(0.5) == " none50%" and report._none_label(0.0) == report._none_label(None) == ""


def test_report_cli_refuses_a_name_with_a_folder_and_an_out_that_is_a_file(tmp_path, capsys):
    run = tmp_path / "bench.json"
    run.write_text(json.dumps({"machine_info": {"milp": {"device": "NVIDIA H200"}},
                               "benchmarks": [_fwd("milp", 8, 1.0), _fwd("milp", 32, 2.0)]}))
    for name in ("sub/x", "", ".."):  # was: FileNotFoundError from mkstemp, after the plots were drawn
        with pytest.raises(SystemExit):
            report.main([str(run), "--out", str(tmp_path / "o"), "--name", name])
        assert "--name is a file stem" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit):  # was: FileExistsError from mkdir
        report.main([str(run), "--out", str(afile)])
    assert "--out must be a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and afile.read_text() == ""


# =========================================================================== bench/_util.py
@pytest.mark.parametrize("var, value, why", [
    ("MILP_BENCH_DTYPE", "bf16", "MILP_BENCH_DTYPE must be one of ['bfloat16', 'float16', 'float32'], got 'bf16'"),
    ("MILP_BENCH_REP_MS", "50ms", "MILP_BENCH_REP_MS must be a number of milliseconds, got '50ms'"),
])
def test_util_names_a_bench_knob_it_cannot_use(monkeypatch, var, value, why):
    """MILP_BENCH_DTYPE=bf16 raised a bare KeyError: 'bf16' while collecting every bench file of
    every gpu_run.sh stage."""
    monkeypatch.setitem(sys.modules, "bench__util", sys.modules.get("bench__util"))  # put back after
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as exc:
        _module("_util")
    assert str(exc.value) == why
    monkeypatch.setenv("MILP_BENCH_DTYPE", " Float16 ")
    monkeypatch.delenv("MILP_BENCH_REP_MS", raising=False)
    assert str(_module("_util").DTYPE) == "torch.float16"


def test_counts_and_derived_figures_by_hand(monkeypatch):
    """The README's FLOP and byte formulas, worked out by hand for three small CPU problems, and
    run()'s derived figures from a stand-in benchmark (on CPU: the rounds' minimum)."""
    U = _module("_util")
    # 7b-up-small: k=256, n=688; decode, 8 users one token each, ranks 96 8 16 32 64 96 8 16 (Σ 336), fp32
    p = U.Problem(U._decode("fwd", "7b-up-small", 8), device=U.torch.device("cpu"), dtype=U.torch.float32)
    assert (p.adapter_tokens, p.rank_tokens, p.rank_users, p.bank.max_rank) == (8, 336, 336, 96)
    assert U.counts("fwd", p) == (2 * 8 * 256 * 688 + 2 * 336 * 944, 4 * (8 * 256 + 688 * 256 + 8 * 688 + 336 * 944))
    assert U.counts("fwd", p, "base") == (2 * 8 * 256 * 688, 4 * (8 * 256 + 688 * 256 + 8 * 688))
    assert U.counts("fwdbwd", p) == (4 * 8 * 256 * 688 + 6 * 336 * 944,
                                     4 * (3 * 8 * 256 + 2 * 688 * 256 + 2 * 8 * 688 + 3 * 336 * 944))
    assert U.counts("fwdbwd", p, "base") == (4 * 8 * 256 * 688, 4 * (2 * 8 * 256 + 2 * 688 * 256 + 2 * 8 * 688))
    # 7b-down-small: k=688; 256 tokens, 25 without adapter, 4 users of 32 rank-8 modules (R_u = R_T = 256)
    p = U.Problem(U._prefill("shrink", "7b-down-small", 256, 4, "32x8"), device=U.torch.device("cpu"),
                  dtype=U.torch.float32)
    assert (p.adapter_tokens, p.rank_tokens, p.rank_users, p.bank.max_rank) == (231, 231 * 256, 1024, 256)
    assert U.counts("shrink", p) == (2 * 231 * 256 * 688, 4 * (231 * 688 + 1024 * 688) + 4 * 256 * 256)
    # expand: 40 tokens, 4 without adapter, 9 each for ranks 96 8 16 32 (Σ 152)
    p = U.Problem(U._prefill("expand", "7b-up-small", 40, 4), device=U.torch.device("cpu"), dtype=U.torch.float32)
    assert (p.adapter_tokens, p.rank_tokens, p.rank_users) == (36, 9 * 152, 152)
    assert U.counts("expand", p) == (2 * 9 * 152 * 688, 4 * 9 * 152 + 4 * 152 * 688 + 2 * 4 * 36 * 688)

    monkeypatch.setattr(U, "CUDA", False)
    peaks = U.Peaks(device="cpu", dtype="float32", tflops=2.0, gbs=100.0, matmul="", copy="")

    def bench(min_s):
        b = SimpleNamespace(extra_info={}, group=None, stats=None)
        b.pedantic = lambda fn, **kw: setattr(b, "stats", None if min_s is None else SimpleNamespace(
            stats=SimpleNamespace(min=min_s, median=2 * min_s)))
        return b

    # 1 GFLOP and 0.1 GB in 2 ms: 0.5 TFLOP/s (25% of 2), 50 GB/s (50% of 100); the bound is the
    # bytes' 1 ms (the FLOPs' 0.5 ms): memory, 50% of the roofline
    e = U.run(bench(2e-3), workload="w", impl="milp", fn=lambda: None, flops=1e9, nbytes=1e8, tokens=100, peaks=peaks)
    assert e["time_ms"] == pytest.approx(2.0) and e["host_ms"] == pytest.approx(4.0) and e["timing"] == "host-clock-min"
    assert e["tokens_per_s"] == pytest.approx(5e4) and e["tflops"] == pytest.approx(0.5)
    assert e["gbs"] == pytest.approx(50.0) and e["pct_peak_tflops"] == pytest.approx(25.0)
    assert e["pct_peak_gbs"] == pytest.approx(50.0) and e["roofline_ms"] == pytest.approx(1.0)
    assert e["bound"] == "memory" and e["pct_roofline"] == pytest.approx(50.0)
    e = U.run(bench(None), workload="w", impl="milp", fn=lambda: None, flops=4e9, nbytes=1e8, tokens=1, peaks=peaks)
    assert e["timing"] == "single-run" and e["bound"] == "compute" and e["roofline_ms"] == pytest.approx(2.0)
    assert math.isfinite(e["time_ms"])  # --benchmark-disable: the one plain run's time


# =========================================================================== bench/gpu_run.sh
STUB = r"""#!/usr/bin/env bash
# a stand-in python for gpu_run.sh: no CUDA, and each tool writes what the real one writes
echo "$* | paths=${MILP_BENCH_PATHS-}" >> "$STUB_LOG"
case "$*" in
  *"torch.cuda.is_available"*|*"import pytest_timeout"*|*"import xdist"*) exit 1 ;;
  *"bench/profile_step.py"*) out=${*##*--out }; tok=${*#*--tokens }; tok=${tok%% *}
                            : > "$out/profile_7b-up-prefill-T$tok-U32-mix-none10.txt"
                            : > "$out/profile_7b-up-prefill-T$tok-U32-mix-none10.json" ;;
  *"-m pytest"*) for a in "$@"; do case "$a" in
                   --benchmark-json=*) echo '{"benchmarks": []}' > "${a#*=}" ;;
                   --junitxml=*) echo '<testsuites/>' > "${a#*=}" ;; esac; done ;;
esac
exit 0
"""


def _dry_run(tmp_path, *stages):
    """gpu_run.sh with the stand-in python: ``(result, the stand-in's calls, $OUT)``."""
    if list(Path("/tmp/milp_tuned").glob("*.json")):
        pytest.skip("/tmp/milp_tuned holds tuned configs: setup would copy them into kernels/configs")
    stub, log, out = tmp_path / "py", tmp_path / "log", tmp_path / "out"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILP_")}
    env.update(PYTHON=str(stub), OUT=str(out), STUB_LOG=str(log), MILP_GIT_COMMIT="0" * 40, HOME=str(tmp_path))
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), *stages], env=env, capture_output=True,
                         text=True, timeout=120)
    return res, log.read_text().splitlines(), out


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
@pytest.mark.parametrize("stages, most", [
    (["quick"], 8),
    # the README's first call less its autotune stage, which adds one file (the GPU's config)
    (["setup", "precompile", "kernel-tests", "profile"], 7),
])
def test_gpu_run_dry_run_leaves_what_comes_back_from_out(tmp_path, stages, most):
    """$OUT returns at most 8 files, none deeper than 2 folders; quick's kernel stage alone
    times the forced paths (MILP_BENCH_PATHS=1), the data of bench/dispatch.py."""
    res, calls, out = _dry_run(tmp_path, *stages)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.parent == out for p in files) and len(files) <= most, sorted(p.name for p in files)
    pytests = [c for c in calls if "-m pytest" in c]
    if stages == ["quick"]:
        assert [c.endswith("paths=1") for c in pytests] == [False, True, False, False, False]
        assert "bench_quick_kernels.json" in pytests[1]
    else:
        assert sum("bench/profile_step.py" in c for c in calls) == 2 and len(pytests) == 1


@pytest.mark.parametrize("stages", [["setup", "kernel-tests", "autotun", "profile"], ["setup", "setup tests"], [""]])
def test_gpu_run_refuses_a_misspelt_stage_before_running_any(tmp_path, stages):
    """A misspelt stage ended the call where it stood: the stages before it had run (and spent
    the device time), those after it never did."""
    res, calls, out = _dry_run(tmp_path, *stages)
    assert res.returncode == 2 and calls == [] and not out.exists()
    assert f"unknown stage '{stages[-2] if stages[-1] == 'profile' else stages[-1]}'" in res.stderr
