import pytest
import torch

from kernels import BatchPlan
from kernels.plan import max_tiles


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
