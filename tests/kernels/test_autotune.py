"""Launch configs as data: the autotuner's output is read back by get_config."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import autotune, lora_linear, use_backend
from kernels.tuning import (
    LaunchConfig,
    _dispatch_knobs,
    _load_table,
    choose_path,
    get_config,
    heuristic_config,
    use_config,
    use_dispatch,
)

from .cases import make_case


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    path = tmp_path / "gpu.json"
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(path))
    yield path
    _load_table.cache_clear()


def test_tuned_table_is_written_and_read_back(table_path, monkeypatch, device):
    dev = torch.device(device)  # the GPU, or the CPU interpreter
    with use_backend("triton"):
        table = autotune.tune(torch.float32, device=dev, tiny=True, progress=False)
    autotune.write_table(table, table_path)
    data = json.loads(table_path.read_text())
    assert set(data["ops"]) == {"fused_linear", "shrink", "expand", "grad_weights"}
    # the decode bucket (8 tokens) is tuned through partial sums + expand: it passed its check too
    assert {e["max_tokens"] for e in data["ops"]["shrink"]} == {8, 96}
    entry = data["ops"]["shrink"][0]
    cfg = get_config("shrink", num_tokens=entry["max_tokens"], n=entry["n"], k=entry["k"],
                     max_rank=entry["max_rank"], dtype=torch.float32, device=dev)
    assert cfg.split_k == entry["split_k"] and cfg.block_k == entry["block_k"]
    # a problem outside every bucket falls back to the heuristic
    big = get_config("shrink", num_tokens=10**6, n=1, k=1, max_rank=1, dtype=torch.float32, device=dev)
    assert big == heuristic_config("shrink", num_tokens=10**6, n=1, k=1, max_rank=1, dtype=torch.float32)
    # the dispatch threshold is read by choose_path
    rank = data["dispatch"]["fused_max_rank"]
    assert _dispatch_knobs(dev)["fused_max_rank"] == rank  # the table beats the GPU's own file
    T = max(4096, _dispatch_knobs(dev)["decode_max_tokens"] + 1)  # past the split path (a GPU's file may move it)
    assert choose_path(T, 16, device=dev) == ("fused" if rank >= 16 else "fused_t")
    # merging keeps entries of other dtypes
    other = dict(table, ops={op: [dict(e, dtype="bfloat16") for e in es] for op, es in table["ops"].items()})
    autotune.write_table(other, table_path)
    dtypes = {e["dtype"] for e in json.loads(table_path.read_text())["ops"]["shrink"]}
    assert dtypes == {"float32", "bfloat16"}


def test_use_config_forces_a_launch_config(device):
    case = make_case(40, 24, 20, {0: [8], 1: [3]}, max_users=2, device=device)
    with use_backend("triton"):
        ref = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
        with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=2)):
            assert get_config("shrink", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32,
                              device=torch.device("cpu")).split_k == 2
            out = lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="op must be one of"):
        with use_config("gemm", LaunchConfig()):
            pass
    with pytest.raises(TypeError, match="LaunchConfig"):
        with use_config("shrink", {"block_m": 16}):
            pass


def test_launch_plans_follow_the_tables_and_overrides(table_path, device):
    """The launchers memoise their host decisions (``launch_plan``): a launch must still see a
    new table (file rewritten and the cache cleared, as ``autotune`` does), a ``use_config``
    block, and the table again after the block."""
    from kernels import aot

    case = make_case(40, 24, 20, {0: [8], 1: [3]}, max_users=2, device=device)

    def shrink_blocks():
        with use_backend("triton"), aot.LaunchRecorder() as rec:
            lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="split")
        return {(r["constexprs"]["BLOCK_K"], r["constexprs"]["SPLIT_K"]) for r in rec.records.values()
                if r["kernel"] == "lora_shrink"}

    def write(block_k, split_k):
        entry = dict(max_tokens=None, n=None, k=None, block_m=16, block_r=16, block_k=block_k, split_k=split_k)
        table_path.write_text(json.dumps({"ops": {"shrink": [entry]}}))
        _load_table.cache_clear()

    write(16, 1)  # (blocks of at least 16: a GPU's tl.dot needs them)
    assert shrink_blocks() == {(16, 1)}
    write(32, 1)
    assert shrink_blocks() == {(32, 1)}
    with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3)):
        assert shrink_blocks() == {(16, 2)}  # split_k 3 of 24 columns in blocks of 16: 2 blocks
    assert shrink_blocks() == {(32, 1)}


def test_bad_table_is_reported(table_path):
    table_path.write_text(json.dumps({"ops": [1, 2]}))
    with pytest.raises(ValueError, match="'ops' must be an object"):
        get_config("shrink", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32, device=torch.device("cpu"))


def test_precompile_records_every_candidate_and_compiles_it_into_the_cache(tmp_path):
    """``--jobs N``: each candidate's launches are recorded (not run) and compiled for the GPU in
    N processes, into Triton's cache, before the timing loop. Runs in a fresh process without
    the interpreter (the compiler refuses to run under it); sm_90 needs no GPU to compile for."""
    code = (
        "import json, torch\n"
        "from kernels import autotune\n"
        "p = autotune.Problem(8, 48, 40, 16, 8)\n"  # decode bucket: shrink partials + their expand
        "s = autotune.precompile([('shrink', p), ('expand', p)], torch.bfloat16, torch.device('cpu'), tiny=True,\n"
        "                        jobs=2, arch=90, progress=False)\n"
        "print(json.dumps(s))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # shrink at split_k 1 and 2 (each with the expand that adds its partials), expand's two configs
    assert summary["variants"] >= 4 and summary["failed"] == 0 and summary["arch"] == 90
    assert len(list((tmp_path / "cache").iterdir())) >= summary["variants"]


def test_autotune_cli_rejects_bad_jobs():
    with pytest.raises(SystemExit):
        autotune.main(["--tiny", "--jobs", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (interpreter) case")
def test_autotune_jobs_on_cpu_skip_the_precompile(tmp_path):
    """``--jobs`` precompiles for a GPU; under the interpreter there is nothing to compile, and
    ``--tiny --jobs 2`` used to stop with 'compile_recorded needs TRITON_INTERPRET unset'."""
    out = tmp_path / "tiny.json"
    assert autotune.main(["--tiny", "--jobs", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(data["ops"][op] for op in ("shrink", "expand")) and "_precompiled" not in data
    # the split path's overlap was timed after the configs were written, and merged in
    assert data["dispatch"]["split_overlap_min_tokens"] in (0, 8, 96)
    assert [r["tokens"] for r in data["dispatch"]["_measured_overlap"]] == [8, 96]
    assert data["dispatch"]["split_parallel_max_tokens"] in (0, 8, 16)
    assert [r["tokens"] for r in data["dispatch"]["_measured_parallel"]] == [8, 16]
    assert "fused_max_rank" in data["dispatch"]
    # the table the tuner wrote is one the (strict) reader takes: every key it adds is known or a note
    from kernels.tuning import _load_table

    _load_table.cache_clear()
    assert _load_table(str(out))["__dispatch__"] == data["dispatch"]


def test_tune_split_parallel_picks_the_last_size_of_a_winning_run(monkeypatch):
    """The knob is the largest size up to which the two branches win at every smaller one."""
    times = iter([2.0, 1.5, 1.0, 1.0])  # (serial, branches) at 8 then 16 tokens: a win, then no gain
    monkeypatch.setattr(autotune, "_graph_time", lambda fn, device: next(times))
    knob = autotune.tune_split_parallel(torch.float32, torch.device("cpu"), tiny=True)
    assert knob["split_parallel_max_tokens"] == 8
    assert [(r["serial_ms"], r["parallel_ms"]) for r in knob["_measured_parallel"]] == [(2.0, 1.5), (1.0, 1.0)]
    times = iter([1.0, 0.99, 1.0, 0.5])  # not 2% faster at the smallest size: never
    assert autotune.tune_split_parallel(torch.float32, torch.device("cpu"), tiny=True)["split_parallel_max_tokens"] == 0


def test_tune_split_overlap_picks_the_first_size_of_a_winning_run(monkeypatch):
    """The knob is the smallest size from which the overlap wins at every larger one."""
    times = iter([1.0, 1.0, 2.0, 1.5])  # (serial, overlap) at 8 then 96 tokens: no gain, then a win
    monkeypatch.setattr(autotune, "_time", lambda fn, device, quick=False: next(times))
    knob = autotune.tune_split_overlap(torch.float32, torch.device("cpu"), tiny=True)
    assert knob["split_overlap_min_tokens"] == 96
    assert [(r["serial_ms"], r["overlap_ms"]) for r in knob["_measured_overlap"]] == [(1.0, 1.0), (2.0, 1.5)]
    times = iter([1.0, 0.5, 1.0, 0.99])  # not 2% faster at the largest size: never
    assert autotune.tune_split_overlap(torch.float32, torch.device("cpu"), tiny=True)["split_overlap_min_tokens"] == 0


def test_use_dispatch_forces_knobs_over_the_tables(table_path, device):
    dev = torch.device(device)
    table_path.write_text(json.dumps({"ops": {}, "dispatch": {"decode_max_tokens": 4096}}))
    assert choose_path(1000, 96, device=dev) == "split"
    with use_dispatch(decode_max_tokens=64):
        assert choose_path(1000, 96, device=dev) == "fused_t"
        with use_dispatch(fused_max_rank=96):  # nested: both hold
            assert choose_path(1000, 96, device=dev) == "fused"
        assert choose_path(1000, 96, device=dev) == "fused_t"
    assert choose_path(1000, 96, device=dev) == "split"
    with pytest.raises(ValueError, match="unknown knob.*decode_max_token"):
        with use_dispatch(decode_max_token=1):
            pass
    with pytest.raises(ValueError, match="split_overlap_min_tokens must be an int >= 0"):
        with use_dispatch(split_overlap_min_tokens=-1):
            pass


def test_write_table_merges_dispatch_knobs(tmp_path):
    """A tuning run sets fused_max_rank only: the thresholds bench/dispatch.py wrote stay."""
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"device": "x", "ops": {}, "dispatch": {"decode_max_tokens": 512, "fused_max_rank": 0},
                                "_dispatch_measured": {"w": 1}}))
    entry = {"max_tokens": 8, "n": 40, "k": 48, "max_rank": 16, "dtype": "bfloat16", "block_m": 16}
    autotune.write_table({"device": "x", "ops": {"shrink": [entry]}, "dispatch": {"fused_max_rank": 16}}, path)
    data = json.loads(path.read_text())
    assert data["dispatch"] == {"decode_max_tokens": 512, "fused_max_rank": 16}
    assert data["_dispatch_measured"] == {"w": 1} and data["ops"]["shrink"] == [entry]


def test_write_table_is_atomic_with_the_projects_file_modes(tmp_path):
    """A new config file is 0o644 (not mkstemp's 0o600: a shared GPU box reads it as another
    user), a replaced one keeps its mode, and a table that cannot be written leaves the old
    file whole and no temp file behind."""
    import os
    import stat

    path = tmp_path / "gpu.json"
    entry = {"max_tokens": 8, "n": 40, "k": 48, "max_rank": 16, "dtype": "bfloat16", "block_m": 16}
    old_umask = os.umask(0o022)
    try:
        autotune.write_table({"device": "x", "ops": {"shrink": [entry]}}, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o664)
    autotune.write_table({"device": "x", "ops": {"expand": [dict(entry, block_n=32)]}}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not JSON serializable"):
        autotune.write_table({"device": object(), "ops": {"shrink": [dict(entry, dtype="float16")]}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]


def test_quick_buckets_cover_the_targets():
    """``--quick`` tunes the targets' sizes: decode at 32 and 256 users (a token each: a bucket
    covers every smaller count, so 256 users must not land in a prefill bucket) and prefill at
    4096 and 16384 tokens, for the 7B FFN shapes; the fused kernel only where a path runs it."""
    probs = autotune.problems(quick=True)
    assert {(p.num_tokens, p.users) for p in probs} == {(32, 32), (256, 256), (4096, 32), (16384, 32)}
    assert {(p.k, p.n) for p in probs} == {(4096, 11008), (11008, 4096)}
    by = {(p.num_tokens, op) for op in ("fused_linear", "shrink", "expand", "grad_weights") for p in probs
          if autotune.worth_tuning(op, p, quick=True)}
    assert ("fused_linear" not in {op for t, op in by if t in (32, 256, 16384)})
    assert {op for t, op in by if t == 256} == {"shrink", "expand"}
    assert {op for t, op in by if t == 4096} == {"fused_linear", "shrink", "expand", "grad_weights"}
    decode = autotune.Problem(256, 4096, 11008, 96, 256)
    assert autotune.decode_like(decode) and not autotune.decode_like(autotune.Problem(4096, 4096, 11008, 96, 32))
    assert {c.block_m for c in autotune.candidates("expand", decode)} == {16}  # one-row tiles
    assert all(autotune.worth_tuning(op, decode) for op in ("fused_linear", "grad_weights"))  # full grid: all


def test_interrupted_tuning_keeps_the_buckets_it_finished(monkeypatch, device):
    """A run cut short (SIGINT from the device call's time limit) returns what it tuned."""
    calls = {"n": 0}
    real = autotune._runner

    def runner(op, problem, dtype, dev):
        calls["n"] += 1
        if calls["n"] == 2:  # the second bucket is interrupted
            raise KeyboardInterrupt
        return real(op, problem, dtype, dev)

    monkeypatch.setattr(autotune, "_runner", runner)
    with use_backend("triton"):
        table = autotune.tune(torch.float32, device=torch.device(device), tiny=True, progress=False,
                              ops=("shrink", "fused_linear"))
    assert len(table["ops"]["shrink"]) == 1 and table["ops"]["fused_linear"] == []
    assert table["_interrupted"] == "1 of 4 buckets tuned" and table["dispatch"] == {}


def test_a_gpu_reads_its_own_file_over_its_architecture_s(tmp_path, monkeypatch):
    """``table_paths_for``: the GPU's own file (what the autotuner writes) first, then the
    ``sm_<cc>.json`` of its architecture, those that exist; none = the heuristics."""
    from kernels import tuning

    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    name, own, arch = "NVIDIA H100 80GB HBM3", tmp_path / "nvidia_h100_80gb_hbm3.json", tmp_path / "sm_90.json"
    assert tuning.table_paths_for(name, (9, 0)) == []
    arch.write_text("{}")
    assert tuning.table_paths_for(name, (9, 0)) == [arch]
    assert tuning.table_paths_for(name, (8, 0)) == []  # another architecture
    assert tuning.table_paths_for(name) == []  # capability unknown
    own.write_text("{}")
    assert tuning.table_paths_for(name, (9, 0)) == [own, arch]
    # the knobs layer: the own file's launch configs (a tuning run writes no dispatch) keep the
    # architecture's dispatch; a knob the own file sets wins
    tables = [{"__dispatch__": {"fused_max_rank": 8}}, {"__dispatch__": {"decode_max_tokens": 16384}}]
    monkeypatch.setattr(tuning, "_tables", lambda device: tables)
    knobs = tuning._dispatch_knobs(torch.device("cuda", 0))
    assert knobs["decode_max_tokens"] == 16384 and knobs["fused_max_rank"] == 8


def test_shipped_architecture_file_carries_the_h200_dispatch():
    """``sm_90.json`` (every Hopper GPU without a file of its own) holds the H200's measured dispatch."""
    from kernels.tuning import CONFIG_DIR

    h200 = json.loads((CONFIG_DIR / "nvidia_h200.json").read_text())
    assert _load_table(str(CONFIG_DIR / "sm_90.json"))["__dispatch__"] == h200["dispatch"]


@pytest.mark.parametrize("tokens", [8, 96])  # a decode bucket (on split-K partials) and a prefill one
def test_expand_is_tuned_in_the_mode_the_split_path_runs_it(device, tokens):
    """Expand-first sizes (``split_expand_first``) time and check the expand writing ``y``;
    the others adding into it. The timed run works in place (no copy of ``y`` per call)."""
    from kernels import aot

    p = autotune.Problem(tokens, 48, 40, 16, 8)
    for first, accumulate in ((0, True), (1 << 20, False)):
        with use_dispatch(split_expand_first_max_tokens=first), use_backend("triton"), aot.LaunchRecorder() as rec:
            run, check = autotune._runner("expand", p, torch.float32, torch.device(device))
            assert check() < 1e-4
            y = run()
            assert run().data_ptr() == y.data_ptr()
        modes = {r["constexprs"]["ACCUMULATE"] for r in rec.records.values() if r["kernel"].startswith("lora_expand")}
        assert modes == {accumulate}


def test_split_schedules_are_timed_with_the_tuned_configs_before_the_other_buckets(monkeypatch, device):
    """The overlap and two-branch timings run once the shrink and the expand are tuned, with those
    configs in force (a temporary table read before the GPU's files), and before the grouped
    dA/dB and fused kernels' buckets: a run cut short there keeps the schedule knobs."""
    from kernels.tuning import get_config

    seen = {}

    def overlap(dtype, dev, tiny):  # what the schedule timing sees: the tuned expand config
        entry = table_so_far()["expand"][-1]
        cfg = get_config("expand", num_tokens=entry["max_tokens"], n=entry["n"], k=entry["k"],
                         max_rank=entry["max_rank"], dtype=dtype, device=dev)
        seen["expand"] = (cfg.block_n, cfg.n_blocks, cfg.split_n) == (entry["block_n"], entry["n_blocks"],
                                                                        entry["split_n"])
        return {"split_overlap_min_tokens": 96, "_measured_overlap": []}

    def table_so_far():
        with open(os.environ["MILP_KERNEL_CONFIGS"], encoding="utf-8") as f:
            return json.load(f)["ops"]

    calls = {"n": 0}
    real = autotune._runner

    def runner(op, problem, dtype, dev):  # interrupt the first bucket after the shrink and expand ones
        if op not in ("shrink", "expand"):
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(op, problem, dtype, dev)

    monkeypatch.setattr(autotune, "tune_split_overlap", overlap)
    monkeypatch.setattr(autotune, "tune_split_parallel", lambda *a: {"split_parallel_max_tokens": 8})
    monkeypatch.setattr(autotune, "_runner", runner)
    before = os.environ.get("MILP_KERNEL_CONFIGS")
    with use_backend("triton"):
        table = autotune.tune(torch.float32, device=torch.device(device), tiny=True, progress=False,
                              ops=("shrink", "expand", "grad_weights", "fused_linear"))
    assert seen == {"expand": True} and calls["n"] == 4  # shrink and expand, two buckets each
    assert table["dispatch"] == {"split_overlap_min_tokens": 96, "_measured_overlap": [],
                                 "split_parallel_max_tokens": 8}
    assert "_interrupted" in table and os.environ.get("MILP_KERNEL_CONFIGS") == before  # restored


@pytest.mark.parametrize("field,value,expected", [
    ("block_k", 8, "block_k must be a power of two >= 16"),     # the GPU's tl.dot: K >= 16 (the interpreter runs it)
    ("block_m", 48, "block_m must be a power of two >= 16"),    # tl.arange: powers of two
    ("block_r", True, "block_r must be a power of two >= 16"),
    ("num_warps", 3, "num_warps must be a power of two in 1..32"),
    ("split_k", 0, "split_k must be an int >= 1"),
    ("split_n", -1, "split_n must be an int >= 0"),
    ("n_blocks", 1.0, "n_blocks must be an int >= 1"),
])
def test_launch_config_refuses_what_no_gpu_compiles(field, value, expected):
    """A config that only the Triton interpreter would run (CI's tests once used ``block_k=8``,
    which sm_90's compile refuses) is refused where it is made, naming the field; so is a tuned
    table's entry, with its op and entry named."""
    from kernels.tuning import LaunchConfig

    with pytest.raises(ValueError, match=f"LaunchConfig.{expected}, got {value!r}"):
        LaunchConfig(**{field: value})


def test_a_bad_table_entry_is_named(tmp_path, monkeypatch):
    from kernels.tuning import _load_table, get_config

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"ops": {"shrink": [{"max_tokens": 64, "dtype": "float32", "block_k": 8}]}}))
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(path))
    _load_table.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"entry of 'shrink' .*'block_k': 8.*block_k must be a power of two"):
            get_config("shrink", num_tokens=8, n=16, k=32, max_rank=16, dtype=torch.float32, device=torch.device("cpu"))
    finally:
        monkeypatch.delenv("MILP_KERNEL_CONFIGS")
        _load_table.cache_clear()
