"""The bench/ tools that run without a GPU: bench/dispatch.py (thresholds from a GPU run),
bench/report.py (targets, forced paths, the README summary), bench/launch_host.py (launch
host time on the stand-in driver) and the search benchmark's committed trials."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


dispatch = _module("dispatch")


def _entry(workload, impl, T, max_rank, ms, op="fwd"):
    return {"extra_info": {"workload": workload, "impl": impl, "op": op, "T": T, "max_rank": max_rank,
                           "phase": "decode" if T <= 256 else "prefill", "time_ms": ms}}


def _run(tmp_path, times, device="NVIDIA H100 80GB HBM3", name="run.json"):
    """``times``: {(T, max_rank): (split, fused, fused_t)} -> a pytest-benchmark JSON."""
    benches = []
    for (T, R), per_path in times.items():
        wl = f"fwd:7b-up-T{T}-R{R}"
        benches.append(_entry(wl, "milp", T, R, min(per_path)))
        benches += [_entry(wl, f"milp-{p}", T, R, ms) for p, ms in zip(dispatch.PATHS, per_path)]
    benches.append(_entry("fwdbwd:x", "milp-split", 4096, 96, 1.0, op="fwdbwd"))  # not a forward: ignored
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {"milp": {"device": device}}, "benchmarks": benches}))
    return path


def test_dispatch_thresholds_follow_the_measured_winners(tmp_path):
    run = _run(tmp_path, {
        (32, 96): (0.10, 0.50, 0.40),      # decode: split wins
        (256, 96): (0.20, 0.30, 0.25),     # split still wins
        (4096, 16): (1.30, 1.00, 1.10),    # prefill: fused wins at rank 16
        (4096, 96): (1.40, 1.50, 1.20),    # fused_t wins at rank 96
        (16384, 96): (5.00, 6.00, 4.50),
    })
    device, rows = dispatch.path_times([str(run)])
    assert device == "NVIDIA H100 80GB HBM3" and len(rows) == 5
    proposal, evidence = dispatch.propose(rows)
    assert proposal == {"decode_max_tokens": 256, "fused_max_rank": 16}
    assert evidence["fwd:7b-up-T32-R96"]["split"] == 0.10


def test_dispatch_tolerance_and_split_everywhere(tmp_path):
    rows = dispatch.path_times([str(_run(tmp_path, {(32, 96): (0.101, 0.2, 0.1), (4096, 96): (1.0, 2.0, 1.5)}))])[1]
    # split within 2% of the fastest at every size, the largest (4096) included: no upper bound
    assert dispatch.propose(rows, tolerance=0.02) == ({"decode_max_tokens": dispatch.UNBOUNDED},
                                                      dispatch.propose(rows)[1])
    assert dispatch.propose(rows, tolerance=0.0)[0] == {"decode_max_tokens": 0, "fused_max_rank": 0}


def test_dispatch_write_merges_into_the_config_and_choose_path_reads_it(tmp_path, monkeypatch, capsys):
    import torch

    import kernels.tuning as tuning

    run = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4), (4096, 96): (2.0, 1.5, 1.2)})
    cfg = tmp_path / "gpu.json"
    cfg.write_text(json.dumps({"device": "x", "ops": {"shrink": [{"max_tokens": 64, "block_m": 16}]},
                               "dispatch": {"split_tokens_per_segment": 8, "split_overlap_min_tokens": 4096,
                                            "_measured_overlap": [{"tokens": 4096}]}}))
    assert dispatch.main([str(run), "--write", "--out", str(cfg)]) == 0
    data = json.loads(cfg.read_text())
    assert data["ops"]["shrink"] == [{"max_tokens": 64, "block_m": 16}]  # kept
    # the other knobs are kept, and the autotuner's evidence for them
    assert data["dispatch"] == {"split_tokens_per_segment": 8, "split_overlap_min_tokens": 4096,
                                "_measured_overlap": [{"tokens": 4096}], "decode_max_tokens": 32, "fused_max_rank": 0}
    assert "fwd:7b-up-T4096-R96" in data["_dispatch_measured"]
    assert "decode_max_tokens" in capsys.readouterr().out
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(cfg))
    tuning._load_table.cache_clear()
    try:
        cpu = torch.device("cpu")  # the override file applies to any device
        assert tuning.choose_path(48, 96, device=cpu) == "fused_t"  # past the measured 32 tokens: no split
        assert tuning.choose_path(32, 96, device=cpu) == "split"
        assert tuning.choose_path(48, 96) == "split"  # no device: the built-in thresholds
    finally:
        monkeypatch.delenv("MILP_KERNEL_CONFIGS")
        tuning._load_table.cache_clear()


def test_dispatch_refuses_cpu_runs_and_runs_without_forced_paths(tmp_path, capsys):
    run = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4)}, device="cpu")
    with pytest.raises(SystemExit):
        dispatch.main([str(run)])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"machine_info": {"milp": {"device": "NVIDIA H100"}}, "benchmarks": []}))
    assert dispatch.main([str(empty)]) == 1
    assert "MILP_BENCH_PATHS=1" in capsys.readouterr().err
    other = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4)}, device="NVIDIA H200", name="other.json")
    with pytest.raises(SystemExit, match="one GPU at a time"):
        dispatch.path_times([str(_run(tmp_path, {(32, 96): (0.1, 0.5, 0.4)})), str(other)])


def test_dispatch_cli_bad_arguments(tmp_path, capsys):
    run = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4)})
    with pytest.raises(SystemExit):
        dispatch.main([str(tmp_path / "missing.json")])
    assert "no such JSON file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dispatch.main([str(run), "--tolerance", "1.5"])
    assert "--tolerance must be in [0, 1)" in capsys.readouterr().err


# =========================================================================== bench/report.py
report = _module("report")


def _gpu_run(tmp_path, name="gpu.json"):
    """A GPU run with one forward target workload (and a forced path), the two runtime targets."""
    fwd = {"op": "fwd", "phase": "prefill", "shape": "7b-up", "T": 4096, "users": 32, "ranks": "mix",
           "none_share": 0.0, "roofline_ms": 1.0}
    benches = [
        {"extra_info": dict(fwd, workload="fwd:7b-up-T4096", impl="milp", time_ms=1.05)},
        {"extra_info": dict(fwd, workload="fwd:7b-up-T4096", impl="base", time_ms=1.0, roofline_ms=0.99)},
        {"extra_info": dict(fwd, workload="fwd:7b-up-T4096", impl="milp-split", time_ms=1.3)},
        {"extra_info": {"workload": "runtime-train-U16", "impl": "milp", "op": "runtime-train-U16", "time_ms": 10.0,
                        "speedup_vs_sequential": 4.6, "target_speedup_vs_sequential": 4.0}},
        {"extra_info": {"workload": "runtime-train-U16", "impl": "loop", "op": "runtime-train-U16", "time_ms": 46.0}},
        {"extra_info": {"workload": "runtime-decode-U32", "impl": "milp", "op": "runtime-decode-U32", "time_ms": 1.25,
                        "target_tokens_per_s_vs_base": 0.85, "bytes_floor_vs_base": 0.84}},
        {"extra_info": {"workload": "runtime-decode-U32", "impl": "base", "op": "runtime-decode-U32", "time_ms": 1.0}},
    ]
    machine = {"milp": {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "torch": "2.11.0",
                        "triton": "3.6.0", "git_commit": "0123456789abcdef", "config_files": ["sm_90.json"],
                        "dispatch": {"decode_max_tokens": 2147483647, "split_overlap_min_tokens": 4096}}}
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": machine, "datetime": "2026-11-28T05:00:00", "benchmarks": benches}))
    return path


def test_report_targets_forced_paths_and_runtime_targets(tmp_path):
    md, *_ = report.build([str(_gpu_run(tmp_path))], tmp_path / "out")
    text = md.read_text()
    assert md.name == "gpu_nvidia_h100_80gb_hbm3.md"
    # issue 3: fused forward 1.05 <= 1.10, floor = 1.0 / 0.99
    assert "| `7b-up-T4096` | 1.050 | – | 1.010 | ≤ 1.10 | yes |" in text
    assert "×milp-split" in text and "| 1.24 |" in text  # the forced path: 1.3 / 1.05
    # issue 5: training 4.6 >= 4 (as stored); decode: base/ours from the merged times, 0.80 < 0.85
    assert "| `runtime-train-U16` | 4.60 | – | ≥ 4.00 | yes |" in text
    assert "| `runtime-decode-U32` | 0.80 | 0.840 | ≥ 0.85 | **no** |" in text
    # what chose the kernels: the config files read and the dispatch knobs in force
    assert "| config files | sm_90.json |" in text
    assert "| dispatch knobs | decode_max_tokens=2147483647, split_overlap_min_tokens=4096 |" in text


def test_report_writes_the_readme_summary_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_START}\nold table\n{report.README_END}\nafter\n")
    run = _gpu_run(tmp_path)
    assert report.main([str(run), "--out", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "**NVIDIA H100 80GB HBM3**, bfloat16, torch 2.11.0, triton 3.6.0, commit `0123456789ab`" in text
    assert "[results/gpu_nvidia_h100_80gb_hbm3.md](results/gpu_nvidia_h100_80gb_hbm3.md)" in text
    assert "### Speed targets (issue 3)" in text and "### Runtime targets (issue 5)" in text
    # a second run replaces the block, it does not stack
    report.main([str(run), "--out", str(tmp_path / "results"), "--readme", str(readme)])
    assert readme.read_text() == text


def test_report_readme_refusals(tmp_path, capsys):
    run = _gpu_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    out = tmp_path / "results"
    with pytest.raises(SystemExit):
        report.main([str(run), "--out", str(out), "--readme", str(readme)])
    assert "must hold the line" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"machine_info": {"milp": {"device": "cpu"}}, "benchmarks": []}))
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    with pytest.raises(SystemExit):
        report.main([str(cpu), "--out", str(out), "--readme", str(readme)])
    assert "GPU results only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(run), "--readme", str(tmp_path / "missing.md")])
    assert "--readme: no such file" in capsys.readouterr().err


# =========================================================================== bench/streams.py
def test_stream_summary_counts_kernels_per_stream_and_the_time_they_overlap():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    streams = _module("streams")

    def ev(sid, a, b, name="k", dev=DeviceType.CUDA):
        return SimpleNamespace(device_type=dev, device_resource_id=sid, time_range=SimpleNamespace(start=a, end=b),
                               name=name)

    events = [ev(7, 0, 100, "gemm"), ev(7, 100, 150, "expand"), ev(9, 20, 60, "shrink"), ev(9, 140, 170, "dA"),
              ev(0, 0, 1000, "aten::mm", DeviceType.CPU)]  # host events are not kernels
    text = streams.stream_summary(events)
    assert "stream 7: 2 kernels, busy 0.150 ms" in text and "stream 9: 2 kernels, busy 0.070 ms" in text
    assert "at once: 0.050 ms" in text  # 20-60 beside the GEMM, 140-150 beside the expand
    assert streams.stream_summary([ev(0, 0, 1, dev=DeviceType.CPU)]) == "no CUDA kernels in the profile"


def test_profile_step_reports_host_or_device_and_host_time_by_package(tmp_path, capsys, monkeypatch):
    """bench/profile_step.py on CPU (the torch path, a small shape): the profiler tables and the
    host section the GPU session reads (issue time per step, time by package, top functions)."""
    monkeypatch.setenv("MILP_BENCH_SIZE", "small")
    monkeypatch.setenv("MILP_NVTX", "1")  # what the script sets by default, undone after the test
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ first
    profile_step = _module("profile_step")
    assert profile_step.main(["--tokens", "40", "--users", "4", "--shape", "7b-up-small", "--steps", "1",
                              "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("profile_*.txt")).read_text()
    assert "-- by device time --" in text and "-- host or device (no profiler) --" in text
    assert "host issue" in text and "us/step" in text
    assert "host time by package" in text and "kernels " in text and "tottime" in text
    assert profile_step._package("/x/site-packages/triton/runtime/jit.py") == "triton"
    assert profile_step._package("~") == "C calls"


def test_launch_host_times_both_launch_paths_on_the_stand_in_driver():
    """bench/launch_host.py in its own process (the stand-in CUDA driver: sm_90 compiles,
    launches that do nothing): a row per launcher and op call and launch path, and the plain
    linear's; the table prints the saving."""
    launch_host = _module("launch_host")
    rows = launch_host.measure_in_subprocess(calls=3, model_calls=2)
    got = {(r["kernel"], r["launch"]) for r in rows}
    want = {(k, m) for k in launch_host.KERNELS + launch_host.OPS + launch_host.MODELS for m in launch_host.MODES}
    assert got == want | {(k, "-") for k in launch_host.BASES}
    assert all(r["host_us_per_call"] > 0 and r["launches"].startswith("stand-in") for r in rows)


