"""Property-based and edge-case tests of the search's numerical modules: the surrogate and the
acquisition step, objectives, Pareto front / hypervolume invariants, the test problems, the
validation driver's statistics and the plots.

GP fits are the slow part: ``kind="gp"`` fits run under hypothesis with few examples; the
SAAS (NUTS) path runs on two tiny hand-picked data sets with the smallest NUTS settings.
"""
from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_helpers import lora_space_small

import search.validate as validate
from search import BoxSpace, Objective, SearchSpace, ffn_target_shapes
from search.objectives import check_objectives, default_objectives
from search.pareto import hypervolume, hypervolume_trace, infer_ref_point, pareto_mask, to_maximization
from search.plots import plot_hypervolume, plot_pareto
from search.problems import DTLZ2Problem, LoRASynthetic
from search.space import LoRAConfig
from search.surrogate import AcquisitionSettings, NUTSSettings, _mc_objective, fit_surrogate, propose

GP_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACQ = AcquisitionSettings(mc_samples=8, raw_samples=16, num_restarts=1, maxiter_alternating=2)
DIRS = st.sampled_from(["minimize", "maximize"])


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def posterior(model, X):
    p = model.posterior(X)
    return p.mean, p.variance


# ------------------------------------------------------------------------- surrogate: tiny data
_COORD = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0, allow_nan=False))


@st.composite
def tiny_data(draw):
    """1–4 rows (duplicates and box corners common), 1–3 dims, 1–2 columns (some constant)."""
    d = draw(st.integers(1, 3))
    rows = draw(st.lists(st.lists(_COORD, min_size=d, max_size=d), min_size=1, max_size=3))
    rows += draw(st.lists(st.sampled_from(rows), max_size=1))  # an exact duplicate
    n = len(rows)
    cols, const = [], []
    for _ in range(draw(st.integers(1, 2))):
        scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
        if draw(st.booleans()):
            c = draw(st.floats(-1e3, 1e3, allow_nan=False))
            cols.append([c] * n)
            const.append(c)
        else:
            cols.append([scale * draw(st.floats(-1, 1, allow_nan=False)) for _ in range(n)])
            const.append(None)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    X = torch.tensor(rows, dtype=dtype)
    Y = torch.tensor(cols, dtype=dtype).T.contiguous()
    return X, Y, const


@GP_SETTINGS
@given(data=tiny_data())
def test_gp_posterior_is_finite_on_tiny_degenerate_data(data):
    X, Y, const = data
    model = quiet(fit_surrogate, X, Y, kind="gp")
    assert model.num_outputs == Y.shape[1]
    Xt = torch.cat([X.double(), torch.rand(3, X.shape[1], dtype=torch.float64)])
    mean, var = posterior(model, Xt)
    assert mean.shape == var.shape == (Xt.shape[0], Y.shape[1]) and mean.dtype == torch.float64
    assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()
    for j, c in enumerate(const):  # a constant objective is predicted as that constant everywhere
        if c is not None:
            assert mean[:, j].tolist() == pytest.approx([float(torch.tensor(c, dtype=X.dtype))] * Xt.shape[0],
                                                        rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("case", ["single_point", "duplicates_at_edges_with_a_constant_objective"])
def test_saas_posterior_is_finite_on_tiny_degenerate_data(case):
    nuts = NUTSSettings(warmup_steps=4, num_samples=7, thinning=3)  # 7 is not a multiple of 3
    if case == "single_point":
        X = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
        Y = torch.tensor([[3.0]], dtype=torch.float64)
    else:
        X = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float32)
        Y = torch.tensor([[0.0, 2.5], [1.0, 2.5], [1.5, 2.5], [-1.0, 2.5]], dtype=torch.float32)
    model = quiet(fit_surrogate, X, Y, kind="saas", nuts=nuts, seed=3)
    assert model.num_outputs == Y.shape[1]
    # ceil(7 / 3) = 3 posterior samples kept, as NUTSSettings.kept_samples says
    assert [m.num_mcmc_samples for m in model.models] == [nuts.kept_samples] * Y.shape[1] == [3] * Y.shape[1]
    Xt = torch.cat([X.double(), torch.rand(2, 2, dtype=torch.float64)])
    mean, var = posterior(model, Xt)
    assert mean.shape == (3, Xt.shape[0], Y.shape[1])  # MCMC batch first
    assert torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()
    if case != "single_point":  # near the constant (NUTS samples the GP's constant mean around it)
        assert mean[..., 1].flatten().tolist() == pytest.approx([2.5] * mean[..., 1].numel(), abs=0.1)


