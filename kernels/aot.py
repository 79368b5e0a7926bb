"""Compile the Triton kernels ahead of time for a GPU architecture — no GPU needed.

Triton's compiler and the ``ptxas`` it ships run on any machine, so every kernel variant
can be lowered to PTX and SASS for Hopper (sm_90a), Ampere (sm_80) or the other
architectures of :data:`SHARED_LIMIT` on a CPU-only
machine: this catches code that the CPU interpreter accepts but the compiler rejects,
and reports what matters for speed — shared memory, registers, spills, and whether the
matrix products use Hopper's ``wgmma`` (``HGMMA`` in SASS), Blackwell's ``tcgen05.mma`` or the
older ``mma``.

Usage::

    TRITON_INTERPRET=0 python -m kernels.aot --arch 90 --dtype bf16

(``TRITON_INTERPRET`` must be unset or 0: interpreted kernels cannot be compiled.)

Beyond these representative scenarios, :class:`LaunchRecorder` writes down every variant a run
actually launches (kernel, constexprs, argument types and the JIT's specialisation of each
argument, as a GPU would see them), and :func:`compile_recorded` compiles each distinct one.
That is how a CPU machine checks that *every* variant the GPU test suite will launch compiles
and fits the chip's shared memory (``MILP_RECORD_LAUNCHES=FILE`` on a ``pytest tests/kernels``
run under the interpreter, then ``python -m kernels.aot --recorded FILE --arch 90``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any, TypedDict

import triton
import triton.language as tl

__all__ = ["AotReport", "LaunchRecorder", "compile_recorded", "compile_variants", "SCENARIOS", "SHARED_LIMIT",
           "VARIANTS"]

_DT = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
#: the most shared memory one block may use (bytes, CUDA's opt-in limit per compute capability
#: x10): H100/H200 227 KB, A100 163 KB, consumer Ampere/Ada/Blackwell 99 KB
SHARED_LIMIT = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


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
    #: Blackwell's (sm_100) tensor-core MMA, from tensor memory
    tcgen05: bool = False

    def row(self) -> str:
        mm = "wgmma" if self.wgmma else "tcgen05" if self.tcgen05 else "mma" if self.mma else "fma"
        return (f"{self.kernel:<18} {self.variant:<43} sm_{self.arch} {self.dtype:<5} smem={self.shared_bytes:>6} "
                f"regs={self.registers!s:>4} spill={self.spill_bytes!s:>4} {mm}")


class _Problem(TypedDict):
    num_tokens: int
    n: int
    k: int
    max_rank: int


#: (kernel, scenario name, problem) compiled with the configs the launchers would pick
SCENARIOS: tuple[tuple[str, str, _Problem], ...] = (
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


def _variants(dtype: str) -> list[tuple[str, str, Any, dict[str, str], list[str], dict[str, int | bool],
                                       dict[str, int | bool]]]:
    import torch

    from .ops._common import next_pow2
    from .tuning import choose_path, get_config

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    kinds = {
        "fused_lora_linear": (
            _jit_kernel("fused_lora_linear"),
            dict(x_ptr="dt", w_ptr="dt", bias_ptr="dt", a_ptr="dt", b_ptr="dt", scale_ptr="fp32", slots_ptr="i32",
                 sorted_ptr="i32", tiles_ptr="i32", t_ptr="fp32", y_ptr="dt"),
            ["n_tiles", "K", "N", "R_T", "stride_xt", "stride_xk", "stride_wn", "stride_wk", "stride_a", "stride_b",
             "stride_t", "stride_yt"]),
        "lora_shrink": (
            _jit_kernel("lora_shrink"),
            dict(x_ptr="dt", a_ptr="dt", scale_ptr="fp32", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32",
                 t_ptr="fp32"),
            ["K", "R_T", "stride_xt", "stride_xk", "stride_a", "stride_t", "stride_ts"]),
        "lora_expand": (
            _jit_kernel("lora_expand"),
            dict(t_ptr="fp32", b_ptr="dt", slots_ptr="i32", sorted_ptr="i32", tiles_ptr="i32", y_ptr="dt"),
            ["N", "R_T", "stride_t", "stride_b", "stride_yt", "stride_ts"]),
        "lora_grad_weights": (
            _jit_kernel("lora_grad_weights"),
            dict(x_ptr="dt", dy_ptr="dt", t_bwd_ptr="fp32", t_fwd_ptr="fp32", slots_ptr="i32", sorted_ptr="i32",
                 seg_ptr="i32", da_ptr="dt", db_ptr="dt"),
            ["K", "N", "R_T", "stride_x", "stride_dy", "stride_tb", "stride_tf", "stride_da", "stride_db"]),
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
            consts = dict(SPLIT=split, ACCUMULATE=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
                          N_BLOCKS=1, HOIST_T=False)
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


def _require_compiler(what: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(f"{what} needs TRITON_INTERPRET unset or 0 (interpreted kernels cannot compile)")


def _compile(kernel: str, variant: str, dtype: str, fn: Any, signature: dict, constexprs: dict, attrs: dict,
             options: dict, arch: int) -> AotReport:
    """Compile one variant of ``fn`` for ``sm_<arch>`` and report what ptxas says of it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={p: signature[p] for p in fn.arg_names}, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs, spill = _ptxas_info(ptx, arch)
    return AotReport(kernel, variant, arch, dtype, int(compiled.metadata.shared), regs, spill,
                     wgmma="wgmma" in ptx, mma="mma.sync" in ptx, tcgen05="tcgen05.mma" in ptx)