def test_launch_host_cli_bad_arguments(capsys, monkeypatch):
    launch_host = _module("launch_host")
    with pytest.raises(SystemExit):
        launch_host.main(["--calls", "0"])
    assert "--calls must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_host.main(["--model-calls", "-1"])
    assert "--model-calls must be >= 0, got -1" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit):
        launch_host.main([])
    assert "run without TRITON_INTERPRET=1" in capsys.readouterr().err


def test_launch_host_leaves_the_launch_switch_and_value_checks_as_they_were(monkeypatch):
    """In a bench session (CUDA: in process) the figures must not change how later benchmarks
    launch: an exported MILP_TRITON_LAUNCH=jit stays, and so do the op's value checks."""
    import kernels.library

    launch_host = _module("launch_host")
    checked = kernels.library._values_checked
    monkeypatch.setenv("MILP_TRITON_LAUNCH", "jit")

    def measuring(*args):  # what _measure leaves behind
        os.environ["MILP_TRITON_LAUNCH"] = "direct"
        kernels.library._values_checked = lambda t: False
        return []

    monkeypatch.setattr(launch_host, "_measure", measuring)
    assert launch_host.measure(calls=1) == []
    assert os.environ["MILP_TRITON_LAUNCH"] == "jit" and kernels.library._values_checked is checked


