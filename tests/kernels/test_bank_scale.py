"""AdapterBank at the scale of thousands of users: the host work of one add/remove does not
grow with the users the bank holds, and :meth:`AdapterBank.layout_changes` reports exactly the
users whose segment changed (what lets an optimizer follow the bank per change, not per user).

No timings (the project's rule): complexity shows as the Python lines one operation runs in
``kernels/bank.py`` (a loop over the users or the free runs runs a line per element), at two sizes.
"""
from __future__ import annotations

import torch

import kernels
from kernels import AdapterBank
from tests.host_work import lines_run as _lines_run

BANK_FILE = kernels.bank.__file__


def lines_run(fn, *args, **kwargs):
    """:func:`tests.host_work.lines_run` over kernels/bank.py."""
    return _lines_run(fn, *args, files=(BANK_FILE,), **kwargs)


def bank_of(n: int, rank: int = 1) -> AdapterBank:
    bank = AdapterBank(4, 4, max_users=n + 1, capacity=2 * (n + 1) * rank)
    for u in range(n):
        bank.add(u, [rank], init="zeros")
    return bank


def test_add_and_remove_do_not_scan_every_user():
    counts = {}
    for n in (16, 512):
        bank = bank_of(n)
        _, add = lines_run(bank.add, n, [2], init="zeros")
        _, remove = lines_run(bank.remove, n)
        counts[n] = (add, remove)
        assert bank.used_rows == n  # the running count matches the segments
    assert counts[512] == counts[16], counts


def test_remove_in_a_fragmented_bank_does_not_walk_every_free_run():
    counts = {}
    for n in (32, 1024):
        bank = bank_of(n)
        for u in range(0, n, 2):  # every other user gone: n/2 free runs
            bank.remove(u)
        free = list(bank._free)
        _, counts[n] = lines_run(bank.remove, n - 1)  # between two free runs: both merge
        # the free list is what a sort and merge of every run gives
        merged = sorted(free + [(n - 1, 1)])
        want = []
        for s, k in merged:
            if want and want[-1][0] + want[-1][1] == s:
                want[-1] = (want[-1][0], want[-1][1] + k)
            else:
                want.append((s, k))
        assert bank._free == want
    assert counts[1024] == counts[32], counts


def test_layout_changes_names_the_users_changed_since_a_mark():
    bank = AdapterBank(4, 4, max_users=8)
    mark, users = bank.layout_changes(None)
    assert users is None  # no mark: re-read the whole table
    bank.add(3, [2])
    bank.add(5, [1, 1])
    bank.remove(3)
    mark2, users = bank.layout_changes(mark)
    assert users == {3, 5}
    assert bank.layout_changes(mark2)[1] == set()
    bank.add(5, [4])  # replaced: one change of user 5
    assert bank.layout_changes(mark2)[1] == {5}
    assert bank.layout_changes(mark)[1] == {3, 5}  # an older mark sees all since


def test_layout_changes_is_unknown_after_rows_of_others_move():
    bank = AdapterBank(4, 4, max_users=8)
    for u in range(4):
        bank.add(u, [2], init="random")
    mark, _ = bank.layout_changes(None)
    bank.compact()  # nothing to move: the mark holds
    mark, users = bank.layout_changes(mark)
    assert users == set()
    bank.remove(0)
    bank.compact()  # users 1..3 moved
    mark, users = bank.layout_changes(mark)
    assert users is None
    state = bank.state_dict()
    other = AdapterBank(4, 4, max_users=8)
    other_mark, _ = other.layout_changes(None)
    other.load_state_dict(state)  # a loaded table replaces every segment
    assert other.layout_changes(other_mark)[1] is None
    assert other.users == [1, 2, 3] and other.used_rows == 6


def test_a_long_journal_ends_the_epoch():
    bank = AdapterBank(4, 4, max_users=2, capacity=4)
    mark, _ = bank.layout_changes(None)
    for _ in range(100):  # far more changes than users: a full re-read is as cheap
        bank.add(0, [1])
        bank.remove(0)
    assert bank.layout_changes(mark)[1] is None
    assert len(bank._journal) <= 2 * bank.max_users + 64


def test_used_rows_follows_every_change():
    g = torch.Generator().manual_seed(0)
    bank = AdapterBank(4, 4, max_users=16)
    for step in range(200):
        u = int(torch.randint(16, (1,), generator=g))
        if bank.has(u) and step % 3 == 0:
            bank.remove(u)
        else:
            bank.add(u, [int(r) for r in torch.randint(1, 5, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                          generator=g)])
        if step % 50 == 0:
            bank.compact()
        assert bank.used_rows == sum(bank.segment(v).rank for v in bank.users)
