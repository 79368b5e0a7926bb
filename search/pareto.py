"""Pareto front, reference point and hypervolume in the objectives' own units (BoTorch inside).

``Y`` is ``[n, m]`` in natural units; ``directions`` gives ``"minimize"``/``"maximize"`` per
column.  Internally everything is mapped to BoTorch's maximisation convention
(minimised columns negated) and uses ``is_non_dominated``, ``infer_reference_point`` and
``DominatedPartitioning``.

Reference-point rule (:func:`infer_ref_point`): BoTorch's ``infer_reference_point`` on the
Pareto front of the finite observations, ``nadir - 0.1 · (ideal - nadir)`` in the
maximisation convention, i.e. 10 % of the front's range beyond its worst value in every
objective; where the front has zero range in an objective the margin is
``0.1 · max(|nadir|, 1)``.  A user-given reference point always takes precedence.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning
from botorch.utils.multi_objective.hypervolume import infer_reference_point
from botorch.utils.multi_objective.pareto import is_non_dominated

__all__ = ["hypervolume", "hypervolume_trace", "infer_ref_point", "pareto_mask", "to_maximization"]


def _signs(directions: Sequence[str], m: int) -> torch.Tensor:
    if not isinstance(directions, Sequence):
        raise TypeError(f"directions must be a sequence of 'minimize'/'maximize', got {type(directions).__name__}")
    if isinstance(directions, str) or len(directions) != m:
        raise ValueError(f"directions must list one of 'minimize'/'maximize' per objective ({m}), got {directions!r}")
    out = []
    for i, d in enumerate(directions):
        if d not in ("minimize", "maximize"):
            raise ValueError(f"directions[{i}] must be 'minimize' or 'maximize', got {d!r}")
        out.append(1.0 if d == "maximize" else -1.0)
    return torch.tensor(out, dtype=torch.float64)


def _num(directions: Sequence[str]) -> int:
    return 0 if isinstance(directions, str) or not isinstance(directions, Sequence) else len(directions)


def _as_tensor(v: object, name: str, expected: str) -> torch.Tensor:
    """``v`` as a float64 tensor; what torch cannot convert (text, ``None``, ragged rows) is a
    ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(v, (str, bytes)) or v is None:
        raise TypeError(f"{name} must be {expected}, got {type(v).__name__}")
    try:
        return torch.as_tensor(v, dtype=torch.float64)
    except TypeError as e:
        raise TypeError(f"{name} must be {expected} ({e})") from None
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be {expected} ({e})") from None


def _as_y(Y: object, name: str = "Y", m: int = 0) -> torch.Tensor:
    """``Y`` as a float64 ``[n, m]`` tensor; an empty list is ``[0, m]`` (no rows of ``m`` objectives)."""
    t = _as_tensor(Y, name, "a 2-D array of numbers [n, m]")
    if t.dim() == 1 and t.numel() == 0:
        t = t.reshape(0, m)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, m], got shape {tuple(t.shape)}")
    return t


def to_maximization(Y: object, directions: Sequence[str]) -> torch.Tensor:
    """``Y`` in BoTorch's convention (minimised columns negated).

    Example:
        >>> to_maximization([[1.0, 2.0]], ["minimize", "maximize"]).tolist()
        [[-1.0, 2.0]]
    """
    t = _as_y(Y, m=_num(directions))
    return t * _signs(directions, t.shape[-1])


def pareto_mask(Y: object, directions: Sequence[str]) -> list[bool]:
    """Which rows of ``Y`` are Pareto-optimal (rows with a non-finite value never are).

    Duplicated optimal rows are all marked.

    Example:
        >>> pareto_mask([[1, 1], [2, 0], [2, 2], [0, 3]], ["minimize", "minimize"])
        [True, True, False, True]
    """
    Ym = to_maximization(Y, directions)
    finite = torch.isfinite(Ym).all(-1)
    mask = torch.zeros(Ym.shape[0], dtype=torch.bool)
    if finite.any():
        mask[finite] = is_non_dominated(Ym[finite], deduplicate=False)
    return mask.tolist()


def infer_ref_point(Y: object, directions: Sequence[str], scale: float = 0.1) -> list[float]:
    """The reference point of the module's rule, in natural units.

    ``scale`` is the margin as a fraction of the front's range (finite, ``>= 0``).

    Example:
        >>> infer_ref_point([[0.0, 1.0], [1.0, 0.0]], ["minimize", "minimize"])
        [1.1, 1.1]
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__} ({scale!r})")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    t = _as_y(Y, m=_num(directions))
    signs = _signs(directions, t.shape[-1])
    Ym = t * signs
    Ym = Ym[torch.isfinite(Ym).all(-1)]
    if Ym.shape[0] == 0:
        raise ValueError("Y has no row with all values finite; cannot infer a reference point")
    front = Ym[is_non_dominated(Ym)]
    ref = infer_reference_point(front, scale=scale)
    nadir = front.min(0).values
    flat = (front.max(0).values - nadir) == 0
    ref = torch.where(flat, nadir - scale * nadir.abs().clamp_min(1.0), ref)
    return (ref * signs).tolist()


def _ref_max(ref_point: Sequence[float], signs: torch.Tensor) -> torch.Tensor:
    r = _as_tensor(ref_point, "ref_point", f"{signs.numel()} numbers (one per objective)")
    if r.shape != signs.shape:
        raise ValueError(f"ref_point must have {signs.numel()} values, got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError(f"ref_point must be finite, got {r.tolist()}")
    return r * signs


def hypervolume(Y: object, ref_point: Sequence[float], directions: Sequence[str]) -> float:
    """Hypervolume dominated by the finite rows of ``Y`` and bounded by ``ref_point``.

    Rows not strictly better than the reference point in every objective add nothing.

    Example:
        >>> hypervolume([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], [2.0, 2.0], ["minimize"] * 2)
        3.25
    """
    t = _as_y(Y, m=_num(directions))
    signs = _signs(directions, t.shape[-1])
    r = _ref_max(ref_point, signs)
    if t.shape[0] == 0:
        return 0.0
    Ym = t * signs
    Ym = Ym[torch.isfinite(Ym).all(-1)]
    if Ym.shape[0] == 0:
        return 0.0
    if Ym.shape[-1] == 1:  # one objective: a length (BoTorch's box decomposition needs m >= 2)
        return float((Ym.max() - r[0]).clamp_min(0.0))
    return float(DominatedPartitioning(ref_point=r, Y=Ym).compute_hypervolume())


def hypervolume_trace(Y: object, ref_point: Sequence[float], directions: Sequence[str]) -> list[float]:
    """Hypervolume of the first ``k`` rows for ``k = 1..n`` (non-decreasing).

    Example:
        >>> hypervolume_trace([[1.0, 1.0], [0.0, 2.0], [3.0, 3.0]], [2.0, 2.0], ["minimize"] * 2)
        [1.0, 1.0, 1.0]
    """
    t = _as_y(Y, m=_num(directions))
    _ref_max(ref_point, _signs(directions, t.shape[-1]))  # bad arguments are named even with no row
    out: list[float] = []
    best = 0.0
    for k in range(1, t.shape[0] + 1):
        row = t[k - 1]
        if k == 1 or bool(torch.isfinite(row).all()):
            # max: a dominated row adds nothing, but the box decomposition of the larger set can
            # round one ulp below the smaller set's volume
            hv = hypervolume(t[:k], ref_point, directions)
            best = hv if k == 1 else max(best, hv)
        out.append(best if math.isfinite(best) else 0.0)
    return out
