"""Property-based tests of :mod:`kernels.tuning`: launch configs and config tables as data.

* :class:`LaunchConfig` round-trips through JSON, and refuses what no GPU compiles, naming the field;
* a drawn config table (``MILP_KERNEL_CONFIGS``) answers :func:`get_config` exactly as the module
  docstring says: the first entry whose ``max_tokens`` (inclusive), ``n``, ``k``, ``max_rank`` and
  ``dtype`` match wins (its ``block_m`` moved to the nearest of the plan's ``block_ms``), else the
  heuristic; bucket lookup is monotone in the token count;
* a bad entry or dispatch knob is refused when the table is read, naming the file, the op and the field;
* the heuristic always gives a valid config; :func:`choose_path` and :func:`split_schedule` follow
  their knobs (``0 = never``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import tuning
from kernels.plan import DEFAULT_BLOCK_MS
from kernels.tuning import (
    DISPATCH_KNOBS,
    OPS,
    PATHS,
    LaunchConfig,
    _load_table,
    choose_path,
    get_config,
    heuristic_config,
    split_schedule,
    use_config,
    use_dispatch,
)

CPU = torch.device("cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_POW2 = st.sampled_from([16, 32, 64, 128, 256])
configs = st.builds(LaunchConfig, block_m=_POW2, block_n=_POW2, block_k=_POW2, block_r=_POW2,
                    split_k=st.integers(1, 32), num_warps=st.sampled_from([1, 2, 4, 8, 16, 32]),
                    num_stages=st.integers(1, 6), split_n=st.integers(0, 8), n_blocks=st.integers(1, 8))
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


@contextlib.contextmanager
def table(obj: object, raw: str | None = None):
    """``obj`` (or the text ``raw``) as the ``MILP_KERNEL_CONFIGS`` table inside the block."""
    before = os.environ.get("MILP_KERNEL_CONFIGS")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gpu.json"
        path.write_text(raw if raw is not None else json.dumps(obj))
        os.environ["MILP_KERNEL_CONFIGS"] = str(path)
        _load_table.cache_clear()
        try:
            yield str(path)
        finally:
            if before is None:
                os.environ.pop("MILP_KERNEL_CONFIGS", None)
            else:
                os.environ["MILP_KERNEL_CONFIGS"] = before
            _load_table.cache_clear()


# ------------------------------------------------------------------ LaunchConfig as data
@_SETTINGS
@given(cfg=configs)
def test_launch_config_round_trips_through_json(cfg):
    text = json.dumps(dataclasses.asdict(cfg))
    back = LaunchConfig(**json.loads(text))
    assert back == cfg and hash(back) == hash(cfg)
    assert back.kwargs() == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": True}


_BAD_FIELD = st.one_of(
    st.tuples(st.sampled_from(["block_m", "block_n", "block_k", "block_r"]),
              st.one_of(st.integers(-64, 15), st.sampled_from([24, 48, 96, 100, 16.0, True, "16", None]))),
    st.tuples(st.just("num_warps"), st.one_of(st.integers(-4, 0), st.sampled_from([3, 6, 64, 4.0, False]))),
    st.tuples(st.sampled_from(["split_k", "num_stages", "n_blocks"]),
              st.one_of(st.integers(-8, 0), st.sampled_from([2.0, True, "2"]))),
    st.tuples(st.just("split_n"), st.one_of(st.integers(-8, -1), st.sampled_from([1.5, True, None]))),
)


@_SETTINGS
@given(cfg=configs, bad=_BAD_FIELD)
def test_launch_config_refuses_a_bad_field_naming_it(cfg, bad):
    field, value = bad
    with pytest.raises(ValueError, match=rf"LaunchConfig\.{field} must be .*got {value!r}".replace("(", r"\(")):
        dataclasses.replace(cfg, **{field: value})


# ------------------------------------------------------------------ tables: first match wins
_NULL_OR = lambda s: st.one_of(st.none(), s)  # noqa: E731

entries = st.builds(
    lambda cfg, max_tokens, n, k, max_rank, dtype: {
        "max_tokens": max_tokens, "n": n, "k": k, "max_rank": max_rank, "dtype": dtype,
        "median_ms": 0.5, **dataclasses.asdict(cfg)},  # extra keys (the autotuner's timings) are kept
    configs, _NULL_OR(st.integers(0, 5000)), _NULL_OR(st.sampled_from([8, 24, 40])),
    _NULL_OR(st.sampled_from([8, 24, 40])), _NULL_OR(st.integers(0, 128)),
    _NULL_OR(st.sampled_from(sorted(_DTYPE_NAMES.values()))))

problems = st.fixed_dictionaries({
    "num_tokens": st.integers(0, 6000), "n": st.sampled_from([8, 24, 40]), "k": st.sampled_from([8, 24, 40]),
    "max_rank": st.integers(0, 160), "dtype": st.sampled_from(DTYPES)})

_BLOCK_MS = st.one_of(st.none(), st.just(DEFAULT_BLOCK_MS),
                      st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256]), min_size=1, max_size=5,
                               unique=True).filter(lambda b: max(b) >= 16).map(tuple))


def _matches(entry: dict, p: dict) -> bool:
    """The module docstring's rule, written plainly."""
    return ((entry["max_tokens"] is None or p["num_tokens"] <= entry["max_tokens"])
            and entry["n"] in (None, p["n"]) and entry["k"] in (None, p["k"])
            and (entry["max_rank"] is None or p["max_rank"] <= entry["max_rank"])
            and entry["dtype"] in (None, _DTYPE_NAMES[p["dtype"]]))


