"""Every kernel compiles for Hopper and Ampere (no GPU needed): no spills, fits shared memory,
and the fused GEMM uses Hopper's wgmma. Catches code the CPU interpreter accepts but the
compiler rejects, and register/shared-memory regressions of the launch configs."""
import json
import os
import subprocess
import sys

import pytest

from kernels.aot import SHARED_LIMIT as SMEM_LIMIT


def _compile(arch: int, dtype: str) -> list[dict]:
    """Every kernel variant of :func:`kernels.aot.compile_variants`, compiled in a fresh process
    (the interpreter is off there); the reports as dicts."""
    code = (
        "import json, dataclasses\n"
        "from kernels.aot import compile_variants\n"
        f"print(json.dumps([dataclasses.asdict(r) for r in compile_variants({arch}, {dtype!r})]))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    reports = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in reports} == {"fused_lora_linear", "lora_shrink", "lora_expand", "lora_grad_weights"}
    return reports


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_reference_dtypes_compile(dtype):
    """fp32/fp64 are not speed targets (spills allowed) but the GPU tests run them: they must
    compile (triton 3.6 once rejected the fp64 accumulator that 3.9 accepted)."""
    _compile(90, dtype)


@pytest.mark.parametrize("arch, dtype", [(90, "bf16"), (80, "fp16")])
def test_kernels_compile_without_spills(arch, dtype):
    reports = _compile(arch, dtype)
    for r in reports:
        where = f"{r['kernel']} / {r['variant']} on sm_{arch}"
        assert r["spill_bytes"] == 0, f"{where} spills {r['spill_bytes']} bytes"
        assert r["shared_bytes"] <= SMEM_LIMIT[arch], f"{where} needs {r['shared_bytes']} B of shared memory"
        if r["kernel"] == "fused_lora_linear":
            assert r["wgmma"] if arch == 90 else r["mma"], f"{where} misses the tensor cores"


def _aot_cli(*args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "kernels.aot", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_recorded_launches_compile(tmp_path, device):
    """Every variant a run launches is written down as the GPU's JIT would specialise it, and
    each one compiles for sm_90 (what ``MILP_RECORD_LAUNCHES`` + ``--recorded`` do for a whole
    test session)."""
    import torch

    from kernels import aot, lora_linear, use_backend

    from .cases import make_case

    case = make_case(70, 40, 24, {0: [8, 3], 1: [16]}, max_users=2, dtype=torch.bfloat16, device=device)
    with aot.LaunchRecorder() as rec, use_backend("triton"):
        x = case.x.clone().requires_grad_(True)
        lora_linear(x, case.w, case.b, case.bank, case.plan).float().sum().backward()
        with torch.no_grad():
            # the fused kernel by name: which path "auto" takes at 70 tokens depends on the GPU
            lora_linear(case.x, case.w, case.b, case.bank, case.plan, path="fused")
            lora_linear(case.x[:5], case.w, case.b, case.bank, type(case.plan).build(case.ids[:5], 2))
    kinds = {r["kernel"] for r in rec.records.values()}
    assert kinds == {"fused_lora_linear", "lora_shrink", "lora_expand", "lora_grad_weights"}, kinds
    for r in rec.records.values():
        assert r["constexprs"]["UPCAST"] is False
        assert set(r["options"]) == {"num_warps", "num_stages", "enable_fp_fusion"}
        assert r["signature"]["x_ptr" if "x_ptr" in r["signature"] else "t_ptr"].startswith("*")
    path = tmp_path / "launches.jsonl"
    assert rec.write(str(path)) == len(rec.records)
    rec.write(str(path))  # appended twice: read back once
    assert len(aot.read_records(str(path))) == len(rec.records)
    out = _aot_cli("--recorded", str(path), "--arch", "90", "--jobs", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{len(rec.records)} recorded variants for sm_90: {len(rec.records)} compile and fit, 0 do not" in out.stdout


def test_recorded_variant_that_cannot_compile_is_reported(tmp_path):
    from kernels import aot

    path = tmp_path / "launches.jsonl"
    missing = _aot_cli("--recorded", str(path))
    assert missing.returncode == 2 and "--recorded: no such file" in missing.stderr
    # a shrink with BLOCK_K = 8: tl.dot needs K >= 16 on the GPU
    sig = {n: "i32" for n in ("K", "R_T", "stride_xt", "stride_a", "stride_t", "stride_ts")}
    sig.update({n: "*bf16" for n in ("x_ptr", "a_ptr")}, scale_ptr="*fp32", slots_ptr="*i32", sorted_ptr="*i32",
               tiles_ptr="*i32", t_ptr="*fp32")
    consts = dict(SPLIT_K=1, PARTIALS=False, BLOCK_M=16, BLOCK_R=16, BLOCK_K=8, UPCAST=False, IEEE=False,
                  ACC={"tl_dtype": "fp32"}, stride_xk=1)
    sig.update({n: "constexpr" for n in consts})
    rec = {"kernel": "lora_shrink", "signature": sig, "constexprs": consts, "div16": ["x_ptr"],
           "options": {"num_warps": 4, "num_stages": 2}}
    path.write_text(json.dumps(rec) + "\n")
    jobs = _aot_cli("--recorded", str(path), "--jobs", "0")
    assert jobs.returncode == 2 and "--jobs must be >= 1, got 0" in jobs.stderr
    out = _aot_cli("--recorded", str(path), "--arch", "90")
    assert out.returncode == 1 and "FAILED lora_shrink" in out.stdout and "0 compile and fit, 1 do not" in out.stdout
    # a record from another version of the kernel (a parameter it lacks) is reported, not a crash
    stale = dict(rec, signature={k: v for k, v in sig.items() if k != "R_T"})
    path.write_text(json.dumps(stale) + "\n")
    out = _aot_cli("--recorded", str(path), "--arch", "90")
    assert out.returncode == 1 and "lacks parameters ['R_T']" in out.stdout, out.stdout + out.stderr
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"launches.jsonl:1: not a JSON record"):
        aot.read_records(str(path))


def test_recorder_without_launching(device):
    """``launch=False`` records the variants and skips the kernels (``bench/variants.py`` uses it
    to enumerate the GPU benchmark grid on a CPU)."""
    import torch

    from kernels import aot, lora_shrink, use_backend

    from .cases import make_case

    case = make_case(70, 40, 24, {0: [8, 3], 1: [16]}, max_users=2, device=device)
    with use_backend("triton"):
        assert lora_shrink(case.x, case.bank, case.plan).abs().sum() > 0
        # the shrink writes all of its output itself (no zero-fill): deterministic mode fills
        # new tensors with NaN, so an output left all NaN was never written
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with aot.LaunchRecorder(launch=False) as rec:
                t = lora_shrink(case.x, case.bank, case.plan)
        finally:
            torch.use_deterministic_algorithms(was)
    assert [r["kernel"] for r in rec.records.values()] == ["lora_shrink"]
    assert t.isnan().all()
    with use_backend("triton"), aot.LaunchRecorder(launch=False, record=False) as quiet:  # a no-op stub
        lora_shrink(case.x, case.bank, case.plan)
    assert quiet.records == {}


def test_bench_variants_records_the_grid(monkeypatch):
    """``bench/variants.py`` drives the benchmark's problems through the launchers: on the CPU
    subset here, every kernel of the forward and backward is recorded, with the GPU's flags."""
    import importlib.util
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("bench/variants.py is the CPU stand-in for a GPU run")
    root = Path(__file__).resolve().parents[2]
    # what the module sets and imports stays inside this test
    monkeypatch.setenv("MILP_BENCH_SIZE", "small")
    monkeypatch.setenv("MILP_BENCH_DTYPE", "bfloat16")
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("bench_variants", root / "bench" / "variants.py")
    variants = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(variants)
    finally:
        for name in set(sys.modules) - before:  # bench's _util, baselines: not packages of the project
            if name in ("_util", "baselines"):
                del sys.modules[name]
    small = variants.U.workloads
    monkeypatch.setattr(variants.U, "workloads", lambda op, size: small(op, "small")[:3])
    rec = variants.record(["fwd", "fwdbwd"], progress=False)
    kinds = {r["kernel"] for r in rec.records.values()}
    assert kinds == {"fused_lora_linear", "lora_shrink", "lora_expand", "lora_grad_weights"}, kinds
    assert all(r["constexprs"]["UPCAST"] is False for r in rec.records.values())
    with pytest.raises(SystemExit):
        variants.main(["--out", "/dev/null", "--ops", "gemm"])


@pytest.mark.parametrize("args, message", [
    (["--arch", "95"], "--arch must be one of [70, 75, 80, 86, 87, 89, 90, 100, 120] (compute capability x10), got 95"),
    (["--arch", "9"], "--arch must be one of"),  # 9.0 written without the x10
    (["--kernel", "lora_expand_gemv"], "--kernel lora_expand_gemv has no scenario"),
])
def test_cli_refuses_what_it_cannot_check(args, message, capsys):
    """Refused before any compile: an arch whose shared memory is unknown (the check would pass
    anything), a kernel the scenarios do not cover."""
    from kernels import aot

    with pytest.raises(SystemExit) as exc:
        aot.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_a_recorded_file_without_records(tmp_path, capsys):
    """An empty record file (a recording run that launched nothing) is no evidence that the
    launches fit: refused, where it used to report "0 recorded variants ... 0 do not" and exit 0.
    Records of other kernels than ``--kernel`` count as none."""
    from kernels import aot

    path = tmp_path / "launches.jsonl"
    path.write_text("\n")
    with pytest.raises(SystemExit) as exc:
        aot.main(["--recorded", str(path)])
    assert exc.value.code == 2 and "holds no launch records" in capsys.readouterr().err
    rec = {"kernel": "lora_shrink", "signature": {"x_ptr": "*bf16"}, "constexprs": {}, "div16": [], "options": {}}
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit) as exc:
        aot.main(["--recorded", str(path), "--kernel", "lora_expand_gemv"])  # a recorded kernel's name is taken
    assert exc.value.code == 2 and "holds no launch records of lora_expand_gemv" in capsys.readouterr().err


def test_blackwell_tensor_cores_are_named():
    """sm_100 lowers the prefill shrink's dots to ``tcgen05.mma``: reported as such, not as ``fma``."""
    code = ("from kernels.aot import compile_variants\n"
            "for r in compile_variants(100, 'bf16', 'lora_shrink'): print(r.row())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = dict((line.split(" sm_")[0].split(None, 1)[1].strip(), line) for line in out.stdout.splitlines())
    assert rows["prefill 4096 tokens r=3072"].endswith("tcgen05"), out.stdout
    assert rows["decode 32 tokens k=4096 r<=96"].endswith(" mma"), out.stdout
