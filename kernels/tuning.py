"""Launch configurations as data, with a heuristic fallback.

Tuned configs live in ``kernels/configs/<gpu>.json`` (``<gpu>`` = the device name
lower-cased with non-alphanumerics as ``_``, e.g. ``nvidia_h100_80gb_hbm3``) and may be
overridden by a file named in ``MILP_KERNEL_CONFIGS``. A file looks like::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "ops": {"fused_linear": [
         {"max_tokens": 64,   "n": null, "k": null, "block_m": 16, "block_n": 64,  "block_k": 128, ...},
         {"max_tokens": null, "n": 11008, "k": 4096, "block_m": 128, "block_n": 128, ...}]}}

The first entry whose ``max_tokens`` (inclusive, ``null`` = any), ``n``, ``k``, ``max_rank``
and ``dtype`` (``null`` = any) all match wins; otherwise :func:`heuristic_config` decides.
``block_m`` must be one of the plan's ``block_ms``; the nearest one is taken otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import torch

__all__ = ["LaunchConfig", "get_config", "heuristic_config", "config_path_for", "DECODE_MAX_TOKENS", "FUSED_MAX_RANK"]

CONFIG_DIR = Path(__file__).parent / "configs"
OPS = ("fused_linear", "shrink", "expand", "grad_weights")
#: batches of at most this many tokens take the decode path (base GEMM + split-K shrink + expand)
DECODE_MAX_TOKENS = 64
#: largest rank block the fused kernel computes inside its K loop; above it t is precomputed
FUSED_MAX_RANK = 128


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    block_r: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def kwargs(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def config_path_for(device_name: str) -> Path:
    return CONFIG_DIR / f"{_slug(device_name)}.json"


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    ops = data.get("ops", {})
    if not isinstance(ops, dict):
        raise ValueError(f"{path}: 'ops' must be an object of op name -> list of configs")
    return ops


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _tables(device: torch.device) -> list[dict]:
    tables = []
    override = os.environ.get("MILP_KERNEL_CONFIGS")
    if override:
        tables.append(_load_table(override))
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        tables.append(_load_table(str(config_path_for(_device_name(idx)))))
    return tables


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
    return dt is None or dt == str(dtype).replace("torch.", "")


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
    cfg = None
    for table in _tables(device):
        for entry in table.get(op, []):
            if _match(entry, num_tokens, n, k, max_rank, dtype):
                cfg = LaunchConfig(**{key: v for key, v in entry.items() if key in _FIELDS})
                break
        if cfg is not None:
            break
    if cfg is None:
        cfg = heuristic_config(op, num_tokens=num_tokens, n=n, k=k, max_rank=max_rank, dtype=dtype)
    if block_ms and cfg.block_m not in block_ms:
        nearest = min(block_ms, key=lambda b: (abs(b - cfg.block_m), b))
        cfg = dataclasses.replace(cfg, block_m=nearest)
    return cfg