def test_the_search_benchmarks_committed_trials_still_fit_the_search(tmp_path):
    """bench/test_search.py times the round after the trials of bench/search_trials_n100.jsonl: a
    change of the space, the synthetic problem or the trial log's format must come with the file
    written anew (``python bench/test_search.py``), or the benchmark fails (or times another round)."""
    from search.problems import LoRASynthetic
    from search.surrogate import AcquisitionSettings

    bench_search = _module("test_search")
    quick = AcquisitionSettings(mc_samples=4, raw_samples=16, num_restarts=1, maxiter_alternating=2)
    # every trial scored, the design's and the first Bayesian round's (resume_trials asserts it)
    s = bench_search.resume_trials(tmp_path, surrogate="gp", acquisition=quick)
    assert s.n_finished == bench_search.N and not s.pending and all(t.ok for t in s.trials)
    prob = LoRASynthetic(seed=0)
    for t in s.trials:  # the problem's values today: the exact parameter count, the loss within its noise
        assert t.values["parameters"] == prob.space.parameter_count(t.config), t.trial_id
        assert abs(t.values["val_ce"] - prob.true_loss(t.config)) <= 5 * prob.noise_std, t.trial_id
    assert s.ask(1)[0].source == "gp"  # the design is used up: the next ask is a Bayesian round