def _fitted(cfg: LaunchConfig, block_ms) -> LaunchConfig:
    """``block_m`` moved to the nearest of ``block_ms`` a launch config can take (ties: the smaller)."""
    if not block_ms or cfg.block_m in block_ms:
        return cfg
    best = min((b for b in block_ms if b >= 16), key=lambda b: (abs(b - cfg.block_m), b))
    return dataclasses.replace(cfg, block_m=best)


@_SETTINGS
@given(ops=st.dictionaries(st.sampled_from(OPS), st.lists(entries, max_size=5), max_size=4),
       lookups=st.lists(st.tuples(st.sampled_from(OPS), problems, _BLOCK_MS), min_size=1, max_size=6))
def test_get_config_takes_the_first_matching_entry_else_the_heuristic(ops, lookups):
    with table({"device": "test", "ops": ops}):
        for op, p, block_ms in lookups:
            for _ in range(2):  # the second answer comes from the memo: the same
                got = get_config(op, **p, device=CPU, block_ms=block_ms)
                hit = next((e for e in ops.get(op, []) if _matches(e, p)), None)
                want = (LaunchConfig(**{f: hit[f] for f in tuning._FIELDS}) if hit is not None
                        else heuristic_config(op, **p))
                assert got == _fitted(want, block_ms), (op, p, hit)
                if block_ms:
                    assert got.block_m in block_ms


@_SETTINGS
@given(cfgs=st.lists(configs, min_size=1, max_size=5), caps=st.lists(st.integers(1, 4096), min_size=1, max_size=5,
                                                                       unique=True),
       tokens=st.lists(st.integers(0, 5000), min_size=2, max_size=8), catch_all=st.booleans())
def test_bucket_lookup_is_monotone_in_the_token_count(cfgs, caps, tokens, catch_all):
    """Buckets sorted by ``max_tokens`` (what the autotuner writes): more tokens never pick an
    earlier (smaller) bucket, a count up to a bucket's bound never passes it, and past the last
    bound the heuristic (or a catch-all ``null`` entry) answers."""
    caps = sorted(caps)[: len(cfgs)]
    es = [dict(dataclasses.asdict(c), max_tokens=m) for c, m in zip(cfgs, caps)]
    if catch_all:
        es.append(dict(dataclasses.asdict(LaunchConfig(block_m=128, split_k=7)), max_tokens=None))
    with table({"ops": {"shrink": es}}):
        def bucket(t):
            cfg = get_config("shrink", num_tokens=t, n=8, k=8, max_rank=4, dtype=torch.float32, device=CPU)
            idx = next((i for i, m in enumerate(caps) if t <= m), None)
            if idx is None:
                want = (LaunchConfig(block_m=128, split_k=7) if catch_all else
                        heuristic_config("shrink", num_tokens=t, n=8, k=8, max_rank=4, dtype=torch.float32))
                assert cfg == want
                return len(caps)
            assert cfg == LaunchConfig(**{f: es[idx][f] for f in tuning._FIELDS})
            return idx

        picked = [bucket(t) for t in sorted(tokens)]
        assert picked == sorted(picked)


