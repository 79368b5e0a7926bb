"""Property-based tests of :class:`kernels.AdapterBank` against a plain dict model.

A rule-based state machine adds, replaces, removes, compacts, reserves and sets weights in drawn
orders, and some ``add`` calls run out of memory (a simulated device whose tensors may not exceed
a size). After every step the bank matches ``{user: [(A_j, B_j, alpha_j)]}``: each live user's
rows read back bit-exact through its slot, the per-row scales are ``float32(alpha_j / r_j)``,
absent users have rank 0, no two users share a row, and a refused call (a bad argument, an
allocation that failed) leaves the bank exactly as it was.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels import AdapterBank

_RANKS = st.lists(st.integers(1, 12), min_size=1, max_size=3)
_ALPHA = st.one_of(st.sampled_from([16.0, 1.0, 8]), st.floats(-100, 100, allow_nan=False, allow_infinity=False))
_SEED = st.integers(0, 2**16)


class OutOfMemory(TorchDispatchMode):
    """A device that cannot hold a new tensor of more than ``limit`` elements: such an allocation
    raises, as a CUDA out-of-memory error would (views and in-place results pass)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.limit and t.untyped_storage().data_ptr() not in held:
                raise RuntimeError(f"out of memory (simulated): {func} made {t.numel()} elements")
        return out


def snapshot(bank: AdapterBank) -> tuple:
    """Everything observable about a bank (public API, plus tensor contents)."""
    segs = {u: bank.segment(u) for u in bank.users}
    return (bank.capacity, bank.version, bank.max_users, bank.max_rank, bank.used_rows, segs,
            bank.lora_a.detach().clone(), bank.lora_b.detach().clone(), bank.scale.clone(), bank.slots.clone(),
            bank.lora_a.dtype, bank.lora_b.shape)


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True))


def scale32(alpha: float, r: int) -> float:
    return torch.tensor(float(alpha) / r, dtype=torch.float32).item()


