"""Properties of PackedAdamW against ``torch.optim.AdamW`` run per user on that user's own tensors.

A drawn scenario builds one or two packed adapter banks (small capacity, so they grow), users
with drawn ragged ranks, settings and step budgets, and then interleaves joint steps of random
user subsets (duplicates, any order), users joining and leaving, ``compact()``, a changed step
budget and an evict/reload of a user's optimizer state (``user_state`` → rows removed → re-added
elsewhere → ``load_user_state``). Each user has a *reference*: ``torch.optim.AdamW`` over its own
rows (float64 for float64 banks, float32 otherwise, the float32 master for bf16), with the lr of
:func:`lr_multiplier` set before each step and ``clip_grad_norm_`` over its own gradients. After
every event the bank rows, the moments and the step counts equal the references; users not
stepped, and free rows, are bit for bit untouched, whatever their gradients hold.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from milp.optim import AdamWConfig, PackedAdamW, lr_multiplier, warmup_steps

DIMS = ((5, 3), (2, 4))  # (in, out) of the (up to) two banks
MAX_USERS = 5
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-5, atol=2e-6)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))


optim_configs = st.builds(
    AdamWConfig,
    lr=st.sampled_from([1e-3, 3e-2, 0.1]),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.3]),
    warmup_ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    decay=st.sampled_from(["linear", "constant"]),
    max_grad_norm=st.sampled_from([None, None, 0.3, 5.0]),
)
budgets = st.sampled_from([None, 1, 2, 3, 7, 10])


class Reference:
    """torch.optim.AdamW over one user's rows of every bank it has rows in."""

    def __init__(self, banks, u: int, cfg: AdamWConfig, total: int | None, master=None) -> None:
        self.u, self.cfg, self.total, self.steps = u, cfg, total, 0
        self.params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, b in enumerate(banks):
            if b.has(u):
                a, bb, _ = b.adapter_weights(u)
                cd = torch.float64 if b.lora_a.dtype == torch.float64 else torch.float32
                self.params[i] = tuple(w.detach().to(cd).clone().requires_grad_() for w in (a, bb))
        flat = [p for ab in self.params.values() for p in ab]
        self.opt = torch.optim.AdamW(flat, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay) if flat else None

    def step(self, banks) -> None:
        self.steps += 1
        if self.opt is None:
            return
        for i, (pa, pb) in self.params.items():
            seg = banks[i].segment(self.u)
            sl = slice(seg.offset, seg.offset + seg.rank)
            for p, w in ((pa, banks[i].lora_a), (pb, banks[i].lora_b)):
                p.grad = torch.zeros_like(p) if w.grad is None else w.grad[sl].to(p.dtype).clone()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for ab in self.params.values() for p in ab], self.cfg.max_grad_norm)
        mult = lr_multiplier(self.steps, self.total, self.cfg.warmup_ratio, self.cfg.decay)
        self.opt.param_groups[0]["lr"] = self.cfg.lr * mult
        self.opt.step()

    def check(self, banks, opt: PackedAdamW) -> None:
        assert opt.step_count(self.u) == self.steps
        state = opt.user_state(self.u)
        assert int(state["step"]) == self.steps
        for i, (pa, pb) in self.params.items():
            dt = banks[i].lora_a.dtype
            tol = TOL[dt]
            a, b, _ = banks[i].adapter_weights(self.u)
            for sfx, p, now in (("a", pa, a), ("b", pb, b)):
                want = p.detach()
                if dt in (torch.bfloat16, torch.float16):
                    master = state[f"{i}.master_{sfx}"]
                    torch.testing.assert_close(master, want, **tol)
                    assert same(master.to(dt), now.detach())  # the bank holds the master, rounded
                else:
                    torch.testing.assert_close(now.detach(), want, **tol)
                if self.steps and self.opt is not None and p in self.opt.state:
                    st_ = self.opt.state[p]
                    torch.testing.assert_close(state[f"{i}.exp_avg_{sfx}"], st_["exp_avg"], **tol)
                    torch.testing.assert_close(state[f"{i}.exp_avg_sq_{sfx}"], st_["exp_avg_sq"],
                                               rtol=tol["rtol"], atol=tol["atol"] ** 2)


