"""Compile the Triton kernels ahead of time for a GPU architecture — no GPU needed.

Triton's compiler and the ``ptxas`` it ships run on any machine, so every kernel variant
can be lowered to PTX and SASS for Hopper (sm_90a) or Ampere (sm_80) on a CPU-only
machine: this catches code that the CPU interpreter accepts but the compiler rejects,
and reports what matters for speed — shared memory, registers, spills, and whether the
matrix products use Hopper's ``wgmma`` (``HGMMA`` in SASS) or the older ``mma``.

Usage::

    TRITON_INTERPRET=0 python -m kernels.aot --arch 90 --dtype bf16

(``TRITON_INTERPRET`` must be unset or 0: interpreted kernels cannot be compiled.)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl

__all__ = ["AotReport", "compile_variants", "VARIANTS"]

_DT = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}


@dataclasses.dataclass
class AotReport:
    kernel: str
    variant: str
    arch: int
    dtype: str
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    wgmma: bool
    mma: bool

    def row(self) -> str:
        mm = "wgmma" if self.wgmma else ("mma" if self.mma else "fma")
        return (f"{self.kernel:<22} {self.variant:<28} sm_{self.arch} {self.dtype:<5} smem={self.shared_bytes:>6} "
                f"regs={self.registers!s:>4} spill={self.spill_bytes!s:>4} {mm}")


def _variants():
    from .ops.expand import _expand_kernel
    from .ops.fused_linear import _fused_lora_linear_kernel
    from .ops.grad_weights import _grad_weights_kernel
    from .ops.shrink import _shrink_kernel

    def ptrs(dt, **kinds):
        return {name: ("*" + (dt if kind == "dt" else kind)) for name, kind in kinds.items()}

    fused_ptrs = dict(x_ptr="dt", w_ptr="dt", bias_ptr="dt", a_ptr="dt", b_ptr="dt", scale_ptr="fp32",
                      slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32", t_ptr="fp32", y_ptr="dt")
    fused_ints = ["n_tiles", "K", "N", "stride_xt", "stride_xk", "stride_wn", "stride_wk", "stride_a", "stride_b",
                  "stride_t", "stride_yt"]
    out = []
    for load_t, block_r, name in ((False, 128, "compute_t R<=128"), (True, 32, "load_t R>128")):
        out.append(("fused_lora_linear", name, _fused_lora_linear_kernel, fused_ptrs, fused_ints,
                    dict(HAS_BIAS=False, LOAD_T=load_t, STORE_T=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                         BLOCK_R=block_r, GROUP_M=8), dict(num_warps=8, num_stages=3)))
    out.append(("lora_shrink", "decode split-K=8", _shrink_kernel,
                dict(x_ptr="dt", a_ptr="dt", scale_ptr="fp32", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32",
                     t_ptr="fp32"),
                ["K", "stride_xt", "stride_xk", "stride_a", "stride_t"],
                dict(SPLIT_K=8, BLOCK_M=16, BLOCK_R=32, BLOCK_K=64), dict(num_warps=4, num_stages=2)))
    out.append(("lora_expand", "bm=16", _expand_kernel,
                dict(t_ptr="fp32", b_ptr="dt", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32", y_ptr="dt"),
                ["N", "stride_t", "stride_b", "stride_yt"],
                dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=32), dict(num_warps=4, num_stages=2)))
    out.append(("lora_grad_weights", "r=32 c=64 t=32", _grad_weights_kernel,
                dict(x_ptr="dt", dy_ptr="dt", t_bwd_ptr="fp32", t_fwd_ptr="fp32", slots_ptr="i32", sorted_ptr="i32",
                     seg_ptr="i32", da_ptr="dt", db_ptr="dt"),
                ["K", "N", "stride_x", "stride_dy", "stride_tb", "stride_tf", "stride_da", "stride_db"],
                dict(BLOCK_R=32, BLOCK_C=64, BLOCK_T=32), dict(num_warps=4, num_stages=2)))
    return out, ptrs


VARIANTS = ("fused_lora_linear", "lora_shrink", "lora_expand", "lora_grad_weights")


def _ptxas_info(ptx: str, arch: int) -> tuple[int | None, int | None]:
    from triton.backends.nvidia.compiler import get_ptxas

    try:  # triton >= 3.7 takes the arch; 3.6 does not
        ptxas = get_ptxas(arch)
    except TypeError:
        ptxas = get_ptxas()
    path = ptxas.path if hasattr(ptxas, "path") else ptxas[0]
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([path, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def compile_variants(arch: int = 90, dtype: str = "bf16", only: str | None = None) -> list[AotReport]:
    """Compile every kernel variant for ``sm_<arch>``; one :class:`AotReport` each.

    Example:
        >>> reports = compile_variants(90, "bf16")  # doctest: +SKIP
        >>> all(r.wgmma for r in reports if r.kernel == "fused_lora_linear")  # doctest: +SKIP
        True
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_variants needs TRITON_INTERPRET unset or 0 (interpreted kernels cannot compile)")
    if dtype not in _DT:
        raise ValueError(f"dtype must be one of {sorted(_DT)}, got {dtype!r}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ops._common import dot_flags  # noqa: F401  (same flags as the launchers)

    variants, ptrs = _variants()
    reports = []
    for kernel, variant, fn, ptr_kinds, ints, constexprs, opts in variants:
        if only and kernel != only:
            continue
        signature = ptrs(dtype, **ptr_kinds)
        signature.update({name: "i32" for name in ints})
        consts = dict(constexprs, UPCAST=False, IEEE=dtype in ("fp32", "fp64"),
                      ACC=tl.float64 if dtype == "fp64" else tl.float32)
        signature.update({name: "constexpr" for name in consts})
        missing = [p for p in fn.arg_names if p not in signature]
        if missing:
            raise RuntimeError(f"{kernel}: no signature for parameters {missing}")
        src = ASTSource(fn=fn, signature={p: signature[p] for p in fn.arg_names}, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        ptx = compiled.asm["ptx"]
        regs, spill = _ptxas_info(ptx, arch)
        reports.append(AotReport(kernel, variant, arch, dtype, int(compiled.metadata.shared), regs, spill,
                                 wgmma="wgmma" in ptx, mma="mma.sync" in ptx))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DT), help="operand dtype")
    parser.add_argument("--kernel", default=None, choices=VARIANTS, help="only this kernel")
    args = parser.parse_args(argv)
    for r in compile_variants(args.arch, args.dtype, args.kernel):
        print(r.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
