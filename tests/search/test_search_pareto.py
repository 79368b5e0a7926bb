"""Pareto front, reference point and hypervolume on fronts with known answers; plots."""
from __future__ import annotations

import math
import os

import pytest
import torch
from botorch.utils.multi_objective.pareto import is_non_dominated
from hypothesis import given, settings
from hypothesis import strategies as st

import search.pareto
import search.plots
import search.trial_log
from search import BoxSpace, Objective, Search
from search.pareto import hypervolume, hypervolume_trace, infer_ref_point, pareto_mask, to_maximization


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


def test_one_objective_hypervolume_is_a_length():
    # regression: BoTorch's DominatedPartitioning raised IndexError for m = 1
    assert hypervolume([[1.0], [0.5], [3.0]], [2.0], ["minimize"]) == pytest.approx(1.5)
    assert hypervolume([[1.0], [-4.0]], [2.0], ["maximize"]) == 0.0  # nothing beyond the reference
    assert hypervolume_trace([[1.5], [math.nan], [0.0]], [2.0], ["minimize"]) == pytest.approx([0.5, 0.5, 2.0])


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


def test_no_rows():
    """An empty history: no front, no volume, no reference point (named), in every shape of empty."""
    for Y in ([], torch.zeros(0, 2)):
        assert pareto_mask(Y, ["minimize", "maximize"]) == []
        assert to_maximization(Y, ["minimize", "maximize"]).shape == (0, 2)
        assert hypervolume(Y, [1.0, 1.0], ["minimize", "maximize"]) == 0.0
        assert hypervolume_trace(Y, [1.0, 1.0], ["minimize", "maximize"]) == []
        with pytest.raises(ValueError, match="no row"):
            infer_ref_point(Y, ["minimize", "maximize"])


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


# ------------------------------------------------------------------------------------------------
# properties on drawn point sets, against brute-force definitions: values on a quarter grid so that
# ties and duplicated rows are common; a few rows with NaN / ±inf (never optimal, add no volume)

_GRID = st.integers(-12, 12).map(lambda k: k / 4)
_NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def _problems(draw, max_rows=8, dims=(1, 2, 3)):
    """``(Y rows, directions)``; rows may repeat and a few may hold a non-finite value."""
    m = draw(st.sampled_from(dims))
    rows = draw(st.lists(st.lists(_GRID, min_size=m, max_size=m), min_size=1, max_size=max_rows))
    rows += draw(st.lists(st.sampled_from(rows), max_size=2))  # exact duplicates
    for r in draw(st.lists(st.integers(0, len(rows) - 1), max_size=2)):
        rows[r] = list(rows[r])
        rows[r][draw(st.integers(0, m - 1))] = draw(_NONFINITE)
    return rows, draw(st.lists(st.sampled_from(["minimize", "maximize"]), min_size=m, max_size=m))


def _maxconv(rows, directions):
    return [[v if d == "maximize" else -v for v, d in zip(r, directions)] for r in rows]


def _brute_mask(rows, directions):
    """Row i is optimal iff it is finite and no finite row is >= everywhere and > somewhere."""
    Ym = _maxconv(rows, directions)
    fin = [all(math.isfinite(v) for v in r) for r in Ym]
    return [fin[i] and not any(fin[j] and all(a >= b for a, b in zip(Ym[j], Ym[i])) and Ym[j] != Ym[i]
                               for j in range(len(Ym)))
            for i in range(len(Ym))]


def _brute_hv(rows, ref, directions):
    """Volume of the union of the boxes [ref, y] (maximisation convention), by inclusion–exclusion."""
    import itertools

    Ym = [r for r in _maxconv(rows, directions) if all(math.isfinite(v) for v in r)]
    rm = _maxconv([ref], directions)[0]
    total = 0.0
    for k in range(1, len(Ym) + 1):
        for sub in itertools.combinations(Ym, k):
            vol = math.prod(max(0.0, min(col) - r) for col, r in zip(zip(*sub), rm))
            total += vol if k % 2 else -vol
    return total


@settings(max_examples=150, deadline=None)
@given(problem=_problems(), data=st.data())
def test_pareto_mask_is_the_brute_force_front_in_any_order(problem, data):
    rows, dirs = problem
    mask = pareto_mask(rows, dirs)
    assert mask == _brute_mask(rows, dirs)
    perm = data.draw(st.permutations(range(len(rows))))
    assert pareto_mask([rows[i] for i in perm], dirs) == [mask[i] for i in perm]
    # negating a column and flipping its direction is the same problem
    j = data.draw(st.integers(0, len(dirs) - 1))
    flip = {"minimize": "maximize", "maximize": "minimize"}
    neg = [[-v if k == j else v for k, v in enumerate(r)] for r in rows]
    assert pareto_mask(neg, [flip[d] if k == j else d for k, d in enumerate(dirs)]) == mask


@settings(max_examples=5, deadline=None)
@given(n=st.integers(800, 1100), seed=st.integers(0, 10_000), dirs=st.sampled_from(
    [["minimize", "minimize"], ["minimize", "maximize"], ["maximize", "minimize", "maximize"]]))
def test_pareto_mask_on_large_sets_with_many_duplicates(n, seed, dirs):
    # BoTorch switches to a loop-based algorithm above ~800 float64 rows; duplicates must all stay marked
    g = torch.Generator().manual_seed(seed)
    Y = torch.randint(0, 6, (n, len(dirs)), generator=g).double()
    Ym = to_maximization(Y, dirs)
    ge = (Ym[:, None, :] >= Ym[None, :, :]).all(-1) & (Ym[:, None, :] > Ym[None, :, :]).any(-1)  # [j, i]: j dominates i
    assert pareto_mask(Y, dirs) == (~ge.any(0)).tolist()


