"""Model-based tests of MilpRuntime: a rule-based state machine adds, removes, evicts and reloads
users with drawn MemoryConfigs and interleaves forwards, joint training steps and mixed
generation, against

* each user's *shadow*: a one-user runtime that gets that user's rows alone (training must
  give the same losses, adapters and optimizer state), and
* an independent LoRA written here with forward hooks on an uninjected copy of the base model
  (``h = W x + Σ_j (α / r_j) B_j A_j x`` per FFN linear), fed with the shadow's adapters;

and a second machine for a runtime with a :class:`~milp.store.UserStore` and a few slots, whose
loads, least-recently-used evictions, write-backs and refusals follow a model of the cache.
Everything in float64 on the torch (CPU) path, so "equal" means equal to rounding.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.optim import AdamWConfig
from milp.runtime import MilpRuntime, pad_sequences
from milp.store import UserStore

PAD = 0
TARGETS = ("gate_proj", "up_proj", "down_proj")
_BASE = tiny_model("llama").double()  # pristine, never injected: deep-copied for every runtime
_BASE.generation_config.eos_token_id = None


def fresh_runtime(max_users: int, **kw) -> MilpRuntime:
    return MilpRuntime(copy.deepcopy(_BASE), max_users=max_users, **kw)


@st.composite
def configs(draw, adapters: bool | None = None, max_modules: int = 3, rank_choices=(1, 2, 4, 8),
            alphas=(1.0, 8.0, 16.0)):
    """A 2-layer MemoryConfig: layers on/off, 0-``max_modules`` modules, shared or per-module
    ranks; ``adapters``: at least one module somewhere."""
    mask, modules, ranks = [], [], []
    for _ in range(2):
        on = draw(st.booleans())
        n = draw(st.integers(0, max_modules)) if on else 0
        mask.append(on)
        modules.append(n)
        if n > 1 and draw(st.booleans()):
            ranks.append(tuple(draw(st.sampled_from(rank_choices)) for _ in range(n)))
        else:
            ranks.append(draw(st.sampled_from(rank_choices)))
    if adapters and not any(m and n for m, n in zip(mask, modules)):
        mask[0], modules[0] = True, 1
    return MemoryConfig(tuple(mask), tuple(modules), tuple(ranks), lora_alpha=draw(st.sampled_from(alphas)))


optims = st.builds(AdamWConfig, lr=st.sampled_from([1e-3, 2e-2]), max_grad_norm=st.sampled_from([None, 0.05]),
                   weight_decay=st.sampled_from([0.0, 0.1]))


def manual_logits(cfg: MemoryConfig, tensors: dict[str, torch.Tensor], ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Logits of the base model with ``cfg``'s adapters ``tensors`` (adapter_state layout: A
    ``[Σr, in]``, B ``[Σr, out]``, modules stacked in order, unscaled), added by hooks."""
    hooks = []
    try:
        for li in cfg.active_layers:
            ranks = cfg.layer_ranks(li)
            for t in TARGETS:
                a, b = tensors[f"layers.{li}.mlp.{t}.lora_A"], tensors[f"layers.{li}.mlp.{t}.lora_B"]

                def hook(_mod, inp, out, a=a, b=b, ranks=ranks):
                    x, off, delta = inp[0], 0, 0
                    for r in ranks:
                        delta = delta + (x @ a[off:off + r].T) @ b[off:off + r] * (cfg.lora_alpha / r)
                        off += r
                    return out + delta

                hooks.append(getattr(_BASE.model.layers[li].mlp, t).register_forward_hook(hook))
        with torch.no_grad():
            return _BASE(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in hooks:
            h.remove()


def token_rows(draw, n_rows: int, min_len: int = 1, max_len: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return [torch.randint(3, 90, (draw(st.integers(min_len, max_len)),), generator=g).tolist()
            for _ in range(n_rows)]


def assert_states_equal(got: dict, want: dict, *, exact: bool = False, msg: str = "") -> None:
    assert got.keys() == want.keys(), msg
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), f"{msg}: {k}"
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=f"{msg}: {k}")


