"""Properties of MilpRuntime's training side, as users see it over many steps.

* training interrupted and resumed (``save_user`` with the optimizer state, ``remove_user``,
  ``load_user`` into a fresh runtime, or the same one in another slot) continues exactly as
  training straight through: adapters, moments, master weights, step counts, learning rates;
* a user joining a batch whose other users are already at step ``k`` trains as it would alone,
  and does not change the others' trajectories or schedules (rows per user imbalanced);
* ``set_total_steps`` mid-training keeps adapters, moments and step count and only changes the
  learning rate of the following steps;
* ``lr = 0`` leaves adapters bit for bit (also bf16 with float32 masters);
* a user removed and another added into the same slot starts from a fresh optimizer;
* per-user losses equal the mean cross-entropy of that user's target tokens, by hand;
* save/load without the optimizer state restarts the optimizer and keeps the adapters;
* users coming and going (banks growing, rows reused) leave every other user bit for bit;
* regressions: ``train_step`` under ``torch.no_grad()``, a refused ``load_adapter_state``
  leaving the user as it was, adapters of another half-precision dtype seeding the master.

float64 where "the same" means equal to rounding; float32/bfloat16 where the same operations
run on the same values (bit for bit).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_runtime_props import configs as _configs  # tests/milp is on sys.path (pytest's rootdir-relative import)

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.optim import AdamWConfig, lr_multiplier
from milp.runtime import MilpRuntime, pad_sequences

PAD = 0
_BASES: dict[torch.dtype, torch.nn.Module] = {}
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fresh_runtime(dtype: torch.dtype = torch.float64, max_users: int = 3, **kw) -> MilpRuntime:
    if dtype not in _BASES:
        _BASES[dtype] = tiny_model("llama").to(dtype)
    return MilpRuntime(copy.deepcopy(_BASES[dtype]), max_users=max_users, **kw)


def configs(adapters: bool = True):
    """test_runtime_props' configurations, smaller: 0-2 modules of rank 1-4."""
    return _configs(adapters=adapters, max_modules=2, rank_choices=(1, 2, 4), alphas=(1.0, 8.0))


optims = st.builds(
    AdamWConfig,
    lr=st.sampled_from([1e-3, 2e-2]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    warmup_ratio=st.sampled_from([0.0, 0.1, 0.5]),
    decay=st.sampled_from(["linear", "constant"]),
    max_grad_norm=st.sampled_from([None, 0.05]),
)
budgets = st.sampled_from([None, 2, 4, 7])


def batch(seed: int, n_rows: int, min_len: int = 2, max_len: int = 6):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 90, (int(torch.randint(min_len, max_len + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_rows)]
    return rows, *pad_sequences(rows, PAD, side="right")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(got: dict, want: dict, msg: str = "", tol: dict | None = None) -> None:
    assert got.keys() == want.keys(), msg
    for k in want:
        if tol is None:
            assert got[k].dtype == want[k].dtype and torch.equal(bits(got[k]), bits(want[k])), f"{msg}: {k}"
        else:
            torch.testing.assert_close(got[k], want[k], **tol, msg=f"{msg}: {k}")


def opt_state(rt: MilpRuntime, u) -> dict:
    return {k: v.clone() for k, v in rt.optimizer.user_state(rt.slot(u)).items()}


def schedule(rt: MilpRuntime, u) -> tuple:
    s = rt.slot(u)
    return rt.optimizer.step_count(s), rt.optimizer.current_lr(s), rt.optimizer.config(s)


# ------------------------------------------------------------------ resume
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]), cfg=configs(),
       opt=optims, total=budgets, n=st.integers(0, 3), m=st.integers(1, 3),
       where=st.sampled_from(["fresh", "other slot", "same slot"]), rows=st.integers(1, 3), seed=st.integers(0, 1000),
       master=st.booleans())