class BankModel(RuleBasedStateMachine):
    @initialize(k=st.integers(1, 6), n=st.integers(1, 9), max_users=st.integers(1, 6),
                capacity=st.sampled_from([0, 1, 7, 24]), dtype=st.sampled_from([torch.float32, torch.float64,
                                                                                  torch.bfloat16]))
    def setup(self, k, n, max_users, capacity, dtype):
        self.bank = AdapterBank(k, n, max_users=max_users, capacity=capacity, dtype=dtype)
        self.model: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.high = 0

    # ------------------------------------------------------------------ helpers
    def _read(self, user: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The bank's rows of ``user`` (copies), split by module."""
        a, b, _ = self.bank.adapter_weights(user)
        seg, out, row = self.bank.segment(user), [], 0
        for r, al in zip(seg.ranks, seg.alphas):
            out.append((a[row:row + r].detach().clone(), b[row:row + r].detach().clone(), al))
            row += r
        return out

    def _used(self) -> int:
        return sum(a.shape[0] for mods in self.model.values() for a, _, _ in mods)

    def _pick_user(self, data, present: bool | None = None) -> int | None:
        pool = [u for u in range(self.bank.max_users) if present is None or (u in self.model) == present]
        return data.draw(st.sampled_from(pool), label="user") if pool else None

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), ranks=_RANKS, alpha=_ALPHA, init=st.sampled_from(["lora", "random", "zeros", "given"]),
          seed=_SEED, per_module=st.booleans())
    def add(self, data, ranks, alpha, init, seed, per_module):
        """Add or replace: the user's rows (fresh, or weights given after) and nobody else's change."""
        user = self._pick_user(data)
        alphas = [alpha] * len(ranks) if not per_module else data.draw(st.lists(_ALPHA, min_size=len(ranks),
                                                                                max_size=len(ranks)), label="alphas")
        others = {u: self._read(u) for u in self.model if u != user}
        g = torch.Generator().manual_seed(seed)
        seg = self.bank.add(user, ranks, alphas if per_module else alpha,
                            init="zeros" if init == "given" else init, generator=g)
        assert seg == self.bank.segment(user) and seg.ranks == tuple(ranks)
        assert seg.alphas == tuple(float(a) for a in alphas) and seg.rank == sum(ranks)
        if init == "given":
            wa = torch.randn(seg.rank, self.bank.in_features, generator=g, dtype=torch.float64)
            wb = torch.randn(seg.rank, self.bank.out_features, generator=g, dtype=torch.float64)
            self.bank.set_adapter_weights(user, wa, wb)
            got_a, got_b, _ = self.bank.adapter_weights(user)
            dt = self.bank.lora_a.dtype
            assert torch.equal(got_a, wa.to(dt)) and torch.equal(got_b, wb.to(dt))
        mods = self._read(user)
        for a, b, _ in mods:
            if init in ("zeros", "lora"):
                assert not b.any()
            if init == "zeros":
                assert not a.any()
        self.model[user] = mods
        self.high = max(self.high, seg.rank)
        for u, want in others.items():  # a replacement or a growth moved nobody's values
            assert all(torch.equal(x, y) for m, w in zip(self._read(u), want) for x, y in zip(m[:2], w[:2])), u

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        user = self._pick_user(data, present=True)
        cap, version = self.bank.capacity, self.bank.version
        self.bank.remove(user)
        del self.model[user]
        assert (self.bank.capacity, self.bank.version) == (cap, version)
        assert self.bank.slots[user].tolist() == [0, 0] and self.bank.rank_of(user) == 0

    @rule()
    def compact(self):
        ptrs = self.bank.lora_a.data_ptr(), self.bank.lora_b.data_ptr(), self.bank.scale.data_ptr()
        self.bank.compact()
        assert (self.bank.lora_a.data_ptr(), self.bank.lora_b.data_ptr(), self.bank.scale.data_ptr()) == ptrs
        # at the front, in offset order, no gaps
        spans = sorted((s.offset, s.rank) for s in map(self.bank.segment, self.model))
        cursor = 0
        for off, r in spans:
            assert off == cursor
            cursor += r

    @precondition(lambda self: len(self.model) >= 2)
    @rule(data=st.data())
    def compact_out_of_memory(self, data):
        """The first user (by offset) leaves, then a compaction whose row copies run out of memory
        part-way raises; every segment is then where it was or moved whole, and the free list is the
        rows nobody holds. A failed copy used to leave a half-moved segment (its rows overlap) and
        the free list of before the moves, so the next ``add`` landed on a moved user."""
        bank = self.bank
        first = min(self.model, key=lambda u: bank.segment(u).offset)
        bank.remove(first)
        del self.model[first]
        sizes = sorted({seg.rank * d for seg in map(bank.segment, self.model)
                        for d in (bank.in_features, bank.out_features, 1)})
        limit = data.draw(st.sampled_from(sizes), label="limit") - 1
        try:
            with OutOfMemory(limit):
                bank.compact()
        except RuntimeError as exc:
            assert "out of memory" in str(exc)

    @rule(extra=st.integers(0, 30))
    def reserve(self, extra):
        cap, version = self.bank.capacity, self.bank.version
        self.bank.reserve(cap + extra)
        assert self.bank.capacity == cap + extra and self.bank.version == version + (extra > 0)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=_SEED)
    def set_weights(self, data, seed):
        user = self._pick_user(data, present=True)
        r = self.bank.rank_of(user)
        g = torch.Generator().manual_seed(seed)
        wa = torch.randn(r, self.bank.in_features, generator=g, dtype=torch.float32)
        wb = torch.randn(r, self.bank.out_features, generator=g, dtype=torch.float64)
        self.bank.set_adapter_weights(user, wa, wb)
        a, b = wa.to(self.bank.lora_a.dtype), wb.to(self.bank.lora_b.dtype)
        row, mods = 0, []
        for ma, _, al in self.model[user]:
            mods.append((a[row:row + ma.shape[0]], b[row:row + ma.shape[0]], al))
            row += ma.shape[0]
        self.model[user] = mods

    @rule(data=st.data(), ranks=_RANKS, more=st.integers(1, 40))
    def add_out_of_memory(self, data, ranks, more):
        """An ``add`` that needs the bank to grow, on a device that cannot hold the grown tensors
        (``lora_b`` only, or both): it raises, and the bank, the replaced user included, is as
        it was. It used to lose a replaced user, and ``reserve`` could leave ``lora_a`` grown and
        ``lora_b`` not."""
        user = self._pick_user(data)
        bank = self.bank
        held = bank.rank_of(user)
        free = bank.capacity - bank.used_rows + held
        ranks = ranks + [free + more]  # more than the free rows: growth
        k, n = bank.in_features, bank.out_features
        grown = max(bank.used_rows - held + sum(ranks), 2 * bank.capacity, 64)
        # lora_a [grown, k] may fit and lora_b [grown, n] not (when n > k), or neither
        limit = data.draw(st.sampled_from([grown * min(k, n), grown * max(k, n) - 1]), label="limit")
        if limit >= grown * max(k, n):
            return
        before = snapshot(bank)
        with pytest.raises(RuntimeError, match="out of memory"), OutOfMemory(limit):
            bank.add(user, ranks, alpha=4.0, init="random")
        assert same(snapshot(bank), before)

    @rule(data=st.data())
    def bad_calls_change_nothing(self, data):
        """Refused calls name the argument and leave the bank as it was."""
        user = self._pick_user(data)
        present = self._pick_user(data, present=True)
        r = self.bank.rank_of(present) if present is not None else 1
        k, n = self.bank.in_features, self.bank.out_features
        calls = [
            (lambda b: b.add(user, [2, 0]), ValueError, r"ranks\[\.\.\.\] must be >= 1"),
            (lambda b: b.add(user, []), ValueError, "ranks must name at least one module"),
            (lambda b: b.add(user, True), TypeError, "ranks must be an int or a sequence of ints, got bool"),
            (lambda b: b.add(user, np.int64(4)), TypeError, "ranks must be an int or a sequence of ints, got int64"),
            (lambda b: b.add(user, [2.0]), TypeError, r"ranks\[\.\.\.\] must be an int"),
            (lambda b: b.add(user, 3, alpha=math.nan), ValueError, "alpha must be finite"),
            (lambda b: b.add(user, 3, alpha=1e40), ValueError, "alpha / rank must be finite in float32"),
            (lambda b: b.add(user, [1, 2], alpha=[1.0, -1e39]), ValueError, "alpha / rank must be finite in float32"),
            (lambda b: b.add(user, [1, 2], alpha=[1.0]), ValueError, "alpha has 1 values for 2 ranks"),
            (lambda b: b.add(user, 3, alpha="16"), TypeError, "alpha must be a number or a sequence"),
            (lambda b: b.add(user, 3, alpha=torch.tensor(2.0)), TypeError, "alpha must be a number or a sequence"),
            (lambda b: b.add(user, 3, alpha=[None]), TypeError, "alpha must be a number"),
            (lambda b: b.add(user, 3, init="kaiming"), ValueError, "init must be one of"),
            (lambda b: b.add(b.max_users, 3), ValueError, "user must be in"),
            (lambda b: b.add(-1, 3), ValueError, "user must be in"),
            (lambda b: b.add(np.int64(0), 3), TypeError, "user must be an int id"),
            (lambda b: b.reserve(-1), ValueError, "capacity must be >= 0"),
            (lambda b: b.reserve(8.0), TypeError, "capacity must be an int"),
            (lambda b: b.resize_users(0), ValueError, "max_users must be >= 1"),
        ]
        if present is not None:
            calls += [
                (lambda b: b.set_adapter_weights(present, torch.zeros(r, k + 1), torch.zeros(r, n)), ValueError,
                 rf"a must have shape \[{r}, {k}\]"),
                (lambda b: b.set_adapter_weights(present, torch.zeros(r, k), torch.zeros(r + 1, n)), ValueError,
                 rf"b must have shape \[{r}, {n}\]"),
                (lambda b: b.set_adapter_weights(present, torch.zeros(r, k, dtype=torch.int64), torch.zeros(r, n)),
                 TypeError, "a must have dtype in"),
                (lambda b: b.set_adapter_weights(present, torch.zeros(r, k).tolist(), torch.zeros(r, n)),
                 TypeError, "a must be a torch.Tensor"),
                (lambda b: b.set_adapter_weights(present, torch.zeros(r, k), torch.full((r, n), math.inf)),
                 ValueError, "NaN or inf"),
            ]
        absent = self._pick_user(data, present=False)
        if absent is not None:
            calls += [(lambda b: b.remove(absent), KeyError, f"user {absent} has no adapters"),
                      (lambda b: b.segment(absent), KeyError, f"user {absent} has no adapters"),
                      (lambda b: b.set_adapter_weights(absent, torch.zeros(1, k), torch.zeros(1, n)), KeyError,
                       f"user {absent} has no adapters")]
        call, exc, match = data.draw(st.sampled_from(calls), label="call")
        before = snapshot(self.bank)
        with pytest.raises(exc, match=match):
            call(self.bank)
        assert same(snapshot(self.bank), before)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def matches_the_model(self):
        bank = self.bank
        cap = bank.capacity
        assert bank.users == sorted(self.model) and bank.max_rank == self.high
        assert bank.lora_a.shape == (cap, bank.in_features) and bank.lora_b.shape == (cap, bank.out_features)
        assert bank.scale.shape == (cap,) and bank.scale.dtype == torch.float32
        slots = bank.slots.tolist()
        owner = [None] * cap
        for u in range(bank.max_users):
            if u not in self.model:
                assert slots[u] == [0, 0] and bank.rank_of(u) == 0 and not bank.has(u)
                continue
            seg = bank.segment(u)
            assert slots[u] == [seg.offset, seg.rank] and 0 <= seg.offset and seg.offset + seg.rank <= cap
            for row in range(seg.offset, seg.offset + seg.rank):  # no two live users share a row
                assert owner[row] is None, (u, owner[row], row)
                owner[row] = u
            # read back through the slot, bit-exact, module by module
            row = seg.offset
            for (a, b, al), r, sal in zip(self.model[u], seg.ranks, seg.alphas, strict=True):
                assert a.shape[0] == r and sal == al
                assert torch.equal(bank.lora_a[row:row + r].detach(), a), u
                assert torch.equal(bank.lora_b[row:row + r].detach(), b), u
                assert bank.scale[row:row + r].tolist() == [scale32(al, r)] * r, u
                row += r
        # rows nobody holds carry no scale (a stale one would scale the rows' next owner until set)
        assert all(bank.scale[i].item() == 0 for i in range(cap) if owner[i] is None)
        assert bank.used_rows == self._used() == sum(o is not None for o in owner)
        # the free list: exactly the runs of rows nobody holds, merged
        runs: list[tuple[int, int]] = []
        for i in (i for i in range(cap) if owner[i] is None):
            if runs and sum(runs[-1]) == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
        assert bank._free == runs, (bank._free, runs)
        assert bank.num_parameters() == self._used() * (bank.in_features + bank.out_features)