POOL = ["a", "b", "c", 7, 8]
MAX_USERS = 3


class RuntimeMachine(RuleBasedStateMachine):
    """Users come and go in a 3-slot runtime; every loaded user behaves as its shadow."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="milp-rt-props-"))
        self.rt = fresh_runtime(MAX_USERS)
        self.loaded: list = []           # in order of adding
        self.cfg: dict = {}
        self.shadow: dict = {}           # user -> one-user runtime (kept while the user is saved)
        self.saved: dict = {}            # user -> (directory, weights, optimizer state, config) when saved
        self.n_saves = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------- users
    @initialize(data=st.data(), cfgs=st.lists(configs(adapters=True), min_size=2, max_size=2), opt=optims)
    def two_trained_users(self, data, cfgs, opt):
        """Start from two users with adapters, trained once together: evictions and reloads
        then carry optimizer state."""
        for u, cfg in zip(("a", 7), cfgs):
            self.add(u, cfg, opt, 5, seed=len(self.loaded), init="random")
        self.train(data)

    @rule(user=st.sampled_from(POOL), cfg=configs(), opt=optims, steps=st.sampled_from([None, 2, 5]),
          seed=st.integers(0, 50), init=st.sampled_from(["random", "random", "lora"]))
    def add(self, user, cfg, opt, steps, seed, init):
        if user in self.loaded:
            with pytest.raises(ValueError, match="already loaded"):
                self.rt.add_user(user, cfg, optim=opt, total_steps=steps, init=init, seed=seed)
            return
        if len(self.loaded) == MAX_USERS:
            with pytest.raises(ValueError, match=f"max_users={MAX_USERS}"):
                self.rt.add_user(user, cfg, optim=opt, total_steps=steps, init=init, seed=seed)
            return
        self.rt.add_user(user, cfg, optim=opt, total_steps=steps, init=init, seed=seed)
        sh = fresh_runtime(1)
        sh.add_user(user, cfg, optim=opt, total_steps=steps, init=init, seed=seed)
        assert_states_equal(self.rt.adapter_state(user), sh.adapter_state(user), exact=True, msg=f"init {user!r}")
        self.loaded.append(user)
        self.cfg[user] = cfg
        self.shadow[user] = sh

    def _refused(self, user, call) -> None:
        with pytest.raises(KeyError, match=f"unknown user {user!r}"):
            call()

    @rule(user=st.sampled_from(POOL))
    def remove(self, user):
        if user not in self.loaded:
            return self._refused(user, lambda: self.rt.remove_user(user))
        self.rt.remove_user(user)
        self.loaded.remove(user)
        if user not in self.saved:
            del self.shadow[user]

    @rule(data=st.data())
    def evict(self, data):
        loaded = st.sampled_from(self.loaded) if self.loaded else st.nothing()
        user = data.draw(st.one_of(loaded, loaded, loaded, st.sampled_from(POOL)))
        self.n_saves += 1
        d = self.tmp / f"save{self.n_saves}"
        if user not in self.loaded:
            self._refused(user, lambda: self.rt.evict_user(user, d))
            assert not d.exists()
            return
        slot = self.rt.slot(user)
        # cloned: on CPU PackedAdamW.user_state's "step" is a view of the live counter (reset by the eviction)
        opt_state = {k: v.clone() for k, v in self.rt.optimizer.user_state(slot).items()}
        weights, opt_cfg = self.rt.adapter_state(user), self.rt.optimizer.config(slot)
        assert self.rt.evict_user(user, d) == d
        self.loaded.remove(user)
        self.saved[user] = (d, weights, opt_state, self.cfg[user])
        back = fresh_runtime(1)  # what was written is the user: weights, optimizer state, settings
        assert back.load_user(d) == user and back.config(user) == self.cfg[user]
        assert back.optimizer.config(0) == opt_cfg
        assert_states_equal(back.adapter_state(user), self.saved[user][1], exact=True, msg=f"saved {user!r}")
        assert_states_equal(back.optimizer.user_state(0), self.saved[user][2], exact=True, msg=f"saved {user!r}")

    @precondition(lambda self: self.saved)
    @rule(data=st.data(), other_id=st.booleans())
    def reload(self, data, other_id):
        user = data.draw(st.sampled_from(sorted(self.saved, key=repr)))
        d, weights, opt_state, cfg = self.saved[user]
        key = data.draw(st.sampled_from([u for u in POOL if u != user])) if other_id else user
        if key in self.loaded:
            with pytest.raises(ValueError, match="already loaded"):
                self.rt.load_user(d, key)
            return
        if len(self.loaded) == MAX_USERS:
            with pytest.raises(ValueError, match=f"max_users={MAX_USERS}"):
                self.rt.load_user(d, key)
            return
        assert self.rt.load_user(d, key if other_id else None) == key
        # what was saved comes back bit for bit, optimizer state included
        assert_states_equal(self.rt.adapter_state(key), weights, exact=True, msg=f"reloaded {key!r}")
        assert_states_equal(self.rt.optimizer.user_state(self.rt.slot(key)), opt_state, exact=True,
                            msg=f"reloaded optimizer {key!r}")
        sh = fresh_runtime(1)  # a shadow that is the saved user, whatever happened to the old one since
        sh.load_user(d, key)
        self.loaded.append(key)
        self.cfg[key] = cfg  # the saved user's, not that of a user added under its id since
        self.shadow[key] = sh

    @rule(user=st.sampled_from(POOL))
    def unknown_users_are_refused_by_name(self, user):
        if user in self.loaded:
            return
        before = self.rt.users
        ids = torch.randint(3, 90, (2, 4))
        other = self.loaded[0] if self.loaded else None
        self._refused(user, lambda: self.rt.forward(ids, [other, user]))
        self._refused(user, lambda: self.rt.train_step(ids, [user, other]))
        self._refused(user, lambda: self.rt.generate(ids, [other, user], max_new_tokens=1, pad_token_id=PAD))
        self._refused(user, lambda: self.rt.loss(ids, user))
        self._refused(user, lambda: self.rt.slot(user))
        self._refused(user, lambda: self.rt.config(user))
        self._refused(user, lambda: self.rt.adapter_state(user))
        self._refused(user, lambda: self.rt.save_user(user, self.tmp / "never"))
        self._refused(user, lambda: self.rt.check_user(user))
        assert not (self.tmp / "never").exists()
        assert self.rt.users == before

    # ------------------------------------------------------------ batches
    def _batch(self, data, side: str, min_len: int = 1):
        users = data.draw(st.lists(st.sampled_from([*self.loaded, None]), min_size=1, max_size=5))
        rows = token_rows(data.draw, len(users), min_len=min_len)
        ids, mask = pad_sequences(rows, PAD, side=side)
        return users, rows, ids, mask

    @rule(data=st.data())
    def forward(self, data):
        users, _, ids, mask = self._batch(data, "right")
        with torch.no_grad():
            logits = self.rt.forward(ids, users, attention_mask=mask).logits
        for u in dict.fromkeys(users):
            rows = [b for b, v in enumerate(users) if v == u]
            if u is None:
                want = manual_logits(MemoryConfig((False, False), (0, 0), (1, 1)), {}, ids[rows], mask[rows])
            else:
                sh = self.shadow[u]
                want = manual_logits(self.cfg[u], sh.adapter_state(u), ids[rows], mask[rows])
            on = mask[rows].bool()
            torch.testing.assert_close(logits[rows][on], want[on], rtol=1e-9, atol=1e-10, msg=f"user {u!r}")

    @rule(data=st.data())
    def train(self, data):
        users, rows, ids, mask = self._batch(data, "right")
        has_target = {u: any(len(rows[b]) > 1 for b, v in enumerate(users) if v == u) for u in users}
        if not any(has_target[u] for u in users if u is not None):
            with pytest.raises(ValueError, match="no target tokens"):
                self.rt.train_step(ids, users, attention_mask=mask)
            return
        losses = self.rt.train_step(ids, users, attention_mask=mask)
        assert set(losses) == {u for u in users if u is not None and has_target[u]}
        for u in losses:
            mine = [rows[b] for b, v in enumerate(users) if v == u]
            ids_u, mask_u = pad_sequences(mine, PAD, side="right")
            sh = self.shadow[u]
            want = sh.train_step(ids_u, u, attention_mask=mask_u)
            assert losses[u] == pytest.approx(want[u], rel=1e-9, abs=1e-12), u
        for u in self.loaded:
            sh = self.shadow[u]
            assert_states_equal(self.rt.adapter_state(u), sh.adapter_state(u), msg=f"trained {u!r}")
            assert_states_equal(self.rt.optimizer.user_state(self.rt.slot(u)),
                                sh.optimizer.user_state(sh.slot(u)), msg=f"optimizer {u!r}")

    @rule(data=st.data(), new=st.integers(1, 3))
    def generate(self, data, new):
        users, rows, ids, mask = self._batch(data, "left")
        out = self.rt.generate(ids, users, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               pad_token_id=PAD)
        S = ids.shape[1]
        for b, u in enumerate(users):
            one = (self.shadow[u] if u is not None else self.rt).generate(
                torch.tensor([rows[b]]), [u], max_new_tokens=new, do_sample=False, pad_token_id=PAD)
            assert out[b, S:].tolist() == one[0, len(rows[b]):].tolist(), f"row {b} (user {u!r})"

    # --------------------------------------------------------- invariants
    @invariant()
    def bookkeeping(self):
        rt = self.rt
        assert rt.users == self.loaded
        slots = [rt.slot(u) for u in self.loaded]
        assert len(set(slots)) == len(slots) and all(0 <= s < MAX_USERS for s in slots)
        for u in self.loaded:
            assert rt.has_user(u) and rt.config(u) == self.cfg[u]
            assert rt.num_parameters(u) == self.cfg[u].num_parameters(rt.state.target_shapes())
            sh = self.shadow[u]  # e.g. a user without adapters is never stepped, alone or mixed
            assert rt.optimizer.step_count(rt.slot(u)) == sh.optimizer.step_count(sh.slot(u)), u
        assert sorted(rt.state.users()) == sorted(s for u, s in zip(self.loaded, slots) if self.cfg[u].active_layers)


TestRuntimeMachine = RuntimeMachine.TestCase
TestRuntimeMachine.settings = settings(max_examples=20, stateful_step_count=10, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ a runtime with a store
STORE_USERS = {  # saved in the store; "none" has no adapter anywhere (a legal configuration)
    "s0": MemoryConfig.uniform(2, modules=2, rank=4),
    "s1": MemoryConfig((True, False), (1, 0), (8, 8), lora_alpha=8.0),
    "s2": MemoryConfig((False, True), (0, 3), (8, (1, 2, 4)), lora_alpha=4.0),
    3: MemoryConfig.uniform(2, modules=1, rank=2),
    "none": MemoryConfig((False, False), (0, 0), (8, 8)),
}
DIRECT = "d"  # added with add_user: never evicted
STORE_SLOTS = 2


class StoreMachine(RuleBasedStateMachine):
    """Batches name any store user; the runtime's loads, evictions (least recently used first,
    only store users the batch does not need, trained ones only with write_back) and refusals
    (nothing changed) follow the model here, and every user computes what the shadow runtime
    holding all users computes."""

    @initialize(write_back=st.booleans())
    def setup(self, write_back):
        self.tmp = Path(tempfile.mkdtemp(prefix="milp-store-props-"))
        from milp.store import user_dirname

        src = fresh_runtime(len(STORE_USERS))
        for i, (u, cfg) in enumerate(STORE_USERS.items()):
            src.add_user(u, cfg, optim=AdamWConfig(lr=2e-2, max_grad_norm=0.1), total_steps=6, init="random", seed=i)
            src.save_user(u, self.tmp / user_dirname(u))
        self.write_back = write_back
        self.rt = fresh_runtime(STORE_SLOTS, store=UserStore(self.tmp, write_back=write_back))
        self.shadow = fresh_runtime(len(STORE_USERS) + 1)
        for u in STORE_USERS:
            self.shadow.load_user(self.tmp / user_dirname(u))
        self.order: list = []           # the runtime's users, in order of loading/adding
        self.dirty: dict = {}           # store user -> trained since loaded
        self.last: dict = {}            # store user -> batch counter of last use
        self.batches = 0
        self.cache = [0, 0, 0, 0]
        self.steps: dict = dict.fromkeys([*STORE_USERS, DIRECT], 0)  # updates each user got (kept by the store)

    def teardown(self) -> None:
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _admit(self, need: list) -> str | None:
        """The model of MilpRuntime._admit: None when the batch is placed, else the refusal."""
        need = list(dict.fromkeys(u for u in need if u is not None))
        if len(need) > STORE_SLOTS:
            return "distinct users"
        if "ghost" in need:
            return "has no such user"
        missing = [u for u in need if u not in self.order]
        free = STORE_SLOTS - len(self.order)
        victims = []
        if len(missing) > free:
            movable = [u for u in self.order
                       if u != DIRECT and u not in need and (self.write_back or not self.dirty[u])]
            movable.sort(key=lambda u: self.last[u])
            victims = movable[: len(missing) - free]
            if len(victims) < len(missing) - free:
                return "slots can be freed"
        for u in victims:
            if self.dirty[u]:
                self.cache[3] += 1
            self.cache[2] += 1
            self.order.remove(u)
            del self.dirty[u], self.last[u]
        for u in missing:
            self.order.append(u)
            self.dirty[u] = False
            self.cache[1] += 1
        self.cache[0] += len(need) - len(missing)
        self.batches += 1
        for u in need:
            if u != DIRECT:
                self.last[u] = self.batches
        return None

    def _draw_batch(self, data, min_len: int):
        """Rows of 1-3 distinct users (3: more than the slots), base rows, now and then an id the store lacks."""
        pool = [*STORE_USERS, *STORE_USERS, "ghost"] + ([DIRECT] if DIRECT in self.order else [])
        k = data.draw(st.sampled_from([1, 1, 1, 2, 2, 3]))
        distinct = data.draw(st.lists(st.sampled_from(pool), min_size=k, max_size=k, unique=True))
        extra = data.draw(st.lists(st.sampled_from([*distinct, None]), max_size=4 - len(distinct)))
        users = data.draw(st.permutations(distinct + extra))
        rows = token_rows(data.draw, len(users), min_len=min_len)
        ids, mask = pad_sequences(rows, PAD, side="right")
        return users, rows, ids, mask

    def _run(self, users, call):
        """``call()`` under the model's admission: the refusal it predicts (nothing changed), or the result."""
        before = (list(self.rt.users), self.rt.cache_info())
        refusal = self._admit(users)
        if refusal is None:
            return call()
        with pytest.raises((ValueError, KeyError), match=refusal):
            call()
        assert (self.rt.users, self.rt.cache_info()) == before
        return None

    @rule(data=st.data())
    def forward(self, data):
        users, _, ids, mask = self._draw_batch(data, 1)

        def call():
            with torch.no_grad():
                return self.rt.forward(ids, users, attention_mask=mask).logits

        logits = self._run(users, call)
        if logits is None:
            return
        with torch.no_grad():
            want = self.shadow.forward(ids, users, attention_mask=mask).logits
        on = mask.bool()
        torch.testing.assert_close(logits[on], want[on], rtol=1e-9, atol=1e-10)

    @rule(data=st.data())
    def train(self, data):
        users, _, ids, mask = self._draw_batch(data, 2)
        if all(u is None for u in users):
            return
        losses = self._run(users, lambda: self.rt.train_step(ids, users, attention_mask=mask))
        if losses is None:
            return
        want = self.shadow.train_step(ids, users, attention_mask=mask)
        assert losses == pytest.approx(want, rel=1e-9, abs=1e-12)
        for u in losses:
            if u == DIRECT or STORE_USERS[u].active_layers:  # a user without adapters is not trained
                self.steps[u] += 1
                self.dirty[u] = u != DIRECT
        for u in self.order:
            assert_states_equal(self.rt.adapter_state(u), self.shadow.adapter_state(u), msg=f"{u!r}")

    @precondition(lambda self: DIRECT not in self.order and len(self.order) < STORE_SLOTS)
    @rule()
    def add_direct(self):
        cfg = MemoryConfig.uniform(2, modules=1, rank=4)
        self.rt.add_user(DIRECT, cfg, total_steps=6, init="random", seed=99)
        if not self.shadow.has_user(DIRECT):
            self.shadow.add_user(DIRECT, cfg, total_steps=6, init="random", seed=99)
        self.order.append(DIRECT)

    @precondition(lambda self: DIRECT in self.order)
    @rule()
    def remove_direct(self):
        self.rt.remove_user(DIRECT)
        self.shadow.remove_user(DIRECT)
        self.order.remove(DIRECT)
        self.steps[DIRECT] = 0

    @invariant()
    def cache_follows_the_model(self):
        if not hasattr(self, "rt"):
            return
        assert self.rt.users == self.order
        assert tuple(self.rt.cache_info()) == tuple(self.cache)
        for u in self.order:  # trained users are kept, or written back with their optimizer state
            assert self.rt.optimizer.step_count(self.rt.slot(u)) == self.steps[u], u


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=20, stateful_step_count=10, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ generation
@st.composite
def prompts(draw, n_users: int = 3):
    users = draw(st.lists(st.sampled_from([*range(n_users), None]), min_size=1, max_size=4))
    rows = token_rows(draw, len(users), min_len=1, max_len=6)
    return users, rows


