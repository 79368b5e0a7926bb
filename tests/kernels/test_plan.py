import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import BatchPlan
from kernels.plan import max_tiles, tile_span


def _check_plan(plan: BatchPlan, ids: torch.Tensor):
    T = ids.numel()
    assert plan.num_tokens == T
    # segments: one per present user, in id order (-1 first), covering the sorted tokens
    segs = [s for s in plan.segments.tolist() if s[1] > s[0]]
    users = sorted(set(ids.tolist()))
    assert [s[2] for s in segs] == users
    assert segs[0][0] == 0 and segs[-1][1] == T if T else segs == []
    for (_s0, e0, _), (s1, _, _) in zip(segs, segs[1:]):
        assert e0 == s1
    st = plan.sorted_tokens[:T].long()
    assert sorted(st.tolist()) == list(range(T))
    for start, end, user in segs:
        toks = st[start:end]
        assert (ids[toks] == user).all()
        assert toks.tolist() == sorted(toks.tolist())  # stable inside a user
    assert torch.equal(plan.token_user_host(), ids.long())
    # every tile lies inside one segment, tiles cover each segment exactly once
    for bm in plan.block_ms:
        tiles = plan.tiles_for(bm).tolist()
        assert len(tiles) == max_tiles(plan.max_tokens, plan.max_segments, bm)
        live = [t for t in tiles if t[1] > t[0]]
        covered = []
        for start, end, user in live:
            assert end - start <= bm
            seg = next(s for s in segs if s[0] <= start and end <= s[1])
            assert seg[2] == user
            covered.extend(range(start, end))
        assert covered == list(range(T))
        assert all(t == [0, 0, -1] for t in tiles[len(live):])


@pytest.mark.parametrize("T, U", [(1, 1), (7, 3), (65, 64), (257, 5), (300, 1000)])
def test_plan_matches_ids(T, U):
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(-1, U, (T,), generator=g)
    _check_plan(BatchPlan.build(ids, U), ids)


def test_all_base_only_and_single_user():
    ids = torch.full((9,), -1)
    plan = BatchPlan.build(ids, 4)
    _check_plan(plan, ids)
    assert plan.segments[0].tolist() == [0, 9, -1]
    ids = torch.full((40,), 2)
    _check_plan(BatchPlan.build(ids, 4), ids)


def test_update_reuses_buffers_for_new_batches():
    plan = BatchPlan(100, 8, block_ms=(16, 64))
    ptrs = [plan.sorted_tokens.data_ptr(), plan.segments.data_ptr(), plan.tiles.data_ptr()]
    g = torch.Generator().manual_seed(1)
    for T in (100, 3, 57, 0, 100):
        ids = torch.randint(-1, 8, (T,), generator=g, dtype=torch.int32)
        plan.update(ids, validate=False)
        if T:
            _check_plan(plan, ids)
        assert [plan.sorted_tokens.data_ptr(), plan.segments.data_ptr(), plan.tiles.data_ptr()] == ptrs


def test_segment_capacity_is_bounded_by_tokens():
    plan = BatchPlan(4, 100_000)
    assert plan.max_segments == 5
    ids = torch.tensor([99_999, 5, -1, 5])
    plan.update(ids)
    _check_plan(plan, ids)


@pytest.mark.parametrize(
    "ids, exc, match",
    [
        (torch.tensor([0, 4]), ValueError, r"\[-1, 4\)"),
        (torch.tensor([-2, 0]), ValueError, r"\[-1, 4\)"),
        (torch.zeros(9, dtype=torch.long), ValueError, "max_tokens"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, "1-D"),
        (torch.zeros(3), TypeError, "integer"),
        ([0, 1], TypeError, "torch.Tensor"),
    ],
)
def test_bad_token_user(ids, exc, match):
    plan = BatchPlan(8, 4)
    with pytest.raises(exc, match=match):
        plan.update(ids)


def test_bad_construction():
    with pytest.raises(ValueError, match="block_ms"):
        BatchPlan(8, 4, block_ms=(24,))
    with pytest.raises(ValueError, match="max_users"):
        BatchPlan(8, 0)
    with pytest.raises(ValueError, match="block_m=8"):
        BatchPlan(8, 4, block_ms=(16,)).tiles_for(8)