def test_bank_matches_a_dict_model():
    run_state_machine_as_test(BankModel, settings=settings(
        max_examples=150, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]))


# ------------------------------------------------------------------ regressions, written out
def test_reserve_that_runs_out_of_memory_leaves_the_bank_whole():
    """``reserve`` grew ``lora_a`` in place, then failed to allocate ``lora_b``: the bank kept
    ``lora_a [100, 4]`` beside ``lora_b [4, 8]`` and ``scale [4]``, every later call broken."""
    bank = AdapterBank(4, 8, max_users=2, capacity=4)
    bank.add(0, 4, init="random")
    before = snapshot(bank)
    with pytest.raises(RuntimeError, match="out of memory"), OutOfMemory(100 * 4):
        bank.reserve(100)
    assert same(snapshot(bank), before)
    bank.reserve(100)
    assert bank.capacity == 100 and bank.version == 1


def test_replacing_a_user_past_memory_keeps_the_old_adapters():
    """``add`` over a present user removed it before growing: when the growth failed the user was
    gone (slot zeroed, rows freed)."""
    bank = AdapterBank(4, 8, max_users=2, capacity=4)
    bank.add(0, 4, alpha=2.0, init="random")
    before = snapshot(bank)
    with pytest.raises(RuntimeError, match="out of memory"), OutOfMemory(64):
        bank.add(0, 100)
    assert same(snapshot(bank), before) and bank.users == [0] and bank.slots[0].tolist() == [0, 4]