@settings(max_examples=200, deadline=None)
@given(num_samples=st.integers(1, 300), thinning=st.integers(1, 300))
def test_kept_samples_is_the_length_of_the_thinned_chain(num_samples, thinning):
    if thinning > num_samples:
        with pytest.raises(ValueError, match="thinning"):
            NUTSSettings(1, num_samples, thinning)
        return
    assert NUTSSettings(1, num_samples, thinning).kept_samples == len(range(0, num_samples, thinning))


_X = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
_Y = torch.stack([_X[:, 0], 1 - _X[:, 0] * _X[:, 1]], -1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"Y": _Y[:, :0]}, ValueError, "Y must have at least one column"),
        ({"X": _X[:, :0]}, ValueError, "X must have at least one column"),
        ({"X": _X[:0], "Y": _Y[:0]}, ValueError, "X must have at least one row"),
        ({"Y": torch.tensor([[0.0, 1.0]] * 3 + [[math.inf, 0.0]], dtype=torch.float64)}, ValueError,
         "Y must be finite"),
        ({"X": torch.tensor([[0.5, math.nan]] * 4, dtype=torch.float64)}, ValueError, "X must be finite"),
        ({"X": _X.tolist()}, ValueError, "X must be a 2-D tensor"),
        ({"nuts": {}}, TypeError, "nuts must be NUTSSettings"),
        ({"nuts": 0}, TypeError, "nuts must be NUTSSettings"),
        ({"seed": "1"}, TypeError, "seed must be an int"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"kind": "saasbo"}, ValueError, "kind must be one of"),
    ],
)
def test_fit_surrogate_bad_input_names_the_argument(kwargs, exc, match):
    kw = {"X": _X, "Y": _Y, "kind": "gp", **kwargs}
    with pytest.raises(exc, match=match):
        fit_surrogate(kw.pop("X"), kw.pop("Y"), **kw)


@pytest.fixture(scope="module")
def gp2():
    """A GP of two objectives on a 2-D box (fitted once)."""
    torch.set_num_threads(1)
    return quiet(fit_surrogate, _X, _Y, kind="gp")


def _count(X):
    return X.sum(-1)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"ref_point": [0.0, float("nan")]}, ValueError, "ref_point must be finite"),
        ({"ref_point": torch.zeros(3)}, ValueError, r"ref_point must have shape \(2,\)"),
        ({"settings": {"mc_samples": 8}}, TypeError, "settings must be AcquisitionSettings"),
        ({"settings": 0}, TypeError, "settings must be AcquisitionSettings"),
        ({"q": 0}, ValueError, "q must be >= 1"),
        ({"X_baseline": torch.rand(4, 3, dtype=torch.float64)}, ValueError, "X_baseline must be"),
        ({"space": BoxSpace([(0, 1)] * 3)}, ValueError, "X_baseline must be"),
        # objective indices: every objective exactly once, one modelled index per model output
        ({"modelled": [0], "known": [(1, _count, -1.0)]}, ValueError, "modelled must list one objective index"),
        ({"modelled": [0, 1], "known": [(1, _count, -1.0)], "ref_point": torch.zeros(3)}, ValueError,
         "each objective index"),
        ({"modelled": [0, 3], "known": [(1, _count, -1.0)], "ref_point": torch.zeros(3)}, ValueError,
         "each objective index"),
        ({"modelled": [1, 0]}, ValueError, "modelled must be 0..m-1"),
    ],
)
def test_propose_bad_input_names_the_argument(gp2, kwargs, exc, match):
    kw = {"model": gp2, "X_baseline": _X, "ref_point": torch.zeros(2, dtype=torch.float64),
          "space": BoxSpace([(0, 1)] * 2), "q": 1, "settings": ACQ, **kwargs}
    with pytest.raises(exc, match=match):
        quiet(propose, **kw)


