"""The runtime at the scale of thousands of users: per-step and per-user host work that does not
grow with the users loaded (or the slots), and the shortcuts that make it so giving what the
full passes gave.

No timings (the project's rule): complexity shows as counts at two sizes — the Python lines an
operation runs in the library's files (a loop over every user runs a line per user), the
elements read back from tensors to the host (``tolist``/``item``/``int``: on a GPU each read is
a device sync), the rows an optimizer step updates, and calls of an inner function.
"""
from __future__ import annotations

import json
import random
import shutil
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import milp.inject
import milp.optim
import milp.runtime
from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.optim import AdamWConfig, PackedAdamW
from milp.runtime import MilpRuntime
from milp.store import UserStore, user_dirname
from tests.host_work import lines_run as _lines_run

LIB_FILES = (milp.runtime.__file__, milp.optim.__file__, milp.inject.__file__, kernels.bank.__file__)
CFG = MemoryConfig.uniform(2, 1, 1)  # rank 1 on both layers of the tiny model


def lines_run(fn, *args, **kwargs):
    """:func:`tests.host_work.lines_run` over the runtime's files."""
    return _lines_run(fn, *args, files=LIB_FILES, **kwargs)


class HostReads:
    """Counts reads of tensor values to the host (``tolist``, ``item``, ``int()``) while active:
    ``calls`` and ``elements`` read."""

    def __init__(self, monkeypatch):
        self.calls = self.elements = 0
        self.active = False
        for name in ("tolist", "item", "__int__", "__index__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                if self.active:
                    self.calls += 1
                    self.elements += t.numel()
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def run(self, fn, *args, **kwargs):
        self.calls = self.elements = 0
        self.active = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.active = False


def runtime_with(n: int, **kw) -> MilpRuntime:
    # capacity for every user up front: a bank that grows re-reads its table once (amortized)
    rt = MilpRuntime(tiny_model("llama"), max_users=n + 2, capacity=2 * (n + 2), **kw)
    for u in range(n):
        rt.add_user(u, CFG, total_steps=100)
    return rt


IDS = torch.randint(3, 90, (4, 6), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- runtime
def test_train_step_host_work_does_not_grow_with_the_users_loaded(monkeypatch):
    """A step of 2 users: the same lines and host reads with 40 or 300 users loaded (it was a
    pass over every user of every bank per step: the optimizer's layout sync, the slot -> user
    map, and the whole slot table read back per layer on the CPU path). Both sizes exceed the
    batch's tokens, which bound a plan's segment table."""
    reads = HostReads(monkeypatch)
    counts = {}
    for n in (40, 300):
        rt = runtime_with(n)
        batch = [0, n - 1, 0, n - 1]
        rt.train_step(IDS, batch)  # first step: plans, caches
        losses, lines = lines_run(rt.train_step, IDS, batch)
        reads.run(rt.train_step, IDS, batch)
        counts[n] = (lines, reads.elements)
        assert sorted(losses) == [0, n - 1]
        assert rt.optimizer.step_count(rt.slot(0)) == 3 and rt.optimizer.step_count(rt.slot(1)) == 0
    assert counts[300] == counts[40], counts


def test_add_and_remove_user_host_work_does_not_grow_with_the_users_loaded():
    counts = {}
    for n in (6, 130):
        rt = runtime_with(n)
        rt.remove_user(n - 1)  # the lowest free slot, above every other user's: taken first, as before
        _, add = lines_run(rt.add_user, "new", CFG, total_steps=10)
        assert rt.slot("new") == n - 1
        _, remove = lines_run(rt.remove_user, "new")
        counts[n] = (add, remove)
        rt.remove_user(1)
        for u in ("a", "b", "c"):
            rt.add_user(u, CFG)
        assert [rt.slot(u) for u in "abc"] == [1, n - 1, n]
    assert counts[130] == counts[6], counts


def test_slots_are_the_lowest_free_as_a_scan_would_pick():
    rng = random.Random(0)
    rt = MilpRuntime(tiny_model("llama"), max_users=12)
    held: dict[str, int] = {}
    for i in range(80):
        if held and (len(held) == 12 or rng.random() < 0.45):
            u = rng.choice(sorted(held))
            rt.remove_user(u)
            del held[u]
        else:
            u = f"u{i}"
            want = min(set(range(12)) - set(held.values()))
            rt.add_user(u, CFG)
            held[u] = want
        assert {u: rt.slot(u) for u in rt.users} == held
    with pytest.raises(ValueError, match="max_users=12"):
        for i in range(13):
            rt.add_user(f"x{i}", CFG)


def test_optimizer_follows_the_banks_after_compaction_and_growth():
    """The per-change sync falls back to a full one where rows moved (compaction, growth):
    moments follow their users, as a sync over every user did."""
    torch.manual_seed(0)
    rt = MilpRuntime(tiny_model("llama"), max_users=8, capacity=24)
    for u in range(6):
        rt.add_user(u, MemoryConfig.uniform(2, 1, 1 + u % 3), total_steps=50)  # 12 rows per bank
    for _ in range(2):
        rt.train_step(IDS, [0, 3, 4, 5])
    before = {u: rt.optimizer.user_state(rt.slot(u)) for u in (0, 3, 4, 5)}
    rt.remove_user(1)
    rt.remove_user(2)
    bank = rt.state.banks()[0]
    mark, _ = bank.layout_changes(None)
    version = bank.version
    rt.add_user(9, MemoryConfig.uniform(2, 2, 8), total_steps=50)  # 16 rows: only once compacted
    assert bank.layout_changes(mark)[1] is None and bank.version == version  # moved, not grown
    rt.add_user(10, MemoryConfig.uniform(2, 2, 8), total_steps=50)  # no room: grows
    assert bank.version > version
    for u in (0, 3, 4, 5):
        now = rt.optimizer.user_state(rt.slot(u))
        assert now.keys() == before[u].keys()
        for k in now:
            torch.testing.assert_close(now[k], before[u][k], rtol=0, atol=0)
    for u in (9, 10):
        assert all(not v.any() for v in rt.optimizer.user_state(rt.slot(u)).values())
    for i, b in enumerate(rt.state.banks()):  # the optimizer's map of rows is the bank's table
        ru = rt.optimizer._row_user[i].tolist()
        want = [-1] * b.capacity
        for s in b.users:
            seg = b.segment(s)
            want[seg.offset : seg.offset + seg.rank] = [s] * seg.rank
        assert ru == want
        assert rt.optimizer._layout[i] == {s: (b.segment(s).offset, b.segment(s).rank) for s in b.users}
    rt.train_step(IDS, [0, 9, 10, 5])


# --------------------------------------------------------------------------- optimizer step
class RowsUpdated(TorchDispatchMode):
    """The largest tensor an AdamW moment update (``lerp_``) ran over."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.lerp_:
            self.largest = max(self.largest, args[0].numel())
        return func(*args, **(kwargs or {}))


def test_a_step_of_a_few_users_updates_their_rows_not_the_bank():
    counts = {}
    for n in (8, 256):
        bank = kernels.AdapterBank(16, 16, max_users=n)
        for u in range(n):
            bank.add(u, [2], init="random")
        opt = PackedAdamW([bank], max_users=n)
        for u in range(n):
            opt.set_user(u)
        bank.lora_a.grad, bank.lora_b.grad = torch.ones_like(bank.lora_a), torch.ones_like(bank.lora_b)
        mode = RowsUpdated()
        with mode:
            opt.step([0, n - 1])  # the first and the last user: a span over the whole bank
        counts[n] = mode.largest
        assert counts[n] > 0
    assert counts[256] == counts[8] == 2 * 2 * 16, counts


def ragged(dtype, g):
    """Users 0 [3], 4 [2] far apart (users 1..3 between, one gap), all with random weights."""
    bank = kernels.AdapterBank(10, 8, max_users=6, dtype=dtype)
    for u, r in ((0, [3]), (1, [4]), (5, [2]), (2, [1, 2]), (3, [5]), (4, [2])):
        bank.add(u, r, init="random", generator=g)
    bank.remove(5)
    return bank


def bits(t):
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gathered_step_equals_stepping_each_user_alone_bitwise(dtype):
    """Users 0 and 4 stepped together (their rows gathered: the span between is mostly others')
    give bit for bit what stepping each alone gives (its own rows: a span), with clipping, and
    the rows between (others', free) untouched whatever their gradients hold."""
    banks = [ragged(dtype, torch.Generator().manual_seed(1)) for _ in range(2)]
    opts = [PackedAdamW([b], 6) for b in banks]
    cfgs = {0: AdamWConfig(lr=1e-2, max_grad_norm=0.5), 4: AdamWConfig(lr=3e-3, weight_decay=0.1),
            1: AdamWConfig()}
    for opt in opts:
        for u, c in cfgs.items():
            opt.set_user(u, c, total_steps=10)
    between = [t.detach().clone() for t in (banks[0].lora_a[3:14], banks[0].lora_b[3:14])]
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        ga = torch.randn(banks[0].lora_a.shape, generator=g).to(dtype)
        gb = torch.randn(banks[0].lora_b.shape, generator=g).to(dtype)
        ga[5] = float("nan")  # user 1's row: not stepped, must not matter
        for b in banks:
            b.lora_a.grad, b.lora_b.grad = ga.clone(), gb.clone()
        opts[0].step([4, 0])
        opts[1].step([0])
        opts[1].step([4])
    for x, y in ((banks[0].lora_a, banks[1].lora_a), (banks[0].lora_b, banks[1].lora_b)):
        assert torch.equal(bits(x), bits(y))
    for u in (0, 4):
        sj, sa = opts[0].user_state(u), opts[1].user_state(u)
        assert sj.keys() == sa.keys() and all(torch.equal(bits(sj[k]), bits(sa[k])) for k in sj if k != "step")
        assert opts[0].step_count(u) == 4
    for now, then in zip((banks[0].lora_a[3:14], banks[0].lora_b[3:14]), between):
        assert torch.equal(bits(now), bits(then))


def test_step_count_reads_nothing_back_from_the_device(monkeypatch):
    reads = HostReads(monkeypatch)
    bank = kernels.AdapterBank(4, 4, max_users=3)
    bank.add(1, [2])
    opt = PackedAdamW([bank], max_users=3)
    opt.set_user(1, total_steps=5)
    for _ in range(3):
        opt.step([1])
    state = opt.user_state(1)
    assert reads.run(opt.step_count, 1) == 3 and reads.calls == 0
    assert int(state["step"]) == 3
    opt.set_total_steps(1, 9)
    assert opt.step_count(1) == 3
    state["step"] = torch.tensor([7])
    opt.load_user_state(1, state)
    assert opt.step_count(1) == 7 == int(opt._step[1])
    opt.drop_user(1)
    assert opt.step_count(1) == 0


# --------------------------------------------------------------------------- store
@pytest.fixture(scope="module")
def store_of_many(tmp_path_factory):
    """40 saved users (copies of one save, each under its own id)."""
    root = tmp_path_factory.mktemp("many")
    writer = MilpRuntime(tiny_model("llama"), max_users=1)
    writer.add_user("s0", CFG, init="random", seed=0)
    writer.save_user("s0", root / user_dirname("s0"))
    for i in range(1, 40):
        d = root / user_dirname(f"s{i}")
        shutil.copytree(root / user_dirname("s0"), d)
        info = json.loads((d / "user.json").read_text())
        info["user"] = f"s{i}"
        (d / "user.json").write_text(json.dumps(info))
    return root


def test_evictions_and_row_batches_do_not_scan_or_sync_every_loaded_user(store_of_many, monkeypatch):
    """With every slot held by store users, a batch naming one new user evicts the least recently
    used without asking every loaded user whether it may go, and neither it nor ``row_batches``
    reads a step count back from the device per loaded user."""
    reads = HostReads(monkeypatch)
    counts = {}
    for slots in (4, 24):
        rt = MilpRuntime(tiny_model("llama"), max_users=slots, store=UserStore(store_of_many))
        with torch.no_grad():
            for i in range(slots):
                rt.forward(IDS[:1], [f"s{i}"])
        calls = []
        original = MilpRuntime._evictable

        def counted(self, user, _calls=calls, _original=original):
            _calls.append(user)
            return _original(self, user)

        with mock.patch.object(MilpRuntime, "_evictable", counted), torch.no_grad():
            reads.run(rt.forward, IDS[:1], [f"s{slots}"])
            evict = (len(calls), reads.calls)
            assert "s0" not in rt.users and f"s{slots}" in rt.users  # the least recently used went
            calls.clear()
            reads.run(lambda gen: list(gen), rt.row_batches(["s1", "s2", None], 2))
            batches = reads.calls
        counts[slots] = evict, batches
    assert counts[24] == counts[4], counts


def test_evictions_follow_least_recently_used_then_load_order(store_of_many):
    """The victims are those a stable sort of the loaded store users by last use (ties: load
    order) gives, over random batches with ties (several users per batch)."""
    rng = random.Random(3)
    slots = 5
    rt = MilpRuntime(tiny_model("llama"), max_users=slots, store=UserStore(store_of_many))
    loaded: list[str] = []
    last: dict[str, int] = {}
    t = 0
    for _ in range(30):
        need = list(dict.fromkeys(f"s{rng.randrange(9)}" for _ in range(rng.randint(1, 3))))
        missing = [u for u in need if u not in loaded]
        k = len(missing) - (slots - len(loaded))
        if k > 0:
            movable = sorted((u for u in loaded if u not in need), key=last.__getitem__)
            for u in movable[:k]:
                loaded.remove(u)
                del last[u]
        loaded += missing
        t += 1
        for u in need:
            last[u] = t
        with torch.no_grad():
            rt.forward(IDS[: len(need)], need)
        assert sorted(rt.users) == sorted(loaded)