def test_training_interrupted_and_resumed_equals_training_straight(dtype, cfg, opt, total, n, m, where, rows, seed,
                                                                   master):
    straight = fresh_runtime(dtype, master_weights=master)
    straight.add_user("u", cfg, optim=opt, total_steps=total, init="random", seed=seed)
    paused = fresh_runtime(dtype, master_weights=master)
    paused.add_user("u", cfg, optim=opt, total_steps=total, init="random", seed=seed)
    batches = [batch(seed + i, rows)[1:] for i in range(n + m)]
    for ids, mask in batches[:n]:
        assert straight.train_step(ids, "u", attention_mask=mask) == paused.train_step(ids, "u", attention_mask=mask)
    with tempfile.TemporaryDirectory() as d:
        paused.save_user("u", Path(d) / "u")
        paused.remove_user("u")
        if where == "fresh":
            paused = fresh_runtime(dtype, master_weights=master)
        elif where == "other slot":  # the same runtime; another user takes the old slot first
            paused.add_user("other", MemoryConfig.uniform(2, 1, 2), init="random", seed=1)
        assert paused.load_user(Path(d) / "u") == "u"
    assert schedule(paused, "u") == schedule(straight, "u")
    assert_same(opt_state(paused, "u"), opt_state(straight, "u"), "loaded optimizer")
    for i, (ids, mask) in enumerate(batches[n:]):
        assert straight.train_step(ids, "u", attention_mask=mask) == paused.train_step(ids, "u", attention_mask=mask)
        assert schedule(paused, "u") == schedule(straight, "u"), i
    assert_same(paused.adapter_state("u"), straight.adapter_state("u"), "adapters")
    assert_same(opt_state(paused, "u"), opt_state(straight, "u"), "optimizer")


# ------------------------------------------------------------------ joining mid-way
@SETTINGS
@given(cfgs=st.lists(configs(), min_size=2, max_size=2), opts=st.lists(optims, min_size=2, max_size=2),
       totals=st.lists(budgets, min_size=2, max_size=2), k=st.integers(1, 3), j=st.integers(1, 3),
       rows=st.lists(st.integers(1, 5), min_size=2, max_size=2), nones=st.integers(0, 2), seed=st.integers(0, 1000))
def test_a_user_joining_mid_way_trains_as_alone_and_leaves_the_others_schedules(
        cfgs, opts, totals, k, j, rows, nones, seed):
    joint = fresh_runtime()
    alone = {u: fresh_runtime(max_users=1) for u in "ab"}
    for i, u in enumerate("ab"):
        alone[u].add_user(u, cfgs[i], optim=opts[i], total_steps=totals[i], init="random", seed=seed + i)
    joint.add_user("a", cfgs[0], optim=opts[0], total_steps=totals[0], init="random", seed=seed)
    for s in range(k):
        rows_a, ids, mask = batch(seed + 10 * s, rows[0])
        assert joint.train_step(ids, "a", attention_mask=mask) == alone["a"].train_step(ids, "a", attention_mask=mask)
    joint.add_user("b", cfgs[1], optim=opts[1], total_steps=totals[1], init="random", seed=seed + 1)
    assert_same(joint.adapter_state("a"), alone["a"].adapter_state("a"), "a before b trains")
    assert schedule(joint, "a") == schedule(alone["a"], "a")
    tol = dict(rtol=1e-9, atol=1e-11)
    for s in range(j):
        rows_a = batch(seed + 100 + s, rows[0])[0]
        rows_b = batch(seed + 200 + s, rows[1])[0]
        extra = batch(seed + 300 + s, nones)[0] if nones else []
        all_rows = rows_a + rows_b + extra
        users = ["a"] * len(rows_a) + ["b"] * len(rows_b) + [None] * len(extra)
        perm = torch.randperm(len(all_rows), generator=torch.Generator().manual_seed(seed + s)).tolist()
        ids, mask = pad_sequences([all_rows[p] for p in perm], PAD)
        got = joint.train_step(ids, [users[p] for p in perm], attention_mask=mask)
        for u, mine in (("a", rows_a), ("b", rows_b)):
            ids_u, mask_u = pad_sequences(mine, PAD)
            want = alone[u].train_step(ids_u, u, attention_mask=mask_u)
            # the token losses are float32 (milp.losses), summed here in another order
            assert abs(got[u] - want[u]) <= 1e-6 * abs(want[u]) + 1e-7, (s, u)
        for u in "ab":
            assert schedule(joint, u) == schedule(alone[u], u), (s, u)
            assert_same(joint.adapter_state(u), alone[u].adapter_state(u), f"step {s} {u}", tol)
            assert_same(opt_state(joint, u), opt_state(alone[u], u), f"step {s} {u} optimizer", tol)