_GEN: list[MilpRuntime] = []


def gen_runtime() -> MilpRuntime:
    if not _GEN:
        rt = fresh_runtime(3)
        rt.add_user(0, MemoryConfig.uniform(2, modules=2, rank=4), init="random", seed=0)
        rt.add_user(1, MemoryConfig((True, False), (3, 0), ((1, 2, 8), 8), lora_alpha=8.0), init="random", seed=1)
        rt.add_user(2, MemoryConfig((False, False), (0, 0), (8, 8)))
        _GEN.append(rt)
    return _GEN[0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=prompts(), new=st.integers(2, 5), pick=st.integers(0, 100))
def test_mixed_generation_with_eos_midway_equals_each_user_alone(case, new, pick):
    """Greedy mixed-user generation from left-padded prompts of different lengths, with an EOS
    that some row produces midway: each row is what its user generates alone (stopping at the
    EOS), then padding."""
    users, rows = case
    rt = gen_runtime()
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    free = [rt.generate(torch.tensor([r]), [u], eos_token_id=None, **kw)[0, len(r):].tolist()
            for r, u in zip(rows, users)]
    middle = [t for f in free for t in f[:-1] if t != PAD]
    eos = middle[pick % len(middle)] if middle else 95
    ids, mask = pad_sequences(rows, PAD, side="left")
    out = rt.generate(ids, users, attention_mask=mask, eos_token_id=eos, **kw)
    S = ids.shape[1]
    for b, (r, u) in enumerate(zip(rows, users)):
        alone = rt.generate(torch.tensor([r]), [u], eos_token_id=eos, **kw)[0, len(r):].tolist()
        want = free[b][: free[b].index(eos) + 1] if eos in free[b] else free[b]
        assert alone == want, f"row {b} alone (user {u!r})"
        got = out[b, S:].tolist()
        assert got[: len(want)] == want and all(t == PAD for t in got[len(want):]), f"row {b} (user {u!r})"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=prompts(), new=st.integers(1, 4))