def test_propose_accepts_a_plain_sequence_as_reference_point(gp2):
    cand = quiet(propose, gp2, _X, [0.0, 0.0], BoxSpace([(0, 1)] * 2), 1, settings=ACQ)
    assert cand.shape == (1, 2) and cand.dtype == torch.float64


# A small LoRA space: 3 layer bits, n in 0..2 and r in {8, 16} (one known objective: parameters)
SMALL = SearchSpace(3, modules=(0, 2), ranks=(8, 16), target_shapes=ffn_target_shapes(3, 4, 8))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box=st.booleans(), n=st.integers(1, 4), q=st.integers(1, 2), seed=st.integers(0, 100),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_propose_returns_points_of_the_space(box, n, q, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    if box:
        space = BoxSpace([(0.0, 2.0), (-1.0, 1.0)])
        X = torch.rand(n, 2, generator=g, dtype=torch.float64)
        Y = torch.stack([X[:, 0], 1 - X.prod(-1)], -1)
        modelled, known = None, ()
    else:
        space = SMALL
        X = torch.tensor([space.snap(r) for r in torch.rand(n, space.dim, generator=g).tolist()],
                         dtype=torch.float64)
        Y = -X.sum(-1, keepdim=True)
        modelled, known = [0], [(1, space.parameter_count_relaxed, -1.0)]
    model = quiet(fit_surrogate, X.to(dtype), Y.to(dtype), kind="gp", seed=seed,
                  input_map=space.effective_tensor if not box else None)
    ref = torch.full((2,), -1e4, dtype=dtype)
    cand = quiet(propose, model, X.to(dtype), ref, space, q, modelled=modelled, known=known,
                 settings=ACQ, seed=seed)
    assert cand.shape == (q, space.dim) and cand.dtype == torch.float64
    assert ((cand >= 0) & (cand <= 1)).all()
    for row in cand.tolist():
        assert list(space.snap(row)) == row


@st.composite
def mc_objective_problems(draw):
    n_obj = draw(st.integers(2, 4))
    known_idx = draw(st.lists(st.integers(0, n_obj - 1), min_size=1, max_size=n_obj - 1, unique=True))
    modelled = [i for i in range(n_obj) if i not in known_idx]
    signs = {i: draw(st.sampled_from([-1.0, 1.0])) for i in known_idx}
    fb = draw(st.booleans())
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    return n_obj, modelled, known_idx, signs, fb, batch, draw(st.integers(1, 3)), draw(st.integers(1, 3))


@FAST
@given(p=mc_objective_problems())
def test_mc_objective_puts_each_objective_in_its_column(p):
    n_obj, modelled, known_idx, signs, fb, batch, q, d = p
    g = torch.Generator().manual_seed(0)
    fns = {i: (lambda X, k=i: (k + 1) * X.sum(-1) ** 2) for i in known_idx}
    obj = _mc_objective(n_obj, modelled, [(i, fns[i], signs[i]) for i in known_idx], fb)
    X = torch.rand(*batch, q, d, generator=g, dtype=torch.float64)
    mcmc = (2,) if fb else ()
    samples = torch.randn(5, *batch, *mcmc, q, len(modelled), generator=g, dtype=torch.float64)
    out = obj(samples, X=X)
    assert out.shape == (*samples.shape[:-1], n_obj)
    for j, i in enumerate(modelled):
        assert torch.equal(out[..., i], samples[..., j])
    for i in known_idx:
        want = signs[i] * fns[i](X)
        if fb:
            want = want.unsqueeze(-2)
        assert torch.equal(out[..., i], want.expand(samples.shape[:-1]))


# ------------------------------------------------------------------------- objectives
@FAST
@given(dirs=st.lists(DIRS, min_size=1, max_size=4), data=st.data())
def test_objective_signs_match_the_maximisation_convention(dirs, data):
    rows = data.draw(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=len(dirs),
                                       max_size=len(dirs)), max_size=5))
    objs = [Objective(f"o{i}", d) for i, d in enumerate(dirs)]
    Ym = to_maximization(rows, dirs)
    assert Ym.shape == (len(rows), len(dirs))
    signs = torch.tensor([o.sign for o in objs], dtype=torch.float64)
    assert torch.equal(Ym, torch.tensor(rows, dtype=torch.float64).reshape(-1, len(dirs)) * signs)
    # negating twice is the identity (the search logs natural units, BoTorch sees maximisation)
    assert torch.equal(to_maximization(Ym, dirs), torch.tensor(rows, dtype=torch.float64).reshape(-1, len(dirs)))
    assert [o.describe() for o in objs] == [{"name": f"o{i}", "direction": d, "known": False}
                                             for i, d in enumerate(dirs)]


