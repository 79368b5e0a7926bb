"""Argument checks shared by the ops: each failure names the argument and what was expected."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._backend import env

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a tensor as described.

    ``shape`` entries that are ``None`` are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_device(name: str, device: object) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``): a ``torch.device``, a device string
    such as ``"cuda:0"`` or a CUDA index; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a device string or None, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must name a device such as 'cpu' or 'cuda:0', got {device!r}") from None


def values_checked(t: torch.Tensor) -> bool:
    """Whether to check ``t``'s values (slots, ranks, token ids, row slots): always on CPU, where
    reading them is free; on a GPU only under ``MILP_DEBUG=1``, since reading them back stalls
    the host on every call (and cannot happen while a CUDA graph is captured)."""
    return t.device.type == "cpu" or env("MILP_DEBUG", "0") == "1"