# ------------------------------------------------------------------ set_total_steps
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.bfloat16]), cfg=configs(), opt=optims, t1=budgets, t2=budgets,
       n=st.integers(0, 4), m=st.integers(1, 3), seed=st.integers(0, 1000))
def test_set_total_steps_mid_training_changes_only_the_following_learning_rates(dtype, cfg, opt, t1, t2, n, m, seed):
    rt = fresh_runtime(dtype)
    rt.add_user("u", cfg, optim=opt, total_steps=t1, init="random", seed=seed)
    rt.add_user("v", MemoryConfig.uniform(2, 1, 2), optim=opt, total_steps=5, init="random", seed=seed + 1)
    for s in range(n):
        _, ids, mask = batch(seed + s, 2)
        rt.train_step(ids, ["u", "v"], attention_mask=mask)
    before = rt.adapter_state("u"), opt_state(rt, "u"), rt.adapter_state("v"), opt_state(rt, "v"), schedule(rt, "v")
    rt.set_total_steps("u", t2)
    after = rt.adapter_state("u"), opt_state(rt, "u"), rt.adapter_state("v"), opt_state(rt, "v"), schedule(rt, "v")
    for x, y in zip(before[:4], after[:4]):
        assert_same(y, x, "set_total_steps")
    assert before[4] == after[4]
    s = rt.slot("u")
    assert rt.optimizer.step_count(s) == n and rt.optimizer.config(s) == (opt, t2)
    for i in range(m):
        assert rt.optimizer.current_lr(s) == opt.lr * lr_multiplier(n + i + 1, t2, opt.warmup_ratio, opt.decay)
        _, ids, mask = batch(seed + 50 + i, 2)
        rt.train_step(ids, "u", attention_mask=mask)
    # saved and loaded with the new budget
    with tempfile.TemporaryDirectory() as d:
        rt.save_user("u", Path(d) / "u")
        back = fresh_runtime(dtype)
        back.load_user(Path(d) / "u")
    assert schedule(back, "u") == schedule(rt, "u")


# ------------------------------------------------------------------ lr 0
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), cfg=configs(),
       wd=st.sampled_from([0.0, 0.1, 10.0]), total=budgets, n=st.integers(1, 3), seed=st.integers(0, 1000),
       master=st.booleans())
def test_lr_zero_leaves_the_adapters_bit_for_bit(dtype, cfg, wd, total, n, seed, master):
    rt = fresh_runtime(dtype, master_weights=master)
    rt.add_user("u", cfg, optim=AdamWConfig(lr=0.0, weight_decay=wd), total_steps=total, init="random", seed=seed)
    rt.add_user("w", MemoryConfig.uniform(2, 1, 2), optim=AdamWConfig(lr=1e-2), init="random", seed=seed + 1)
    start = rt.adapter_state("u")
    for s in range(n):
        _, ids, mask = batch(seed + s, 3)
        rt.train_step(ids, ["u", "w", "u"], attention_mask=mask)
    assert rt.optimizer.step_count(rt.slot("u")) == n
    assert_same(rt.adapter_state("u"), start, "lr 0")


# ------------------------------------------------------------------ remove and add into the same slot
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), cfg=configs(), cfg2=configs(),
       opt=optims, total=budgets, n=st.integers(1, 3), m=st.integers(1, 3), seed=st.integers(0, 1000),
       init=st.sampled_from(["random", "lora"]))
def test_a_new_user_in_a_freed_slot_starts_with_a_fresh_optimizer(dtype, cfg, cfg2, opt, total, n, m, seed, init):
    rt = fresh_runtime(dtype)
    rt.add_user("old", cfg, optim=opt, total_steps=total, init="random", seed=seed)
    rt.add_user("keep", MemoryConfig.uniform(2, 1, 2), optim=opt, init="random", seed=seed + 1)
    for s in range(n):
        _, ids, mask = batch(seed + s, 2)
        rt.train_step(ids, ["old", "keep"], attention_mask=mask)
    slot = rt.slot("old")
    rt.remove_user("old")
    rt.add_user("new", cfg2, optim=opt, total_steps=total, init=init, seed=seed + 2)
    assert rt.slot("new") == slot
    ref = fresh_runtime(dtype, max_users=1)
    ref.add_user("new", cfg2, optim=opt, total_steps=total, init=init, seed=seed + 2)
    assert_same(rt.adapter_state("new"), ref.adapter_state("new"), "init")
    assert_same(opt_state(rt, "new"), opt_state(ref, "new"), "fresh optimizer")
    assert schedule(rt, "new") == schedule(ref, "new")
    for s in range(m):
        _, ids, mask = batch(seed + 20 + s, 2)
        assert rt.train_step(ids, "new", attention_mask=mask) == ref.train_step(ids, "new", attention_mask=mask)
    assert_same(rt.adapter_state("new"), ref.adapter_state("new"), "trained")
    assert_same(opt_state(rt, "new"), opt_state(ref, "new"), "trained optimizer")