def test_unvalidated_update_takes_a_segment_hint():
    plan = BatchPlan(16, 8)
    ids = torch.tensor([3, 3, -1, 5, 5, 5])
    assert plan.update(ids).num_segments == 3
    assert plan.update(ids, validate=False).num_segments is None
    assert plan.update(ids, validate=False, num_segments=3).num_segments == 3
    assert plan.token_user_host().tolist() == ids.tolist()
    with pytest.raises(ValueError, match="num_segments"):
        plan.update(ids, validate=False, num_segments=-1)


# ------------------------------------------------------------------ property-based: update() == a fresh plan
_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@st.composite
def _batch(draw, max_tokens: int, max_users: int) -> list[int]:
    """Ids of a batch: random, all ``-1``, one user, every user, long runs, alternations."""
    T = draw(st.integers(0, max_tokens), label="T")
    uid = st.integers(-1, max_users - 1)
    kind = draw(st.sampled_from(["random", "none", "one", "every", "runs", "alternate"]), label="kind")
    if kind == "random":
        return draw(st.lists(uid, min_size=T, max_size=T))
    if kind == "none":
        return [-1] * T
    if kind == "one":
        return [draw(uid)] * T
    if kind == "every":
        ids = [i % (max_users + 1) - 1 for i in range(T)]
        return draw(st.permutations(ids)) if draw(st.booleans()) else ids
    if kind == "alternate":
        a, b = draw(uid), draw(uid)
        return [a if i % 2 == 0 else b for i in range(T)]
    ids: list[int] = []
    while len(ids) < T:
        ids += [draw(uid)] * draw(st.integers(1, max(1, T)))
    return ids[:T]


def _as_tensor(ids: list[int], how: str) -> torch.Tensor:
    """``ids`` as a tensor of a drawn integer dtype, sometimes a strided view."""
    lo, hi = min(ids, default=0), max(ids, default=0)
    fits = [d for d in _ID_DTYPES if torch.iinfo(d).min <= lo and hi <= torch.iinfo(d).max]
    dtype = fits[int(how[1:]) % len(fits)]
    t = torch.tensor(ids, dtype=torch.int64).to(dtype)
    if how[0] == "s":  # a view with stride 2 over a buffer with junk between the ids
        buf = torch.full((2 * len(ids),), 99, dtype=dtype)
        buf[::2] = t
        t = buf[::2]
    return t


def _spec_check(plan: BatchPlan, ids: list[int]):
    """The module docstring's layout, checked from the ids alone."""
    T, S = len(ids), plan.max_segments
    assert S == min(plan.max_users, plan.max_tokens) + 1
    for name, buf, shape in (("sorted_tokens", plan.sorted_tokens, (plan.max_tokens,)),
                             ("segments", plan.segments, (S, 3))):
        assert buf.dtype == torch.int32 and tuple(buf.shape) == shape, name
    assert plan.num_tokens == T
    st_ = plan.sorted_tokens.tolist()
    assert st_[:T] == sorted(range(T), key=lambda i: ids[i])  # grouped by user, stable (sorted() is)
    assert st_[T:] == [0] * (plan.max_tokens - T)  # tail = 0
    users = sorted(set(ids))
    segs = plan.segments.tolist()
    want, start = [], 0
    for u in users:
        n = ids.count(u)
        want.append([start, start + n, u])
        start += n
    assert segs == want + [[0, 0, -1]] * (S - len(users))  # unused: (0, 0, -1)
    assert plan.num_segments_host() == len(users)
    assert plan.token_user_host().tolist() == ids
    total = 0
    for bm in plan.block_ms:
        off, rows = tile_span(plan.max_tokens, S, plan.block_ms, bm)
        assert (off, rows) == (total, max_tiles(plan.max_tokens, S, bm))  # consecutive blocks, block_ms order
        total += rows
        tiles = plan.tiles_for(bm)
        assert tiles.dtype == torch.int32 and torch.equal(tiles, plan.tiles[off : off + rows])
        tiles = tiles.tolist()
        live = [t for t in tiles if t[1] > t[0]]
        assert tiles[len(live):] == [[0, 0, -1]] * (rows - len(live))  # unused tiles after the live ones
        cursor = 0
        for s, e, u in live:  # each token once, in sorted order, ≤ bm rows, inside one segment
            assert s == cursor and e - s <= bm, (bm, live)
            assert any(s0 <= s and e <= e0 and u == u0 for s0, e0, u0 in want), (bm, (s, e, u), want)
            cursor = e
        assert cursor == T
    assert plan.tiles.shape == (total, 3) and plan.tiles.dtype == torch.int32


