import math
import sys
from unittest import mock

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

import kernels
from kernels import PATHS, AdapterBank, BatchPlan, use_backend
from kernels.ops import fused_linear
from kernels.reference import lora_linear_ref

from .cases import rel_err


def test_add_packs_modules_contiguously_with_per_row_scales():
    bank = AdapterBank(8, 12, max_users=4)
    seg = bank.add(1, [4, 2], alpha=[8.0, 4.0])
    assert seg.rank == 6 and bank.rank_of(1) == 6 and bank.rank_of(0) == 0
    off, rank = bank.slots[1].tolist()
    assert rank == 6
    assert bank.scale[off : off + 6].tolist() == [2.0] * 4 + [2.0] * 2
    a, b, s = bank.adapter_weights(1)
    assert a.shape == (6, 8) and b.shape == (6, 12) and s.shape == (6,)
    assert torch.count_nonzero(b) == 0  # "lora" init: B = 0, A random
    assert torch.count_nonzero(a) > 0
    assert bank.num_parameters(1) == 6 * (8 + 12)
    assert bank.max_rank == 6


def test_max_rank_is_a_high_water_mark():
    """Like the capacity, ``max_rank`` does not shrink when users leave (an int the compiled op
    reads: evictions must not re-trace it); a larger user raises it."""
    bank = AdapterBank(8, 12, max_users=4)
    bank.add(0, [4])
    bank.add(1, [16, 8])
    assert bank.max_rank == 24
    bank.remove(1)
    assert bank.max_rank == 24 and bank.rank_of(0) == 4
    bank.add(2, [2])
    assert bank.max_rank == 24
    bank.add(3, [32])
    assert bank.max_rank == 32


def test_remove_frees_rows_for_reuse_without_reallocation():
    bank = AdapterBank(4, 4, max_users=8, capacity=64)
    for u in range(4):
        bank.add(u, 16)
    ptr, version = bank.lora_a.data_ptr(), bank.version
    bank.remove(1)
    bank.add(5, [8, 8])  # fits the hole left by user 1
    assert bank.lora_a.data_ptr() == ptr and bank.version == version
    assert bank.slots[5].tolist() == [16, 16]
    assert bank.slots[1].tolist() == [0, 0]
    assert sorted(bank.users) == [0, 2, 3, 5]


def test_fragmented_free_space_is_compacted_in_place():
    bank = AdapterBank(4, 6, max_users=8, capacity=40)
    g = torch.Generator().manual_seed(0)
    for u in range(4):
        bank.add(u, 10, init="random", generator=g)
    kept = {u: [t.clone() for t in bank.adapter_weights(u)] for u in (1, 3)}
    bank.remove(0)
    bank.remove(2)  # two holes of 10 rows: 20 free, none contiguous
    ptr = bank.lora_a.data_ptr()
    bank.add(6, 20)
    assert bank.lora_a.data_ptr() == ptr  # compacted, not grown
    for u, (a, b, s) in kept.items():
        a2, b2, s2 = bank.adapter_weights(u)
        assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(s, s2)
    assert bank.used_rows == 40


def test_growth_reallocates_and_bumps_version():
    bank = AdapterBank(4, 4, max_users=2)
    assert bank.capacity == 0
    bank.add(0, 8, init="random")
    a0 = bank.adapter_weights(0)[0].clone()
    v = bank.version
    bank.add(1, 100)
    assert bank.capacity >= 108 and bank.version > v
    assert torch.equal(bank.adapter_weights(0)[0], a0)