# ------------------------------------------------------------------ per-user losses by hand
@SETTINGS
@given(data=st.data(), n_users=st.integers(1, 3), seed=st.integers(0, 1000), explicit=st.booleans())
def test_per_user_losses_are_the_mean_ce_of_each_users_targets(data, n_users, seed, explicit):
    rt = fresh_runtime()
    users = ["a", "b", 5][:n_users]
    cfgs = {u: data.draw(configs(adapters=data.draw(st.booleans()))) for u in users}
    for i, u in enumerate(users):
        rt.add_user(u, cfgs[u], init="random", seed=seed + i)
    row_users = data.draw(st.lists(st.sampled_from([*users, None]), min_size=1, max_size=6))
    rows, ids, mask = batch(seed, len(row_users), min_len=1)
    labels = ids.masked_fill(mask == 0, -100)
    if explicit:  # explicit labels: some targets ignored, padding left in (the caller's labels count)
        g = torch.Generator().manual_seed(seed + 1)
        drop = torch.rand(ids.shape, generator=g) < 0.3
        labels = torch.where(drop, -100, torch.randint(3, 90, ids.shape, generator=g))
    total, per_user = rt.loss(ids, row_users, attention_mask=mask, labels=labels if explicit else None)
    want = {}
    for u in dict.fromkeys(row_users):
        if u is None:
            continue
        rows_u = [b for b, v in enumerate(row_users) if v == u]
        with torch.no_grad():
            logits = rt.forward(ids[rows_u], u, attention_mask=mask[rows_u]).logits.double()
        lab = labels[rows_u][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                               ignore_index=-100, reduction="none")
        keep = lab.reshape(-1) != -100
        if keep.any():
            want[u] = ce[keep].mean()
    assert per_user.keys() == want.keys()
    for u in want:
        torch.testing.assert_close(per_user[u].double(), want[u], rtol=1e-6, atol=1e-7, msg=str(u))
    torch.testing.assert_close(total.double(), sum(want.values(), torch.tensor(0.0, dtype=torch.float64)),
                               rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ without the optimizer state
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), cfg=configs(), opt=optims,
       total=budgets, n=st.integers(1, 3), seed=st.integers(0, 1000), include=st.booleans())
def test_save_load_without_optimizer_state_restarts_the_optimizer(dtype, cfg, opt, total, n, seed, include):
    rt = fresh_runtime(dtype)
    rt.add_user("u", cfg, optim=opt, total_steps=total, init="random", seed=seed)
    for s in range(n):
        _, ids, mask = batch(seed + s, 2)
        rt.train_step(ids, "u", attention_mask=mask)
    with tempfile.TemporaryDirectory() as d:
        rt.save_user("u", Path(d) / "u", include_optimizer=include)
        back = fresh_runtime(dtype)
        back.load_user(Path(d) / "u", load_optimizer=False)
    assert_same(back.adapter_state("u"), rt.adapter_state("u"), "adapters")
    ref = fresh_runtime(dtype)  # a fresh optimizer over the same adapters
    ref.add_user("u", cfg, optim=opt, total_steps=total, init="zeros")
    ref.load_adapter_state("u", rt.adapter_state("u"))
    assert schedule(back, "u") == schedule(ref, "u")
    assert back.optimizer.step_count(back.slot("u")) == 0
    assert_same(opt_state(back, "u"), opt_state(ref, "u"), "fresh optimizer")


