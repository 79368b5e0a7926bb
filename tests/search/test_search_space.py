"""Search spaces: exact encode/decode, the parameter count, bad input."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from search.space import (
    BoxSpace,
    LoRAConfig,
    SearchSpace,
    extended_space,
    ffn_target_shapes,
    paper_space,
    parameter_count,
)


# ------------------------------------------------------------------ parameter count
def test_parameter_count_hand_computed_llama_layer():
    # SmolLM2-135M: hidden 576, FFN 1536, 30 layers. One rank-8 module on gate/up/down:
    # gate/up: 8 * (576 + 1536) each, down: 8 * (1536 + 576)  -> 3 * 8 * 2112 = 50688
    shapes = ffn_target_shapes(30, 576, 1536)
    assert parameter_count([True] + [False] * 29, [1] * 30, [8] * 30, shapes) == 50688
    # all layers, 4 modules of rank 16: 30 * 4 * 16 * 6336
    assert parameter_count([True] * 30, [4] * 30, [16] * 30, shapes) == 30 * 4 * 16 * 6336


def test_parameter_count_llama2_7b_all_layers():
    # LLaMA2-7B: 32 layers, 4096 <-> 11008; n = 1, r = 8 on every layer
    shapes = ffn_target_shapes(32, 4096, 11008)
    per_layer = 8 * (2 * (4096 + 11008) + (11008 + 4096))
    assert parameter_count([True] * 32, [1] * 32, [8] * 32, shapes) == 32 * per_layer == 11_599_872


def test_parameter_count_mixed_ranks_and_masks():
    shapes = [[(3, 5)], [(2, 7), (7, 2)], []]
    # layer 0: ranks 1+2 on one linear of width 8 -> 24; layer 1: masked off; layer 2: no targets
    assert parameter_count([True, False, True], [2, 3, 5], [[1, 2], 4, 8], shapes) == 24
    assert parameter_count([True, True, True], [2, 3, 5], [[1, 2], 4, 8], shapes) == 24 + 3 * 4 * 18
    assert parameter_count([True, True, True], [0, 0, 0], [8, 8, 8], shapes) == 0
    assert parameter_count([], [], [], []) == 0


def test_parameter_count_accepts_numpy_and_bool_like():
    np = pytest.importorskip("numpy")
    shapes = ffn_target_shapes(2, 4, 8)
    got = parameter_count(np.array([1, 0], dtype=bool), np.array([2, 2]), np.array([8, 8]), shapes)
    assert got == 2 * 8 * 36 and isinstance(got, int)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (([True], [1, 2], [8], [[(4, 4)]]), ValueError, "modules"),
        (([True], [1], [8, 8], [[(4, 4)]]), ValueError, "ranks"),
        (([True], [1], [8], [[(4, 4)], [(4, 4)]]), ValueError, "target_shapes"),
        (([True], [-1], [8], [[(4, 4)]]), ValueError, r"modules\[0\]"),
        (([True], [1], [0], [[(4, 4)]]), ValueError, r"ranks\[0\]"),
        (([True], [2], [[8, -8]], [[(4, 4)]]), ValueError, r"ranks\[0\]\[1\]"),
        (([True], [2], [[8]], [[(4, 4)]]), ValueError, r"ranks\[0\] lists 1"),
        (([True], [1], [8], [[(4, 0)]]), ValueError, "out_features"),
        (([True], [1], [8], [[(4, 4, 4)]]), ValueError, r"target_shapes\[0\]\[0\]"),
        (([True], [1.5], [8], [[(4, 4)]]), TypeError, r"modules\[0\]"),
        (([True], [True], [8], [[(4, 4)]]), TypeError, r"modules\[0\]"),
        (([2], [1], [8], [[(4, 4)]]), TypeError, r"layer_mask\[0\]"),
        (("x", [1], [8], [[(4, 4)]]), TypeError, "layer_mask"),
    ],
)
def test_parameter_count_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        parameter_count(*args)


# ------------------------------------------------------------------- encode / decode
SPACES = [
    paper_space(6),
    extended_space(5),
    extended_space(4, modules_per_layer=True),
    SearchSpace(3, modules=(2, 2), ranks=(4,)),  # degenerate (fixed) dims
    SearchSpace(3, modules=(1, 7), ranks=(64, 8, 16)),  # unsorted rank set
    paper_space(4, search_layers=False),  # Table 4 ablations: no layer bits ...
    SearchSpace(3, modules=(2, 2), search_layers=False),  # ... only the size
    extended_space(3, modules_per_layer=True, search_layers=False),
]


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_grid_round_trip_is_exact(space):
    # every grid point decodes to a configuration that encodes back to the same floats
    torch.manual_seed(0)
    for _ in range(200):
        x = [vals[torch.randint(len(vals), ()).item()] for _, vals in sorted(space.discrete_values.items())]
        c = space.decode(x)
        assert space.encode(c) == tuple(x)
        assert space.decode(space.encode(c)) == c


@pytest.mark.parametrize("space", SPACES, ids=repr)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_point_snaps_onto_grid(space, data):
    x = data.draw(st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=space.dim, max_size=space.dim))
    s = space.snap(x)
    for i, v in enumerate(s):
        assert v in space.discrete_values[i]
    assert space.snap(s) == s
    assert space.decode(s) == space.decode(x)


def test_paper_space_layout_and_values():
    s = paper_space(32)
    assert s.dim == 34 and s.names[-2:] == ("modules", "rank")
    assert len(s.discrete_values[32]) == 33 and len(s.discrete_values[33]) == 5
    c = s.decode([1.0] * 32 + [0.0, 1.0])
    assert c.layer_mask == (True,) * 32 and c.modules == (0,) * 32 and c.ranks == (96,) * 32
    # every module count and every rank is reachable, and the grid is k / 32, i / 4
    for n in range(33):
        cfg = LoRAConfig.uniform(32, modules=n, rank=8)
        assert s.encode(cfg)[32] == n / 32 and s.decode(s.encode(cfg)).modules[0] == n
    for i, r in enumerate((8, 16, 32, 64, 96)):
        assert s.encode(LoRAConfig.uniform(32, modules=1, rank=r))[33] == i / 4


def test_bin_decoding_is_uniform_on_a_uniform_grid():
    s = paper_space(1)
    xs = [(i + 0.5) / 330 for i in range(330)]  # 330 = 10 per module value
    counts = {}
    for x in xs:
        n = s.decode([1.0, x, 0.0]).modules[0]
        counts[n] = counts.get(n, 0) + 1
    assert set(counts) == set(range(33)) and set(counts.values()) == {10}


def test_extended_space_per_layer_values():
    s = extended_space(3, modules_per_layer=True, ranks=(8, 16))
    c = LoRAConfig((True, False, True), (0, 5, 32), (16, 8, 16))
    x = s.encode(c)
    assert x == (1.0, 0.0, 1.0, 0.0, 5 / 32, 1.0, 1.0, 0.0, 1.0)
    assert s.decode(x) == c


def test_encode_rejects_configs_outside_the_space():
    s = paper_space(2)
    with pytest.raises(ValueError, match="shares one rank"):
        s.encode(LoRAConfig((True, True), (1, 1), (8, 16)))
    with pytest.raises(ValueError, match="shares one module count"):
        s.encode(LoRAConfig((True, True), (1, 2), (8, 8)))
    with pytest.raises(ValueError, match="not one of the space's ranks"):
        s.encode(LoRAConfig((True, True), (1, 1), (12, 12)))
    with pytest.raises(ValueError, match="outside the space's range"):
        s.encode(LoRAConfig((True, True), (33, 33), (8, 8)))
    with pytest.raises(ValueError, match="layers"):
        s.encode(LoRAConfig.uniform(3, 1, 8))
    with pytest.raises(TypeError, match="config"):
        s.encode({"layer_mask": [True, True]})


def test_decode_bad_points():
    s = paper_space(2)
    with pytest.raises(ValueError, match="length 4"):
        s.decode([0.0] * 3)
    with pytest.raises(ValueError, match=r"x\[1\] must be finite"):
        s.decode([0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(TypeError, match="x"):
        s.decode("0000")
    with pytest.raises(TypeError, match=r"x\[0\]"):
        s.decode([[0.0], 0.0, 0.0, 0.0])
    assert s.decode(torch.zeros(4, dtype=torch.float64)) == s.decode([0.0] * 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(num_layers=2.0), TypeError, "num_layers"),
        (dict(num_layers=2, modules=(32, 0)), ValueError, "inverted"),
        (dict(num_layers=2, modules=()), ValueError, "modules"),
        (dict(num_layers=2, modules=(-1, 4)), ValueError, r"modules\[0\]"),
        (dict(num_layers=2, ranks=()), ValueError, "ranks"),
        (dict(num_layers=2, ranks=(8, 0)), ValueError, "positive"),
        (dict(num_layers=2, ranks=(8, -16)), ValueError, "positive"),
        (dict(num_layers=2, ranks=(8, 8)), ValueError, "duplicates"),
        (dict(num_layers=2, ranks=(8, 16.0)), TypeError, r"ranks\[1\]"),
        (dict(num_layers=2, rank_per_layer=1), TypeError, "rank_per_layer"),
        (dict(num_layers=2, target_shapes=[[(4, 8)]]), ValueError, "target_shapes"),
        (dict(num_layers=1, target_shapes=[[(4, -8)]]), ValueError, "out_features"),
    ],
)
def test_search_space_bad_input(kwargs, exc, match):
    n = kwargs.pop("num_layers")
    with pytest.raises(exc, match=match):
        SearchSpace(n, **kwargs)


def test_lora_config_validation_and_json():
    c = LoRAConfig([1, 0], [2, 3], [8, 16])
    assert c.layer_mask == (True, False) and c.effective_modules == (2, 0) and c.active_layers == (0,)
    assert LoRAConfig.from_json(c.to_json()) == c and hash(c) == hash(LoRAConfig.from_dict(c.to_dict()))
    with pytest.raises(ValueError, match="ranks"):
        LoRAConfig((True,), (1,), (0,))
    with pytest.raises(ValueError, match="layer_mask"):
        LoRAConfig((), (), ())
    with pytest.raises(ValueError, match="modules"):
        LoRAConfig((True, True), (1,), (8, 8))
    with pytest.raises(ValueError, match="missing"):
        LoRAConfig.from_dict({"layer_mask": [True]})
    with pytest.raises(ValueError, match="text is not valid JSON"):
        LoRAConfig.from_json('{"layer_mask": [tr')


def test_parameter_count_tensor_matches_pure_function():
    shapes = ffn_target_shapes(4, 576, 1536)
    shapes[2] = [(10, 20)]  # odd layer
    for s in (
        paper_space(4, target_shapes=shapes),
        extended_space(4, modules_per_layer=True, target_shapes=shapes),
        paper_space(4, search_layers=False, target_shapes=shapes),
        SearchSpace(4, ranks=(8,), search_layers=False, target_shapes=shapes),
    ):
        g = torch.Generator().manual_seed(1)
        X = torch.rand(300, s.dim, generator=g, dtype=torch.float64)
        got = s.parameter_count_tensor(X)
        want = [s.parameter_count(c) for c in s.decode_many(X)]
        assert got.tolist() == [float(w) for w in want]
        assert s.parameter_count_tensor(X.view(30, 10, s.dim)).shape == (30, 10)


def test_parameter_count_needs_target_shapes():
    with pytest.raises(ValueError, match="target_shapes"):
        paper_space(2).parameter_count(LoRAConfig.uniform(2, 1, 8))


def test_box_space():
    s = BoxSpace([(0.0, 1.0), (-2.0, 2.0)])
    assert s.decode(s.encode((0.25, 1.0))) == (0.25, 1.0)
    assert s.snap([-1.0, 2.0]) == (0.0, 1.0)
    for bad, exc, match in [
        ([], ValueError, "bounds"),
        ([(1.0, 0.0)], ValueError, "inverted"),
        ([(1.0, 1.0)], ValueError, "empty"),
        ([(0.0, math.inf)], ValueError, "finite"),
        ([(0.0,)], ValueError, r"bounds\[0\]"),
        ([("a", 1.0)], TypeError, r"bounds\[0\]"),
    ]:
        with pytest.raises(exc, match=match):
            BoxSpace(bad)
    with pytest.raises(ValueError, match="outside the bounds"):
        s.encode((2.0, 0.0))
    for bad in [("0.5", 0.0), (True, 0.0), (None, 0.0)]:  # float("0.5") is no point of the box
        with pytest.raises(TypeError, match=r"config\[0\] must be a real number"):
            s.encode(bad)


def test_small_space_enumeration_is_a_bijection():
    s = SearchSpace(2, modules=(0, 2), ranks=(4, 8))
    grids = [s.discrete_values[i] for i in range(s.dim)]
    configs = {s.decode(x) for x in itertools.product(*grids)}
    assert len(configs) == 2 * 2 * 3 * 2


def test_relaxed_parameter_count_equals_the_exact_one_on_the_grid():
    shapes = ffn_target_shapes(5, 64, 96)
    for s in (
        paper_space(5, target_shapes=shapes),
        extended_space(5, modules_per_layer=True, ranks=(4, 8, 12, 64, 96, 128), target_shapes=shapes),
        SearchSpace(5, modules=(3, 3), ranks=(16,), target_shapes=shapes),
        extended_space(5, search_layers=False, target_shapes=shapes),
    ):
        g = torch.Generator().manual_seed(0)
        idx = [torch.randint(len(v), (400,), generator=g) for _, v in sorted(s.discrete_values.items())]
        X = torch.stack(
            [torch.tensor(v, dtype=torch.float64)[i] for i, (_, v) in zip(idx, sorted(s.discrete_values.items()))], -1
        )
        exact = s.parameter_count_tensor(X)
        assert torch.allclose(s.parameter_count_relaxed(X), exact, rtol=1e-12, atol=0)
        Xr = torch.rand(50, s.dim, generator=g, dtype=torch.float64, requires_grad=True)
        s.parameter_count_relaxed(Xr).sum().backward()
        assert torch.isfinite(Xr.grad).all() and Xr.grad.abs().sum() > 0
    obj = paper_space(5, target_shapes=shapes).parameter_count_objective()
    assert obj.known is not None and obj.known_relaxed is not None


@pytest.mark.parametrize(
    "space",
    [
        paper_space(4),
        extended_space(4),
        extended_space(4, modules_per_layer=True),
        SearchSpace(4, modules=(0, 3), rank_per_layer=False, modules_per_layer=True),
        SearchSpace(4, modules=(2, 5)),
        paper_space(4, search_layers=False),
        SearchSpace(4, modules=(0, 3), modules_per_layer=True, rank_per_layer=True, search_layers=False),
    ],
    ids=repr,
)
def test_effective_tensor_identifies_equivalent_configurations(space):
    g = torch.Generator().manual_seed(0)
    grids = [torch.tensor(v, dtype=torch.float64) for _, v in sorted(space.discrete_values.items())]
    X = torch.stack([gr[torch.randint(len(gr), (3000,), generator=g)] for gr in grids], -1)
    E = space.effective_tensor(X)
    assert E.shape == X.shape
    for e in E[:200]:  # grid points map onto grid points
        assert tuple(e.tolist()) == space.snap(e.tolist())
    by_key = {}
    for x, e in zip(X, E):
        by_key.setdefault(space.canonical(space.decode(x)), set()).add(tuple(e.tolist()))
    assert all(len(v) == 1 for v in by_key.values())
    assert by_key[()] == {(0.0,) * space.dim}  # every "no adapter" configuration: the origin
    # and different effective configurations stay apart
    assert len({next(iter(v)) for v in by_key.values()}) == len(by_key)


def test_space_without_layer_bits_keeps_every_layer_on():
    shapes = ffn_target_shapes(3, 8, 16)
    full, fixed = paper_space(3, target_shapes=shapes), paper_space(3, target_shapes=shapes, search_layers=False)
    assert fixed.dim == 2 and fixed.names == ("modules", "rank")
    assert fixed.describe()["search_layers"] is False and full.describe()["search_layers"] is True
    c = fixed.decode([0.5, 1.0])
    assert c.layer_mask == (True, True, True) and c.ranks == (96,) * 3
    assert fixed.parameter_count(c) == full.parameter_count(c)
    with pytest.raises(ValueError, match="keeps every layer on"):
        fixed.encode(LoRAConfig((True, False, True), (2,) * 3, (8,) * 3))
    # only the number searched: rank and layers fixed -> one free dimension
    num = SearchSpace(3, ranks=(16,), search_layers=False)
    assert num.dim == 2 and list(num.fixed_dims) == [1]
    with pytest.raises(TypeError, match="search_layers"):
        SearchSpace(3, search_layers="no")
