"""Pareto front, reference point and hypervolume on fronts with known answers; plots."""
from __future__ import annotations

import math
import os

import pytest
import torch

import search.pareto
import search.plots
import search.trial_log
from search import BoxSpace, Objective, Search
from search.pareto import hypervolume, hypervolume_trace, infer_ref_point, pareto_mask


def test_staircase_2d_minimize():
    Y = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.0, 3.0], [2.5, 2.5]]
    assert pareto_mask(Y, ["minimize"] * 2) == [True, True, True, False, False]
    # union of rectangles to (4, 4): 3x1 + 2x1 + 1x1 = 6
    assert hypervolume(Y, [4.0, 4.0], ["minimize"] * 2) == pytest.approx(6.0)


def test_mixed_directions_match_the_minimisation_problem():
    Y = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    flipped = torch.stack([Y[:, 0], -Y[:, 1]], -1)
    assert hypervolume(flipped, [4.0, -4.0], ["minimize", "maximize"]) == pytest.approx(6.0)
    assert pareto_mask(flipped, ["minimize", "maximize"]) == [True, True, True]


def test_3d_known_volume():
    # a single point at the origin with the reference point (1, 2, 3): a 1 x 2 x 3 box
    assert hypervolume([[0.0, 0.0, 0.0]], [1.0, 2.0, 3.0], ["minimize"] * 3) == pytest.approx(6.0)
    # two boxes overlapping in a unit cube: 2 + 2 - 1
    Y = [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    assert hypervolume(Y, [2.0, 2.0, 2.0], ["minimize"] * 3) == pytest.approx(3.0)


def test_dtlz2_front_approaches_the_known_max():
    from botorch.test_functions.multi_objective import DTLZ2

    p = DTLZ2(dim=6, num_objectives=2)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    X = torch.full((2001, 6), 0.5, dtype=torch.float64)
    X[:, 0] = t  # x_{m..d} = 0.5 lies on the Pareto front
    hv = hypervolume(p(X), [1.1, 1.1], ["minimize"] * 2)
    assert hv == pytest.approx(p.max_hv, rel=1e-3)


def test_points_worse_than_the_reference_add_nothing_and_nan_rows_are_ignored():
    Y = [[5.0, 5.0], [math.nan, 0.0], [1.0, 1.0]]
    assert hypervolume(Y, [2.0, 2.0], ["minimize"] * 2) == pytest.approx(1.0)
    assert pareto_mask(Y, ["minimize"] * 2) == [False, False, True]
    assert hypervolume([], [1.0, 1.0], ["minimize"] * 2) == 0.0


def test_trace_is_monotone_and_ends_at_the_total():
    g = torch.Generator().manual_seed(0)
    Y = torch.rand(40, 2, generator=g, dtype=torch.float64)
    tr = hypervolume_trace(Y, [1.0, 1.0], ["minimize"] * 2)
    assert all(b >= a for a, b in zip(tr, tr[1:]))
    assert tr[-1] == pytest.approx(hypervolume(Y, [1.0, 1.0], ["minimize"] * 2))


def test_reference_point_rule():
    Y = [[0.0, 10.0], [1.0, 0.0], [5.0, 20.0]]  # the last row is dominated
    assert infer_ref_point(Y, ["minimize"] * 2) == pytest.approx([1.1, 11.0])
    assert infer_ref_point(Y, ["maximize", "minimize"]) == pytest.approx([0.6, 22.0])
    assert infer_ref_point([[3.0, 4.0]], ["minimize", "maximize"]) == pytest.approx([3.3, 3.6])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pareto_mask([[1.0, 2.0]], ["minimize"]), "directions"),
        (lambda: pareto_mask([[1.0, 2.0]], ["minimize", "up"]), r"directions\[1\]"),
        (lambda: hypervolume([[1.0, 2.0]], [1.0], ["minimize"] * 2), "ref_point"),
        (lambda: hypervolume([[1.0, 2.0]], [1.0, math.inf], ["minimize"] * 2), "ref_point"),
        (lambda: hypervolume([1.0, 2.0], [1.0, 1.0], ["minimize"] * 2), "Y must be 2-D"),
        (lambda: infer_ref_point([[math.nan, 1.0]], ["minimize"] * 2), "no row"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_search_front_and_hypervolume_use_directions():
    s = Search(BoxSpace([(0, 1)]), [Objective("ce"), Objective("rouge", "maximize")], q=4, n_init=4,
               surrogate="gp", ref_point={"ce": 4.0})
    for t, v in zip(s.ask(), [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (3.0, 3.0)]):
        s.tell(t, {"ce": v[0], "rouge": -v[1]})
    assert [t.trial_id for t in s.pareto_front()] == [0, 1, 2]
    # rouge is inferred: the front's worst (-3) minus 10 % of its range (2) = -3.2
    assert s.reference_point() == pytest.approx([4.0, -3.2])
    assert s.hypervolume([4.0, -4.0]) == pytest.approx(6.0)
    tr = s.hypervolume_trace([4.0, -4.0])
    assert tr == pytest.approx([3.0, 5.0, 6.0, 6.0])


def test_plots_write_pngs_atomically(tmp_path):
    search.plots.plot_pareto([[1, 2, 3], [2, 1, 3], [3, 3, 0]], ["a", "b", "c"], ["minimize"] * 3, tmp_path / "p.png")
    search.plots.plot_hypervolume({"bo": [0, 1, 2]}, tmp_path / "h.png", bands={"bo": ([0, 0, 1], [0, 2, 3])})
    assert sorted(os.listdir(tmp_path)) == ["h.png", "p.png"]
    with pytest.raises(ValueError, match="names"):
        search.plots.plot_pareto([[1.0]], ["a"], ["minimize"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="Y rows"):
        search.plots.plot_pareto([[1.0, 2.0, 3.0]], ["a", "b"], ["minimize"] * 2, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_atomic_writes_leave_ordinary_file_modes(tmp_path):
    # mkstemp creates 0o600 files: a new result must come out 0o644, a replaced one keeps its mode
    new, kept = tmp_path / "a.json", tmp_path / "b.md"
    kept.write_text("old")
    kept.chmod(0o664)
    search.trial_log.atomic_write_text(new, "{}")
    search.trial_log.atomic_write_text(kept, "new")
    search.plots.plot_hypervolume({"bo": [0, 1]}, tmp_path / "h.png")
    assert [(p.stat().st_mode & 0o777) for p in (new, kept, tmp_path / "h.png")] == [0o644, 0o664, 0o644]
    assert kept.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["a.json", "b.md", "h.png"]
