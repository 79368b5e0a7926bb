"""Launch configurations as data, with a heuristic fallback.

Tuned configs live in ``kernels/configs/<gpu>.json`` (``<gpu>`` = the device name
lower-cased with non-alphanumerics as ``_``, e.g. ``nvidia_h100_80gb_hbm3``), over its
architecture's, ``sm_<major><minor>.json`` (:func:`table_paths_for`: what the GPU's own file
does not set, e.g. the dispatch thresholds, comes from there). A file named in
``MILP_KERNEL_CONFIGS`` overrides both. A file looks like::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "ops": {"fused_linear": [
         {"max_tokens": 64,   "n": null, "k": null, "block_m": 16, "block_n": 64,  "block_k": 128, ...},
         {"max_tokens": null, "n": 11008, "k": 4096, "block_m": 128, "block_n": 128, ...}]}}

An optional ``"dispatch"`` object overrides the thresholds of :func:`choose_path`
(``decode_max_tokens``, ``split_tokens_per_segment``, ``fused_max_rank``) and of the split
path's schedule (``split_expand_first_max_tokens``: :func:`split_expand_first`;
``split_overlap_min_tokens``: :func:`split_overlap`; ``split_parallel_max_tokens``:
:func:`split_parallel`); :func:`use_dispatch` overrides them all for a block of code.

The first entry whose ``max_tokens`` (inclusive, ``null`` = any), ``n``, ``k``, ``max_rank``
and ``dtype`` (``null`` = any) all match wins; otherwise :func:`heuristic_config` decides.
``block_m`` must be one of the plan's ``block_ms``; the nearest one (of those a config can take,
``>= MIN_BLOCK``) is taken otherwise. A file is checked whole when it is read: a malformed entry
or knob raises a ``ValueError`` naming the file, the op and the field, and so does an unknown
key (a misspelt field or knob would leave its default in force unseen): notes and the tuner's
measurements go under keys starting with ``_``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import numbers
import operator
import re
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._backend import env
from ._checks import FLOAT_DTYPES, check_device, check_positive_int
from .plan import _check_block_ms

__all__ = [
    "LaunchConfig",
    "get_config",
    "launch_plan",
    "heuristic_config",
    "config_path_for",
    "table_paths_for",
    "choose_path",
    "use_config",
    "PATHS",
    "DECODE_MAX_TOKENS",
    "FUSED_MAX_BLOCK_R",
    "FUSED_MAX_RANK",
    "SPLIT_TOKENS_PER_SEGMENT",
    "SPLIT_EXPAND_FIRST_MAX_TOKENS",
    "split_expand_first",
    "SPLIT_OVERLAP_MIN_TOKENS",
    "split_overlap",
    "SPLIT_PARALLEL_MAX_TOKENS",
    "split_parallel",
    "split_schedule",
    "use_dispatch",
    "DISPATCH_KNOBS",
]

_T = TypeVar("_T")
CONFIG_DIR = Path(__file__).parent / "configs"
OPS = ("fused_linear", "shrink", "expand", "grad_weights")
#: the three ways to compute ``x Wᵀ + Σ s (x Aᵀ) B`` (see :func:`choose_path`)
PATHS = ("split", "fused", "fused_t")
#: batches of at most this many tokens take the split path (decode)
DECODE_MAX_TOKENS = 64
#: batches averaging fewer tokens per user than this take the split path: segment-aligned
#: tiles this short would re-read W once per user
SPLIT_TOKENS_PER_SEGMENT = 32
#: largest rank the fused kernel multiplies inside its K loop (every column block redoes
#: ``x Aᵀ``: BLOCK_R / BLOCK_N extra tensor-core work); above it ``t`` is precomputed once
FUSED_MAX_RANK = 16
#: the largest ``t`` tile (``next_pow2`` of the bank's rank) the fused path keeps in registers,
#: even when asked for by ``path="fused"`` or a dispatch table: above it the path runs as
#: ``fused_t``. At 256 the tile needs 192 KB of shared memory (over an A100's 163 KB) and fp32
#: spills 100 KB a thread on sm_90; 128 compiles spill-free in bf16 (``python -m kernels.aot``)
FUSED_MAX_BLOCK_R = 128
#: batches of at most this many tokens run the split path expand-first (see
#: :func:`split_expand_first`); 0 = never: cuBLAS GEMM first, then the expand adds into ``y``
SPLIT_EXPAND_FIRST_MAX_TOKENS = 0
#: split-path batches of at least this many tokens run the shrink on a side CUDA stream,
#: concurrently with the base GEMM (see :func:`split_overlap`); 0 = never
SPLIT_OVERLAP_MIN_TOKENS = 0
#: inference split-path batches of at most this many tokens, captured in a CUDA graph, compute
#: ``t B`` on a side stream beside the base GEMM (see :func:`split_parallel`); 0 = never
SPLIT_PARALLEL_MAX_TOKENS = 0
#: the smallest tile side of a launch config (a tensor-core ``tl.dot`` needs a reduction of 16)
MIN_BLOCK = 16
#: the dispatch knobs a config table's ``"dispatch"`` object (or :func:`use_dispatch`) can set
DISPATCH_KNOBS = ("decode_max_tokens", "split_tokens_per_segment", "fused_max_rank", "split_expand_first_max_tokens",
                  "split_overlap_min_tokens", "split_parallel_max_tokens")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration. ``split_n`` (the expand only): 0 runs the tensor-core kernel
    over ``block_n``-column blocks; ``n > 0`` runs its decode (GEMV) form, ``n`` programs per
    tile, each streaming ``1/n`` of the columns in ``block_n`` blocks for one row at a time.
    ``n_blocks`` (the tensor-core expand only): column blocks per program, streamed with ``t``
    loaded once (1: a program per block)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    block_r: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    split_n: int = 0
    n_blocks: int = 1

    def __post_init__(self) -> None:
        """Refuse what no GPU compiles, naming the field: a Triton tile side must be a power of
        two, and a tensor-core ``tl.dot`` needs a reduction of at least 16 (``block_k`` in the
        shrink and fused kernels and ``dA``/``dB``'s token blocks, ``block_r`` in the expand),
        which the Triton interpreter on a CPU does not check. NumPy ints (a sweep's values) are
        taken, as plain ints."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, numbers.Integral) and not isinstance(v, (bool, int)):
                object.__setattr__(self, f.name, operator.index(v))
        for name in ("block_m", "block_n", "block_k", "block_r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < MIN_BLOCK or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= {MIN_BLOCK}, got {v!r}")
        v = self.num_warps
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 32 or v & (v - 1):
            raise ValueError(f"LaunchConfig.num_warps must be a power of two in 1..32, got {v!r}")
        for name, lo in (("split_k", 1), ("num_stages", 1), ("split_n", 0), ("n_blocks", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"LaunchConfig.{name} must be an int >= {lo}, got {v!r}")

    def kwargs(self) -> dict[str, int | bool]:
        """Launch options. ``enable_fp_fusion`` is stated rather than left to Triton's default,
        which ``TRITON_DEFAULT_FP_FUSION`` sets and Triton 3.10 turns off (3.9 warns that it will):
        the kernels' numerics and speed do not depend on the environment or the Triton release."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def config_path_for(device_name: str) -> Path:
    return CONFIG_DIR / f"{_slug(device_name)}.json"


def choose_path(
    num_tokens: int, max_rank: int, *, num_segments: int | None = None, device: torch.device | None = None
) -> str:
    """Which kernels compute a multi-LoRA linear of this shape.

    * ``"split"`` — base GEMM by cuBLAS over all tokens, then the split-K shrink and the
      expand-add: for decode (few tokens, many users), where the GEMM is a memory-bound
      GEMV that must read ``W`` exactly once.
    * ``"fused"`` — one launch: every ``x`` tile is loaded once for ``W`` and ``A``, ``t``
      stays in registers and is expanded before ``y`` is written. Pays ``BLOCK_R/BLOCK_N``
      extra tensor-core work, so only for small ranks.
    * ``"fused_t"`` — the shrink once (re-reads ``x``: ~2% of a 4096-wide GEMM), then the
      base GEMM with the expand in its epilogue (``y`` written once).

    ``num_segments`` (users present, host value; :attr:`BatchPlan.num_segments` when the
    plan was validated) lets batches with few tokens per user take the split path.
    Thresholds can be overridden per GPU by a ``"dispatch"`` object in the config JSON.

    Example:
        >>> choose_path(8, 96), choose_path(4096, 96), choose_path(4096, 8)
        ('split', 'fused_t', 'fused')
    """
    check_positive_int("num_tokens", num_tokens, minimum=0)
    check_positive_int("max_rank", max_rank, minimum=0)
    if num_segments is not None:
        check_positive_int("num_segments", num_segments, minimum=0)
    knobs = _dispatch_knobs(check_device("device", device))
    if num_tokens <= knobs["decode_max_tokens"]:
        return "split"
    if num_segments and num_tokens < knobs["split_tokens_per_segment"] * num_segments:
        return "split"
    return "fused" if max_rank <= knobs["fused_max_rank"] else "fused_t"


def _dispatch_knobs(device: torch.device | None) -> types.MappingProxyType:
    """The dispatch thresholds: this module's defaults, overridden by the GPU's config files
    (its architecture's, then its own), overridden by the ``MILP_KERNEL_CONFIGS`` table (the
    same precedence as the launch configs of :func:`get_config`), each through its
    ``"dispatch"`` object; :func:`use_dispatch` overrides them all."""
    forced = _override.dispatch
    tables = _tables(device) if device is not None else []
    # the module's defaults are in the key: assigning one (kernels.tuning.DECODE_MAX_TOKENS = …) takes effect
    key = ("__dispatch__", device, DECODE_MAX_TOKENS, SPLIT_TOKENS_PER_SEGMENT, FUSED_MAX_RANK,
           SPLIT_EXPAND_FIRST_MAX_TOKENS, SPLIT_OVERLAP_MIN_TOKENS, SPLIT_PARALLEL_MAX_TOKENS, forced)
    knobs = _memo_get(_CONFIG_MEMO, key, tables)
    if knobs is None:  # memoised like the configs: the path is chosen for every call
        knobs = {"decode_max_tokens": DECODE_MAX_TOKENS, "split_tokens_per_segment": SPLIT_TOKENS_PER_SEGMENT,
                 "fused_max_rank": FUSED_MAX_RANK, "split_expand_first_max_tokens": SPLIT_EXPAND_FIRST_MAX_TOKENS,
                 "split_overlap_min_tokens": SPLIT_OVERLAP_MIN_TOKENS,
                 "split_parallel_max_tokens": SPLIT_PARALLEL_MAX_TOKENS}
        for table in reversed(tables):
            knobs.update({k: v for k, v in table.get("__dispatch__", {}).items() if k in knobs})
        knobs.update(forced or ())
        knobs = types.MappingProxyType(knobs)
        _memo_put(_CONFIG_MEMO, key, tables, knobs)
    return knobs


@contextlib.contextmanager
def use_dispatch(**knobs: int) -> Iterator[None]:
    """Force dispatch knobs (names in :data:`DISPATCH_KNOBS`) inside the block, over the
    config tables and this module's defaults (experiments, autotuning, tests).

    Example:
        >>> with use_dispatch(decode_max_tokens=0):
        ...     choose_path(8, 96)
        'fused_t'
    """
    bad = sorted(set(knobs) - set(DISPATCH_KNOBS))
    if bad:
        raise ValueError(f"use_dispatch: unknown knob(s) {bad}; expected names from {DISPATCH_KNOBS}")
    for name, value in knobs.items():
        _check_count("use_dispatch", name, value)
    previous = _override.dispatch
    _override.dispatch = tuple(sorted({**dict(previous or ()), **knobs}.items()))
    try:
        yield
    finally:
        _override.dispatch = previous


def split_expand_first(num_tokens: int, device: torch.device | None = None) -> bool:
    """Order of the split path's kernels for a batch of ``num_tokens``.

    ``False``: cuBLAS computes ``y = x Wᵀ``, then the expand adds ``t B`` into ``y`` (it reads
    and writes ``y`` once more). ``True``: the expand writes ``t B`` into every row of ``y``,
    then cuBLAS adds ``x Wᵀ`` in its epilogue (``y.addmm_(x, Wᵀ)``, ``beta = 1``). On an
    H200 (``bench/probe_split.py``), expand-first was 6–12% faster at decode and 2–7% at
    512 tokens, and 4–7% slower at 16384 prefill tokens. The overwriting expand reached only
    1.6 TB/s there, and the ``beta = 1`` epilogue cost 0–7%. Knob
    ``"split_expand_first_max_tokens"`` of a config table's ``"dispatch"`` (expand-first up to
    that many tokens); default :data:`SPLIT_EXPAND_FIRST_MAX_TOKENS`.

    Example:
        >>> split_expand_first(32)
        False
    """
    return split_schedule(num_tokens, device)[1]


def split_overlap(num_tokens: int, device: torch.device | None = None) -> bool:
    """Whether the split path runs its shrink on a side CUDA stream, concurrently with the base
    GEMM (GEMM first only; the backward's grouped ``dA``/``dB`` follows the shrink there).

    The shrink needs only ``x`` and the base GEMM only ``x`` and ``W``; serially the shrink's
    time adds to the GEMM's. On an H200 (``bench/probe_split.py``) the shrink was latency-bound
    at prefill: 0.15 ms beside a 0.45 ms GEMM at 4096 tokens with ``K = 11008``. Concurrently it
    can fill SMs the GEMM leaves idle (its tail wave) at the price of a stream fork and join
    (a few µs of host time, none in a CUDA graph). Whether that wins depends on how cuBLAS's
    kernel occupies the GPU, so it is measured: ``python -m kernels.autotune`` times both and
    writes knob ``"split_overlap_min_tokens"`` of a config table's ``"dispatch"`` (overlap from
    that many tokens on; 0 = never, the default :data:`SPLIT_OVERLAP_MIN_TOKENS`).

    Example:
        >>> split_overlap(4096)
        False
        >>> with use_dispatch(split_overlap_min_tokens=1024):
        ...     split_overlap(512), split_overlap(4096)
        (False, True)
    """
    return split_schedule(num_tokens, device)[2]


def split_parallel(num_tokens: int, device: torch.device | None = None) -> bool:
    """Whether an inference split-path batch of ``num_tokens`` may run as two branches: the
    shrink and an expand writing ``d = t B`` on a side CUDA stream, beside the base GEMM (or
    GEMV) on the current one, then ``y += d``.

    At decode every piece is small and latency-bound: on an H200 with 32 users the GEMV took
    0.034 ms, the shrink 0.013 and the expand 0.045, one after the other (0.082 ms replayed
    from a CUDA graph). As two branches the adapters' work can hide beside the GEMV, for one
    more small launch (the add) and a ``[T, N]`` buffer. :mod:`kernels.library` takes it only
    while a CUDA graph is being captured: eagerly, decode is bound by the host, and the
    stream fork, join and add would only add host time. Knob ``"split_parallel_max_tokens"``
    of a config table's ``"dispatch"`` (up to that many tokens; 0 = never, the default
    :data:`SPLIT_PARALLEL_MAX_TOKENS`), which ``python -m kernels.autotune`` measures from
    CUDA-graph replays.

    Example:
        >>> with use_dispatch(split_parallel_max_tokens=256):
        ...     split_parallel(32), split_parallel(512)
        (True, False)
    """
    return split_schedule(num_tokens, device)[0]


def split_schedule(num_tokens: int, device: torch.device | None = None) -> tuple[bool, bool, bool]:
    """``(parallel, expand_first, overlap)``: :func:`split_parallel`, :func:`split_expand_first`
    and :func:`split_overlap` for a split-path batch of ``num_tokens``, from one lookup of the
    knobs (the op asks on every call; answered apart they cost a few µs more of host time).

    Example:
        >>> split_schedule(32)
        (False, False, False)
    """
    knobs = _dispatch_knobs(device)
    return (0 < num_tokens <= knobs["split_parallel_max_tokens"],
            0 < num_tokens <= knobs["split_expand_first_max_tokens"],
            0 < knobs["split_overlap_min_tokens"] <= num_tokens)


@functools.cache
def _load_table(path: str) -> dict:
    """The table at ``path`` (``{}`` when there is none), checked whole when it is read: a bad
    entry or knob is refused naming the file, the op and the field, even one no lookup reaches."""
    p = Path(path)
    if not p.exists():
        return {}
    with open(p, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: a kernel config table must be valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a kernel config table must be a JSON object, got {type(data).__name__}")
    unknown = _unknown(data, _TABLE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in a kernel config table; expected {_TABLE_KEYS} "
                         "(notes and measurements go under keys starting with '_')")
    ops = data.get("ops", {})
    if not isinstance(ops, dict):
        raise ValueError(f"{path}: 'ops' must be an object of op name -> list of configs")
    for op, entries in ops.items():
        if not isinstance(entries, list):
            raise ValueError(f"{path}: 'ops' of {op!r} must be a list of config entries, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem:
                raise ValueError(f"{path}: kernel config table entry of {op!r} #{i} {entry}: {problem}")
    dispatch = data.get("dispatch", {})
    if not isinstance(dispatch, dict):
        raise ValueError(f"{path}: 'dispatch' must be an object of threshold name -> int")
    unknown = _unknown(dispatch, DISPATCH_KNOBS)
    if unknown:  # a misspelt knob would leave its default in force unseen
        raise ValueError(f"{path}: 'dispatch': unknown knob(s) {unknown}; expected names from {DISPATCH_KNOBS} "
                         "(measurements go under keys starting with '_')")
    for name in DISPATCH_KNOBS:
        if name in dispatch:
            _check_count(f"{path}: 'dispatch'", name, dispatch[name])
    return dict(ops, __dispatch__=dispatch)


#: a table's top-level keys (others must start with ``_``: notes, the tuner's evidence)
_TABLE_KEYS = ("device", "triton", "torch", "created", "ops", "dispatch")
#: what an entry matches on, and what the autotuner records beside its launch config
_MATCH_KEYS = ("max_tokens", "n", "k", "max_rank", "dtype")
_ENTRY_NOTES = ("median_ms",)


def _unknown(obj: dict, known: tuple[str, ...] | set[str]) -> list[str]:
    """The keys of ``obj`` that are neither ``known`` nor notes (``_``-prefixed), sorted."""
    return sorted(k for k in obj if k not in known and not str(k).startswith("_"))


def _check_count(where: str, name: str, value: object) -> None:
    """A dispatch knob (a token count or a rank): an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as a table entry's ``dtype`` spells it (``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


#: the ``dtype`` names an entry may match: the kernels' float dtypes
_DTYPE_NAMES = tuple(_dtype_name(d) for d in FLOAT_DTYPES)


def _entry_problem(entry: object) -> str | None:
    """What is wrong with a config table entry, naming the field; ``None`` when it is good."""
    if not isinstance(entry, dict):
        return f"an entry must be an object of fields, got {type(entry).__name__}"
    unknown = _unknown(entry, {*_MATCH_KEYS, *_FIELDS, *_ENTRY_NOTES})
    if unknown:  # a misspelt field would leave its default in force unseen
        return (f"unknown field(s) {unknown}; expected match keys {_MATCH_KEYS}, launch config fields "
                f"{tuple(sorted(_FIELDS))} or notes starting with '_'")
    for key in _MATCH_KEYS[:-1]:
        v = entry.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"{key} must be an int >= 0 or null (any), got {v!r}"
    dt = entry.get("dtype")
    if dt is not None and dt not in _DTYPE_NAMES:
        return f"dtype must be one of {_DTYPE_NAMES} or null (any), got {dt!r}"
    try:
        _entry_config(entry)
    except ValueError as exc:  # LaunchConfig's own check, naming the field
        return str(exc)
    return None


def _entry_config(entry: dict) -> LaunchConfig:
    return LaunchConfig(**{key: v for key, v in entry.items() if key in _FIELDS})


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _tables(device: torch.device) -> list[dict]:
    tables = []
    override = env("MILP_KERNEL_CONFIGS")
    if override:
        tables.append(_load_table(override))
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        tables.extend(_load_table(path) for path in _device_table_paths(idx))
    return tables


@functools.cache
def _device_table_paths(index: int) -> tuple[str, ...]:
    # cached (no file-system calls per launch); write_table clears it when it adds a file
    return tuple(str(p) for p in table_paths_for(_device_name(index), torch.cuda.get_device_capability(index)))


def table_paths_for(device_name: str, capability: tuple[int, int] | None = None) -> list[Path]:
    """The config files a GPU reads, the first one's entries and dispatch knobs winning: its own
    (:func:`config_path_for`, what the autotuner writes) and its architecture's
    (``sm_<major><minor>.json``: the H200's measured dispatch for every sm_90 GPU), those that
    exist. None: the heuristics and this module's thresholds.

    Example:
        >>> [p.name for p in table_paths_for("NVIDIA H100 80GB HBM3", (9, 0))]
        ['sm_90.json']
    """
    paths = [config_path_for(device_name)]
    if capability is not None:
        paths.append(CONFIG_DIR / f"sm_{capability[0]}{capability[1]}.json")
    return [p for p in paths if p.exists()]


_FIELDS = {f.name for f in dataclasses.fields(LaunchConfig)}


def _match(entry: dict, num_tokens: int, n: int, k: int, max_rank: int, dtype: torch.dtype) -> bool:
    mt = entry.get("max_tokens")
    if mt is not None and num_tokens > mt:
        return False
    for key, value in (("n", n), ("k", k)):
        if entry.get(key) is not None and entry[key] != value:
            return False
    mr = entry.get("max_rank")
    if mr is not None and max_rank > mr:
        return False
    dt = entry.get("dtype")
    return dt is None or dt == _dtype_name(dtype)


def heuristic_config(op: str, *, num_tokens: int, n: int, k: int, max_rank: int, dtype: torch.dtype) -> LaunchConfig:
    """A reasonable config when no tuned entry matches."""
    wide = dtype == torch.float64
    if op == "fused_linear":
        bm = 16 if num_tokens <= 16 else 32 if num_tokens <= 64 else 64 if num_tokens <= 2048 else 128
        bn = 64 if wide else 128
        bk = 32 if wide or dtype == torch.float32 else 64
        warps = 8 if bm * bn >= 128 * 128 else 4
        return LaunchConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=3)
    if op == "shrink":
        decode = num_tokens <= DECODE_MAX_TOKENS
        bm = 16 if decode else 64
        # decode: few rows, long K -> split K across programs so enough of them stream A
        split = 1 if not decode or k < 1024 else min(16, max(1, k // 512))
        return LaunchConfig(block_m=bm, block_r=32 if max_rank > 16 else 16, block_k=64 if not wide else 32,
                            split_k=split, num_warps=4, num_stages=2)
    if op == "expand":
        bm = 16 if num_tokens <= DECODE_MAX_TOKENS else 64
        return LaunchConfig(block_m=bm, block_n=64 if wide else 128, block_r=16 if max_rank <= 16 else 32,
                            num_warps=4, num_stages=2)
    if op == "grad_weights":
        # block_k is the token chunk of the reduction, block_n the column block
        return LaunchConfig(block_m=16, block_r=32 if max_rank > 16 else 16, block_n=64, block_k=32,
                            num_warps=4, num_stages=2)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


class _Overrides(threading.local):
    """Per-thread overrides (:func:`use_config`, :func:`use_dispatch`). The class attributes
    are every thread's defaults: reading a missing attribute of a plain ``threading.local``
    raises and catches inside ``getattr`` (0.4 µs), and the launchers read these per launch."""

    table: dict | None = None
    dispatch: tuple | None = None


_override = _Overrides()


@contextlib.contextmanager
def use_config(op: str, config: LaunchConfig) -> Iterator[None]:
    """Force ``config`` for every launch of ``op`` inside the block (autotuning, experiments).

    Example:
        >>> with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=32, split_k=4)):
        ...     pass  # every lora_shrink launch here uses this config
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig, got {type(config).__name__}")
    table = _override.table
    if table is None:
        table = _override.table = {}
    previous = table.get(op)
    table[op] = config
    try:
        yield
    finally:
        if previous is None:
            table.pop(op, None)
        else:
            table[op] = previous


def get_config(
    op: str,
    *,
    num_tokens: int,
    n: int,
    k: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    block_ms: tuple[int, ...] | list[int] | None = None,
) -> LaunchConfig:
    """The launch config of ``op`` for this problem: a tuned entry, else the heuristic.

    Example:
        >>> get_config("fused_linear", num_tokens=4096, n=11008, k=4096, max_rank=96,
        ...            dtype=torch.bfloat16, device=torch.device("cpu")).block_m
        128
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    for name, v in (("num_tokens", num_tokens), ("n", n), ("k", k), ("max_rank", max_rank)):
        if v is not None or name in ("num_tokens", "max_rank"):  # n, k = None: any (a table entry's null)
            check_positive_int(name, v, minimum=0)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    checked = check_device("device", device)
    if checked is None:
        raise TypeError("device must be a torch.device, got None")
    device = checked
    if block_ms is not None and not (isinstance(block_ms, (tuple, list)) and not block_ms):
        block_ms = _check_block_ms(block_ms)
    cfg = (_override.table or {}).get(op)
    if cfg is not None:
        return _fit_block_m(cfg, block_ms)
    tables = _tables(device)
    key = (op, num_tokens, n, k, max_rank, dtype, tuple(block_ms) if block_ms else ())
    hit = _memo_get(_CONFIG_MEMO, key, tables)
    if hit is not None:
        return hit
    for table in tables:
        for entry in table.get(op, []):
            if _match(entry, num_tokens, n, k, max_rank, dtype):
                cfg = _entry_config(entry)  # checked when the table was read
                break
        if cfg is not None:
            break
    if cfg is None:
        cfg = heuristic_config(op, num_tokens=num_tokens, n=n, k=k, max_rank=max_rank, dtype=dtype)
    cfg = _fit_block_m(cfg, block_ms)
    _memo_put(_CONFIG_MEMO, key, tables, cfg)
    return cfg


def launch_plan(key: tuple, device: torch.device, build: Callable[[], _T]) -> _T:
    """``build()`` memoised under ``(key, device)``: what a launcher decides on the host before
    its launch (config, tile rows, grid, constexprs), once per problem instead of once per
    launch. ``key`` must hold everything ``build`` reads besides the config tables; a
    reloaded table (another ``MILP_KERNEL_CONFIGS``, a cleared cache) rebuilds, and inside a
    :func:`use_config` block nothing is memoised.

    Example:
        >>> launch_plan(("demo", 7), torch.device("cpu"), lambda: 7 * 6)
        42
    """
    if _override.table:
        return build()
    tables = _tables(device)
    full = (key, device)
    hit = _memo_get(_PLAN_MEMO, full, tables)
    if hit is None:
        hit = build()
        _memo_put(_PLAN_MEMO, full, tables, hit)
    return hit


def _memo_get(memo: dict[tuple, tuple[list[dict], Any]], key: tuple, tables: list[dict]) -> Any:
    # an entry holds the tables it was computed from; a reloaded table (another file,
    # _load_table.cache_clear()) is another object, so the entry is recomputed
    hit = memo.get(key)
    if hit is not None and len(hit[0]) == len(tables) and all(map(operator.is_, hit[0], tables)):
        return hit[1]
    return None


def _memo_put(memo: dict[tuple, tuple[list[dict], Any]], key: tuple, tables: list[dict], value: object) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = (tables, value)


# (op, tokens, n, k, max_rank, dtype, block_ms) -> (tables it came from, config), and the
# launchers' plans by their keys: the lookups run for every launch, and a decode step
# launches a few hundred kernels
_CONFIG_MEMO: dict[tuple, tuple[list[dict], LaunchConfig | types.MappingProxyType]] = {}
_PLAN_MEMO: dict[tuple, tuple[list[dict], object]] = {}
_MEMO_SIZE = 4096


def _fit_block_m(cfg: LaunchConfig, block_ms: tuple[int, ...] | list[int] | None) -> LaunchConfig:
    """``cfg`` with its ``block_m`` moved to the nearest of the plan's tile heights that a launch
    config can take (``>= MIN_BLOCK``: a plan may also keep smaller ones)."""
    if block_ms and cfg.block_m not in block_ms:
        fit = [b for b in block_ms if b >= MIN_BLOCK]
        if not fit:
            raise ValueError(f"block_ms={list(block_ms)} (the plan's tile heights) has none >= {MIN_BLOCK}, "
                             f"the smallest block_m the kernels take")
        nearest = min(fit, key=lambda b: (abs(b - cfg.block_m), b))
        cfg = dataclasses.replace(cfg, block_m=nearest)
    return cfg