def set_grads(banks, g: torch.Generator, scale: float, missing_b: bool) -> None:
    for b in banks:
        b.lora_a.grad = (scale * torch.randn(b.lora_a.shape, generator=g)).to(b.lora_a.dtype)
        b.lora_b.grad = None if missing_b else (scale * torch.randn(b.lora_b.shape, generator=g)).to(b.lora_b.dtype)


def poison(banks, rows_per_bank, g: torch.Generator) -> None:
    """NaN / inf gradients in the given rows of each bank (users not stepped, free rows)."""
    bad = torch.tensor([math.nan, math.inf, -math.inf])
    for b, rows in zip(banks, rows_per_bank):
        for r in rows:
            for w in (b.lora_a, b.lora_b):
                if w.grad is not None:
                    w.grad[r, int(torch.randint(w.shape[1], (1,), generator=g))] = bad[
                        int(torch.randint(3, (1,), generator=g))].to(w.dtype)


def user_rows(bank: kernels.AdapterBank, u: int) -> range:
    seg = bank.segment(u)
    return range(seg.offset, seg.offset + seg.rank)


def snapshot(bank: kernels.AdapterBank, rows) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.tensor(list(rows), dtype=torch.long)
    return bank.lora_a.detach()[idx].clone(), bank.lora_b.detach()[idx].clone()


@st.composite
def scenarios(draw):
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32, torch.bfloat16]))
    nbanks = draw(st.integers(1, 2))
    events = draw(st.lists(st.sampled_from(["step"] * 6 + ["join", "leave", "reload", "compact", "budget"]),
                           min_size=3, max_size=14))
    return dict(dtype=dtype, nbanks=nbanks, events=events, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None)
@given(case=scenarios(), data=st.data())
def test_packed_adamw_equals_torch_adamw_per_user(case, data):
    dtype, g = case["dtype"], torch.Generator().manual_seed(case["seed"])
    banks = [kernels.AdapterBank(i, o, max_users=MAX_USERS, capacity=4, dtype=dtype)
             for i, o in DIMS[: case["nbanks"]]]
    opt = PackedAdamW(banks, MAX_USERS)
    refs: dict[int, Reference] = {}

    def join(u: int) -> None:
        for b in banks:
            if data.draw(st.booleans()) or b is banks[-1] and not any(x.has(u) for x in banks):
                b.add(u, data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)), init="random", generator=g)
        cfg, total = data.draw(optim_configs), data.draw(budgets)
        opt.set_user(u, cfg, total)
        refs[u] = Reference(banks, u, cfg, total)

    for u in range(data.draw(st.integers(1, 3))):
        join(u)
    for ev in case["events"]:
        free = [u for u in range(MAX_USERS) if u not in refs]
        if ev == "join" and free:
            join(data.draw(st.sampled_from(free)))
        elif ev == "leave" and len(refs) > 1:
            u = data.draw(st.sampled_from(sorted(refs)))
            for b in banks:
                if b.has(u):
                    b.remove(u)
            opt.drop_user(u)
            opt.sync()
            del refs[u]
        elif ev == "compact":
            for b in banks:
                b.compact()
        elif ev == "budget":
            u = data.draw(st.sampled_from(sorted(refs)))
            total = data.draw(budgets)
            opt.set_total_steps(u, total)
            refs[u].total = total
        elif ev == "reload":
            # evict a user (its rows and optimizer state), let another user take rows, load it back
            u = data.draw(st.sampled_from(sorted(refs)))
            state = opt.user_state(u)
            saved = {i: banks[i].adapter_weights(u)[:2] for i in range(len(banks)) if banks[i].has(u)}
            saved = {i: (a.detach().clone(), b.detach().clone()) for i, (a, b) in saved.items()}
            ranks = {i: banks[i].segment(u).ranks for i in saved}
            for i in saved:
                banks[i].remove(u)
            opt.drop_user(u)
            if free and data.draw(st.booleans()):
                join(free[0])
            for i, (a, b) in saved.items():
                banks[i].add(u, ranks[i], init="zeros")
                banks[i].set_adapter_weights(u, a, b)
            cfg, total = refs[u].cfg, refs[u].total
            opt.set_user(u, cfg, total)
            opt.load_user_state(u, state)
        elif ev == "step":
            set_grads(banks, g, data.draw(st.sampled_from([1e-3, 1.0, 30.0])), data.draw(st.booleans()))
            chosen = data.draw(st.lists(st.sampled_from(sorted(refs)), max_size=4))
            stepped = set(chosen)
            others = [u for u in refs if u not in stepped]
            used = [set().union(*(user_rows(b, u) for u in b.users)) if b.users else set() for b in banks]
            free_rows = [sorted(set(range(b.capacity)) - used[i]) for i, b in enumerate(banks)]
            if data.draw(st.booleans()):
                poison(banks, [[r for u in others if b.has(u) for r in user_rows(b, u)] + free_rows[i]
                               for i, b in enumerate(banks)], g)
            kept = {(i, u): snapshot(b, user_rows(b, u)) for u in others for i, b in enumerate(banks) if b.has(u)}
            kept_free = {i: snapshot(b, free_rows[i]) for i, b in enumerate(banks)}
            before = {u: opt.user_state(u) for u in others}
            opt.step(chosen)
            for u in stepped:
                refs[u].step(banks)
            for (i, u), (a, b) in kept.items():
                now = snapshot(banks[i], user_rows(banks[i], u))
                assert same(now[0], a) and same(now[1], b), f"user {u} was not stepped but its rows changed"
            for i, (a, b) in kept_free.items():
                now = snapshot(banks[i], free_rows[i])
                assert same(now[0], a) and same(now[1], b), "free rows changed"
            for u, st_ in before.items():
                after = opt.user_state(u)
                assert after.keys() == st_.keys() and all(same(after[k], st_[k]) for k in st_), u
            opt.zero_grad()
        for ref in refs.values():
            ref.check(banks, opt)