# ------------------------------------------------------------------ tables: refused whole, named
_ENTRY_FIELD = st.one_of(
    st.tuples(st.sampled_from(["max_tokens", "n", "k", "max_rank"]),
              st.sampled_from([-1, "64", 64.0, True, [64]]), st.just("must be an int >= 0 or null")),
    st.tuples(st.just("dtype"), st.sampled_from(["torch.float32", "bf16", "int8", 32]),
              st.just("dtype must be one of")),
    st.tuples(st.sampled_from(["block_m", "block_k"]), st.sampled_from([8, 48, 16.0, "16"]),
              st.just("must be a power of two >= 16")),
    st.tuples(st.just("num_warps"), st.sampled_from([3, 0]), st.just("num_warps must be a power of two")),
)


@_SETTINGS
@given(op=st.sampled_from(OPS), good=st.lists(entries, max_size=3), bad=_ENTRY_FIELD, where=st.integers(0, 3),
       lookup=problems)
def test_a_bad_entry_is_refused_naming_the_file_op_and_field(op, good, bad, where, lookup):
    """Wherever it sits (after a catch-all entry too, which no lookup passes), and whatever the
    lookup asks, for any op: a ``ValueError`` naming the file, the op, the entry and the field,
    never a ``TypeError``/``AttributeError`` from inside the matching."""
    field, value, message = bad
    es = list(good)
    es.insert(min(where, len(es)), dict(dataclasses.asdict(LaunchConfig()), **{field: value}))
    with table({"ops": {op: es}}) as path:
        for asked in OPS:
            with pytest.raises(ValueError) as info:
                get_config(asked, **lookup, device=CPU)
            msg = str(info.value)
            assert path in msg and f"entry of {op!r}" in msg and field in msg and message in msg, msg


@pytest.mark.parametrize("obj, raw, message", [
    (None, "{not json", "must be valid JSON"),
    ([{"ops": {}}], None, "must be a JSON object, got list"),
    ({"ops": [1]}, None, "'ops' must be an object"),
    ({"ops": {"shrink": {"block_m": 16}}}, None, "'ops' of 'shrink' must be a list of config entries, got dict"),
    ({"ops": {"expand": [7]}}, None, "entry of 'expand' #0 7: an entry must be an object of fields, got int"),
    ({"ops": {"shrink": [{"split_k": 2}, "x"]}}, None, "entry of 'shrink' #1"),
    ({"dispatch": [1]}, None, "'dispatch' must be an object"),
    # misspelt keys used to be skipped, leaving the default in force unseen
    ({"dispatch": {"decode_max_token": 64}}, None, r"'dispatch': unknown knob\(s\) \['decode_max_token'\]"),
    ({"ops": {"shrink": [{"max_tokens": 8, "blok_k": 64}]}}, None,
     r"entry of 'shrink' #0 .*unknown field\(s\) \['blok_k'\]"),
    ({"dispach": {"decode_max_tokens": 64}}, None, r"unknown key\(s\) \['dispach'\] in a kernel config table"),
])
def test_a_malformed_table_is_refused_naming_the_file(obj, raw, message):
    """Each used to raise from inside the lookup (``AttributeError: 'list' object has no attribute
    'get'``, a ``JSONDecodeError`` naming no file)."""
    with table(obj, raw) as path:
        for call in (lambda: get_config("shrink", num_tokens=8, n=8, k=8, max_rank=8, dtype=torch.float32,
                                        device=CPU),
                     lambda: choose_path(100, 8, device=CPU)):
            with pytest.raises(ValueError, match=message) as info:
                call()
            assert path in str(info.value)