@st.composite
def _with_ref(draw, max_rows=7):
    rows, dirs = draw(_problems(max_rows=max_rows))
    ref = [draw(_GRID) for _ in dirs]
    return rows, ref, dirs


@settings(max_examples=150, deadline=None)
@given(problem=_with_ref(), data=st.data())
def test_hypervolume_is_the_union_of_boxes(problem, data):
    rows, ref, dirs = problem
    hv = hypervolume(rows, ref, dirs)
    assert hv == pytest.approx(_brute_hv(rows, ref, dirs), rel=1e-9, abs=1e-9)
    # invariant to row order, to duplicated rows and to added rows that are dominated (or worse than ref)
    perm = data.draw(st.permutations(range(len(rows))))
    assert hypervolume([rows[i] for i in perm], ref, dirs) == pytest.approx(hv, rel=1e-9, abs=1e-12)
    base = data.draw(st.sampled_from(rows))
    worse = [v - d if dd == "maximize" else v + d for v, dd, d in
             zip(base, dirs, data.draw(st.lists(st.sampled_from([0.0, 0.25, 3.0]), min_size=len(dirs),
                                                max_size=len(dirs))))]
    assert hypervolume(rows + [worse, base], ref, dirs) == pytest.approx(hv, rel=1e-9, abs=1e-12)
    # a new row never lowers it; the trace is the hypervolume of each prefix
    new = [data.draw(_GRID) for _ in dirs]
    assert hypervolume(rows + [new], ref, dirs) >= hv - 1e-12
    trace = hypervolume_trace(rows, ref, dirs)
    assert trace == pytest.approx([_brute_hv(rows[:k], ref, dirs) for k in range(1, len(rows) + 1)],
                                  rel=1e-9, abs=1e-9)
    # negating a column, its direction and its reference coordinate: the same problem
    j = data.draw(st.integers(0, len(dirs) - 1))
    flip = {"minimize": "maximize", "maximize": "minimize"}
    neg = [[-v if k == j else v for k, v in enumerate(r)] for r in rows]
    neg_ref = [-v if k == j else v for k, v in enumerate(ref)]
    neg_dirs = [flip[d] if k == j else d for k, d in enumerate(dirs)]
    assert hypervolume(neg, neg_ref, neg_dirs) == pytest.approx(hv, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(problem=_with_ref(max_rows=6))
def test_hypervolume_agrees_with_botorch_hypervolume(problem):
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    rows, ref, dirs = problem
    Ym = torch.tensor(_maxconv(rows, dirs), dtype=torch.float64)
    Ym = Ym[torch.isfinite(Ym).all(-1)]
    r = torch.tensor(_maxconv([ref], dirs)[0], dtype=torch.float64)
    Ym = Ym[(Ym > r).all(-1)]  # BoTorch's Hypervolume takes the points that bound a volume
    want = Hypervolume(r).compute(Ym[is_non_dominated(Ym)]) if Ym.shape[0] else 0.0
    assert hypervolume(rows, ref, dirs) == pytest.approx(want, rel=1e-9, abs=1e-12)


def _brute_ref(rows, dirs, scale):
    """The module docstring's rule, on the brute-force front of the finite rows."""
    Ym = _maxconv(rows, dirs)
    front = [Ym[i] for i, m in enumerate(_brute_mask(rows, dirs)) if m]
    out = []
    for k, d in enumerate(dirs):
        col = [r[k] for r in front]
        nadir, ideal = min(col), max(col)
        ref = nadir - scale * (ideal - nadir) if ideal > nadir else nadir - scale * max(abs(nadir), 1.0)
        out.append(ref if d == "maximize" else -ref)
    return out


@settings(max_examples=100, deadline=None)
@given(problem=_problems(), scale=st.sampled_from([0.1, 0.5, 1.0]), data=st.data())
def test_inferred_reference_point_follows_the_documented_rule(problem, scale, data):
    rows, dirs = problem
    if not any(_brute_mask(rows, dirs)):
        with pytest.raises(ValueError, match="no row"):
            infer_ref_point(rows, dirs, scale)
        return
    ref = infer_ref_point(rows, dirs, scale)
    assert ref == pytest.approx(_brute_ref(rows, dirs, scale), rel=1e-12, abs=1e-12)
    # only the front matters: dominated rows do not move it
    base = data.draw(st.sampled_from([r for r, m in zip(rows, _brute_mask(rows, dirs)) if m]))
    worse = [v - 1.0 if d == "maximize" else v + 1.0 for v, d in zip(base, dirs)]
    assert infer_ref_point(rows + [worse], dirs, scale) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # every front row is strictly better than it, so each bounds a positive volume
    Ym, rm = _maxconv(rows, dirs), _maxconv([ref], dirs)[0]
    for row, m in zip(Ym, _brute_mask(rows, dirs)):
        if m:
            assert all(v > r for v, r in zip(row, rm))
    assert hypervolume(rows, ref, dirs) > 0


def test_hypervolume_trace_never_decreases_by_rounding():
    """The box decomposition of a larger set can round one ulp below the smaller set's volume
    (found by tests/search/test_loop_props.py); the trace is non-decreasing as documented."""
    from search.pareto import hypervolume_trace

    trace = hypervolume_trace([[-2.5104365263543036, -1.175494351e-38], [0.0, 0.0]], [6.0, -6.0],
                              ["minimize", "maximize"])
    assert trace == sorted(trace) and trace[1] == trace[0]