# ------------------------------------------------------------------ users coming and going
@SETTINGS
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       events=st.lists(st.tuples(st.sampled_from(["train", "train", "add", "remove", "budget"]), st.integers(0, 3),
                                 configs(), optims, budgets), min_size=3, max_size=12),
       seed=st.integers(0, 1000))
def test_users_coming_and_going_leave_every_other_user_bit_for_bit(dtype, events, seed):
    """Adds (banks grow), removes (rows freed, reused by users of other ranks) and budget changes
    between single-user steps: every loaded user, master weights included, stays exactly its
    shadow, a one-user runtime that saw only its own steps."""
    rt = fresh_runtime(dtype, max_users=3)
    shadow: dict = {}
    n = 0
    for kind, pick, cfg, opt, total in events:
        n += 1
        loaded = rt.users
        if kind == "add" and len(loaded) < 3 or not loaded:
            u = f"u{n}"
            rt.add_user(u, cfg, optim=opt, total_steps=total, init="random", seed=seed + n)
            shadow[u] = fresh_runtime(dtype, max_users=1)
            shadow[u].add_user(u, cfg, optim=opt, total_steps=total, init="random", seed=seed + n)
        elif kind == "remove":
            u = loaded[pick % len(loaded)]
            rt.remove_user(u)
            del shadow[u]
        elif kind == "budget":
            u = loaded[pick % len(loaded)]
            rt.set_total_steps(u, total)
            shadow[u].set_total_steps(u, total)
        else:
            u = loaded[pick % len(loaded)]
            _, ids, mask = batch(seed + n, 1 + pick)
            assert rt.train_step(ids, u, attention_mask=mask) == shadow[u].train_step(ids, u, attention_mask=mask)
        for v in rt.users:
            assert schedule(rt, v) == schedule(shadow[v], v), (n, v)
            assert_same(rt.adapter_state(v), shadow[v].adapter_state(v), f"event {n} {kind}: {v}")
            assert_same(opt_state(rt, v), opt_state(shadow[v], v), f"event {n} {kind}: {v} optimizer")


# ------------------------------------------------------------------ regressions
def test_train_step_trains_under_no_grad():
    """Was: ``train_step`` called under ``torch.no_grad()`` (an evaluation loop around it, a
    decorated training function) took its "no user has adapters" shortcut, since the loss did not
    require grad: it returned the losses as if it had trained, but updated nobody and counted no
    step. It trains regardless of the caller's grad mode now, as ``torch.optim`` steps do."""
    ref = fresh_runtime(max_users=1)
    rt = fresh_runtime(max_users=1)
    for r in (ref, rt):
        r.add_user("a", MemoryConfig.uniform(2, 1, 2), optim=AdamWConfig(lr=1e-2), total_steps=5, init="random",
                   seed=0)
    _, ids, mask = batch(0, 2)
    want = ref.train_step(ids, "a", attention_mask=mask)
    with torch.no_grad():
        got = rt.train_step(ids, "a", attention_mask=mask)
    assert got == want
    assert rt.optimizer.step_count(rt.slot("a")) == 1
    assert_same(rt.adapter_state("a"), ref.adapter_state("a"), "trained under no_grad")
    with torch.no_grad():  # and the caller's grad mode is left as it was
        rt.train_step(ids, "a", attention_mask=mask)
        assert not torch.is_grad_enabled()
    assert rt.optimizer.step_count(rt.slot("a")) == 2
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        rt.train_step(ids, "a", attention_mask=mask)  # cannot train there: refused, not skipped
    assert rt.optimizer.step_count(rt.slot("a")) == 2


@SETTINGS
@example(dtype=torch.float32, cfg=MemoryConfig.uniform(2, 1, 2), bad="extra", pick=0, seed=0)
@example(dtype=torch.float32, cfg=MemoryConfig.uniform(2, 1, 2), bad="nan", pick=5, seed=0)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), cfg=configs(),
       bad=st.sampled_from(["extra", "nan", "inf", "shape", "missing"]), pick=st.integers(0, 20),
       seed=st.integers(0, 1000))
