"""Property-based tests of the search spaces: encode/decode, the parameter count, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.space import (
    PAPER_MODULES,
    PAPER_RANKS,
    BoxSpace,
    LoRAConfig,
    SearchSpace,
    ffn_target_shapes,
    parameter_count,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------- strategies
RANK_POOL = (8, 12, 16, 24, 32, 48, 64, 80, 96)  # ranks 8..96


@st.composite
def spaces(draw, max_layers=8, shapes=False):
    """A random LoRA space: module range inside 0..32, ranks from 8..96, any layout flags."""
    n_layers = draw(st.integers(1, max_layers))
    lo = draw(st.one_of(st.just(0), st.integers(*PAPER_MODULES)))
    hi = draw(st.integers(lo, PAPER_MODULES[1]))
    ranks = draw(st.lists(st.sampled_from(RANK_POOL), min_size=1, max_size=5, unique=True))
    target_shapes = None
    if shapes:
        target_shapes = [
            [tuple(draw(st.lists(st.integers(1, 64), min_size=2, max_size=2)))
             for _ in range(draw(st.integers(1, 3)))]
            for _ in range(n_layers)
        ]
    return SearchSpace(
        n_layers,
        modules=(lo, hi),
        ranks=ranks,
        rank_per_layer=draw(st.booleans()),
        modules_per_layer=draw(st.booleans()),
        search_layers=draw(st.booleans()),
        target_shapes=target_shapes,
    )


@st.composite
def configs_in(draw, space):
    """A configuration of ``space`` (drawn in configuration terms, not through decode)."""
    L = space.num_layers
    lo, hi = space.modules_range
    mask = tuple(draw(st.lists(st.booleans(), min_size=L, max_size=L))) if space.search_layers else (True,) * L
    if space.modules_per_layer:
        mods = tuple(draw(st.lists(st.integers(lo, hi), min_size=L, max_size=L)))
    else:
        mods = (draw(st.integers(lo, hi)),) * L
    if space.rank_per_layer:
        ranks = tuple(draw(st.lists(st.sampled_from(space.ranks), min_size=L, max_size=L)))
    else:
        ranks = (draw(st.sampled_from(space.ranks)),) * L
    return LoRAConfig(mask, mods, ranks)


def unit_points(dim):
    """Unit-cube points, with grid values, bin edges and out-of-cube values mixed in."""
    edges = st.sampled_from([0.0, 1.0, 0.5, 1 / 3, 2 / 3, 0.25, 0.75, 1 / 33, 32 / 33, -0.25, 1.25])
    return st.lists(st.one_of(st.floats(-0.5, 1.5, allow_nan=False), edges), min_size=dim, max_size=dim)


# ------------------------------------------------------------------------- encode / decode
@SETTINGS
@given(data=st.data())
def test_every_valid_config_round_trips_exactly(data):
    space = data.draw(spaces())
    c = data.draw(configs_in(space))
    x = space.encode(c)
    assert len(x) == space.dim
    for vals in space.discrete_values.values():  # the documented grid {0, 1/(K-1), ..., 1}
        K = len(vals)
        assert vals == ((0.0,) if K == 1 else tuple(j / (K - 1) for j in range(K)))
    assert all(v in space.discrete_values[i] for i, v in enumerate(x))  # a grid point
    assert space.decode(x) == c
    assert space.snap(x) == x
    # and through the log format (JSON) as well
    assert space.config_from_dict(space.config_to_dict(c)) == c
    assert LoRAConfig.from_json(c.to_json()) == c


@SETTINGS
@given(data=st.data())
def test_any_point_decodes_to_a_config_of_the_space(data):
    space = data.draw(spaces())
    x = data.draw(unit_points(space.dim))
    c = space.decode(x)
    lo, hi = space.modules_range
    assert c.num_layers == space.num_layers
    assert all(lo <= n <= hi for n in c.modules) and all(r in space.ranks for r in c.ranks)
    assert space.search_layers or all(c.layer_mask)
    assert space.modules_per_layer or len(set(c.modules)) == 1
    assert space.rank_per_layer or len(set(c.ranks)) == 1
    x2 = space.encode(c)  # never raises: the decoded config is in the space
    assert space.decode(x2) == c and space.snap(x) == x2
    assert space.decode_many([x, x2]) == [c, c]


@SETTINGS
@given(data=st.data())
def test_out_of_range_configs_are_refused_naming_the_field(data):
    space = data.draw(spaces())
    c = data.draw(configs_in(space))
    L = space.num_layers
    i = data.draw(st.integers(0, L - 1))
    lo, hi = space.modules_range
    bad_n = data.draw(st.one_of(st.integers(hi + 1, hi + 40), st.integers(0, lo - 1) if lo > 0 else st.nothing()))
    mods = list(c.modules) if space.modules_per_layer else [bad_n] * L
    mods[i] = bad_n
    with pytest.raises(ValueError, match=rf"config\.modules\[\d+\] = {bad_n} is outside"):
        space.encode(LoRAConfig(c.layer_mask, tuple(mods), c.ranks))
    bad_r = data.draw(st.integers(1, 200).filter(lambda r: r not in space.ranks))
    ranks = list(c.ranks) if space.rank_per_layer else [bad_r] * L
    ranks[i] = bad_r
    with pytest.raises(ValueError, match=rf"config\.ranks\[\d+\] = {bad_r} is not one of"):
        space.encode(LoRAConfig(c.layer_mask, c.modules, tuple(ranks)))
    with pytest.raises(ValueError, match="layers"):
        space.encode(LoRAConfig.uniform(L + 1, space.modules_range[0], space.ranks[0]))


@SETTINGS
@given(
    n=st.integers(1, 4),
    field=st.sampled_from(["modules", "ranks"]),
    bad=st.integers(-100, 0),
    i=st.integers(0, 3),
)
def test_lora_config_refuses_negative_or_zero_values_naming_the_field(n, field, bad, i):
    i = i % n
    vals = {"modules": [1] * n, "ranks": [8] * n}
    if field == "modules" and bad == 0:
        bad = -1  # 0 modules is valid
    vals[field][i] = bad
    with pytest.raises(ValueError, match=rf"{field}\[{i}\] must be >= "):
        LoRAConfig((True,) * n, tuple(vals["modules"]), tuple(vals["ranks"]))
    with pytest.raises(ValueError, match=rf"{field}\[{i}\] must be >= "):
        LoRAConfig.from_dict({"layer_mask": [True] * n, **vals})


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False), st.text(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=5,
)


@SETTINGS
@given(data=st.data(), field=st.sampled_from(["layer_mask", "modules", "ranks"]))
def test_lora_config_from_any_json_is_valid_or_refused_naming_the_field(data, field):
    d = {"layer_mask": [True, False], "modules": [2, 3], "ranks": [8, 16]}
    d[field] = data.draw(json_values)
    try:
        c = LoRAConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        assert field in str(e) or "per layer" in str(e), str(e)
    else:
        assert LoRAConfig.from_json(c.to_json()) == c


def test_lora_config_from_dict_names_a_field_that_is_not_a_list():
    """Regression: ``from_dict`` called ``tuple()`` on each field first, so a field holding a
    number or null failed with ``'int' object is not iterable``, naming nothing."""
    with pytest.raises(TypeError, match="layer_mask must be a sequence, got int"):
        LoRAConfig.from_dict({"layer_mask": 5, "modules": [1], "ranks": [8]})
    with pytest.raises(TypeError, match="modules must be a sequence, got NoneType"):
        LoRAConfig.from_dict({"layer_mask": [True], "modules": None, "ranks": [8]})


# ------------------------------------------------------------------------- parameter count
def reference_count(config: LoRAConfig, shapes) -> int:
    return sum(
        config.modules[i] * config.ranks[i] * sum(k + d for k, d in shapes[i])
        for i in range(config.num_layers)
        if config.layer_mask[i]
    )


@SETTINGS
@given(data=st.data())
def test_parameter_count_is_exact_and_monotone(data):
    space = data.draw(spaces(shapes=True))
    shapes = space.target_shapes
    c = data.draw(configs_in(space))
    p = space.parameter_count(c)
    assert p == reference_count(c, shapes) and isinstance(p, int)
    assert (p == 0) == (c.active_layers == ())
    # the per-module rank list form gives the same number
    assert parameter_count(c.layer_mask, c.modules, [[r] * n for n, r in zip(c.modules, c.ranks)], shapes) == p
    L = c.num_layers
    layer = data.draw(st.integers(0, L - 1))
    # switching a layer on, one more module, a larger rank: never fewer parameters
    on = LoRAConfig(tuple(True if j == layer else b for j, b in enumerate(c.layer_mask)), c.modules, c.ranks)
    assert parameter_count(on.layer_mask, on.modules, on.ranks, shapes) >= p
    more = tuple(n + (j == layer) for j, n in enumerate(c.modules))
    assert parameter_count(c.layer_mask, more, c.ranks, shapes) == p + c.layer_mask[layer] * c.ranks[layer] * sum(
        k + d for k, d in shapes[layer])
    bigger = tuple(r * 2 if j == layer else r for j, r in enumerate(c.ranks))
    assert parameter_count(c.layer_mask, c.modules, bigger, shapes) >= p
    # the vectorised (known objective) count agrees on the config's own grid point
    X = torch.tensor([space.encode(c)], dtype=torch.float64)
    assert space.parameter_count_tensor(X).tolist() == [float(p)]
    assert space.parameter_count_relaxed(X).item() == pytest.approx(float(p), rel=1e-12, abs=1e-9)


@SETTINGS
@given(data=st.data())
def test_parameter_count_tensor_matches_decode_anywhere(data):
    space = data.draw(spaces(shapes=True))
    xs = data.draw(st.lists(unit_points(space.dim), min_size=1, max_size=6))
    X = torch.tensor(xs, dtype=torch.float64)
    want = [float(space.parameter_count(c)) for c in space.decode_many(X)]
    assert space.parameter_count_tensor(X).tolist() == want


@SETTINGS
@given(data=st.data())
def test_effective_tensor_coincides_exactly_for_equivalent_configs(data):
    space = data.draw(spaces())
    a, b = data.draw(configs_in(space)), data.draw(configs_in(space))
    xa = space.encode(a)
    i = data.draw(st.integers(0, space.dim - 1))  # and a neighbour of a: one coordinate moved
    xc = xa[:i] + (data.draw(st.sampled_from(space.discrete_values[i])),) + xa[i + 1 :]
    c = space.decode(xc)
    E = space.effective_tensor(torch.tensor([xa, space.encode(b), xc], dtype=torch.float64))
    for e, other in ((E[1], b), (E[2], c)):
        same = space.canonical(a) == space.canonical(other)
        assert torch.equal(E[0], e) == same
    if space.canonical(a) == ():  # no adapter at all: the origin
        assert bool((E[0] == 0).all())


# ------------------------------------------------------------------------- bad input
@SETTINGS
@given(
    layers=st.integers(1, 6),
    lo=st.integers(-3, 40),
    hi=st.integers(-3, 40),
)
def test_space_module_range_is_validated(layers, lo, hi):
    if 0 <= lo <= hi:
        assert SearchSpace(layers, modules=(lo, hi)).modules_range == (lo, hi)
    else:
        with pytest.raises(ValueError, match=r"modules"):
            SearchSpace(layers, modules=(lo, hi))


# ------------------------------------------------------------------------- box space
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def boxes(draw):
    n = draw(st.integers(1, 4))
    bounds = []
    for _ in range(n):
        lo = draw(finite)
        width = draw(st.floats(1e-3, 1e6))
        bounds.append((lo, lo + width))
    return BoxSpace(bounds)


@SETTINGS
@given(data=st.data())
def test_box_decode_stays_in_the_box_and_encodes_back(data):
    space = data.draw(boxes())
    x = data.draw(unit_points(space.dim))
    c = space.decode(x)
    for v, (lo, hi) in zip(c, space.bounds):
        assert lo <= v <= hi
    u = space.encode(c)  # a decoded point is in the box: never "outside the bounds"
    assert all(0.0 <= v <= 1.0 for v in u)
    for a, b, (lo, hi) in zip(u, space.snap(x), space.bounds):  # up to rounding in the box's units
        assert a == pytest.approx(b, abs=4 * math.ulp(max(abs(lo), abs(hi))) / (hi - lo) + 1e-12)
    assert space.config_from_dict(space.config_to_dict(c)) == c


def test_box_decode_of_the_upper_corner_is_the_upper_bound():
    """Regression: ``lo + 1.0 * (hi - lo)`` rounds past ``hi`` (e.g. -0.1 + 0.30000000000000004),
    so decode gave a point that encode refused as outside the box."""
    s = BoxSpace([(-0.1, 0.2), (0.1, 0.7)])
    c = s.decode([1.0, 1.0])
    assert c == (0.2, 0.7)
    assert s.encode(c) == (1.0, 1.0)


def test_paper_space_defaults():
    s = SearchSpace(3)
    assert s.modules_range == PAPER_MODULES and s.ranks == PAPER_RANKS
    shapes = ffn_target_shapes(3, 8, 16)
    assert math.isclose(
        SearchSpace(3, target_shapes=shapes).parameter_count(LoRAConfig.uniform(3, 32, 96)),
        3 * 32 * 96 * 72,
    )