def compile_variants(arch: int = 90, dtype: str = "bf16", only: str | None = None) -> list[AotReport]:
    """Compile every kernel in each of :data:`SCENARIOS` with the launch config the launcher
    would pick (tuned table or heuristic) for ``sm_<arch>``; one :class:`AotReport` each.

    Example:
        >>> reports = compile_variants(90, "bf16")  # doctest: +SKIP
        >>> all(r.wgmma for r in reports if r.kernel == "fused_lora_linear")  # doctest: +SKIP
        True
    """
    _require_compiler("compile_variants")
    if dtype not in _DT:
        raise ValueError(f"dtype must be one of {sorted(_DT)}, got {dtype!r}")
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
        reports.append(_compile(kernel, variant, dtype, fn, signature, consts, attrs, opts, arch))
    return reports


# ----------------------------------------------------------------------------- recorded launches
#: kernel name -> (module under kernels.ops, attribute)
_KERNELS = {
    "fused_lora_linear": ("fused_linear", "_fused_lora_linear_kernel"),
    "lora_shrink": ("shrink", "_shrink_kernel"),
    "lora_expand": ("expand", "_expand_kernel"),
    "lora_expand_gemv": ("expand", "_expand_gemv_kernel"),
    "lora_grad_weights": ("grad_weights", "_grad_weights_kernel"),
}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def _specialize(value: object) -> tuple[str, object]:
    """``(type, key)`` as the JIT specialises a launch argument: ``("*bf16", "D")`` for a
    16-byte aligned bf16 tensor, ``("i32", "D")`` for an int divisible by 16,
    ``("constexpr", 1)`` for the int 1."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(BaseBackend, value, False, True, True)


def _json_constexpr(value: object) -> object:
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    return value


def launch_record(kernel: str, fn: Any, args: tuple, kwargs: dict) -> dict:
    """What compiling one launch of ``fn`` needs, in JSON: signature, constexprs, the
    arguments specialised as divisible by 16, and the options (warps, stages). ``UPCAST`` (the
    interpreter's bf16 work-around, :func:`kernels.ops._common.dot_flags`) is set to its GPU
    value, False."""
    names = list(fn.arg_names)
    signature, constexprs, div16, options = {}, {}, [], {}
    for name, value in zip(names, args, strict=False):
        ty, key = _specialize(value)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", key
        else:
            signature[name] = ty
            if key == "D":
                div16.append(name)
    for name, value in kwargs.items():
        if name in _OPTIONS:
            options[name] = value
        elif name in names:
            signature[name], constexprs[name] = "constexpr", _json_constexpr(value)
        else:
            raise ValueError(f"{kernel}: launch argument {name!r} is neither a parameter nor an option")
    if "UPCAST" in constexprs:
        constexprs["UPCAST"] = False
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"{kernel}: the launch gave no value for {missing}")
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "div16": div16, "options": options}


class LaunchRecorder:
    """Records the distinct compiled variants that the project's Triton launches would need.

    Used as a context manager around any code that launches the kernels (typically a test
    session under ``TRITON_INTERPRET=1``); the launches still run. :meth:`write` saves one JSON
    line per distinct variant, for :func:`compile_recorded`.

    Example:
        >>> with LaunchRecorder() as rec:  # doctest: +SKIP
        ...     kernels.lora_linear(x, w, None, bank, plan)
        >>> len(rec.records) >= 1  # doctest: +SKIP
        True
    """

    def __init__(self, *, launch: bool = True, record: bool = True) -> None:
        """``launch=False``: record only, skip the launches (outputs stay uninitialised), to
        enumerate the variants of problems too large to run here (``bench/variants.py``).
        ``record=False`` with it: every launch a no-op and nothing written down, to time the
        host code alone (``bench/test_host_overhead.py``)."""
        self.records: dict[str, dict] = {}
        self.launch = launch
        self.record = record
        self._stack = contextlib.ExitStack()

    def _wrap(self, kernel: str, fn: Any) -> Any:
        recorder = self

        class _Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(fn, name)

            def __getitem__(self, grid: object) -> Callable[..., Any]:
                launch = fn[grid] if recorder.launch else None

                def run(*args: Any, **kwargs: Any) -> Any:
                    if recorder.record:
                        rec = launch_record(kernel, fn, args, kwargs)
                        recorder.records.setdefault(json.dumps(rec, sort_keys=True), rec)
                    return launch(*args, **kwargs) if recorder.launch else None  # type: ignore[misc]  # not None then

                return run

        return _Recording()

    def __enter__(self) -> LaunchRecorder:
        import importlib

        for kernel, (module, attr) in _KERNELS.items():
            mod = importlib.import_module(f"kernels.ops.{module}")
            original = getattr(mod, attr)
            setattr(mod, attr, self._wrap(kernel, original))
            self._stack.callback(setattr, mod, attr, original)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def write(self, path: str) -> int:
        """Append the distinct records to ``path`` (JSON lines); returns how many. Several
        processes may append to one file (pytest-xdist workers, each with its recorder): each
        appends all its lines in one write, under an exclusive lock where the OS has ``fcntl``."""
        text = "".join(key + "\n" for key in self.records)
        with open(path, "a", encoding="utf-8") as f:
            try:
                import fcntl
            except ImportError:  # Windows: no lock, one write call
                fcntl = None  # type: ignore[assignment]
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            f.write(text)
            f.flush()
        return len(self.records)


def _record_problem(rec: object) -> str | None:
    """What is wrong with the shape of a launch record (:func:`launch_record`), naming the
    field; ``None`` when it is good."""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__}"
    if rec.get("kernel") not in _KERNELS:
        return f"kernel must be one of {sorted(_KERNELS)}, got {rec.get('kernel')!r}"
    for key, kind in (("signature", dict), ("constexprs", dict), ("div16", list), ("options", dict)):
        if not isinstance(rec.get(key), kind):
            return f"{key} must be a JSON {'object' if kind is dict else 'array'}, got {rec.get(key)!r}"
    bad = [name for name, v in rec["constexprs"].items() if isinstance(v, dict) and v.get("tl_dtype") not in _DT]
    if bad:
        return f"constexprs {bad}: a dtype must be {{'tl_dtype': one of {sorted(_DT)}}}"
    return None


def read_records(path: str) -> list[dict]:
    """The distinct records of a JSON-lines file written by :meth:`LaunchRecorder.write`; a line
    that is not one raises a ``ValueError`` naming the file, the line and what is wrong."""
    seen: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not a JSON record ({exc})") from None
                problem = _record_problem(rec)
                if problem:
                    raise ValueError(f"{path}:{i}: not a launch record: {problem}")
                seen.setdefault(json.dumps(rec, sort_keys=True), rec)
    return list(seen.values())


def _jit_kernel(kernel: str) -> Any:
    import importlib

    if kernel not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(_KERNELS)}")
    module, attr = _KERNELS[kernel]
    return getattr(importlib.import_module(f"kernels.ops.{module}"), attr)


def _describe(exc: BaseException) -> str:
    """One line: the root cause of a compile failure and where (Triton wraps the cause in a
    ``CompilationError`` whose text is the source excerpt)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    where = str(exc).strip().splitlines()[0] if root is not exc and str(exc).strip() else ""
    msg = f"{type(root).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
    return f"{msg} ({where.rstrip(':')})" if where else msg


def compile_recorded(records: list[dict], arch: int = 90, jobs: int = 1) -> list[tuple[dict, AotReport | None,
                                                                                    str | None]]:
    """Compile each recorded variant for ``sm_<arch>``: ``(record, report, error)`` per record
    (``error`` = why it did not compile, else ``None``), in ``jobs`` processes.

    Compiled kernels land in Triton's cache under the key the JIT computes for the same launch,
    so on a GPU machine this also warms the cache ahead of a run (``bench/gpu_run.sh quick``)."""
    if jobs > 1 and len(records) > 1:
        import concurrent.futures
        import multiprocessing

        chunks = [records[i::jobs] for i in range(jobs)]
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(compile_recorded, chunks, [arch] * jobs))
        by_key = {json.dumps(out[0], sort_keys=True): out for part in parts for out in part}
        return [by_key[json.dumps(r, sort_keys=True)] for r in records]
    _require_compiler("compile_recorded")
    out: list[tuple[dict, AotReport | None, str | None]] = []
    for rec in records:
        problem = _record_problem(rec)
        if problem:  # reported with the others, not raised: the variants after it still compile
            out.append((rec, None, f"not a launch record: {problem}"))
            continue
        fn = _jit_kernel(rec["kernel"])
        # a tl.dtype constexpr was saved by its name (str(tl.bfloat16) == "bf16", the keys of _DT)
        consts = {k: _DT[v["tl_dtype"]] if isinstance(v, dict) else v for k, v in rec["constexprs"].items()}
        names = list(fn.arg_names)
        stale = [n for n in names if n not in rec["signature"]]
        if stale:  # recorded from another version of the kernel
            out.append((rec, None, f"the record lacks parameters {stale} of the kernel: recorded from another "
                                   "version of it; record the launches again"))
            continue
        # as the JIT builds them (triton.runtime.jit._pack_args): an entry for every specialised
        # argument, empty where it is not divisible by 16, so the cache key is the JIT's and a
        # variant compiled here on the GPU machine is found there by the first launch
        attrs = {(i,): ([["tt.divisibility", 16]] if n in rec["div16"] else [])
                 for i, n in enumerate(names) if rec["signature"][n] != "constexpr"}
        dt = next((t[1:] for t in rec["signature"].values() if t.startswith("*") and t[1:] in _DT), "?")
        variant = ", ".join(f"{k}={v}" for k, v in rec["constexprs"].items() if k.isupper() and k not in
                            ("UPCAST", "IEEE", "ACC"))
        try:
            report = _compile(rec["kernel"], variant, dt, fn, rec["signature"], consts, attrs, rec["options"], arch)
            out.append((rec, report, None))
        except Exception as exc:  # noqa: BLE001 - reported per variant
            out.append((rec, None, _describe(exc)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90,
                        help=f"compute capability x10, one of {sorted(SHARED_LIMIT)} (90 = H100/H200, 80 = A100)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DT), help="operand dtype")
    parser.add_argument("--kernel", default=None, choices=sorted(_KERNELS),
                        help=f"only this kernel (without --recorded: one of {', '.join(VARIANTS)})")
    parser.add_argument("--recorded", default=None, metavar="FILE",
                        help="compile every variant recorded in FILE (MILP_RECORD_LAUNCHES) instead of the "
                             "scenarios; exit 1 if one fails or exceeds the shared memory of sm_<arch>")
    parser.add_argument("--jobs", type=int, default=1, help="compile processes for --recorded (default 1)")
    args = parser.parse_args(argv)
    if args.arch not in SHARED_LIMIT:  # its shared-memory limit is what the check needs
        parser.error(f"--arch must be one of {sorted(SHARED_LIMIT)} (compute capability x10), got {args.arch}")
    if args.recorded is None:
        if args.kernel is not None and args.kernel not in VARIANTS:
            parser.error(f"--kernel {args.kernel} has no scenario (scenarios cover {', '.join(VARIANTS)}); "
                         f"compile its recorded launches with --recorded FILE")
        for r in compile_variants(args.arch, args.dtype, args.kernel):
            print(r.row())
        return 0
    if not os.path.isfile(args.recorded):
        parser.error(f"--recorded: no such file: {args.recorded}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        records = [r for r in read_records(args.recorded) if args.kernel in (None, r["kernel"])]
    except ValueError as exc:  # a damaged line: named, before any compile
        parser.error(f"--recorded: {exc}")
    if not records:  # nothing compiled is no evidence that the launches fit
        parser.error(f"--recorded: {args.recorded} holds no launch records"
                     + (f" of {args.kernel}" if args.kernel else "")
                     + " (was it written by a run with MILP_RECORD_LAUNCHES set that launched the kernels?)")
    bad = 0
    for rec, report, error in compile_recorded(records, args.arch, args.jobs):
        if error is not None:
            bad += 1
            print(f"FAILED {rec['kernel']} {json.dumps(rec['constexprs'])}: {error}")
            continue
        assert report is not None  # compile_recorded gives a report wherever it gives no error
        if report.shared_bytes > SHARED_LIMIT[args.arch]:
            bad += 1
            print(f"TOO MUCH SHARED MEMORY {report.row()}")
        else:
            print(report.row())
    print(f"{len(records)} recorded variants for sm_{args.arch}: {len(records) - bad} compile and fit, {bad} do not")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