def test_objectives_bad_input_and_defaults():
    space = lora_space_small()
    objs = default_objectives(space)
    assert [(o.name, o.direction, o.is_known) for o in objs] == [
        ("val_ce", "minimize", False), ("rouge_l", "maximize", False), ("parameters", "minimize", True)]
    assert [o.name for o in default_objectives(space, rouge=False)] == ["val_ce", "parameters"]
    c = LoRAConfig.uniform(8, 2, 16)
    x = torch.tensor([space.encode(c)], dtype=torch.float64)
    assert objs[2].known(x).item() == space.parameter_count(c) == objs[2].known_relaxed(x).item()
    with pytest.raises(ValueError, match="at least 2"):
        check_objectives([objs[0]])
    with pytest.raises(ValueError, match="unique names"):
        check_objectives([objs[0], objs[0]])
    with pytest.raises(ValueError, match="at least one objective must be evaluated"):
        check_objectives([objs[2], space.parameter_count_objective("p2")])
    with pytest.raises(TypeError, match=r"objectives\[1\]"):
        check_objectives([objs[0], "rouge_l"])
    with pytest.raises(TypeError, match="objectives must be a sequence"):
        check_objectives(objs[0])
    with pytest.raises(ValueError, match="direction"):
        Objective("a", "Minimize")
    with pytest.raises(TypeError, match="name"):
        Objective(1)
    with pytest.raises(ValueError, match="known_relaxed needs known"):
        Objective("a", known_relaxed=lambda X: X)


# ------------------------------------------------------------------------- pareto invariants
_GRID = st.integers(-8, 8).map(lambda k: k / 4)


@st.composite
def fronts(draw):
    m = draw(st.integers(1, 3))
    rows = draw(st.lists(st.lists(_GRID, min_size=m, max_size=m), min_size=1, max_size=6))
    dirs = draw(st.lists(DIRS, min_size=m, max_size=m))
    ref = [draw(_GRID) for _ in range(m)]
    return rows, ref, dirs


@FAST
@given(p=fronts(), shift=st.lists(st.integers(-8, 8), min_size=3, max_size=3),
       scale=st.sampled_from([0.5, 2.0, 4.0]))