def test_generate_without_a_mask_is_model_generate(case, new):
    """No attention_mask: what ``model.generate`` does with these users (it masks the left
    padding, inferred from pad_token_id), i.e. the same as passing pad_sequences' mask. Before,
    the runtime passed an all-ones mask: padded rows attended to their padding."""
    users, rows = case
    rt = gen_runtime()
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    ids, mask = pad_sequences(rows, PAD, side="left")
    got = rt.generate(ids, users, **kw)
    with rt.using(users, len(users)):
        hf = rt.model.generate(ids, **kw)
    assert got.tolist() == hf.tolist()
    assert got.tolist() == rt.generate(ids, users, attention_mask=mask, **kw).tolist()


def test_a_user_without_adapters_is_not_stepped_in_a_mixed_batch(tmp_path):
    """Regression: a user whose configuration has no adapter got a step counted when trained
    next to a user with adapters (not alone), so as a store user it counted as trained and
    blocked evictions without write_back."""
    from milp.store import user_dirname

    src = fresh_runtime(3)
    for i, u in enumerate(("none", "x", "y")):
        src.add_user(u, STORE_USERS["none"] if u == "none" else MemoryConfig.uniform(2), init="random", seed=i)
        src.save_user(u, tmp_path / user_dirname(u))
    rt = fresh_runtime(2, store=UserStore(tmp_path))
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    assert set(rt.train_step(ids, ["none", "x"])) == {"none", "x"}
    assert rt.optimizer.step_count(rt.slot("none")) == 0 and rt.optimizer.step_count(rt.slot("x")) == 1
    rt.forward(ids, ["x", "y"])  # "none" is evicted (untrained), "x" stays (the batch needs it)
    assert rt.users == ["x", "y"]