def test_notes_and_the_tuners_records_are_read_beside_the_knobs_and_fields():
    """Keys starting with ``_`` (anywhere) and what ``kernels.autotune`` writes are not unknown."""
    entry = dict(dataclasses.asdict(LaunchConfig(block_k=64)), max_tokens=None, n=None, k=None, max_rank=None,
                 dtype="float32", median_ms=0.01, _why="measured")
    obj = {"device": "x", "triton": "3.6.0", "torch": "2.11", "created": "now", "_note": "hand-made",
           "ops": {"shrink": [entry]}, "dispatch": {"decode_max_tokens": 3, "_measured_overlap": []}}
    with table(obj):
        assert get_config("shrink", num_tokens=8, n=8, k=8, max_rank=8, dtype=torch.float32,
                          device=CPU).block_k == 64
        assert choose_path(3, 8, device=CPU) == "split" and choose_path(4, 8, device=CPU) != "split"


@_SETTINGS
@given(knob=st.sampled_from(DISPATCH_KNOBS), value=st.sampled_from([-1, -100, "64", None, 1.5, True, [8], {"a": 1}]),
       others=st.dictionaries(st.sampled_from(DISPATCH_KNOBS), st.integers(0, 10**6), max_size=3))
def test_a_bad_dispatch_knob_is_refused_naming_it(knob, value, others):
    """A table's knob must be an int >= 0, as :func:`use_dispatch` demands: a string or ``null``
    used to raise ``TypeError: '<=' not supported`` from inside :func:`choose_path`, and a negative
    one was taken. Measurements kept beside the knobs (``_measured_*``) are left alone."""
    dispatch = dict(others, **{knob: value}, _measured_overlap=[{"tokens": 8}])
    with table({"ops": {}, "dispatch": dispatch}) as path:
        for call in (lambda: choose_path(100, 8, device=CPU), lambda: split_schedule(100, CPU)):
            with pytest.raises(ValueError, match=rf"'dispatch': {knob} must be an int >= 0, got ") as info:
                call()
            assert path in str(info.value)


@_SETTINGS
@given(knobs=st.dictionaries(st.sampled_from(DISPATCH_KNOBS), st.integers(0, 5000), max_size=6),
       tokens=st.integers(0, 6000), rank=st.integers(0, 300), segs=st.one_of(st.none(), st.integers(0, 300)))
def test_table_knobs_steer_choose_path_and_split_schedule(knobs, tokens, rank, segs):
    """The table's knobs (over this module's defaults) decide as the docstrings say; :func:`use_dispatch`
    over the table; ``0 = never`` for each split-path schedule, an empty batch included."""
    want = {"decode_max_tokens": tuning.DECODE_MAX_TOKENS, "split_tokens_per_segment": tuning.SPLIT_TOKENS_PER_SEGMENT,
            "fused_max_rank": tuning.FUSED_MAX_RANK,
            "split_expand_first_max_tokens": tuning.SPLIT_EXPAND_FIRST_MAX_TOKENS,
            "split_overlap_min_tokens": tuning.SPLIT_OVERLAP_MIN_TOKENS,
            "split_parallel_max_tokens": tuning.SPLIT_PARALLEL_MAX_TOKENS}
    want.update(knobs)

    def path(k):
        if tokens <= k["decode_max_tokens"] or (segs and tokens < k["split_tokens_per_segment"] * segs):
            return "split"
        return "fused" if rank <= k["fused_max_rank"] else "fused_t"

    def schedule(k):
        return (0 < tokens <= k["split_parallel_max_tokens"], 0 < tokens <= k["split_expand_first_max_tokens"],
                0 < k["split_overlap_min_tokens"] <= tokens)

    with table({"ops": {}, "dispatch": knobs}):
        got = choose_path(tokens, rank, num_segments=segs, device=CPU)
        assert got in PATHS and got == path(want)
        assert split_schedule(tokens, CPU) == schedule(want)
        assert (tuning.split_parallel(tokens, CPU), tuning.split_expand_first(tokens, CPU),
                tuning.split_overlap(tokens, CPU)) == schedule(want)
        never = dict.fromkeys(("split_parallel_max_tokens", "split_expand_first_max_tokens",
                               "split_overlap_min_tokens"), 0)
        with use_dispatch(**never):
            assert split_schedule(tokens, CPU) == (False, False, False)
        with use_dispatch(decode_max_tokens=0, fused_max_rank=10**6, split_tokens_per_segment=0):
            assert choose_path(tokens, rank, num_segments=segs, device=CPU) == ("split" if tokens == 0 else "fused")