def test_pending_gradients_follow_their_rows():
    """Users added or removed between ``backward()`` and the optimizer step: compaction moves a
    pending gradient with its rows, growth keeps it (at the new shape), and freed rows lose it,
    so a new user never inherits another's gradient."""
    bank = AdapterBank(4, 6, max_users=8, capacity=40)
    g = torch.Generator().manual_seed(0)
    for u in range(4):
        bank.add(u, 10, init="random", generator=g)
    plan = BatchPlan.build(torch.tensor([0, 1, 2, 3, 1, 3, -1]), 8)
    kernels.lora_linear(torch.randn(7, 4, generator=g), None, None, bank, plan).square().sum().backward()

    def grads(u):
        seg = bank.segment(u)
        sl = slice(seg.offset, seg.offset + seg.rank)
        return bank.lora_a.grad[sl].clone(), bank.lora_b.grad[sl].clone()

    kept = {u: grads(u) for u in (1, 3)}
    assert all(t.abs().sum() > 0 for pair in kept.values() for t in pair)
    bank.remove(0)
    bank.remove(2)
    bank.add(6, 20)  # only fits after compaction: users 1 and 3 move to the front
    assert bank.segment(1).offset == 0 and bank.segment(6).offset == 20
    for u, (ga, gb) in kept.items():
        assert all(torch.equal(x, y) for x, y in zip(grads(u), (ga, gb)))
    assert all(t.abs().sum() == 0 for t in grads(6))
    v = bank.version
    bank.add(7, 30)  # growth
    assert bank.version > v and bank.lora_a.grad.shape == bank.lora_a.shape
    assert bank.lora_b.grad.shape == bank.lora_b.shape
    for u, (ga, gb) in kept.items():
        assert all(torch.equal(x, y) for x, y in zip(grads(u), (ga, gb)))
    assert all(t.abs().sum() == 0 for u in (6, 7) for t in grads(u))


def test_replacing_a_user_and_setting_weights():
    bank = AdapterBank(3, 5, max_users=2)
    bank.add(0, 4)
    bank.add(0, [2, 1], alpha=3.0)
    assert bank.rank_of(0) == 3
    a, b = torch.randn(3, 3), torch.randn(3, 5)
    bank.set_adapter_weights(0, a, b)
    a2, b2, s = bank.adapter_weights(0)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    assert s.tolist() == pytest.approx([1.5, 1.5, 3.0])


def test_bank_moves_and_casts_with_module_api():
    bank = AdapterBank(3, 5, max_users=2, dtype=torch.float16)
    bank.add(1, 2)
    assert bank.lora_a.dtype == torch.float16 and bank.scale.dtype == torch.float32
    state = bank.state_dict()
    assert set(state) == {"lora_a", "lora_b", "scale", "slots", "_extra_state"}


def _churned_bank() -> AdapterBank:
    """A bank with a hole in its rows, modules of several ranks and alphas, and a max rank
    larger than any current user's."""
    bank = AdapterBank(6, 5, max_users=4)
    gen = torch.Generator().manual_seed(0)
    bank.add(1, [2, 3], alpha=[4.0, 6.0], init="random", generator=gen)
    bank.add(3, 4, alpha=0.1, init="random", generator=gen)
    bank.add(2, [1, 7], init="random", generator=gen)
    bank.remove(1)
    bank.remove(2)
    bank.add(0, [1, 2], alpha=[3.0, 5.0], init="random", generator=gen)
    return bank


def _bank_state(bank: AdapterBank) -> tuple:
    return ({u: bank.segment(u) for u in bank.users}, bank._free, bank.max_rank, bank.capacity, bank.max_users,
            [t.tolist() for t in bank.state_dict().values()])


def test_state_dict_round_trips_the_segment_table(tmp_path):
    """``load_state_dict`` restores the users' segments, the free rows and the max rank (not
    only the tensors), into a bank of any capacity and user-id space, through safetensors."""
    from safetensors.torch import load_file, save_file

    bank = _churned_bank()
    save_file(bank.state_dict(), tmp_path / "bank.safetensors")
    for fresh in (AdapterBank(6, 5, max_users=1), AdapterBank(6, 5, max_users=9, capacity=300)):
        version = fresh.version
        fresh.load_state_dict(load_file(tmp_path / "bank.safetensors"))
        assert _bank_state(fresh) == _bank_state(bank) and fresh.version == version + 1
        assert fresh.max_rank == 8 and fresh.segment(0).alphas == (3.0, 5.0)
        # the banks go on alike: the same rows for the same adds, the loaded users' rows untouched
        for b in (bank, fresh):
            b.add(2, 3, init="zeros")
            b.remove(3)
            b.add(1, [2, 2], init="zeros")
        assert _bank_state(fresh) == _bank_state(bank)
        bank = _churned_bank()


