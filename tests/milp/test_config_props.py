"""Property tests of MemoryConfig: every valid config round-trips through each serialised form
(dict, JSON text, JSON file) and counts its parameters exactly; every out-of-range field is
refused with a ValueError/TypeError naming the field, whichever door it comes in by
(constructor, from_dict, from_json, from_search); atomic_directory never loses the previous
directory, wherever the replacement fails."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import milp.config
from milp.config import MAX_MODULES, MemoryConfig, atomic_directory

FAST = settings(max_examples=60, deadline=None)

alphas = st.one_of(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False),
                   st.integers(1, 10**6))


@st.composite
def layer_specs(draw):
    """One layer: (mask, modules, rank spec) with ranks 8..96, shared or per module."""
    n = draw(st.integers(0, MAX_MODULES))
    mask = draw(st.booleans())
    if n and draw(st.booleans()):
        rank = tuple(draw(st.lists(st.integers(8, 96), min_size=n, max_size=n)))
    else:
        rank = draw(st.integers(8, 96))
    return mask, n, rank


@st.composite
def configs(draw, max_layers: int = 8):
    layers = draw(st.lists(layer_specs(), min_size=1, max_size=max_layers))
    return MemoryConfig(tuple(m for m, _, _ in layers), tuple(n for _, n, _ in layers),
                        tuple(r for _, _, r in layers), draw(alphas))


@FAST
@given(cfg=configs())
def test_round_trips_through_every_serialised_form(cfg):
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    text = cfg.to_json()
    assert json.loads(text) == d
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub" / "memory_config.json"
        assert cfg.to_json(path) == text and path.read_text(encoding="utf-8") == text
        from_file = [MemoryConfig.from_json(path), MemoryConfig.from_json(str(path))]
        assert sorted(os.listdir(path.parent)) == ["memory_config.json"]  # no temporary left
    rebuilt = MemoryConfig(d["layer_mask"], d["modules"], d["ranks"], d["lora_alpha"])  # lists are fine too
    for again in (MemoryConfig.from_dict(d), MemoryConfig.from_json(text), *from_file, rebuilt,
                  MemoryConfig.from_search(d, lora_alpha=d["lora_alpha"], num_layers=cfg.num_layers)):
        assert again == cfg and hash(again) == hash(cfg)
        assert again.to_json() == text
        assert isinstance(again.lora_alpha, float) and all(type(m) is bool for m in again.layer_mask)


@FAST
@given(cfg=configs())
def test_layer_ranks_and_active_layers_follow_the_fields(cfg):
    for li in range(cfg.num_layers):
        ranks = cfg.layer_ranks(li)
        on = cfg.layer_mask[li] and cfg.modules[li] > 0
        assert (li in cfg.active_layers) == on
        assert len(ranks) == (cfg.modules[li] if on else 0)
        spec = cfg.ranks[li]
        if on:
            assert ranks == ((spec,) * cfg.modules[li] if isinstance(spec, int) else spec)
    for bad in (-1, cfg.num_layers, True, 0.0):
        with pytest.raises(ValueError, match="layer must be in"):
            cfg.layer_ranks(bad)


@FAST
@given(cfg=configs(), widths=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=3))
def test_num_parameters_is_the_exact_formula(cfg, widths):
    shapes = [widths] * cfg.num_layers
    want = sum(sum(cfg.layer_ranks(li)) * sum(i + o for i, o in widths) for li in range(cfg.num_layers))
    assert cfg.num_parameters(shapes) == want
    with pytest.raises(ValueError, match=f"has {cfg.num_layers} layers but the model has {cfg.num_layers + 1}"):
        cfg.num_parameters([widths] * (cfg.num_layers + 1))


# ------------------------------------------------------------------------------- refusals
BAD_INT = [True, False, -1, 1.0, 8.5, math.nan, math.inf, "8", None, {"r": 8}]
BAD_MODULES = [33, 10**6, -1, True, 1.0, math.nan, "2", None]
BAD_MASK = [2, -1, 0.5, 1.0, math.nan, "True", None, [True]]
BAD_ALPHA = [0, -1.0, -1e-9, math.nan, math.inf, -math.inf, True, "16", None, 10**400, [16.0]]


@st.composite
def broken(draw):
    """A valid config's fields with exactly one made invalid, and the field's name."""
    cfg = draw(configs(max_layers=4))
    mask, modules, ranks = list(cfg.layer_mask), list(cfg.modules), list(cfg.ranks)
    alpha = cfg.lora_alpha
    L = cfg.num_layers
    li = draw(st.integers(0, L - 1))
    kind = draw(st.sampled_from(["mask", "modules", "rank", "module_rank", "ranks_len", "alpha", "len"]))
    if kind == "mask":
        mask[li] = draw(st.sampled_from(BAD_MASK))
        field = f"layer_mask[{li}]"
    elif kind == "modules":
        modules[li] = draw(st.sampled_from(BAD_MODULES))
        field = f"modules[{li}]"
    elif kind == "rank":
        ranks[li] = draw(st.sampled_from([0, *BAD_INT]))
        field = f"ranks[{li}]"
    elif kind == "module_rank":
        n = max(modules[li], 1)
        modules[li] = n
        j = draw(st.integers(0, n - 1))
        rs = [8] * n
        rs[j] = draw(st.sampled_from([0, -8, True, 8.0, math.nan, "8", None]))
        ranks[li] = tuple(rs)
        field = f"ranks[{li}][{j}]"
    elif kind == "ranks_len":  # one rank per module, but not as many as modules
        n = modules[li]
        ranks[li] = tuple([8] * draw(st.sampled_from([k for k in (n - 1, n + 1, n + 5) if k >= 1 and k != n])))
        field = f"ranks[{li}]"
    elif kind == "alpha":
        alpha = draw(st.sampled_from(BAD_ALPHA))
        field = "lora_alpha"
    else:  # one list longer or shorter than the mask
        which = draw(st.sampled_from(["modules", "ranks"]))
        seq = modules if which == "modules" else ranks
        if draw(st.booleans()) or L == 1:
            seq.append(seq[-1])
        else:
            seq.pop()
        field = which
    return (mask, modules, ranks, alpha), field


def test_the_module_range_is_the_papers():
    assert MAX_MODULES == 32  # paper Table 6: n in {0..32}; BAD_MODULES starts just past it
    assert MemoryConfig.uniform(1, 32, 8).modules == (32,) and MemoryConfig.uniform(1, 0, 8).active_layers == ()


def _check_refusal(excinfo, field):
    assert isinstance(excinfo.value, (ValueError, TypeError)), type(excinfo.value)
    assert field in str(excinfo.value), (field, str(excinfo.value))


@settings(max_examples=150, deadline=None)
@given(case=broken())
def test_every_out_of_range_field_is_refused_naming_it(case):
    (mask, modules, ranks, alpha), field = case
    with pytest.raises(Exception) as excinfo:  # noqa: B017 - the type is checked below
        MemoryConfig(tuple(mask), tuple(modules), tuple(ranks), alpha)
    _check_refusal(excinfo, field)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


@settings(max_examples=150, deadline=None)
@given(case=broken())
def test_every_out_of_range_field_is_refused_from_json_and_dicts(case):
    (mask, modules, ranks, alpha), field = case
    d = {"layer_mask": mask, "modules": modules, "ranks": [_jsonable(r) for r in ranks], "lora_alpha": alpha}
    with pytest.raises(Exception) as excinfo:  # noqa: B017
        MemoryConfig.from_dict(d)
    _check_refusal(excinfo, field)
    try:
        text = json.dumps(d)  # NaN/inf are written as JSON's NaN/Infinity, which json reads back
    except (TypeError, ValueError):
        return
    with pytest.raises(Exception) as excinfo:  # noqa: B017
        MemoryConfig.from_json(text)
    _check_refusal(excinfo, field)


FIELDS = ["layer_mask", "modules", "ranks"]


@FAST
@given(cfg=configs(max_layers=3), name=st.sampled_from(FIELDS),
       value=st.sampled_from([5, 8.0, True, None, "101", {"a": 1}]))
def test_a_field_that_is_not_a_list_is_refused_naming_it(cfg, name, value):
    d = cfg.to_dict() | {name: value}
    with pytest.raises((TypeError, ValueError), match=re.escape(name)):
        MemoryConfig.from_dict(d)
    with pytest.raises((TypeError, ValueError), match=re.escape(name)):
        MemoryConfig.from_json(json.dumps(d))


@FAST
@given(cfg=configs(max_layers=3), name=st.sampled_from(["modules", "ranks"]),
       value=st.sampled_from([8.0, True, None, "8", math.nan]))
def test_from_search_refuses_a_bad_scalar_naming_it(cfg, name, value):
    d = cfg.to_dict() | {name: value}
    with pytest.raises((TypeError, ValueError), match=re.escape(name)):
        MemoryConfig.from_search(d)
    with pytest.raises(TypeError, match="layer_mask"):
        MemoryConfig.from_search(cfg.to_dict() | {"layer_mask": 1})


@FAST
@given(value=st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.none(), st.booleans(),
                       st.text(max_size=5)))
def test_json_text_that_is_not_an_object_is_refused_as_json(value):
    """JSON text of a list, number, string or null is a malformed config, not a missing file."""
    text = json.dumps(value)
    if text.lstrip().startswith("{") or Path(text).exists():
        return
    with pytest.raises((TypeError, ValueError)) as excinfo:
        MemoryConfig.from_json(text)
    assert "does not exist" not in str(excinfo.value)


def test_regression_huge_int_alpha_is_a_value_error():
    """A JSON int too large for a float used to escape as OverflowError (not ValueError/TypeError)."""
    with pytest.raises(ValueError, match="lora_alpha"):
        MemoryConfig((True,), (1,), (8,), 10**400)
    with pytest.raises(ValueError, match="lora_alpha"):
        MemoryConfig.from_json('{"layer_mask": [1], "modules": [1], "ranks": [8], "lora_alpha": 1' + "0" * 400 + "}")


def test_regression_non_list_fields_name_the_field():
    """``from_dict({"ranks": 8, ...})`` used to fail with "'int' object is not iterable"."""
    with pytest.raises(TypeError, match="ranks must be a sequence"):
        MemoryConfig.from_dict({"layer_mask": [True], "modules": [1], "ranks": 8})
    with pytest.raises(TypeError, match="modules must be a sequence"):
        MemoryConfig.from_dict({"layer_mask": [True], "modules": {"a": 1}, "ranks": [8]})
    with pytest.raises(TypeError, match=r"ranks\[0\] must be an int"):
        MemoryConfig.from_search({"layer_mask": [1], "modules": 1, "ranks": 8.0})


# ------------------------------------------------------------------------- atomic_directory
class Boom(Exception):
    pass


@settings(max_examples=40, deadline=None)
@given(fail_at=st.integers(0, 6), existed=st.booleans(), kind=st.sampled_from(["replace", "mkdtemp"]))
def test_atomic_directory_keeps_the_previous_directory_wherever_it_fails(fail_at, existed, kind):
    """Fail the ``fail_at``-th ``os.replace`` (or ``tempfile.mkdtemp``) of a replacement: the
    target then holds either the whole old contents (or nothing, if there were none) or the
    whole new ones, and nothing else is left in its parent folder."""
    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as mp:
        target = Path(root) / "user"
        if existed:
            with atomic_directory(target) as tmp:
                (tmp / "old.txt").write_text("old")
        real = {"replace": os.replace, "mkdtemp": tempfile.mkdtemp}[kind]
        calls = [0]

        def flaky(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at + 1:
                raise Boom(f"{kind} #{fail_at} fails")
            return real(*args, **kwargs)

        mp.setattr(os if kind == "replace" else tempfile, kind, flaky)
        failed = False
        try:
            with atomic_directory(target) as tmp:
                (tmp / "new.txt").write_text("new")
                os.replace(tmp / "new.txt", tmp / "new.txt")  # a replace inside the block, as to_json's
        except Boom:
            failed = True
        mp.undo()
        contents = {p.name: p.read_text() for p in target.iterdir()} if target.exists() else None
        assert os.listdir(root) == (["user"] if contents is not None else [])
        if failed:
            assert contents == ({"old.txt": "old"} if existed else None)
        else:
            assert contents == {"new.txt": "new"}


def test_regression_atomic_directory_restores_the_old_directory_when_the_final_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "user"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".user.tmp-"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # where folders cannot be exchanged (the move-aside path), and where the exchange itself fails
    monkeypatch.setattr(milp.config, "_swap_directories", lambda a, b: None)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target) as tmp:
            (tmp / "b").write_text("2")

    def failing_swap(a, b):
        raise OSError("disk gone")

    monkeypatch.setattr(milp.config, "_swap_directories", failing_swap)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(target) as tmp:
            (tmp / "c").write_text("3")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["user"] and (target / "a").read_text() == "1"
