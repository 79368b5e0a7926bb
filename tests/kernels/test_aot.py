"""Every kernel compiles for Hopper and Ampere (no GPU needed): no spills, fits shared memory,
and the fused GEMM uses Hopper's wgmma. Catches code the CPU interpreter accepts but the
compiler rejects, and register/shared-memory regressions of the launch configs."""
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


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