def test_a_refused_load_adapter_state_leaves_the_user_as_it_was(dtype, cfg, bad, pick, seed):
    """Was: ``load_adapter_state`` copied module after module and checked as it went, so tensors
    with an extra target (checked last), or a NaN, a wrong shape or a missing target at a later
    module, were refused after the earlier modules had been overwritten: a half-loaded user. Now
    every target is checked, and a module refused by the bank gives the others their rows back."""
    rt = fresh_runtime(dtype, max_users=2)
    rt.add_user("u", cfg, optim=AdamWConfig(lr=1e-2), total_steps=4, init="random", seed=seed)
    _, ids, mask = batch(seed, 2)
    rt.train_step(ids, "u", attention_mask=mask)
    before, opt_before = rt.adapter_state("u"), opt_state(rt, "u")
    g = torch.Generator().manual_seed(seed)
    new = {k: torch.randn(v.shape, generator=g, dtype=torch.float32) for k, v in before.items()}
    keys = sorted(new)
    k = keys[pick % len(keys)]
    if bad == "extra":
        new["layers.9.mlp.up_proj.lora_A"] = torch.zeros(1, 1)
    elif bad in ("nan", "inf"):
        new[k] = new[k].clone()
        new[k].view(-1)[pick % new[k].numel()] = float(bad)
    elif bad == "shape":
        new[k] = torch.zeros(new[k].shape[0] + 1, new[k].shape[1])
    else:
        del new[k]
    with pytest.raises((KeyError, ValueError)):
        rt.load_adapter_state("u", new)
    assert_same(rt.adapter_state("u"), before, f"refused ({bad} at {k})")
    assert_same(opt_state(rt, "u"), opt_before, f"refused ({bad} at {k}): optimizer")
    good = {k: torch.randn(v.shape, generator=g, dtype=torch.float32) for k, v in before.items()}
    rt.load_adapter_state("u", good)
    assert_same(rt.adapter_state("u"), {k: v.to(dtype) for k, v in good.items()}, "loaded")


@settings(SETTINGS, max_examples=8)
@example(bank_dtype=torch.bfloat16, src_dtype=torch.float16, cfg=MemoryConfig((True, False), (1, 0), (2, 2)),
         seed=0)
@given(bank_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       src_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), cfg=configs(),
       seed=st.integers(0, 1000))
def test_adapters_of_another_dtype_seed_the_master_with_their_own_values(bank_dtype, src_dtype, cfg, seed):
    """Was: ``load_adapter_state`` seeded the float32 master only from a *wider* dtype, so fp16
    adapters (a PEFT adapter saved in fp16, a user trained in an fp16 model) loaded into a bf16
    runtime trained on from their bf16 rounding (3 bits of mantissa lost), and bf16 ones into an
    fp16 runtime lost their small values; "the master rows take the tensors as given". The master
    now holds every value the given tensors hold that rounds to the bank's row (the others come
    from the bank, as the optimizer re-seeds them)."""
    rt = fresh_runtime(bank_dtype, max_users=1)
    rt.add_user("u", cfg, optim=AdamWConfig(lr=1e-2), init="random", seed=seed)
    g = torch.Generator().manual_seed(seed)
    scale = 1e-4 if bank_dtype == torch.float16 else 1.0  # fp16's subnormal range, where bf16 values lose bits
    given_ = {k: (scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(src_dtype)
              for k, v in rt.adapter_state("u").items()}
    rt.load_adapter_state("u", given_)
    state = rt.optimizer.user_state(rt.slot("u"))
    bank_index = {id(b): i for i, b in enumerate(rt.optimizer.banks)}
    for m in rt.state.modules():
        if not m.bank.has(rt.slot("u")):
            continue
        i = bank_index[id(m.bank)]
        for sfx in "ab":
            src = given_[f"layers.{m.layer}.{m.target}.lora_{sfx.upper()}"]
            master = state[f"{i}.master_{sfx}"]
            row = getattr(m.bank, "lora_" + sfx).detach()[m.bank.segment(rt.slot("u")).offset:][:src.shape[0]]
            assert torch.equal(master.to(bank_dtype), row), (m.layer, m.target, sfx)  # the bank holds the master
            want = src.float()
            # exactly the given values where float32 holds them and they round to the bank's row
            fits = (want.to(torch.float64) == src.to(torch.float64)) & (want.to(bank_dtype) == row)
            assert torch.equal(master[fits], want[fits]), (m.layer, m.target, sfx)
            if src_dtype != torch.float64:
                assert fits.all()