def test_state_dict_that_does_not_fit_is_refused_and_leaves_the_bank_as_it_was():
    state = _churned_bank().state_dict()
    target = AdapterBank(6, 5, max_users=2)
    target.add(1, 3, init="random")
    before = _bank_state(target)
    no_table = {k: v for k, v in state.items() if k != "_extra_state"}
    overlap = dict(state, _extra_state=torch.tensor([[1, 8, 0, 0], [0, 0, 3, 16], [3, 1, 4, 16]], dtype=torch.float64))
    moved = dict(state, _extra_state=state["_extra_state"].clone())
    moved["_extra_state"][1:3, 1] += 1  # user 0's modules one row on
    for bad, match in [
        (no_table, "no '_extra_state'.*slots give users rows"),
        (dict(state, _extra_state=torch.zeros(2, 3)), r"must be a \[1 \+ modules, 4\] tensor"),
        (dict(state, _extra_state=torch.tensor([[2.0, 0, 0, 0]])), "format 2"),
        (overlap, "rows another user holds"),
        (moved, "but slots say"),
        (dict(state, _extra_state=state["_extra_state"][:3]), r"no segment for users \[3\]"),
        ({k: v[:, :4] if k == "lora_a" else v for k, v in state.items()}, r"needs lora_a \[rows, 6\]"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            target.load_state_dict(bad)
        assert _bank_state(target) == before
    # an empty bank saved before the table was kept still loads
    empty = AdapterBank(6, 5, max_users=3, capacity=16).state_dict()
    del empty["_extra_state"]
    target = AdapterBank(6, 5, max_users=2)
    target.load_state_dict(empty)
    assert target.users == [] and target._free == [(0, 16)] and target.max_users == 3


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda b: b.add(0, 0), ValueError, "ranks"),
        (lambda b: b.add(0, -4), ValueError, "ranks"),
        (lambda b: b.add(0, []), ValueError, "ranks"),
        (lambda b: b.add(0, 4, alpha=math.nan), ValueError, "alpha"),
        (lambda b: b.add(0, [4, 4], alpha=[1.0]), ValueError, "alpha"),
        (lambda b: b.add(9, 4), ValueError, "user"),
        (lambda b: b.add(-1, 4), ValueError, "user"),
        (lambda b: b.add("a", 4), TypeError, "user"),
        (lambda b: b.add(0, 4, init="xavier"), ValueError, "init"),
        (lambda b: b.remove(1), KeyError, "user 1"),
        (lambda b: b.set_adapter_weights(0, torch.zeros(4, 3), torch.zeros(4, 5)), KeyError, "user 0"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    bank = AdapterBank(3, 5, max_users=2)
    with pytest.raises(exc, match=match):
        call(bank)


def test_bad_weights_and_constructor_args():
    with pytest.raises(ValueError, match="in_features"):
        AdapterBank(0, 5, max_users=2)
    with pytest.raises(TypeError, match="dtype"):
        AdapterBank(3, 5, max_users=2, dtype=torch.int32)
    bank = AdapterBank(3, 5, max_users=2)
    bank.add(0, 4)
    with pytest.raises(ValueError, match=r"a must have shape \[4, 3\]"):
        bank.set_adapter_weights(0, torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        bank.set_adapter_weights(0, torch.full((4, 3), math.nan), torch.zeros(4, 5))


@pytest.mark.parametrize("bank_dtype, w_dtype, big", [(torch.float16, torch.float32, 7e4),
                                                      (torch.float32, torch.float64, 1e39),
                                                      (torch.bfloat16, torch.float64, 1e39)])
def test_weights_the_bank_dtype_cannot_hold_are_refused(bank_dtype, w_dtype, big):
    """Finite weights beyond the bank dtype's range (a float32 checkpoint loaded into a float16
    model) used to be stored as inf, past the NaN/inf check made on the input: now refused like
    NaN, the rows untouched."""
    bank = AdapterBank(3, 2, max_users=1, dtype=bank_dtype)
    bank.add(0, 2, init="random")
    a, b, _ = (t.clone() for t in bank.adapter_weights(0))
    with pytest.raises(ValueError, match="NaN or inf"):
        bank.set_adapter_weights(0, torch.full((2, 3), big, dtype=w_dtype), torch.zeros(2, 2, dtype=w_dtype))
    assert torch.equal(bank.adapter_weights(0)[0], a) and torch.equal(bank.adapter_weights(0)[1], b)
    bank.set_adapter_weights(0, torch.full((2, 3), 1024.0, dtype=w_dtype), torch.zeros(2, 2, dtype=w_dtype))
    assert bank.adapter_weights(0)[0].tolist() == [[1024.0] * 3] * 2


def test_module_casts_keep_scale_float32():
    """``model.to(torch.bfloat16)`` (or ``.half()``, ``.double()``) casts the adapters with the
    model, but the per-row scales stay float32, the kernels' contract: they used to be cast too,
    rounding a rank-3 module's 16/3 and making every later forward raise."""
    bank = AdapterBank(6, 5, max_users=2)
    bank.add(0, [3, 2], alpha=16.0, init="random")
    scale = bank.scale.clone()
    for cast, dtype in ((lambda b: b.to(torch.bfloat16), torch.bfloat16), (lambda b: b.half(), torch.float16),
                        (lambda b: b.double(), torch.float64), (lambda b: b.float(), torch.float32)):
        cast(bank)
        assert bank.lora_a.dtype == bank.lora_b.dtype == dtype
        assert bank.scale.dtype == torch.float32 and torch.equal(bank.scale, scale)
        assert bank.slots.dtype == torch.int32


# ------------------------------------------------------------------ property-based: a drawn life of a bank
_SEED = st.integers(0, 2**16)
_RANKS = st.lists(st.one_of(st.just(1), st.integers(1, 40)), min_size=1, max_size=4)
_ALPHA = st.one_of(st.sampled_from([16.0, 1.0, 7.0]), st.integers(1, 64),
                   st.floats(-64, 64, allow_nan=False, allow_infinity=False))
_INIT = st.sampled_from(["lora", "random", "zeros", "given"])  # "given": set_adapter_weights after the add
_W_DTYPES = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


def _scale32(alpha: float, r: int) -> float:
    """The documented per-row scale: ``alpha / r`` stored as float32."""
    return torch.tensor(float(alpha) / r, dtype=torch.float32).item()


def _alphas(alpha, n: int) -> list[float]:
    return [float(alpha)] * n if isinstance(alpha, (int, float)) else [float(a) for a in alpha]


class BankMachine(RuleBasedStateMachine):
    """An :class:`AdapterBank` against a plain model ``{user: [(A, B, alpha) per module]}`` (float64
    copies of exactly what the bank holds). After every rule the tables, the weights, the scales,
    the free rows and a mixed forward agree with the model; at the end the Triton kernels (the
    interpreter on CPU) agree too."""

    @initialize(k=st.integers(1, 12), n=st.integers(1, 12), max_users=st.integers(1, 7),
                capacity=st.one_of(st.just(0), st.integers(1, 80)),
                dtype=st.sampled_from([torch.float64, torch.float32]),
                triton_path=st.sampled_from(("auto",) + PATHS))
    def setup(self, k, n, max_users, capacity, dtype, triton_path):
        self.bank = AdapterBank(k, n, max_users=max_users, capacity=capacity, dtype=dtype)
        self.plan = BatchPlan(24, max_users)  # reused by `forward`, updated in place batch after batch
        self.triton_path = triton_path  # the one checked through the interpreter at the end (it is slow)
        self.model: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.high = 0  # max_rank: the largest total rank ever added
        self.version = 0

    # ------------------------------------------------------------ helpers
    def _used(self) -> int:
        return sum(a.shape[0] for mods in self.model.values() for a, _, _ in mods)

    def _storage(self):
        b = self.bank
        return b.capacity, b.lora_a.data_ptr(), b.lora_b.data_ptr(), b.scale.data_ptr(), b.version

    def _holes(self) -> list[tuple[int, int]]:
        """``(start, end)`` of the rows no segment holds (from the public segments)."""
        spans = sorted((s.offset, s.offset + s.rank) for s in map(self.bank.segment, self.model))
        holes, cursor = [], 0
        for s, e in spans + [(self.bank.capacity, self.bank.capacity)]:
            if s > cursor:
                holes.append((cursor, s))
            cursor = max(cursor, e)
        return holes

    def _add(self, user, ranks, alpha, init, seed, w_dtype=torch.float64):
        bank = self.bank
        old = self.model.get(user)
        free = bank.capacity - self._used() + (sum(a.shape[0] for a, _, _ in old) if old else 0)
        total = sum(ranks)
        before = self._storage()
        g = torch.Generator().manual_seed(seed)
        seg = bank.add(user, ranks, alpha=alpha, init="zeros" if init == "given" else init, generator=g)
        alphas = _alphas(alpha, len(ranks))
        assert seg == bank.segment(user) and seg.ranks == tuple(ranks) and seg.alphas == tuple(alphas)
        if total <= free:  # the free rows hold it (compacted in place if need be): no reallocation
            assert self._storage() == before
        else:  # grows by reallocation, version bumped
            self.version += 1
            assert bank.version == self.version and bank.capacity >= before[0] - free + total > before[0]
        a, b, _ = bank.adapter_weights(user)
        if init == "given":
            wa = torch.randn(total, bank.in_features, generator=g, dtype=torch.float64).to(w_dtype)
            wb = torch.randn(total, bank.out_features, generator=g, dtype=torch.float64).to(w_dtype)
            bank.set_adapter_weights(user, wa, wb)
            a, b = wa.to(bank.lora_a.dtype), wb.to(bank.lora_b.dtype)
        mods, row = [], 0
        for r, al in zip(ranks, alphas):
            ma, mb = a[row : row + r].detach().double().clone(), b[row : row + r].detach().double().clone()
            if init == "zeros":
                assert not ma.any() and not mb.any()
            elif init in ("lora", "random"):  # A Kaiming-uniform like PEFT: |A| <= 1/sqrt(in)
                assert ma.any() and ma.abs().max() <= (1 + 1e-6) / math.sqrt(bank.in_features)
                assert (not mb.any()) if init == "lora" else mb.any()
            mods.append((ma, mb, al))
            row += r
        self.model[user] = mods
        self.high = max(self.high, total)

    def _forward_case(self, ids, mode, seed):
        bank = self.bank
        dt, k, n = bank.lora_a.dtype, bank.in_features, bank.out_features
        g = torch.Generator().manual_seed(seed)
        T = len(ids)
        x = torch.randn(T, k, generator=g, dtype=torch.float64).to(dt)
        w = torch.randn(n, k, generator=g, dtype=torch.float64).to(dt)
        bias = torch.randn(n, generator=g, dtype=torch.float64).to(dt) if mode == "bias" else None
        want = x.double() @ w.double().t() if mode != "adapters" else torch.zeros(T, n, dtype=torch.float64)
        if bias is not None:
            want += bias.double()
        tok = torch.tensor(ids, dtype=torch.long)
        for u, mods in self.model.items():
            idx = (tok == u).nonzero().flatten()
            for ma, mb, al in mods if idx.numel() else ():
                want[idx] += _scale32(al, ma.shape[0]) * ((x[idx].double() @ ma.t()) @ mb)
        return x, (None if mode == "adapters" else w), bias, tok, want

    def _check_forward(self, ids, mode, seed, backends=(("torch", False), ("torch", True)), plan=None, paths=None):
        """``lora_linear`` of the batch ``ids`` against the model (both forms of the torch path by
        default: gathered rows, and the loop over segments)."""
        bank = self.bank
        x, w, bias, tok, want = self._forward_case(ids, mode, seed)
        plan = plan or BatchPlan.build(tok, bank.max_users)
        tol = 1e-10 if bank.lora_a.dtype == torch.float64 else 2e-5
        w_ref = w if w is not None else x.new_zeros(bank.out_features, bank.in_features)
        ref = lora_linear_ref(x, w_ref, bias, bank.lora_a, bank.lora_b, bank.scale, bank.slots, tok)
        assert rel_err(ref, want) < 1e-12, "the reference over the bank's tables disagrees with the model"
        for backend, loop in backends:
            with use_backend(backend), torch.no_grad(), mock.patch.object(
                fused_linear, "GATHER_MAX_ELEMENTS", -1 if loop else fused_linear.GATHER_MAX_ELEMENTS
            ):
                for path in paths if paths and w is not None else ("auto",):
                    y = kernels.lora_linear(x, w, bias, bank, plan, path=path)
                    assert y.dtype == x.dtype and y.shape == want.shape
                    if not want.numel():
                        continue
                    if bank.lora_a.dtype == torch.float64:
                        err = (y.double() - want).abs().max().item()
                        assert err <= tol * (1 + want.abs().max().item()), (backend, loop, path, err)
                    else:
                        assert rel_err(y, want) < tol, (backend, loop, path)

    def _everyone(self) -> list[int]:
        """A batch with every present user, an absent one, and tokens without an adapter."""
        absent = [u for u in range(self.bank.max_users) if u not in self.model][:1]
        ids = [-1] + sorted(self.model) + absent
        return (ids + ids[::-1])[: 2 * len(ids) - 1]

    # -------------------------------------------------------------- rules
    @rule(data=st.data(), ranks=_RANKS, init=_INIT, seed=_SEED, w_dtype=_W_DTYPES)
    def add(self, data, ranks, init, seed, w_dtype):
        """Add a user, or replace one (``add`` over a present user replaces its modules)."""
        pick = st.integers(0, self.bank.max_users - 1)
        user = data.draw(st.one_of(pick, st.sampled_from(sorted(self.model))) if self.model else pick, label="user")
        alpha = data.draw(st.one_of(_ALPHA, st.lists(_ALPHA, min_size=len(ranks), max_size=len(ranks))), label="alpha")
        self._add(user, ranks, alpha, init, seed, w_dtype)

    @rule(data=st.data())
    def bad_add_changes_nothing(self, data):
        """A refused ``add`` (of a present user, too) leaves the bank as it was."""
        user = data.draw(st.integers(0, self.bank.max_users - 1), label="user")
        call, exc = data.draw(st.sampled_from([
            (lambda b, u: b.add(u, [4, 0]), ValueError),
            (lambda b, u: b.add(u, []), ValueError),
            (lambda b, u: b.add(u, [2, 3], alpha=[1.0]), ValueError),
            (lambda b, u: b.add(u, 3, alpha=math.inf), ValueError),
            (lambda b, u: b.add(u, 3, init="xavier"), ValueError),
            (lambda b, u: b.add(u + b.max_users, 3), ValueError),
            (lambda b, u: b.add(-1 - u, 3), ValueError),
        ]), label="call")
        before = self._storage()
        with pytest.raises(exc):
            call(self.bank, user)
        assert self._storage() == before

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data):
        user = data.draw(st.sampled_from(sorted(self.model)), label="user")
        before = self._storage()
        self.bank.remove(user)
        del self.model[user]
        assert self._storage() == before

    @rule(data=st.data())
    def remove_absent_raises(self, data):
        absent = [u for u in range(self.bank.max_users) if u not in self.model]
        if absent:
            user = data.draw(st.sampled_from(absent), label="user")
            with pytest.raises(KeyError, match=f"user {user} "):
                self.bank.remove(user)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=_SEED, w_dtype=_W_DTYPES, big=st.sampled_from([1.0, 1.0, 1e30, 1e40]))
    def set_weights(self, data, seed, w_dtype, big):
        """Weights are stored as the bank's dtype rounds them, or refused (``ValueError``, rows
        untouched) when they are not finite there: NaN/inf, or beyond the dtype's range."""
        user = data.draw(st.sampled_from(sorted(self.model)), label="user")
        mods = self.model[user]
        r = sum(a.shape[0] for a, _, _ in mods)
        g = torch.Generator().manual_seed(seed)
        wa = (torch.randn(r, self.bank.in_features, generator=g, dtype=torch.float64) * big).to(w_dtype)
        wb = torch.randn(r, self.bank.out_features, generator=g, dtype=torch.float64).to(w_dtype)
        before = self._storage()
        held = wa.to(self.bank.lora_a.dtype), wb.to(self.bank.lora_b.dtype)  # what the rows would hold
        if not all(torch.isfinite(w).all() for w in held):
            with pytest.raises(ValueError, match="NaN or inf"):
                self.bank.set_adapter_weights(user, wa, wb)
            assert self._storage() == before
            return
        self.bank.set_adapter_weights(user, wa, wb)
        assert self._storage() == before
        wa, wb = (w.double() for w in held)
        row, new = 0, []
        for ma, _, al in mods:
            new.append((wa[row : row + ma.shape[0]], wb[row : row + ma.shape[0]], al))
            row += ma.shape[0]
        self.model[user] = new

    @precondition(lambda self: self.bank.max_users >= 2)
    @rule(data=st.data(), seed=_SEED, split=st.booleans())
    def fragment_then_add(self, data, seed, split):
        """Fill in a few users, remove every other one (by offset), then add one that fits the
        free rows only once they are compacted: in place, no reallocation, every kept user's rows
        intact (the invariants)."""
        for u in range(self.bank.max_users):
            if len(self.model) >= min(self.bank.max_users, 4):
                break
            if u not in self.model:
                self._add(u, [data.draw(st.integers(1, 8), label="rank")], 2.0, "random", seed + u)
        order = sorted(self.model, key=lambda u: self.bank.segment(u).offset)
        for u in order[::2]:
            self.bank.remove(u)
            del self.model[u]
        holes = self._holes()
        free, largest = sum(e - s for s, e in holes), max((e - s for s, e in holes), default=0)
        if len(holes) < 2 or free <= largest:
            return
        total = data.draw(st.integers(largest + 1, free), label="total")
        ranks = [total // 2, total - total // 2] if split and total > 1 else [total]
        before = self._storage()
        self._add(order[0], ranks, 8.0, "random", seed)
        assert self._storage() == before

    @precondition(lambda self: self.bank.capacity - self._used() <= 60)
    @rule(data=st.data(), extra=st.integers(1, 8), seed=_SEED)
    def grow(self, data, extra, seed):
        """Add a user that the free rows cannot hold: the bank reallocates, bumps ``version`` and
        keeps every other user's rows."""
        user = data.draw(st.integers(0, self.bank.max_users - 1), label="user")
        old = self.model.get(user)
        free = self.bank.capacity - self._used() + (sum(a.shape[0] for a, _, _ in old) if old else 0)
        cap = self.bank.capacity
        self._add(user, [free + extra], 4.0, "random", seed)
        assert self.bank.version == self.version and self.bank.capacity > cap

    @rule(data=st.data())
    def reserve(self, data):
        cap = self.bank.capacity
        want = data.draw(st.integers(0, cap + 40), label="capacity")
        before = self._storage()
        self.bank.reserve(want)
        if want <= cap:
            assert self._storage() == before
        else:
            self.version += 1
            assert self.bank.capacity == want

    @rule()
    def compact(self):
        before = self._storage()
        self.bank.compact()
        assert self._storage() == before  # in place
        assert self._holes() == ([(self._used(), self.bank.capacity)] if self._used() < self.bank.capacity else [])

    @rule(data=st.data())
    def resize_users(self, data):
        mu = self.bank.max_users
        want = data.draw(st.integers(1, mu + 3), label="max_users")
        self.bank.resize_users(want)
        if want > mu:
            self.version += 1
        assert self.bank.max_users == max(mu, want)

    @rule(dtype=st.sampled_from([torch.float64, torch.float32]), how=st.sampled_from(["to", "method"]))
    def cast(self, dtype, how):
        """``module.to(dtype)``: the adapters follow (rounded), ``scale`` stays float32 as it was."""
        if any(not torch.isfinite(w.to(dtype)).all() for mods in self.model.values() for m in mods for w in m[:2]):
            return  # weights set beyond float32's range (float64 bank): a cast would make them inf
        scale = self.bank.scale.clone()
        if how == "to":
            self.bank.to(dtype)
        else:
            self.bank.double() if dtype == torch.float64 else self.bank.float()
        assert self.bank.lora_a.dtype == self.bank.lora_b.dtype == dtype
        assert torch.equal(self.bank.scale, scale) and self.bank.scale.dtype == torch.float32
        self.model = {u: [(a.to(dtype).double(), b.to(dtype).double(), al) for a, b, al in mods]
                      for u, mods in self.model.items()}
        self.version = self.bank.version

    @rule(data=st.data(), mode=st.sampled_from(["linear", "bias", "adapters"]), seed=_SEED, validate=st.booleans())
    def forward(self, data, mode, seed, validate):
        """A drawn batch of present users, absent ones and ``-1`` tokens, through a plan reused
        from batch to batch (ids within its ``max_users``) or built for it."""
        ids = data.draw(st.lists(st.integers(-1, self.bank.max_users - 1), max_size=24), label="ids")
        plan = None
        if max(ids, default=-1) < self.plan.max_users:
            plan = self.plan.update(torch.tensor(ids, dtype=torch.long), validate=validate)
        self._check_forward(ids, mode, seed, plan=plan)

    # --------------------------------------------------------- invariants
    @invariant()
    def tables_agree_with_the_model(self):
        bank = self.bank
        k, n, cap = bank.in_features, bank.out_features, bank.capacity
        assert bank.users == sorted(self.model) and bank.version == self.version and bank.max_rank == self.high
        assert bank.lora_a.shape == (cap, k) and bank.lora_b.shape == (cap, n) and bank.scale.shape == (cap,)
        assert bank.scale.dtype == torch.float32 and bank.slots.dtype == torch.int32
        assert bank.slots.shape == (bank.max_users, 2)
        slots = bank.slots.tolist()
        spans = []
        for u in range(bank.max_users):
            mods = self.model.get(u)
            if mods is None:  # rank 0 = none, offset 0
                assert not bank.has(u) and bank.rank_of(u) == 0 and slots[u] == [0, 0], (u, slots[u])
                with pytest.raises(KeyError):
                    bank.segment(u)
                continue
            seg = bank.segment(u)
            assert seg.ranks == tuple(a.shape[0] for a, _, _ in mods) and seg.alphas == tuple(al for *_, al in mods)
            assert slots[u] == [seg.offset, seg.rank] and bank.rank_of(u) == seg.rank
            assert 0 <= seg.offset and seg.offset + seg.rank <= cap
            a, b, s = bank.adapter_weights(u)
            assert torch.equal(a.detach().double(), torch.cat([m[0] for m in mods])), u
            assert torch.equal(b.detach().double(), torch.cat([m[1] for m in mods])), u
            assert s.dtype == torch.float32
            assert s.tolist() == [_scale32(al, ma.shape[0]) for ma, _, al in mods for _ in range(ma.shape[0])], u
            spans.append((seg.offset, seg.offset + seg.rank))
        spans.sort()
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), spans  # no overlap
        used = self._used()
        assert bank.used_rows == used and bank.num_parameters() == used * (k + n)
        # the free list and the segments tile [0, capacity) exactly
        free = sorted(bank._free)
        assert sum(r for _, r in free) + used == cap
        cursor = 0
        for s, e in sorted(spans + [(s, s + r) for s, r in free]):
            assert s == cursor, (spans, free)
            cursor = e
        assert cursor == cap

    @invariant()
    def every_user_in_one_batch(self):
        self._check_forward(self._everyone(), "bias", 0, backends=(("torch", False),))

    def teardown(self):
        # at the end of a run that passed (teardown runs in a `finally`): the Triton kernels (the
        # interpreter on CPU) by the run's drawn path, one per run as the interpreter is slow
        if hasattr(self, "bank") and sys.exc_info()[0] is None:
            self._check_forward(self._everyone(), "linear", 1, backends=(("triton", False),), paths=(self.triton_path,))


def test_bank_state_machine():
    """:class:`BankMachine`: drawn sequences of add/replace/remove/set/compact/grow/cast."""
    run_state_machine_as_test(BankMachine, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]))