def test_hypervolume_is_translation_and_scale_equivariant(p, shift, scale):
    rows, ref, dirs = p
    m = len(dirs)
    hv = hypervolume(rows, ref, dirs)
    moved = [[v + s for v, s in zip(r, shift)] for r in rows]
    assert hypervolume(moved, [v + s for v, s in zip(ref, shift)], dirs) == pytest.approx(hv, rel=1e-9, abs=1e-9)
    scaled = [[v * scale for v in r] for r in rows]
    assert hypervolume(scaled, [v * scale for v in ref], dirs) == pytest.approx(hv * scale**m, rel=1e-9, abs=1e-9)
    # a worse reference point never gives less volume
    worse = [v - 1.0 if d == "maximize" else v + 1.0 for v, d in zip(ref, dirs)]
    assert hypervolume(rows, worse, dirs) >= hv - 1e-12
    # the front alone has the whole volume, and every front row is strictly inside a positive box
    mask = pareto_mask(rows, dirs)
    front = [r for r, on in zip(rows, mask) if on]
    assert hypervolume(front, ref, dirs) == pytest.approx(hv, rel=1e-12, abs=1e-12)
    assert hypervolume_trace(rows, ref, dirs)[-1] == pytest.approx(hv, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        # an empty history must not hide a bad argument
        (lambda: hypervolume_trace([], [1.0], ["minimize", "minimize"]), ValueError, "ref_point"),
        (lambda: hypervolume_trace([], [1.0, 1.0], ["minimize", "up"]), ValueError, r"directions\[1\]"),
        (lambda: hypervolume_trace([], [1.0, math.nan], ["minimize"] * 2), ValueError, "ref_point must be finite"),
        (lambda: hypervolume_trace(torch.zeros(0, 3), [1.0, 1.0], ["minimize"] * 2), ValueError, "directions"),
        (lambda: infer_ref_point([[0.0, 1.0]], ["minimize"] * 2, scale=math.nan), ValueError, "scale"),
        (lambda: infer_ref_point([[0.0, 1.0]], ["minimize"] * 2, scale=-0.1), ValueError, "scale"),
        (lambda: infer_ref_point([[0.0, 1.0]], ["minimize"] * 2, scale="0.1"), TypeError, "scale"),
    ],
)
def test_pareto_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_pareto_ties_and_the_reference_point_on_the_front():
    dirs = ["minimize", "minimize"]
    Y = [[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [2.0, 1.0]]
    assert pareto_mask(Y, dirs) == [True, True, False, False]  # duplicated optimal rows are all marked
    assert hypervolume(Y, [2.0, 2.0], dirs) == pytest.approx(1.0)
    # rows on the reference point in one objective bound no volume
    assert hypervolume([[2.0, 0.0], [0.0, 2.0]], [2.0, 2.0], dirs) == 0.0
    assert infer_ref_point([[1.0, 1.0]] * 3, dirs) == pytest.approx([1.1, 1.1])
    assert infer_ref_point([[0.0, 0.0]], dirs) == pytest.approx([0.1, 0.1])  # a zero-range front
    assert infer_ref_point([[0.0, 1.0], [1.0, 0.0]], dirs, scale=0.0) == pytest.approx([1.0, 1.0])


# ------------------------------------------------------------------------- test problems
@pytest.fixture(scope="module")
def small_lora():
    return LoRASynthetic(num_layers=4, relevant_layers=(1, 3), hidden_size=8, intermediate_size=16, noise_std=0.0)


@st.composite
def lora_configs(draw, space):
    L = space.num_layers
    return LoRAConfig(tuple(draw(st.lists(st.booleans(), min_size=L, max_size=L))),
                      (draw(st.integers(*space.modules_range)),) * L, (draw(st.sampled_from(space.ranks)),) * L)


@FAST
@given(data=st.data())
def test_lora_synthetic_optima_are_never_beaten(small_lora, data):
    p = small_lora
    cs = data.draw(st.lists(lora_configs(p.space), min_size=1, max_size=6))
    Y = [p.true_values(c) for c in cs]
    dirs = ["minimize", "minimize"]
    assert all(y[0] >= p.best_loss - 1e-15 for y in Y)
    assert hypervolume(Y, p.ref_point, dirs) / p.hv_scale <= p.max_hv * (1 + 1e-12)
    assert hypervolume([p.log_values(y) for y in Y], list(p.log_ref_point), dirs) <= p.max_hv_log * (1 + 1e-12)
    # noise-free: the objective is the true loss; no adapter on a relevant layer: the base loss
    assert [v["val_ce"] for v in p(cs)] == [y[0] for y in Y]
    for c, y in zip(cs, Y):
        a, b = p.layers
        if not ((c.layer_mask[a] or c.layer_mask[b]) and c.modules[0] > 0):
            assert y[0] == 2.0


def test_lora_synthetic_noise_is_seeded_and_bad_arguments_are_named():
    cs = [LoRAConfig.uniform(4, 2, 16)] * 3
    kw = {"num_layers": 4, "relevant_layers": (0, 2), "hidden_size": 8, "intermediate_size": 16}
    a, b, c = LoRASynthetic(seed=1, **kw), LoRASynthetic(seed=1, **kw), LoRASynthetic(seed=2, **kw)
    assert a(cs) == b(cs) != c(cs)
    for bad, exc in (((0.5, 2), TypeError), ((True, 2), TypeError), ((0, 1, 2), ValueError), ((0,), ValueError),
                     ("ab", TypeError)):
        with pytest.raises(exc, match="relevant_layers"):
            LoRASynthetic(**{**kw, "relevant_layers": bad})
    for bad, exc in ((math.inf, ValueError), (math.nan, ValueError), ("0.1", TypeError)):
        with pytest.raises(exc, match="noise_std"):
            LoRASynthetic(**kw, noise_std=bad)


@FAST
@given(x0=st.floats(0, 1), rest=st.lists(st.floats(0, 1), min_size=5, max_size=5))
def test_dtlz2_front_is_the_unit_sphere(x0, rest):
    p = DTLZ2Problem()
    on = p.true_values([x0] + [0.5] * 5)
    assert math.fsum(v * v for v in on) == pytest.approx(1.0, rel=1e-12)
    off = p.true_values([x0] + rest)
    assert math.fsum(v * v for v in off) >= 1.0 - 1e-12
    assert p([[x0] + rest]) == [off]
    assert hypervolume([on, off], p.ref_point, ["minimize"] * 2) <= p.max_hv + 1e-12


# ------------------------------------------------------------------------- validation driver
@FAST
@given(xs=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=8))
def test_validate_stats(xs):
    s = validate._stats(xs)
    assert s["min"] == min(xs) and s["max"] == max(xs)
    assert s["min"] - 1e-9 * (1 + abs(s["min"])) <= s["mean"] <= s["max"] + 1e-9 * (1 + abs(s["max"]))
    assert s["std"] >= 0 and (len(xs) > 1 or s["std"] == 0.0)
    if len(set(xs)) == 1:
        assert s["std"] == pytest.approx(0.0, abs=1e-9 * (1 + abs(xs[0])))