def test_an_empty_batch_never_runs_expand_first_when_the_knob_says_never():
    """``split_expand_first_max_tokens = 0`` means never (module constant's doc), but
    ``split_schedule(0)`` answered expand-first: ``0 <= 0``."""
    with use_dispatch(split_expand_first_max_tokens=0):
        assert tuning.split_expand_first(0) is False
        assert split_schedule(0) == (False, False, False)
    with use_dispatch(split_expand_first_max_tokens=8):
        assert [tuning.split_expand_first(t) for t in (0, 1, 8, 9)] == [False, True, True, False]


# ------------------------------------------------------------------ heuristic fallback, block_m fitting
@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(OPS), p=problems, n=st.integers(1, 1 << 15), k=st.integers(1, 1 << 15),
       block_ms=_BLOCK_MS)
def test_the_heuristic_always_gives_a_config_the_plan_can_launch(op, p, n, k, block_ms):
    p = dict(p, n=n, k=k)
    cfg = heuristic_config(op, **p)
    assert isinstance(cfg, LaunchConfig)
    assert LaunchConfig(**dataclasses.asdict(cfg)) == cfg  # passes every field check
    got = get_config(op, **p, device=CPU, block_ms=block_ms)
    assert got == _fitted(cfg, block_ms)
    if block_ms:
        assert got.block_m in block_ms and got.block_m >= 16


def test_block_m_is_fitted_to_a_tile_height_a_config_can_take():
    """A plan may keep tile heights under 16 (``BatchPlan(block_ms=(8, 32))``): the nearest of
    those a launch config takes is used. The nearest of all (8 for a config's 16) used to be
    forced in and the launch failed with 'LaunchConfig.block_m must be a power of two >= 16'."""
    kw = dict(num_tokens=8, n=8, k=8, max_rank=8, dtype=torch.float32, device=CPU)
    assert heuristic_config("shrink", **{k: v for k, v in kw.items() if k != "device"}).block_m == 16
    assert get_config("shrink", **kw, block_ms=(8, 32)).block_m == 32
    assert get_config("shrink", **kw, block_ms=[1, 2, 4, 64]).block_m == 64
    with use_config("shrink", LaunchConfig(block_m=16)):
        assert get_config("shrink", **kw, block_ms=(8, 32)).block_m == 32
    with pytest.raises(ValueError, match=r"block_ms=\[4, 8\] .* none >= 16"):
        get_config("shrink", **kw, block_ms=(4, 8))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: get_config("gemm", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32, device=CPU),
     ValueError, "op must be one of"),
    (lambda: heuristic_config("gemm", num_tokens=1, n=1, k=1, max_rank=1, dtype=torch.float32),
     ValueError, "op must be one of"),
    (lambda: use_dispatch(decode_max_tokens=-1).__enter__(), ValueError, "decode_max_tokens must be an int >= 0"),
    (lambda: use_dispatch(fused_max_rank=2.0).__enter__(), ValueError, "fused_max_rank must be an int >= 0"),
    (lambda: use_dispatch(nope=1).__enter__(), ValueError, "unknown knob"),
])
def test_bad_arguments_name_what_is_wrong(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@_SETTINGS
@given(outer=st.dictionaries(st.sampled_from(DISPATCH_KNOBS), st.integers(0, 100), max_size=3),
       inner=st.dictionaries(st.sampled_from(DISPATCH_KNOBS), st.integers(0, 100), max_size=3))
def test_use_dispatch_nests_and_restores(outer, inner):
    base = dict(tuning._dispatch_knobs(None))
    with use_dispatch(**outer):
        assert dict(tuning._dispatch_knobs(None)) == {**base, **outer}
        with use_dispatch(**inner):
            assert dict(tuning._dispatch_knobs(None)) == {**base, **outer, **inner}
        assert dict(tuning._dispatch_knobs(None)) == {**base, **outer}
    assert dict(tuning._dispatch_knobs(None)) == base
