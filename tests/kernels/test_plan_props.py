"""Property-based tests of :class:`kernels.BatchPlan` and of the ops' torch paths fed with one.

A rule-based state machine keeps one plan of fixed capacity and updates it in place with drawn
batches (empty, one token, all ``-1``, ``max_tokens`` tokens, growing and shrinking, validated
or not, refused ones between), beside a float64 bank whose users come and go. After every step:

* the plan describes exactly the last batch: ``token_user_host()`` gives back its ids, segments
  are sorted, contiguous, non-overlapping and cover every token, the tiles of every ``block_m``
  cover every segment's tokens exactly once, and nothing of an earlier (bigger) batch survives;
* the ops' CPU (torch) path with the plan (``lora_shrink``, ``lora_expand_``, ``lora_linear``
  forward and gradients, both the gathered and the per-segment form) and the references of
  :mod:`kernels.reference` agree with a naive loop over the tokens, in float64.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import kernels
from kernels import AdapterBank, BatchPlan, use_backend
from kernels.ops import fused_linear
from kernels.plan import max_tiles, tile_block, tile_span
from kernels.reference import expand_ref, lora_linear_grads_ref, lora_linear_ref, shrink_ref

from .test_plan import _ID_DTYPES
from .test_plan import _batch as batches


def as_ids(ids: list[int], dtype_pick: int) -> torch.Tensor:
    fits = [d for d in _ID_DTYPES if torch.iinfo(d).min <= min(ids, default=0) and max(ids, default=0)
            <= torch.iinfo(d).max]
    return torch.tensor(ids, dtype=torch.int64).to(fits[dtype_pick % len(fits)])


def check_plan(plan: BatchPlan, ids: list[int]) -> None:
    """The module docstring's layout, from the ids alone (an independent reading of it)."""
    T, S = len(ids), plan.max_segments
    assert plan.num_tokens == T
    assert plan.token_user_host().tolist() == ids
    st_ = plan.sorted_tokens.tolist()
    assert sorted(st_[:T]) == list(range(T)) and st_[T:] == [0] * (plan.max_tokens - T)  # a permutation; tail 0
    segs = plan.segments.tolist()
    live = [s for s in segs if s[1] > s[0]]
    assert segs[len(live):] == [[0, 0, -1]] * (S - len(live))  # unused rows: (0, 0, -1), after the live ones
    assert [u for *_, u in live] == sorted(set(ids))  # one per user present, ascending (-1 first)
    cursor = 0
    for start, end, user in live:  # contiguous, non-overlapping, cover [0, T)
        assert start == cursor
        cursor = end
        toks = st_[start:end]
        assert all(ids[t] == user for t in toks) and toks == sorted(toks)  # the user's tokens, in order
    assert cursor == T
    assert plan.num_segments_host() == len(live)
    total = 0
    for bm in plan.block_ms:
        off, rows = tile_span(plan.max_tokens, S, plan.block_ms, bm)
        assert off == total and rows == max_tiles(plan.max_tokens, S, bm)
        total += rows
        tiles = plan.tiles_for(bm).tolist()
        assert tiles == tile_block(plan.tiles, plan.sorted_tokens, plan.segments, list(plan.block_ms), bm).tolist()
        used = [t for t in tiles if t[1] > t[0]]
        assert tiles[len(used):] == [[0, 0, -1]] * (rows - len(used))  # stale tiles never survive
        seen = [0] * T
        for start, end, user in used:
            assert end - start <= bm
            seg = [s for s in live if s[0] <= start and end <= s[1]]
            assert len(seg) == 1 and seg[0][2] == user  # inside one segment, with its user
            for p in range(start, end):
                seen[p] += 1
        assert seen == [1] * T  # every sorted position exactly once
        # as few tiles as the segments need
        assert len(used) == sum(-(-(e - s) // bm) for s, e, _ in live)
    assert plan.tiles.shape == (total, 3)


# ------------------------------------------------------------------ the naive per-token loop
def naive_rows(bank: AdapterBank, u: int):
    off, r = bank.slots[u].tolist() if u >= 0 else (0, 0)
    sl = slice(off, off + r)
    return bank.lora_a[sl].detach(), bank.lora_b[sl].detach(), bank.scale[sl].double(), r


def naive_shrink(x, bank, ids) -> torch.Tensor:
    t = torch.zeros(len(ids), bank.max_rank, dtype=torch.float64)
    for i, u in enumerate(ids):
        a, _, s, r = naive_rows(bank, u)
        t[i, :r] = (a.double() @ x[i].double()) * s
    return t


def naive_expand(y, t, bank, ids) -> torch.Tensor:
    out = y.double().clone()
    for i, u in enumerate(ids):
        _, b, _, r = naive_rows(bank, u)
        out[i] += t[i, :r].double() @ b.double()
    return out


def naive_linear(x, w, bias, a_all, b_all, bank, ids) -> torch.Tensor:
    """``x_i Wᵀ + b + Σ_r s_r (a_r · x_i) b_r`` token by token (differentiable in ``x``, ``a_all``, ``b_all``)."""
    rows = []
    for i, u in enumerate(ids):
        y = x[i] @ w.t() if w is not None else torch.zeros(bank.out_features, dtype=torch.float64)
        if bias is not None:
            y = y + bias
        off, r = bank.slots[u].tolist() if u >= 0 else (0, 0)
        if r:
            y = y + ((a_all[off:off + r] @ x[i]) * bank.scale[off:off + r].double()) @ b_all[off:off + r]
        rows.append(y)
    return torch.stack(rows) if rows else torch.zeros(0, bank.out_features, dtype=torch.float64)


def close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    assert got.shape == want.shape and got.dtype == torch.float64, (what, got.shape, want.shape, got.dtype)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= 1e-12 * (1 + want.abs().max().item() if want.numel() else 1), (what, err)


class PlanModel(RuleBasedStateMachine):
    @initialize(data=st.data(), max_tokens=st.sampled_from([1, 2, 5, 17, 40]), max_users=st.integers(1, 9),
                block_ms=st.lists(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), min_size=1, max_size=4, unique=True),
                k=st.integers(1, 6), n=st.integers(1, 6))
    def setup(self, data, max_tokens, max_users, block_ms, k, n):
        self.plan = BatchPlan(max_tokens, max_users, block_ms=block_ms)
        self.ptrs = [self.plan.sorted_tokens.data_ptr(), self.plan.segments.data_ptr(), self.plan.tiles.data_ptr()]
        self.bank = AdapterBank(k, n, max_users=max_users + data.draw(st.integers(0, 2), label="extra users"),
                                dtype=torch.float64)
        self.ids: list[int] = []
        self.gen = torch.Generator().manual_seed(0)
        for u in range(max_users):
            if data.draw(st.integers(0, 3), label=f"user {u}"):  # most users have adapters
                self._add(u, data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), label="ranks"))
        self.update(data, validate=True, dtype_pick=0, hint=False)

    def _add(self, user, ranks):
        self.bank.add(user, ranks, alpha=float(user + 2), init="random", generator=self.gen)

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), validate=st.booleans(), dtype_pick=st.integers(0, 4), hint=st.booleans())
    def update(self, data, validate, dtype_pick, hint):
        ids = data.draw(batches(self.plan.max_tokens, self.plan.max_users), label="ids")
        n_seg = len(set(ids)) if hint else None
        out = self.plan.update(as_ids(ids, dtype_pick), validate=validate, num_segments=None if validate else n_seg)
        assert out is self.plan
        assert self.plan.num_segments == (len(set(ids)) if validate else n_seg)
        self.ids = ids
        # every batch through the ops too (the invariants check the plan itself)
        self.ops_agree_with_a_per_token_loop(**data.draw(st.fixed_dictionaries(self._OPS_ARGS), label="ops"))

    @rule(data=st.data(), validate=st.booleans())
    def refused_update_changes_nothing(self, data, validate):
        plan = self.plan
        ids = data.draw(batches(plan.max_tokens, plan.max_users), label="ids")
        kind = data.draw(st.sampled_from(["too_long", "bad_id", "2d", "float"] if validate
                                         else ["too_long", "2d", "float"]), label="kind")
        if kind == "too_long":
            bad, exc, match = torch.tensor(ids + [-1] * (plan.max_tokens + 1 - len(ids))), ValueError, "max_tokens"
        elif kind == "bad_id":
            bad_id = data.draw(st.sampled_from([plan.max_users, plan.max_users + 7, -2, -100]), label="bad id")
            bad = torch.tensor((ids + [bad_id])[-plan.max_tokens:])
            exc, match = ValueError, rf"token_user ids must be in \[-1, {plan.max_users}\)"
        elif kind == "2d":
            bad, exc, match = torch.zeros(1, len(ids), dtype=torch.long), ValueError, "token_user must be 1-D"
        else:
            bad, exc, match = torch.tensor(ids, dtype=torch.float32), TypeError, "token_user must be an integer tensor"
        before = (plan.num_tokens, plan.num_segments, plan.sorted_tokens.clone(), plan.segments.clone(),
                  plan.tiles.clone())
        with pytest.raises(exc, match=match):
            plan.update(bad, validate=validate)
        after = (plan.num_tokens, plan.num_segments, plan.sorted_tokens, plan.segments, plan.tiles)
        assert before[:2] == after[:2] and all(torch.equal(a, b) for a, b in zip(before[2:], after[2:]))

    @rule(data=st.data())
    def change_the_bank(self, data):
        """Users come and go between batches (a plan holds ids, not rows)."""
        user = data.draw(st.integers(0, self.bank.max_users - 1), label="user")
        if self.bank.has(user) and data.draw(st.booleans(), label="remove"):
            self.bank.remove(user)
        else:
            self._add(user, data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=3), label="ranks"))

    _OPS_ARGS = dict(seed=st.integers(0, 2**16), bias=st.booleans(), loop=st.booleans(),
                     path=st.sampled_from(["auto", "split"]))

    @rule(**_OPS_ARGS)
    def ops_agree_with_a_per_token_loop(self, seed, bias, loop, path):
        bank, plan, ids = self.bank, self.plan, self.ids
        g = torch.Generator().manual_seed(seed)
        T, k, n = len(ids), bank.in_features, bank.out_features
        x = torch.randn(T, k, generator=g, dtype=torch.float64)
        w = torch.randn(n, k, generator=g, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
        y0 = torch.randn(T, n, generator=g, dtype=torch.float64)
        dy = torch.randn(T, n, generator=g, dtype=torch.float64)
        tok = torch.tensor(ids, dtype=torch.long)
        t_want = naive_shrink(x, bank, ids)
        with use_backend("torch"), mock.patch.object(fused_linear, "GATHER_MAX_ELEMENTS",
                                                     -1 if loop else fused_linear.GATHER_MAX_ELEMENTS):
            with torch.no_grad():
                t = kernels.lora_shrink(x, bank, plan)
                close(t, t_want, "shrink")
                y = kernels.lora_expand_(y0.clone(), t_want, bank, plan)
                close(y, naive_expand(y0, t_want, bank, ids), "expand")
                close(kernels.lora_linear(x, None, None, bank, plan), naive_expand(torch.zeros(T, n), t_want, bank,
                                                                                     ids), "adapters alone")
            # forward and gradients, against autograd through the per-token loop
            xg = x.clone().requires_grad_(True)
            bank.zero_grad(set_to_none=True)
            y = kernels.lora_linear(xg, w, b, bank, plan, path=path)
            (y * dy).sum().backward()
        xr = x.clone().requires_grad_(True)
        ar = bank.lora_a.detach().clone().requires_grad_(True)
        br = bank.lora_b.detach().clone().requires_grad_(True)
        y_want = naive_linear(xr, w, b, ar, br, bank, ids)
        close(y.detach(), y_want.detach(), "lora_linear")
        if T:
            (y_want * dy).sum().backward()
        for got, want, what in ((xg.grad, xr.grad, "dx"), (bank.lora_a.grad, ar.grad, "dA"),
                                (bank.lora_b.grad, br.grad, "dB")):
            want = want if want is not None else torch.zeros_like(got)
            got = got if got is not None else torch.zeros_like(want)
            close(got, want, what)
        bank.zero_grad(set_to_none=True)
        # the references (ids, no plan) against the same loop, with the ids the plan gives back
        tu = plan.token_user_host()
        assert torch.equal(tu, tok)
        close(shrink_ref(x, bank.lora_a.detach(), bank.scale, bank.slots, tu, bank.max_rank), t_want, "shrink_ref")
        close(expand_ref(y0, t_want, bank.lora_b.detach(), bank.slots, tu), naive_expand(y0, t_want, bank, ids),
              "expand_ref")
        close(lora_linear_ref(x, w, b, bank.lora_a.detach(), bank.lora_b.detach(), bank.scale, bank.slots, tu),
              y_want.detach(), "lora_linear_ref")
        dx, da, db = lora_linear_grads_ref(x, w, bank.lora_a.detach(), bank.lora_b.detach(), bank.scale, bank.slots,
                                           tu, dy)
        for got, want, what in ((dx, xr.grad, "dx_ref"), (da, ar.grad, "dA_ref"), (db, br.grad, "dB_ref")):
            close(got, want if want is not None else torch.zeros_like(got), what)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def describes_exactly_the_last_batch(self):
        check_plan(self.plan, self.ids)
        # rewritten in place: the buffers a captured CUDA graph reads stay the same
        assert [self.plan.sorted_tokens.data_ptr(), self.plan.segments.data_ptr(),
                self.plan.tiles.data_ptr()] == self.ptrs


def test_plan_machine():
    run_state_machine_as_test(PlanModel, settings=settings(
        max_examples=35, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


# ------------------------------------------------------------------ regressions, written out
def test_tile_span_takes_the_block_ms_a_plan_hands_the_ops():
    """``as_args()`` gives ``block_ms`` as a list; ``tile_span`` (public) used it as a dict key:
    ``TypeError: unhashable type: 'list'``."""
    plan = BatchPlan(100, 4, block_ms=(16, 64))
    *_, block_ms = plan.as_args()
    assert isinstance(block_ms, list)
    assert tile_span(100, plan.max_segments, block_ms, 64) == tile_span(100, plan.max_segments, (16, 64), 64) == (12, 7)
    with pytest.raises(ValueError, match=r"block_m=32 is not one of the plan's block_ms \[16, 64\]"):
        tile_span(100, plan.max_segments, block_ms, 32)


@pytest.mark.parametrize("block_ms", [(8, 32), (1, 4, 16)])
def test_plans_with_tile_heights_under_16_run_the_triton_kernels(block_ms):
    """A plan may keep tile heights under 16 (``BatchPlan`` takes any power of two); the kernels'
    configs fit ``block_m`` to one of the plan's heights, and used to pick the nearest (8 for
    the heuristic's 16), which no launch config takes: every Triton launch raised
    'LaunchConfig.block_m must be a power of two >= 16'. (Tiny: the interpreter runs it.)"""
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(16, 16, max_users=3)
    bank.add(0, 4, init="random", generator=g)
    bank.add(2, [3, 2], init="random", generator=g)
    ids = torch.tensor([0, 2, -1, 2, 1, 0, 0])
    x, w = torch.randn(7, 16, generator=g), torch.randn(16, 16, generator=g)
    want = lora_linear_ref(x, w, None, bank.lora_a, bank.lora_b, bank.scale, bank.slots, ids)
    plan = BatchPlan(8, 3, block_ms=block_ms).update(ids)
    with use_backend("triton"), torch.no_grad():
        for path in kernels.PATHS:
            y = kernels.lora_linear(x, w, None, bank, plan, path=path)
            assert (y.double() - want).abs().max() < 1e-4 * (1 + want.abs().max()), path



@pytest.mark.parametrize("block_ms, exc, match", [
    (64, TypeError, "block_ms must be a sequence of ints"),  # was: 'int' object is not iterable
    ((16.5, 32), TypeError, "block_ms must be a sequence of ints"),  # was: taken as (16, 32)
    ("16", TypeError, "block_ms must be a sequence of ints"),  # was: 'powers of two, got (1, 6)'
    ([16, None], TypeError, "block_ms must be a sequence of ints"),  # was: int() argument must be ...
    ((), ValueError, "distinct powers of two, got ()"),
    ((16, 16), ValueError, "distinct powers of two"),
    ((16, 48), ValueError, "distinct powers of two"),
])
def test_bad_block_ms_are_refused_naming_them(block_ms, exc, match):
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        BatchPlan(8, 4, block_ms=block_ms)
    with pytest.raises(exc, match=match.replace("(", r"\(").replace(")", r"\)")):
        BatchPlan.build(torch.tensor([0, -1]), 4, block_ms=block_ms)


def test_numpy_block_ms_are_ints():
    import numpy as np

    plan = BatchPlan(8, 4, block_ms=np.array([16, 64]))
    assert plan.block_ms == (16, 64) and all(type(b) is int for b in plan.block_ms)