def _res(bo, sobol, trace_len=3):
    """A results dict of the validation driver: ``bo``/``sobol`` are ``{seed: final_hv}``."""
    def run(seed, hv):
        return {"seed": seed, "final_hv": hv, "max_hv": 1.0, "trace": [hv] * trace_len, "wall_s": 1.0,
                "sources": {}}
    return {
        "command": "python -m search.validate",
        "settings": {"n_init": 2, "n_bo": 1, "q": 1, "surrogate": "gp", "warmup": 1, "samples": 1, "thinning": 1,
                     "mc_samples": 1, "raw_samples": 1, "num_restarts": 1, "threads": 1, "jobs": 2, "seeds": 2},
        "machine": "test", "note": "", "total_wall_s": 0.0,
        "problems": {"dtlz2": {"bo": [run(k, v) for k, v in sorted(bo.items())],
                               "sobol": [run(k, v) for k, v in sorted(sobol.items())]}},
    }


def test_validate_pairs_bo_and_sobol_runs_by_seed():
    # parallel workers finish out of order: the table written after each run must pair equal seeds
    md = validate._markdown(_res({0: 0.5, 1: 0.1}, {1: 0.2}))
    row = next(line for line in md.splitlines() if line.startswith("| dtlz2 | GP+qLogNEHVI"))
    assert "| 0/1 |" in row  # seed 1: BO 0.1 < Sobol 0.2 (not BO seed 0 against Sobol seed 1)
    md = validate._markdown(_res({0: 0.5, 1: 0.3}, {0: 0.4, 1: 0.2}))
    assert "| 2/2 |" in next(line for line in md.splitlines() if line.startswith("| dtlz2 | GP+qLogNEHVI"))


