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

__all__ = ["AotReport", "compile_variants", "SCENARIOS", "VARIANTS"]

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
        return (f"{self.kernel:<18} {self.variant:<43} sm_{self.arch} {self.dtype:<5} smem={self.shared_bytes:>6} "
                f"regs={self.registers!s:>4} spill={self.spill_bytes!s:>4} {mm}")


#: (kernel, scenario name, problem) compiled with the configs the launchers would pick
SCENARIOS = (
    ("fused_lora_linear", "prefill 4096x4096->11008 r<=16", dict(num_tokens=4096, n=11008, k=4096, max_rank=16)),
    ("fused_lora_linear", "prefill 4096x4096->11008 r<=96", dict(num_tokens=4096, n=11008, k=4096, max_rank=96)),
    ("fused_lora_linear", "prefill 4096x11008->4096 r<=96", dict(num_tokens=4096, n=4096, k=11008, max_rank=96)),
    ("fused_lora_linear", "dx 4096x11008->4096 r<=96 (W^T)", dict(num_tokens=4096, n=4096, k=11008, max_rank=96)),
    ("fused_lora_linear", "prefill 32x96 modules", dict(num_tokens=4096, n=11008, k=4096, max_rank=3072)),
    ("lora_shrink", "decode 32 tokens k=4096 r<=96", dict(num_tokens=32, n=96, k=4096, max_rank=96)),
    ("lora_shrink", "prefill 4096 tokens r=3072", dict(num_tokens=4096, n=3072, k=4096, max_rank=3072)),
    ("lora_expand", "decode 32 tokens n=11008 r<=96", dict(num_tokens=32, n=11008, k=96, max_rank=96)),
    ("lora_grad_weights", "train 4096 tokens r<=96", dict(num_tokens=4096, n=11008, k=4096, max_rank=96)),
)


def _variants(dtype: str):
    import torch

    from .ops._common import next_pow2
    from .ops.expand import _expand_kernel
    from .ops.fused_linear import _fused_lora_linear_kernel
    from .ops.grad_weights import _grad_weights_kernel
    from .ops.shrink import _shrink_kernel
    from .tuning import choose_path, get_config

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    kinds = {
        "fused_lora_linear": (
            _fused_lora_linear_kernel,
            dict(x_ptr="dt", w_ptr="dt", bias_ptr="dt", a_ptr="dt", b_ptr="dt", scale_ptr="fp32", slots_ptr="i32",
                 sorted_ptr="i32", tiles_ptr="i32", t_ptr="fp32", y_ptr="dt"),
            ["n_tiles", "K", "N", "stride_xt", "stride_xk", "stride_wn", "stride_wk", "stride_a", "stride_b",
             "stride_t", "stride_yt"]),
        "lora_shrink": (
            _shrink_kernel,
            dict(x_ptr="dt", a_ptr="dt", scale_ptr="fp32", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32",
                 t_ptr="fp32"),
            ["K", "stride_xt", "stride_xk", "stride_a", "stride_t", "stride_ts"]),
        "lora_expand": (
            _expand_kernel,
            dict(t_ptr="fp32", b_ptr="dt", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32", y_ptr="dt"),
            ["N", "stride_t", "stride_b", "stride_yt", "stride_ts"]),
        "lora_grad_weights": (
            _grad_weights_kernel,
            dict(x_ptr="dt", dy_ptr="dt", t_bwd_ptr="fp32", t_fwd_ptr="fp32", slots_ptr="i32", sorted_ptr="i32",
                 seg_ptr="i32", da_ptr="dt", db_ptr="dt"),
            ["K", "N", "stride_x", "stride_dy", "stride_tb", "stride_tf", "stride_da", "stride_db"]),
    }
    out = []
    for kernel, name, prob in SCENARIOS:
        op = "fused_linear" if kernel == "fused_lora_linear" else kernel.removeprefix("lora_")
        cfg = get_config(op, dtype=torch_dtype, device=torch.device("cpu"), **prob)
        if kernel == "fused_lora_linear":
            load_t = choose_path(prob["num_tokens"], prob["max_rank"]) == "fused_t"
            name = f"{name} [{'fused_t' if load_t else 'fused'}]"
            consts = dict(HAS_BIAS=False, LOAD_T=load_t, STORE_T=not load_t, EVEN_K=prob["k"] % cfg.block_k == 0,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          BLOCK_R=cfg.block_r if load_t else next_pow2(prob["max_rank"]), GROUP_M=8)
        elif kernel == "lora_shrink":
            # the op's decode path (split_k > 1) keeps partial sums for the expand
            consts = dict(SPLIT_K=cfg.split_k, PARTIALS=cfg.split_k > 1, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
                          BLOCK_K=cfg.block_k)
        elif kernel == "lora_expand":
            # decode: adds the shrink's split-K partials (its split for K = 4096)
            split = get_config("shrink", num_tokens=prob["num_tokens"], n=prob["max_rank"], k=4096,
                               max_rank=prob["max_rank"], dtype=torch_dtype, device=torch.device("cpu")).split_k
            consts = dict(SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r)
        else:
            consts = dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_n, BLOCK_T=cfg.block_k)
        fn, ptr_kinds, ints = kinds[kernel]
        # unit strides are specialised to the constant 1 by the JIT at launch; do the same
        if kernel in ("fused_lora_linear", "lora_shrink"):
            consts["stride_xk"] = 1
        if kernel == "fused_lora_linear":
            consts["stride_wn" if name.startswith("dx") else "stride_wk"] = 1
        out.append((kernel, name, fn, ptr_kinds, ints, consts, cfg.kwargs()))
    return out


def _pointer_types(dt: str, kinds: dict[str, str]) -> dict[str, str]:
    return {name: "*" + (dt if kind == "dt" else kind) for name, kind in kinds.items()}


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
    """Compile every kernel in each of :data:`SCENARIOS` with the launch config the launcher
    would pick (tuned table or heuristic) for ``sm_<arch>``; one :class:`AotReport` each.

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

    reports = []
    for kernel, variant, fn, ptr_kinds, ints, constexprs, opts in _variants(dtype):
        if only and kernel != only:
            continue
        signature = _pointer_types(dtype, ptr_kinds)
        signature.update({name: "i32" for name in ints if name not in constexprs})
        consts = dict(constexprs, UPCAST=False, IEEE=dtype in ("fp32", "fp64"),
                      ACC=tl.float64 if dtype == "fp64" else tl.float32)
        signature.update({name: "constexpr" for name in consts})
        missing = [p for p in fn.arg_names if p not in signature]
        if missing:
            raise RuntimeError(f"{kernel}: no signature for parameters {missing}")
        # what the JIT infers at launch for real shapes: 16-byte aligned pointers, strides and
        # sizes divisible by 16 (4096, 11008, 5120, 13824 all are); it enables vector loads,
        # cp.async/TMA and software pipelining
        div16 = [i for i, p in enumerate(fn.arg_names)
                 if signature[p].startswith("*") or (signature[p] == "i32" and p != "n_tiles")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
        src = ASTSource(fn=fn, signature={p: signature[p] for p in fn.arg_names}, constexprs=consts, attrs=attrs)
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