# ------------------------------------------------------------------------------------- schedule
@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 400), ratio=st.floats(0.0, 1.0), decay=st.sampled_from(["linear", "constant"]))
def test_schedule_shape(total, ratio, decay):
    """Warm-up ``W = ceil(ratio · total)`` steps rising linearly to 1, then (linear) a decay that is
    positive at the last step and 0 beyond, or (constant) 1; never a division by zero."""
    W = warmup_steps(total, ratio)
    assert 0 <= W <= total and W >= ratio * total - 1e-6 and W < ratio * total + 1
    mults = [lr_multiplier(s, total, ratio, decay) for s in range(1, total + 4)]
    assert all(0.0 <= m <= 1.0 and math.isfinite(m) for m in mults)
    assert mults[:W] == [s / W for s in range(1, W + 1)]
    after = mults[W:total]
    if decay == "constant":
        assert all(m == 1.0 for m in mults[W:])
    else:
        assert after == sorted(after, reverse=True) and all(m > 0 for m in after)
        if after:
            assert after[0] == 1.0 and after[-1] == pytest.approx(1 / (total - W))
        assert mults[total:] == [0.0] * 3
    assert lr_multiplier(5, None, ratio, decay) == 1.0 and warmup_steps(None, ratio) == 0


@settings(max_examples=60, deadline=None)
@given(cfg=optim_configs, total=budgets, steps=st.integers(1, 12))
def test_current_lr_is_the_lr_the_step_applies(cfg, total, steps):
    """``current_lr`` announces the lr of the next update: with zero moments' bias-corrected ratio
    ``m̂ / (√v̂ + eps)`` on a gradient of ±1 (= ±1/(1+eps)), the float64 step moves a weight by lr
    (plus its decay) — also at steps past the budget, where the lr is 0 and nothing moves."""
    cfg = AdamWConfig(**{**cfg.to_dict(), "betas": (0.0, 0.0), "weight_decay": 0.0, "max_grad_norm": None})
    bank = kernels.AdapterBank(1, 1, max_users=1, dtype=torch.float64)
    bank.add(0, [1], init="zeros")
    opt = PackedAdamW([bank], 1)
    opt.set_user(0, cfg, total)
    for _ in range(steps):
        lr = opt.current_lr(0)
        before = float(bank.lora_a.detach()[0, 0])
        bank.lora_a.grad = torch.ones_like(bank.lora_a)
        opt.step([0])
        assert before - float(bank.lora_a.detach()[0, 0]) == pytest.approx(lr / (1 + cfg.eps), rel=1e-12, abs=1e-300)
