"""The bench/ tools that run without a GPU: bench/dispatch.py (thresholds from a GPU run) and
bench/report.py's handling of extra implementations."""
import importlib.util
import json
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
    assert dispatch.propose(rows, tolerance=0.02) == ({"decode_max_tokens": 4096}, dispatch.propose(rows)[1])
    assert dispatch.propose(rows, tolerance=0.0)[0] == {"decode_max_tokens": 0, "fused_max_rank": 0}


def test_dispatch_write_merges_into_the_config_and_choose_path_reads_it(tmp_path, monkeypatch, capsys):
    import torch

    import kernels.tuning as tuning

    run = _run(tmp_path, {(32, 96): (0.1, 0.5, 0.4), (4096, 96): (2.0, 1.5, 1.2)})
    cfg = tmp_path / "gpu.json"
    cfg.write_text(json.dumps({"device": "x", "ops": {"shrink": [{"max_tokens": 64, "block_m": 16}]},
                               "dispatch": {"split_tokens_per_segment": 8}}))
    assert dispatch.main([str(run), "--write", "--out", str(cfg)]) == 0
    data = json.loads(cfg.read_text())
    assert data["ops"]["shrink"] == [{"max_tokens": 64, "block_m": 16}]  # kept
    assert data["dispatch"] == {"split_tokens_per_segment": 8, "decode_max_tokens": 32, "fused_max_rank": 0}
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