def _state(plan: BatchPlan):
    return (plan.num_tokens, plan.num_segments, plan.sorted_tokens.clone(), plan.segments.clone(), plan.tiles.clone())


def _same_state(a, b) -> bool:
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))


@st.composite
def _plan_runs(draw):
    max_tokens = draw(st.integers(1, 70), label="max_tokens")
    max_users = draw(st.one_of(st.integers(1, 20), st.just(1000)), label="max_users")
    block_ms = draw(st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), min_size=1, max_size=4, unique=True),
                    label="block_ms")
    steps = draw(st.lists(st.tuples(
        st.sampled_from(["validate", "fast", "hint", "bad_id", "too_long"]),
        _batch(max_tokens, max_users),
        st.sampled_from([f"{c}{i}" for c in "cs" for i in range(5)]),
    ), min_size=1, max_size=6), label="steps")
    return max_tokens, max_users, tuple(block_ms), steps


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_plan_runs())
def test_update_equals_a_fresh_plan_whatever_came_before(run):
    """``update`` after any earlier batches (larger, smaller, refused) leaves exactly the buffers of
    a fresh plan of the same capacities given only this batch, in the documented layout; the used
    prefix and live tiles equal those of ``BatchPlan.build`` (capacities sized to the batch).
    Refused batches (ids outside ``[-1, max_users)`` with ``validate=True``, more than
    ``max_tokens`` tokens) raise the documented errors and leave the plan as it was."""
    max_tokens, max_users, block_ms, steps = run
    plan = BatchPlan(max_tokens, max_users, block_ms=block_ms)
    _spec_check(plan, [])  # a new plan describes an empty batch
    for mode, ids, how in steps:
        if mode in ("bad_id", "too_long"):
            before = _state(plan)
            if mode == "bad_id":
                bad = ids + [max_users if how[1] in "024" else -2 - int(how[1])]
                bad = bad[len(bad) - max_tokens:]  # keep it within max_tokens, with the bad id
                with pytest.raises(ValueError, match=rf"\[-1, {max_users}\)"):
                    plan.update(torch.tensor(bad), validate=True)
            else:
                with pytest.raises(ValueError, match="max_tokens"):
                    plan.update(torch.tensor(ids + [-1] * (max_tokens + 1 - len(ids))), validate=how[0] == "c")
            assert _same_state(_state(plan), before)
            continue
        tok = _as_tensor(ids, how)
        hint = len(set(ids)) + int(how[1]) if mode == "hint" else None
        out = plan.update(tok, validate=mode == "validate", num_segments=hint)
        assert out is plan
        assert plan.num_segments == (len(set(ids)) if mode == "validate" else hint)
        fresh = BatchPlan(max_tokens, max_users, block_ms=block_ms).update(tok, validate=mode == "validate",
                                                                          num_segments=hint)
        assert _same_state(_state(plan), _state(fresh)), (mode, ids)
        _spec_check(plan, ids)
        built = BatchPlan.build(tok, max_users, block_ms=block_ms)
        T, n = len(ids), len(set(ids))
        assert torch.equal(built.sorted_tokens[:T], plan.sorted_tokens[:T])
        assert torch.equal(built.segments[:n], plan.segments[:n])
        for bm in block_ms:
            live = plan.tiles_for(bm)[:, 1] > plan.tiles_for(bm)[:, 0]
            live_b = built.tiles_for(bm)[:, 1] > built.tiles_for(bm)[:, 0]
            assert torch.equal(built.tiles_for(bm)[live_b], plan.tiles_for(bm)[live])
