"""PackedAdamW's float32 master weights for bf16/fp16 adapter banks: updates below the bank's
precision accumulate, the master follows writes made outside the optimizer, survives
user_state/load_user_state, and float32/float64 banks are unaffected."""
from __future__ import annotations

import pytest
import torch

import kernels
from milp.optim import AdamWConfig, PackedAdamW

HALF = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]
# an lr whose Adam steps (<= ~3.2 lr) stay below half an ulp of weights in [2**-7, 2**-6)
# (bf16: 2**-15 ≈ 3.1e-5, fp16: 2**-18 ≈ 3.8e-6), and the relative rounding of the dtype
TINY_LR = {torch.bfloat16: 1e-6, torch.float16: 1e-7}
REL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ATOL = 2.0**-25  # half the spacing of fp16's subnormals (weights written to 0 and moved a little)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, for bitwise comparisons (``torch.equal`` takes -0.0 == 0.0)."""
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and torch.equal(bits(x), bits(y))


def rows(bank: kernels.AdapterBank, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, _ = bank.adapter_weights(u)
    return a.detach().clone(), b.detach().clone()


def mid_weights(shape, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights of magnitude in [2**-7, 2**-6) (≈1e-2), random sign."""
    mag = 2.0**-7 * (1 + 0.9 * torch.rand(shape, generator=g))
    return (mag * torch.randn(shape, generator=g).sign()).to(dtype)


def set_grads(bank: kernels.AdapterBank, g: torch.Generator, base=None) -> None:
    """Random gradients (around ``base`` [capacity, in+out] when given: a consistent direction)."""
    n = bank.in_features + bank.out_features
    grad = torch.randn(bank.capacity, n, generator=g)
    if base is not None:
        grad = base + 0.3 * grad
    grad = grad.to(bank.lora_a.dtype)
    bank.lora_a.grad = grad[:, : bank.in_features].clone()
    bank.lora_b.grad = grad[:, bank.in_features :].clone()


class Reference:
    """torch.optim.AdamW on float32 copies of one user's rows, fed that user's gradients."""

    def __init__(self, bank: kernels.AdapterBank, u: int, **adamw) -> None:
        self.bank, self.u = bank, u
        self.a, self.b = (w.float().requires_grad_() for w in rows(bank, u))
        self.opt = torch.optim.AdamW([self.a, self.b], **adamw)

    def step(self) -> None:
        seg = self.bank.segment(self.u)
        sl = slice(seg.offset, seg.offset + seg.rank)
        self.a.grad, self.b.grad = self.bank.lora_a.grad[sl].float(), self.bank.lora_b.grad[sl].float()
        self.opt.step()

    def check(self, opt: PackedAdamW, rel: float) -> None:
        """The bank rows equal the reference to the bank's rounding; the master to float32's."""
        st = opt.user_state(self.u)
        for got, master, want in zip(rows(self.bank, self.u), (st["0.master_a"], st["0.master_b"]),
                                     (self.a.detach(), self.b.detach())):
            torch.testing.assert_close(got.float(), want, rtol=rel, atol=ATOL)
            torch.testing.assert_close(master, want, rtol=1e-5, atol=1e-9)
            assert same(got, master.to(got.dtype))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_updates_below_the_banks_precision_accumulate_in_the_master(dtype):
    """With lr 1e-6 (bf16; 1e-7 fp16) on weights ≈1e-2 every update is far below half an ulp:
    with master weights the bank moves and tracks torch's AdamW in float32 to bf16 rounding;
    rounding each step (``master_weights=False``, the old behaviour) leaves it frozen."""
    g = torch.Generator().manual_seed(0)
    banks = {}
    for mw in (True, False):
        bank = kernels.AdapterBank(16, 12, max_users=2, dtype=dtype)
        bank.add(1, [2], init="zeros")
        bank.add(0, [3, 1], init="zeros")
        banks[mw] = bank
    init = [mid_weights(banks[True].lora_a.shape, g, dtype), mid_weights(banks[True].lora_b.shape, g, dtype)]
    cfg = AdamWConfig(lr=TINY_LR[dtype], warmup_ratio=0.0, decay="constant")
    opts = {}
    for mw, bank in banks.items():
        bank.lora_a.data.copy_(init[0])
        bank.lora_b.data.copy_(init[1])
        opts[mw] = PackedAdamW([bank], 2, master_weights=mw)
        opts[mw].set_user(0, cfg)
    ref = Reference(banks[True], 0, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = rows(banks[True], 0)
    base = torch.randn(banks[True].capacity, 28, generator=g)
    for _ in range(300):
        gen_state = g.get_state()
        for bank in banks.values():
            g.set_state(gen_state)
            set_grads(bank, g, base)
        opts[True].step([0])
        opts[False].step([0])
        ref.step()
    ref.check(opts[True], REL[dtype])
    for now, before in zip(rows(banks[True], 0), start):
        assert (now != before).float().mean() > 0.9  # moved by several ulps
    for now, before in zip(rows(banks[False], 0), start):
        assert same(now, before)  # every update rounded away
    assert "0.master_a" not in opts[False].user_state(0)


def ragged_bank(dtype: torch.dtype, g: torch.Generator) -> kernels.AdapterBank:
    """Users 0 [3], 1 [2, 2], 2 [5] with user 3 [1] and a free gap (3 rows) between them."""
    bank = kernels.AdapterBank(10, 8, max_users=6, dtype=dtype)
    for u, r in ((0, [3]), (5, [3]), (3, [1]), (1, [2, 2]), (2, [5])):
        bank.add(u, r, init="random", generator=g)
    bank.remove(5)
    return bank


def test_joint_step_equals_stepping_each_user_alone_bitwise_in_bf16():
    g = torch.Generator().manual_seed(1)
    joint = ragged_bank(torch.bfloat16, g)
    alone = ragged_bank(torch.bfloat16, torch.Generator().manual_seed(1))
    gap = slice(3, 6)
    for bank in (joint, alone):  # junk in the free rows: must stay as it is too
        bank.lora_a.data[gap] = torch.randn(3, 10, generator=torch.Generator().manual_seed(2)).bfloat16()
        bank.lora_a.data[6, :2] = -0.0  # user 3 (not stepped): its -0.0 must not come back as the master's +0.0
    cfgs = {0: AdamWConfig(lr=1e-2, max_grad_norm=0.5), 1: AdamWConfig(lr=3e-3, warmup_ratio=0.5),
            2: AdamWConfig(lr=2e-2, weight_decay=0.1, decay="constant")}
    opts = [PackedAdamW([joint], 6), PackedAdamW([alone], 6)]
    for opt in opts:
        for u, c in cfgs.items():
            opt.set_user(u, c, total_steps=8)
        opt.set_user(3)
    kept = [rows(joint, 3), joint.lora_a.data[gap].clone(), joint.lora_b.data[gap].clone()]
    for _ in range(6):
        set_grads(joint, g)
        alone.lora_a.grad, alone.lora_b.grad = joint.lora_a.grad.clone(), joint.lora_b.grad.clone()
        opts[0].step([2, 0, 1])
        for u in cfgs:
            opts[1].step([u])
    assert same(joint.lora_a, alone.lora_a) and same(joint.lora_b, alone.lora_b)
    for u in cfgs:
        sj, sa = opts[0].user_state(u), opts[1].user_state(u)
        assert sj.keys() == sa.keys() and all(same(sj[k], sa[k]) for k in sj)
        a = rows(joint, u)[0]
        assert not torch.equal(sj["0.master_a"], a.float())  # the master carries what bf16 cannot
        assert same(sj["0.master_a"].bfloat16(), a)
    assert same(rows(joint, 3)[0], kept[0][0]) and same(rows(joint, 3)[1], kept[0][1])
    assert same(joint.lora_a.data[gap], kept[1]) and same(joint.lora_b.data[gap], kept[2])
    assert opts[0].step_count(3) == 0


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_rows_written_outside_the_optimizer_reseed_the_master(dtype):
    """A write into a stepped user's rows between steps (some elements only), and a user added
    into rows another user's master occupied: the next steps start from the bank's values, as
    torch's AdamW in float32 does when its weights are set to them (moments kept)."""
    g = torch.Generator().manual_seed(3)
    bank = kernels.AdapterBank(12, 10, max_users=3, dtype=dtype)
    bank.add(0, [4], init="zeros")
    bank.add(1, [2], init="zeros")
    bank.lora_a.data.copy_(mid_weights(bank.lora_a.shape, g, dtype))
    bank.lora_b.data.copy_(mid_weights(bank.lora_b.shape, g, dtype))
    cfg = AdamWConfig(lr=TINY_LR[dtype], warmup_ratio=0.0, decay="constant", weight_decay=0.0)
    opt = PackedAdamW([bank], 3)
    opt.set_user(0, cfg)
    opt.set_user(1, cfg)
    ref = Reference(bank, 0, lr=cfg.lr, weight_decay=0.0)
    base = torch.randn(bank.capacity, 22, generator=g)
    refs = {0: ref}
    for phase in range(2):
        for _ in range(100):
            set_grads(bank, g, base)
            opt.step([0, 1] if phase == 0 else [0, 2])
            for r in refs.values():
                r.step()
        for r in refs.values():
            r.check(opt, REL[dtype])
        if phase == 0:
            new = mid_weights((2, 12), g, dtype)
            bank.lora_a.data[1:3] = new
            bank.lora_b.data[0, :5] = 0.0
            with torch.no_grad():
                ref.a[1:3] = new.float()
                ref.b[0, :5] = 0.0
            # user 1 replaced by user 2, added into its rows: user 1's master must not leak
            off = bank.segment(1).offset
            bank.remove(1)
            bank.add(2, [2], init="random", generator=g)
            assert bank.segment(2).offset == off
            opt.drop_user(1)
            opt.set_user(2, cfg)
            refs[2] = Reference(bank, 2, lr=cfg.lr, weight_decay=0.0)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_user_state_round_trip_continues_bit_for_bit(dtype):
    """Evict a user (its rows and user_state), reload it into another optimizer at other rows:
    it continues exactly. A state without master rows (older saves) loads, and continues from the
    bank's values as a master equal to them would."""
    g = torch.Generator().manual_seed(4)
    bank = kernels.AdapterBank(8, 6, max_users=3, dtype=dtype)
    bank.add(0, [3, 2], init="random", generator=g)
    opt = PackedAdamW([bank], 3)
    cfg = AdamWConfig(lr=1e-3, warmup_ratio=0.2)
    opt.set_user(0, cfg, total_steps=20)
    for _ in range(4):
        set_grads(bank, g)
        opt.step([0])
    saved_rows, state = rows(bank, 0), opt.user_state(0)
    assert {"0.master_a", "0.master_b"} <= state.keys() and state["0.master_a"].dtype == torch.float32
    assert not torch.equal(state["0.master_a"], saved_rows[0].float())

    def reload(st):
        b2 = kernels.AdapterBank(8, 6, max_users=3, dtype=dtype)
        b2.add(2, [4], init="random", generator=torch.Generator().manual_seed(5))  # user 0's rows move
        b2.add(0, [3, 2], init="zeros")
        b2.set_adapter_weights(0, *saved_rows)
        o2 = PackedAdamW([b2], 3)
        o2.set_user(0, cfg, total_steps=20)
        o2.load_user_state(0, st)
        return b2, o2

    old = {k: v for k, v in state.items() if "master" not in k}
    as_bank = dict(old, **{"0.master_a": saved_rows[0].float(), "0.master_b": saved_rows[1].float()})
    runs = [(bank, opt), reload(state), reload(old), reload(as_bank)]
    for _ in range(4):
        set_grads(bank, g)
        off = bank.segment(0).offset
        for b2, _ in runs[1:]:
            o = b2.segment(0).offset
            for p, p2 in ((bank.lora_a, b2.lora_a), (bank.lora_b, b2.lora_b)):
                p2.grad = torch.zeros_like(p2)
                p2.grad[o : o + 5] = p.grad[off : off + 5]
        for _, o2 in runs:
            o2.step([0])
    got = [(rows(b2, 0), o2.user_state(0)) for b2, o2 in runs]
    for i, j in ((0, 1), (2, 3)):
        (ri, si), (rj, sj) = got[i], got[j]
        assert all(same(x, y) for x, y in zip(ri, rj))
        assert si.keys() == sj.keys() and all(same(si[k], sj[k]) for k in si)
    assert opt.step_count(0) == 8 and runs[2][1].step_count(0) == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_float32_and_float64_banks_are_their_own_master(dtype):
    """No master for float32/float64 banks: the flag changes nothing, bit for bit; a state with
    master rows (a user saved from a bf16 run) loads, its master rows skipped."""
    results = []
    for mw in (True, False):
        g = torch.Generator().manual_seed(6)
        bank = ragged_bank(dtype, g)
        opt = PackedAdamW([bank], 6, master_weights=mw)
        for u in (0, 1, 2):
            opt.set_user(u, AdamWConfig(lr=1e-2, max_grad_norm=1.0), total_steps=6)
        for _ in range(4):
            set_grads(bank, g)
            opt.step([0, 2, 1] if mw else [1, 0, 2])
        results.append((bank.lora_a.detach().clone(), bank.lora_b.detach().clone(), opt.user_state(1)))
        assert not any("master" in k for k in opt.user_state(0))
    (a1, b1, s1), (a2, b2, s2) = results
    assert same(a1, a2) and same(b1, b2) and s1.keys() == s2.keys() and all(same(s1[k], s2[k]) for k in s1)
    st = dict(s1, **{"0.master_a": torch.zeros(4, 10), "0.master_b": torch.zeros(4, 8)})
    opt.load_user_state(1, st)
    assert all(same(opt.user_state(1)[k], s1[k]) for k in s1)
    with pytest.raises(ValueError, match="unknown entry 'exp_avg_c'"):
        opt.load_user_state(1, {"0.exp_avg_c": torch.zeros(4, 10)})
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        PackedAdamW([], 1, master_weights=1)


def test_cast_banks_gain_and_lose_their_master():
    """``model.to(dtype)`` after the optimizer was built: a float32 bank cast to bf16 gets a
    master (seeded from its bf16 values) and tiny updates accumulate; cast back to float32 the
    master goes, the moments stay."""
    g = torch.Generator().manual_seed(7)
    bank = kernels.AdapterBank(8, 6, max_users=1)
    bank.add(0, [3], init="zeros")
    bank.lora_a.data.copy_(mid_weights(bank.lora_a.shape, g, torch.float32))
    bank.lora_b.data.copy_(mid_weights(bank.lora_b.shape, g, torch.float32))
    opt = PackedAdamW([bank], 1)
    opt.set_user(0, AdamWConfig(lr=1e-6, warmup_ratio=0.0, decay="constant"))
    set_grads(bank, g)
    opt.step([0])
    assert "0.master_a" not in opt.user_state(0)
    bank.to(torch.bfloat16)
    start = rows(bank, 0)
    base = torch.randn(bank.capacity, 14, generator=g)
    for _ in range(100):
        set_grads(bank, g, base)
        opt.step([0])
    st = opt.user_state(0)
    assert st["0.master_a"].dtype == torch.float32 and st["0.exp_avg_a"].dtype == torch.float32
    for now, before in zip(rows(bank, 0), start):  # moved by a few ulps from where the cast left it
        assert (now != before).float().mean() > 0.5
        torch.testing.assert_close(now.float(), before.float(), rtol=2**-5, atol=0)
    bank.to(torch.float32)
    set_grads(bank, g)
    opt.step([0])
    assert "0.master_a" not in opt.user_state(0) and opt.step_count(0) == 102


def test_runtime_save_and_load_carry_the_master_of_a_bf16_model(tmp_path):
    """MilpRuntime.save_user writes the master rows into optimizer.safetensors and load_user
    restores them: a bf16 user trained, saved, loaded elsewhere and trained on matches, bit for
    bit, the one that never left."""
    from safetensors.torch import load_file

    from milp.config import MemoryConfig
    from milp.inject import tiny_model
    from milp.runtime import OPTIMIZER_FILE, MilpRuntime

    def runtime():
        return MilpRuntime(tiny_model("llama").to(torch.bfloat16), max_users=2)

    rt = runtime()
    rt.add_user("u", MemoryConfig.uniform(2), optim=AdamWConfig(lr=1e-3), total_steps=10, init="random", seed=1)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(8))
    for _ in range(2):
        rt.train_step(ids, "u")
    d = rt.save_user("u", tmp_path / "u")
    saved = load_file(str(d / OPTIMIZER_FILE))
    assert any(k.endswith(".master_a") for k in saved) and all(
        v.dtype == torch.float32 for k, v in saved.items() if "master" in k)
    rt2 = runtime()
    rt2.load_user(d)
    for r in (rt, rt2):
        for _ in range(2):
            r.train_step(ids, "u")
    a, b = rt.adapter_state("u"), rt2.adapter_state("u")
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    sa, sb = rt.optimizer.user_state(rt.slot("u")), rt2.optimizer.user_state(rt2.slot("u"))
    assert sa.keys() == sb.keys() and all(same(sa[k], sb[k]) for k in sa)


def test_float32_adapters_loaded_into_a_bf16_runtime_seed_the_master(tmp_path):
    """A user trained in float32 (its adapters, no master in its optimizer state) loaded into a
    bf16 runtime: the master rows are the float32 adapters, not their bf16 rounding, so the user
    trains on from its own values; after a step with zero gradients and no weight decay the
    master is still exactly those values. ``master_weights=False`` keeps no master."""
    from milp.config import MemoryConfig
    from milp.inject import tiny_model
    from milp.runtime import MilpRuntime

    rt32 = MilpRuntime(tiny_model("llama"), max_users=1)
    rt32.add_user("u", MemoryConfig.uniform(2), optim=AdamWConfig(weight_decay=0.0), total_steps=10, init="random",
                  seed=3)
    d = rt32.save_user("u", tmp_path / "u")
    src = rt32.adapter_state("u")
    assert all(v.dtype == torch.float32 for v in src.values())

    rt = MilpRuntime(tiny_model("llama").to(torch.bfloat16), max_users=1)
    rt.load_user(d)
    slot = rt.slot("u")
    banks = rt.optimizer.banks
    masters = {k: v for k, v in rt.optimizer.user_state(slot).items() if "master" in k}
    assert len(masters) == 2 * len(banks)
    rows = {}  # bank index -> (A, B) of the source, as the runtime's modules order the banks
    for m in rt.state.modules():
        i = next(j for j, b in enumerate(banks) if b is m.bank)
        rows[i] = (src[f"layers.{m.layer}.{m.target}.lora_A"], src[f"layers.{m.layer}.{m.target}.lora_B"])
    for i, (a, b) in rows.items():
        assert same(masters[f"{i}.master_a"], a) and same(masters[f"{i}.master_b"], b)
        assert not same(masters[f"{i}.master_a"], a.bfloat16().float())  # seeding mattered
    rt.optimizer.zero_grad()
    rt.optimizer.step([slot])
    after = rt.optimizer.user_state(slot)
    assert all(same(after[k], v) for k, v in masters.items())

    off = MilpRuntime(tiny_model("llama").to(torch.bfloat16), max_users=1, master_weights=False)
    off.load_user(d)
    assert not any("master" in k for k in off.optimizer.user_state(off.slot("u")))
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        MilpRuntime(tiny_model("llama"), max_users=1, master_weights=1)


def test_seed_master_refuses_a_foreign_bank_a_user_without_rows_and_wrong_shapes():
    bf = kernels.AdapterBank(6, 4, max_users=2, dtype=torch.bfloat16)
    bf.add(0, [2, 1])
    opt = PackedAdamW([bf], max_users=2)
    opt.set_user(0)
    a, b = torch.randn(3, 6), torch.randn(3, 4)
    with pytest.raises(ValueError, match="not one of the optimizer's banks"):
        opt.seed_master(0, kernels.AdapterBank(6, 4, max_users=2, dtype=torch.bfloat16), a, b)
    with pytest.raises(ValueError, match="user slot 1 has no rows in bank 0"):
        opt.seed_master(1, bf, a, b)
    with pytest.raises(ValueError, match=r"b has shape \[3, 5\], expected \[3, 4\]"):
        opt.seed_master(0, bf, a, torch.randn(3, 5))
    f32 = kernels.AdapterBank(6, 4, max_users=2)
    f32.add(0, [3])
    plain = PackedAdamW([f32], max_users=2)
    plain.set_user(0)
    assert plain.seed_master(0, f32, a, b) is False  # float32 banks are their own master


def test_user_state_is_a_snapshot_not_a_view():
    """On CPU ``.cpu()`` returns the tensor itself: the state's step was a view of the live
    counter, and a later step changed a state someone held (found by the runtime state machine)."""
    bank = kernels.AdapterBank(4, 2, max_users=1)
    bank.add(0, [2])
    opt = PackedAdamW([bank], max_users=1)
    opt.set_user(0)
    state = opt.user_state(0)
    held = {k: v.clone() for k, v in state.items()}
    bank.lora_a.grad = torch.ones_like(bank.lora_a)
    opt.step([0])
    assert all(torch.equal(state[k], held[k]) for k in state) and int(state["step"]) == 0


def test_users_not_stepped_and_free_rows_ignore_non_finite_gradients():
    """Regression: rows of users not stepped got ``lerp(g, 0)``, i.e. ``m + 0·(g - m)``: a NaN or inf
    in their gradient (a user skipped *because* its gradient overflowed) turned their moments and
    weights into NaN; a NaN in a free row's gradient reached user 0's clipping norm the same way."""
    g = torch.Generator().manual_seed(9)
    bank = ragged_bank(torch.float32, g)  # users 0, 3, 1, 2 with free rows 3..5 between 0 and 3
    opt = PackedAdamW([bank], 6)
    for u in (0, 1, 2, 3):
        opt.set_user(u, AdamWConfig(lr=1e-2, max_grad_norm=1.0))
    set_grads(bank, g)
    bank.lora_a.grad[3, 0] = float("nan")  # a free row
    bank.lora_a.grad[6, 1] = float("inf")  # user 3, not stepped
    bank.lora_b.grad[bank.segment(1).offset, 2] = float("nan")  # user 1, not stepped
    kept, state = {u: rows(bank, u) for u in (1, 3)}, {u: opt.user_state(u) for u in (1, 3)}
    opt.step([0, 2])
    for u in (1, 3):
        assert all(same(x, y) for x, y in zip(rows(bank, u), kept[u]))
        assert all(same(opt.user_state(u)[k], v) for k, v in state[u].items())
    for u in (0, 2):
        assert all(torch.isfinite(x).all() for x in rows(bank, u)) and opt.step_count(u) == 1


def test_float64_clipping_uses_max_grad_norm_unrounded():
    """Regression: ``max_grad_norm`` was held in float32, so a float64 bank clipped to 0.3 rounded to
    float32 (relative 4e-8): off from torch's AdamW + clip_grad_norm_ far beyond float64 rounding."""
    bank = kernels.AdapterBank(3, 2, max_users=1, dtype=torch.float64)
    bank.add(0, [2], init="random", generator=torch.Generator().manual_seed(0))
    opt = PackedAdamW([bank], 1)
    opt.set_user(0, AdamWConfig(lr=1e-2, max_grad_norm=0.3, weight_decay=0.0))
    a, b = (w.clone().requires_grad_() for w in rows(bank, 0))
    ref = torch.optim.AdamW([a, b], lr=1e-2, weight_decay=0.0)
    draw = torch.Generator().manual_seed(1)
    for _ in range(3):
        bank.lora_a.grad, bank.lora_b.grad = (torch.randn(w.shape, generator=draw, dtype=w.dtype)
                                              for w in (bank.lora_a, bank.lora_b))
        a.grad, b.grad = bank.lora_a.grad[:2].clone(), bank.lora_b.grad[:2].clone()
        torch.nn.utils.clip_grad_norm_([a, b], 0.3)
        ref.step()
        opt.step([0])
    # float64 rounding of the two computations' orders: an entry near 0 may be off relatively by
    # more than 1e-13 (4.9e-13 at 7e-7 once), never absolutely by 1e-15; the float32 max_grad_norm
    # was off by ~4e-8 relatively, ~1e-9 absolutely
    torch.testing.assert_close(opt.user_state(0)["0.exp_avg_a"], ref.state[a]["exp_avg"], rtol=1e-13, atol=1e-15)


def test_step_refuses_non_integer_slots_and_load_user_state_loads_all_or_nothing():
    """Regression: ``step([0.5])`` stepped user 0 (``as_tensor(..., dtype=int64)`` truncates); a state
    with a bad entry after good ones had loaded those, and a key ``"x.exp_avg_a"`` raised int()'s error."""
    bank = kernels.AdapterBank(4, 2, max_users=2)
    bank.add(0, [2])
    opt = PackedAdamW([bank], max_users=2)
    opt.set_user(0)
    for slots in ([0.5], torch.tensor([0.0]), [True]):
        with pytest.raises(TypeError, match="slots must hold int user slots"):
            opt.step(slots)
    assert opt.step_count(0) == 0
    opt.step(torch.tensor([0]))
    assert opt.step_count(0) == 1
    before = opt.user_state(0)
    bad = {"step": torch.tensor([7]), "0.exp_avg_a": torch.ones(2, 4), "0.exp_avg_b": torch.ones(3, 2)}
    with pytest.raises(ValueError, match=r"'0.exp_avg_b' has shape \[3, 2\], expected \[2, 2\]"):
        opt.load_user_state(0, bad)
    after = opt.user_state(0)
    assert all(same(after[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="names bank 'x', where user slot 0 has no rows"):
        opt.load_user_state(0, {"x.exp_avg_a": torch.ones(2, 4)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync is a GPU matter (CPU: no device to wait for)")
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_step_makes_no_host_sync_on_the_gpu(clip):
    """A step sends its slots and the gathered rows of a few users of a big bank to the GPU in one
    copy from pinned memory: before, one copy from pageable memory per bank (each waits for the
    stream) plus one for the slots. Scattered users (the gathered rows) and a joint step (the span)."""
    banks = [kernels.AdapterBank(24, 20, max_users=8, capacity=64, device="cuda") for _ in range(3)]
    for b in banks:
        for u in range(8):
            b.add(u, [4], init="random")
    opt = PackedAdamW(banks, 8)
    for u in range(8):
        opt.set_user(u, AdamWConfig(max_grad_norm=clip), total_steps=10)
    g = torch.Generator().manual_seed(0)
    for b in banks:
        set_grads(b, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step([0, 7])  # rows 0-3 and 28-31 of a 32-row span: gathered
        opt.step(list(range(8)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [opt.step_count(u) for u in range(8)] == [2, 1, 1, 1, 1, 1, 1, 2]