def test_alpha_whose_scale_overflows_float32_is_refused():
    """``alpha=1e39`` passed the finite check (a float64) and was stored as a float32 scale of inf:
    every forward of that user gave inf/NaN (or was refused later, far from the cause)."""
    bank = AdapterBank(4, 4, max_users=2)
    with pytest.raises(ValueError, match="alpha / rank must be finite in float32"):
        bank.add(0, 1, alpha=1e39)
    assert bank.users == [] and bank.capacity == 0
    bank.add(0, 4, alpha=1e39)  # 2.5e38 fits
    assert bank.scale[:4].tolist() == [scale32(1e39, 4)] * 4 and math.isfinite(bank.scale[0].item())


def test_numpy_alpha_is_a_number():
    """A numpy ``float32`` alpha (a config read with numpy) is a number: it was iterated
    ('numpy.float32' object is not iterable)."""
    bank = AdapterBank(4, 4, max_users=2)
    seg = bank.add(0, [2, 2], alpha=np.float32(8.0))
    assert seg.alphas == (8.0, 8.0) and bank.scale[:4].tolist() == [4.0] * 4
    seg = bank.add(1, [2, 4], alpha=np.array([8.0, 2.0], dtype=np.float32))
    assert seg.alphas == (8.0, 2.0)


def test_compaction_that_runs_out_of_memory_keeps_every_user_whole():
    """A segment moving down over rows it overlaps: ``lora_a``'s rows were copied, then the copy of
    ``lora_b``'s failed. User 1 kept its old offset with ``A`` half overwritten, and the free list
    still named the rows user 2 had already moved into: the next ``add`` took them."""
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(2, 8, max_users=4, capacity=16)
    for u, r in ((0, 4), (1, 2), (2, 6)):
        bank.add(u, r, init="random", generator=g)
    bank.remove(0)
    want = {u: [t.clone() for t in bank.adapter_weights(u)] for u in (1, 2)}
    with pytest.raises(RuntimeError, match="out of memory"), OutOfMemory(6 * 8 - 1):  # user 2's lora_b rows
        bank.compact()
    assert bank.segment(1).offset == 0 and bank.segment(2).offset == 6  # user 1 moved, user 2 did not
    bank.add(3, 4, init="random", generator=g)  # lands in the rows nobody holds
    spans = sorted((bank.segment(u).offset, bank.segment(u).offset + bank.rank_of(u)) for u in (1, 2, 3))
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), spans
    for u, (a, b, s) in want.items():
        a2, b2, s2 = bank.adapter_weights(u)
        assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(s, s2), u
    bank.compact()
    assert [bank.segment(u).offset for u in (1, 3, 2)] == [0, 2, 6]
