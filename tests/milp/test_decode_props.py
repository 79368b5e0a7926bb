"""ContinuousBatch under drawn schedules: rows of drawn prompts, lengths and users join at drawn
steps, some leave early, an end-of-text token ends others; each row's tokens are the ones
generate() gives it alone (a row that left: the start of them)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decode import USERS, alone, runtime  # tests/milp is on sys.path (pytest's rootdir-relative import)

from milp.decode import ContinuousBatch

_RUNTIMES: dict[str, object] = {}


def _runtime(arch: str):
    if arch not in _RUNTIMES:  # one per architecture: generate() alone is the reference, the model never changes
        rt = runtime(arch)
        rt.model.generation_config.eos_token_id = None
        _RUNTIMES[arch] = rt
    return _RUNTIMES[arch]


row = st.tuples(st.lists(st.integers(3, 90), min_size=1, max_size=12),  # prompt
                st.integers(1, 8),  # max_new_tokens
                st.sampled_from([*USERS, None]),  # user
                st.integers(0, 10),  # the step it joins before
                st.one_of(st.none(), st.integers(1, 8)))  # leaves this many steps after joining (None: stays)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])  # rotary, learned positions, OPT's offset positions
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(row, min_size=1, max_size=6), max_rows=st.integers(1, 6),
       eos=st.one_of(st.none(), st.integers(3, 90)), chunk=st.one_of(st.none(), st.integers(1, 8)),
       static=st.sampled_from([None, 20, 24]), buckets=st.booleans())
def test_drawn_schedules_give_each_row_its_tokens_alone(arch, rows, max_rows, eos, chunk, static, buckets):
    """... prompts prefilled whole or in drawn chunks (``prefill_chunk``), rows leaving while
    theirs is prefilled included; with the growing cache or a static one (``max_length``: 20, the
    longest a row may be, or 24), whose steps run every row or (``buckets``) as few as run, the
    rows moved to the first ones as others leave."""
    rt = _runtime(arch)
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=max_rows, eos_token_id=[] if eos is None else eos,
                            prefill_chunk=chunk, max_length=static,
                            row_buckets=list(range(1, max_rows + 1)) if static and buckets else None)
    queue = sorted(range(len(rows)), key=lambda i: rows[i][3])  # in order of arrival; a full batch: they wait
    got: dict[int, list[int]] = {}
    ended, joined_at, step = set(), {}, 0
    while queue or len(batch):
        for i, at in list(joined_at.items()):
            stay = rows[i][4]
            if i not in ended and stay is not None and step == at + stay:
                assert batch.leave(i) == got.get(i, [])  # [] while its prompt is prefilled
                ended.add(i)
        while queue and rows[queue[0]][3] <= step and batch.can_join(rows[queue[0]][2]):
            i = queue.pop(0)
            batch.join(i, rows[i][0], rows[i][1], rows[i][2])
            joined_at[i] = step
        for u in batch.step():
            assert u.error is None and u.tokens[:-1] == got.get(u.key, [])  # one more token a step
            got[u.key] = u.tokens
            if u.done:
                assert u.key not in ended
                ended.add(u.key)
        step += 1
        assert step < 200
    for i, (prompt, limit, user, _, _) in enumerate(rows):
        want = alone(rt, prompt, user, limit, eos)
        mine = got.get(i, [])
        assert mine == want[:len(mine)], f"row {i}"
        if rows[i][4] is None:  # stayed to its end
            assert mine == want, f"row {i}"
    assert len(batch) == 0 and batch._cache is None and batch._block is None
    assert batch._free == list(range(max_rows))