@pytest.mark.parametrize("bo, sobol, trace_len", [({0: 0.5}, {}, 1), ({}, {0: 0.0}, 0), ({}, {}, 2)])
def test_validate_table_and_plot_on_degenerate_results(tmp_path, bo, sobol, trace_len):
    res = _res(bo, sobol, trace_len)
    md = validate._markdown(res)
    assert md.startswith("# Search validation") and ("| dtlz2 |" in md) == bool(bo or sobol)
    validate._plot(res, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_validate_refuses_an_empty_budget_and_an_unknown_method(tmp_path):
    with pytest.raises(SystemExit, match="--n-init"):
        validate.main(["--n-init", "0", "--n-bo", "0", "--problems", "dtlz2", "--seeds", "1",
                       "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
    ns = argparse.Namespace(n_init=2, n_bo=0, q=1, surrogate="gp", warmup=1, samples=1, thinning=1,
                            mc_samples=1, raw_samples=1, num_restarts=1)
    with pytest.raises(ValueError, match="method"):
        validate.run_one("dtlz2", "BO", 0, ns)
    with pytest.raises(ValueError, match="problem"):
        validate.run_one("zdt1", "bo", 0, ns)


# ------------------------------------------------------------------------- plots
_VAL = st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(m=st.integers(2, 3), data=st.data())
def test_plots_never_crash_on_empty_one_point_or_non_finite_data(tmp_path, m, data):
    rows = data.draw(st.lists(st.lists(_VAL, min_size=m, max_size=m), max_size=3))
    dirs = data.draw(st.lists(DIRS, min_size=m, max_size=m))
    p = tmp_path / "front.png"
    plot_pareto(rows, [f"o{i}" for i in range(m)], dirs, p)
    assert p.read_bytes()[:4] == b"\x89PNG"
    trace = data.draw(st.lists(_VAL, max_size=3))
    h = tmp_path / "hv.png"
    named = data.draw(st.booleans())  # a bare sequence is the trace named "search"
    quiet(plot_hypervolume, {"bo": trace} if named else trace, h, bands={"bo" if named else "search": (trace, trace)})
    assert h.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "call, exc, match",
    [
        # an empty Y must not hide bad directions
        (lambda p: plot_pareto([], ["a", "b"], ["minimize"], p), ValueError, "directions"),
        (lambda p: plot_pareto([], ["a", "b"], ["minimize", "up"], p), ValueError, r"directions\[1\]"),
        (lambda p: plot_pareto([1.0, 2.0], ["a", "b"], ["minimize"] * 2, p), ValueError, "Y"),
        (lambda p: plot_pareto([[1.0, 2.0]], "ab", ["minimize"] * 2, p), TypeError, "names"),
        (lambda p: plot_hypervolume({"bo": [1.0, 2.0]}, p, bands={"bo": ([0.0], [1.0])}), ValueError, "bands"),
        (lambda p: plot_hypervolume({"bo": [1.0, 2.0]}, p, bands={"sobol": ([0.0] * 2, [1.0] * 2)}), ValueError,
         "bands"),
        (lambda p: plot_hypervolume("bo", p), TypeError, "traces"),
    ],
)
def test_plots_bad_input_names_the_argument(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

