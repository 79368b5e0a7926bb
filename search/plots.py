"""PNG plots: the Pareto front and hypervolume against evaluations (matplotlib, Agg canvas).

Figures are drawn on a ``FigureCanvasAgg`` (no pyplot, no global backend switch) and
written atomically.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .pareto import _signs, pareto_mask
from .trial_log import atomic_write_with

if TYPE_CHECKING:  # matplotlib is the plot extra: imported when a plot is drawn
    from matplotlib.figure import Figure

__all__ = ["plot_hypervolume", "plot_pareto"]


def _figure(ncols: int = 1) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a test/plot extra
        raise ImportError("plots need matplotlib: pip install 'milp-toolkit[plot]'") from e
    fig = Figure(figsize=(4.8 * ncols, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_pareto(
    Y: Sequence[Sequence[float]],
    names: Sequence[str],
    directions: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "Pareto front",
) -> None:
    """Scatter every evaluated point and highlight the Pareto front; one panel per pair of objectives.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "front.png"
        >>> plot_pareto([[1, 2], [2, 1], [2, 2]], ["ce", "params"], ["minimize"] * 2, p)
        >>> p.read_bytes()[:4]
        b'\\x89PNG'
    """
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names must be a sequence of objective names, got {type(names).__name__} ({names!r})")
    try:
        rows = [list(map(float, r)) for r in Y]
    except TypeError as e:
        raise ValueError(f"Y must be a 2-D sequence of numbers [n, m] ({e})") from e
    m = len(names)
    if m < 2:
        raise ValueError(f"names must list at least 2 objectives, got {list(names)}")
    if any(len(r) != m for r in rows):
        raise ValueError(f"Y rows must have {m} values (one per name)")
    _signs(directions, m)  # named even when Y has no row
    mask = pareto_mask(rows, directions) if rows else []
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    fig = _figure(len(pairs))
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        ax.scatter([r[i] for r in rows], [r[j] for r in rows], s=12, c="0.6", label="evaluated")
        front = sorted((r for r, on in zip(rows, mask) if on), key=lambda r: r[i])
        ax.plot([r[i] for r in front], [r[j] for r in front], "o-", c="C3", ms=5, label="Pareto front")
        arrow = {"minimize": "↓", "maximize": "↑"}
        ax.set_xlabel(f"{names[i]} {arrow.get(directions[i], '')}")
        ax.set_ylabel(f"{names[j]} {arrow.get(directions[j], '')}")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_hypervolume(
    traces: dict[str, Sequence[float]] | Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str = "Hypervolume vs evaluations",
    bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> None:
    """Hypervolume after each evaluation; one line per named trace, optional ``(low, high)`` bands.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "hv.png"
        >>> plot_hypervolume({"bo": [0, 1, 2], "sobol": [0, 1, 1]}, p)
        >>> p.exists()
        True
    """
    if isinstance(traces, (str, bytes)):
        raise TypeError(f"traces must be a sequence of values or a dict name -> sequence, got {traces!r}")
    if not isinstance(traces, dict):
        traces = {"search": list(traces)}
    for name, (lo, hi) in (bands or {}).items():
        if name not in traces:
            raise ValueError(f"bands has {name!r}, which is not a trace name ({list(traces)})")
        if not len(lo) == len(hi) == len(traces[name]):
            raise ValueError(
                f"bands[{name!r}] must be (low, high) with {len(traces[name])} values each (the trace's length), "
                f"got {len(lo)} and {len(hi)}"
            )
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, tr) in enumerate(traces.items()):
        xs = list(range(1, len(tr) + 1))
        ax.plot(xs, list(tr), c=f"C{k}", label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(xs, list(lo), list(hi), color=f"C{k}", alpha=0.2)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)