# ------------------------------------------------------------------ batching helpers
@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=6), min_size=1, max_size=5),
       side=st.sampled_from(["left", "right"]), pad=st.integers(0, 3))
def test_pad_sequences_round_trips(seqs, side, pad):
    ids, mask = pad_sequences(seqs, pad, side=side)
    S = max(map(len, seqs))
    assert ids.shape == mask.shape == (len(seqs), S) and ids.dtype == mask.dtype == torch.long
    for b, s in enumerate(seqs):
        assert ids[b][mask[b] == 1].tolist() == s
        assert bool((ids[b][mask[b] == 0] == pad).all())
        on = mask[b].tolist()
        assert on == ([1] * len(s) + [0] * (S - len(s)) if side == "right" else [0] * (S - len(s)) + [1] * len(s))


@settings(max_examples=40, deadline=None)
@given(sizes=st.dictionaries(st.sampled_from(["a", "b", 7, ("t", 1)]), st.integers(1, 7), min_size=1),
       rows_per_user=st.integers(1, 3), shuffle=st.booleans(), seed=st.integers(0, 3), epoch=st.integers(0, 2))
def test_mixed_batches_give_each_user_its_own_batches(sizes, rows_per_user, shuffle, seed, epoch):
    """Every row of every user exactly once per epoch; user u's rows come in the batches (and
    order) it gets alone; ceil(n_u / rows_per_user) batches involve u; a user's order does not
    depend on the other users."""
    from milp.runtime import mixed_batches

    data = {u: [[3 + i, 100 + j] + [5] * (i % 3) for i in range(n)] for j, (u, n) in enumerate(sizes.items())}
    kw = dict(rows_per_user=rows_per_user, shuffle=shuffle, seed=seed, epoch=epoch)
    batches = list(mixed_batches(data, PAD, **kw))
    assert len(batches) == max(-(-n // rows_per_user) for n in sizes.values())
    for u, seqs in data.items():
        alone = [[ids[r][mask[r] == 1].tolist() for r in range(ids.shape[0])]
                 for ids, mask, _ in mixed_batches({u: seqs}, PAD, **kw)]
        mine = [[ids[r][mask[r] == 1].tolist() for r in range(len(who)) if who[r] == u] for ids, mask, who in batches]
        assert [m for m in mine if m] == alone
        assert sum(1 for m in mine if m) == -(-len(seqs) // rows_per_user)
        assert sorted(r for m in mine for r in m) == sorted(seqs)
