"""Property tests of mixed-user generation and inference: ``MilpRuntime.generate`` / ``forward`` /
``using`` / ``row_slots`` / ``row_batches`` and the pipeline's ``generate_responses`` /
``response_losses`` as they drive them.

The reference for a user is the plain (uninjected) base model with that user's adapters merged
into its FFN weights (``W + Σ_j (α / r_j) B_j A_j``), run alone on the user's own prompt; ``None``
rows are the base model itself. Everything is float64 on the torch (CPU) path, so greedy tokens
must be equal and logits equal to rounding. Generation kwargs that change the rows per prompt
(``num_return_sequences``, beams, sampling), the ways to name users, masks, ``min_new_tokens``,
scores, a store with fewer slots than users, and a compiled decode step (forced on CPU) are drawn
or enumerated.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import milp
from milp.config import MemoryConfig
from milp.data import Record
from milp.inject import tiny_model
from milp.pipeline import generate_responses, response_losses
from milp.runtime import MilpRuntime, pad_sequences
from milp.store import UserStore, user_dirname

PAD = 0
TARGETS = ("gate_proj", "up_proj", "down_proj")
SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_BASE = tiny_model("llama").double()  # pristine, never injected
_BASE.generation_config.eos_token_id = None

#: the users of the shared runtime: both layers, layer 0 with per-module ranks, layer 1 only, no adapter
USERS = {
    0: MemoryConfig.uniform(2, modules=2, rank=4),
    1: MemoryConfig((True, False), (3, 0), ((1, 2, 8), 8), lora_alpha=8.0),
    "c": MemoryConfig((False, True), (0, 1), (8, 4), lora_alpha=4.0),
    "none": MemoryConfig((False, False), (0, 0), (8, 8)),
}
NAMES = [*USERS, None]


def fresh_runtime(max_users: int = len(USERS), **kw) -> MilpRuntime:
    return MilpRuntime(copy.deepcopy(_BASE), max_users=max_users, **kw)


def add_users(rt: MilpRuntime, users=USERS) -> MilpRuntime:
    for i, (u, cfg) in enumerate(users.items()):
        rt.add_user(u, cfg, init="random", seed=10 + i, total_steps=4)
    return rt


_RT: list[MilpRuntime] = []
_MERGED: dict = {}


def runtime() -> MilpRuntime:
    """The shared runtime holding every user of :data:`USERS` (never changed by a test)."""
    if not _RT:
        _RT.append(add_users(fresh_runtime()))
    return _RT[0]


def merged(rt: MilpRuntime, user) -> torch.nn.Module:
    """The base model with ``user``'s adapters (in ``rt``) merged into its weights."""
    m = copy.deepcopy(_BASE)
    if user is None:
        return m
    cfg, tensors = rt.config(user), rt.adapter_state(user)
    with torch.no_grad():
        for li in cfg.active_layers:
            for t in TARGETS:
                a, b = tensors[f"layers.{li}.mlp.{t}.lora_A"], tensors[f"layers.{li}.mlp.{t}.lora_B"]
                w, off = getattr(m.model.layers[li].mlp, t).weight, 0
                for r in cfg.layer_ranks(li):
                    w += (cfg.lora_alpha / r) * b[off:off + r].T @ a[off:off + r]
                    off += r
    return m


def ref(user) -> torch.nn.Module:
    """:func:`merged` of the shared runtime's ``user`` (cached)."""
    if user not in _MERGED:
        _MERGED[user] = merged(runtime(), user)
    return _MERGED[user]


def alone(model, row: list[int], **kw) -> list[int]:
    """The new tokens ``model`` generates from ``row`` alone."""
    with torch.no_grad():
        return model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                              **kw)[0, len(row):].tolist()


@st.composite
def batches(draw, min_size: int = 1, max_size: int = 4):
    users = draw(st.lists(st.sampled_from(NAMES), min_size=min_size, max_size=max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    rows = [torch.randint(3, 90, (draw(st.integers(1, 6)),), generator=g).tolist() for _ in users]
    return users, rows


def test_the_users_differ():
    """The premise of every comparison here: the users' adapters change the greedy tokens."""
    row = [5, 6, 7, 8]
    outs = {repr(u): tuple(alone(ref(u), row, max_new_tokens=5, do_sample=False, pad_token_id=PAD))
            for u in NAMES if u != "none"}
    assert len(set(outs.values())) == len(outs), outs


# ------------------------------------------------------------------ greedy rows = each user's merged model
@SETTINGS
@given(case=batches(), new=st.integers(1, 4), masked=st.booleans())
def test_greedy_rows_equal_each_users_merged_model_alone(case, new, masked):
    """Left-padded prompts of different lengths, with pad_sequences' mask or none (generate infers
    it from pad_token_id): row ``b`` is what ``users[b]``'s merged model generates alone, and a
    user without adapters, like ``None``, is the base model."""
    users, rows = case
    rt = runtime()
    ids, mask = pad_sequences(rows, PAD, side="left")
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    out = rt.generate(ids, users, attention_mask=mask if masked else None, **kw)
    S = ids.shape[1]
    assert out.shape == (len(rows), S + new) and torch.equal(out[:, :S], ids)
    for b, (u, r) in enumerate(zip(users, rows)):
        assert out[b, S:].tolist() == alone(ref(None if u == "none" else u), r, **kw), f"row {b} ({u!r})"


@SETTINGS
@given(case=batches(), new=st.integers(1, 3))
def test_ways_of_naming_users_agree(case, new):
    """One id for every row equals the id repeated (list or tuple); ``None`` equals ``[None] * B``
    and the base model; a mask of all ones equals no mask on unpadded prompts."""
    users, rows = case
    rt = runtime()
    L = len(rows[0])
    ids = torch.tensor([r[:L] + [3] * (L - len(r[:L])) for r in rows])
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    for u in (0, "c", None):
        one = rt.generate(ids, u, **kw)
        assert one.tolist() == rt.generate(ids, [u] * len(rows), **kw).tolist()
        assert one.tolist() == rt.generate(ids, tuple([u] * len(rows)), **kw).tolist()
    with torch.no_grad():
        assert rt.generate(ids, None, **kw).tolist() == _BASE.generate(ids, **kw).tolist()
    ones = torch.ones_like(ids)
    assert rt.generate(ids, users, attention_mask=ones, **kw).tolist() == rt.generate(ids, users, **kw).tolist()


def test_users_that_are_not_one_id_per_row_are_refused_by_name():
    rt = runtime()
    ids = torch.tensor([[5, 6], [7, 8]])
    with pytest.raises(TypeError, match="users must be a user id or a sequence"):
        rt.generate(ids, torch.tensor([0, 1]), max_new_tokens=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="users has 3 entries but the batch has 2 rows"):
        rt.generate(ids, [0, 1, None], max_new_tokens=1, pad_token_id=PAD)
    with pytest.raises(KeyError, match="unknown user 'zz'"):
        rt.forward(ids, ["zz", 0])
    with pytest.raises(ValueError, match="batch_size is needed"):
        with rt.using(0):
            pass


# ------------------------------------------------------------------ forward
@SETTINGS
@given(case=batches(), side=st.sampled_from(["left", "right"]))
def test_forward_on_padded_rows_equals_each_users_merged_model(case, side):
    """``forward`` of a padded mixed batch (``position_ids`` counting real tokens, as generate
    passes them): every real position of row ``b`` has the logits of ``users[b]``'s merged model on
    the row alone; ``using`` + ``model(...)`` is the same."""
    users, rows = case
    rt = runtime()
    ids, mask = pad_sequences(rows, PAD, side=side)
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens, as generate's
    with torch.no_grad():
        got = rt.forward(ids, users, attention_mask=mask, position_ids=pos).logits
        with rt.using(users) as slots:
            assert slots.tolist() == [-1 if u is None else rt.slot(u) for u in users]
            via_using = rt.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(via_using, got, rtol=0, atol=0)
    for b, (u, r) in enumerate(zip(users, rows)):
        with torch.no_grad():
            want = ref(None if u == "none" else u)(torch.tensor([r])).logits[0]
        on = mask[b].bool()
        torch.testing.assert_close(got[b][on], want, rtol=1e-9, atol=1e-10, msg=f"row {b} ({u!r})")


# ------------------------------------------------------------------ rows per prompt
@SETTINGS
@given(case=batches(max_size=3), k=st.integers(1, 3), new=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sampled_return_sequences_follow_their_prompts_user(case, k, new, seed):
    """Sampling ``num_return_sequences=k``: output row ``r`` belongs to prompt ``r // k`` and was
    sampled from that prompt's user's distribution (its logits at every step are the merged
    model's, teacher-forced on the prompt and the tokens sampled before)."""
    users, rows = case
    rt = runtime()
    ids, mask = pad_sequences(rows, PAD, side="left")
    torch.manual_seed(seed)
    out = rt.generate(ids, users, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=0,
                      num_return_sequences=k, pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    S = ids.shape[1]
    assert out.sequences.shape == (len(rows) * k, S + new)
    for r in range(len(rows) * k):
        b = r // k
        assert torch.equal(out.sequences[r, :S], ids[b])
        seq = torch.tensor([rows[b] + out.sequences[r, S:].tolist()])
        with torch.no_grad():
            want = ref(None if users[b] == "none" else users[b])(seq).logits[0]
        for i, step in enumerate(out.logits):
            # generate hands the step logits back in float32
            torch.testing.assert_close(step[r].double(), want[len(rows[b]) - 1 + i], rtol=1e-6, atol=1e-6,
                                       msg=f"row {r} step {i} ({users[b]!r})")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=batches(max_size=3), beams=st.integers(2, 3), data=st.data(), new=st.integers(1, 3))
def test_beam_search_rows_equal_each_prompt_alone(case, beams, data, new):
    """Beam search (``num_return_sequences <= num_beams``) from left-padded prompts of different
    lengths: the ``n`` rows of prompt ``b`` are what ``users[b]``'s merged model returns alone."""
    users, rows = case
    n = data.draw(st.integers(1, beams))
    rt = runtime()
    ids, mask = pad_sequences(rows, PAD, side="left")
    kw = dict(max_new_tokens=new, num_beams=beams, num_return_sequences=n, do_sample=False, pad_token_id=PAD)
    out = rt.generate(ids, users, attention_mask=mask, **kw)
    S = ids.shape[1]
    assert out.shape[0] == len(rows) * n
    for b, (u, r) in enumerate(zip(users, rows)):
        with torch.no_grad():
            one = ref(None if u == "none" else u).generate(torch.tensor([r]), **kw)[:, len(r):]
        got = out[b * n:(b + 1) * n, S:]
        assert got[:, :one.shape[1]].tolist() == one.tolist(), f"prompt {b} ({u!r})"
        assert bool((got[:, one.shape[1]:] == PAD).all())


# ------------------------------------------------------------------ eos, min_new_tokens, scores
@SETTINGS
@given(case=batches(), new=st.integers(1, 4), data=st.data(), eos_is_pad=st.booleans())
def test_eos_min_new_tokens_and_scores_equal_each_user_alone(case, new, data, eos_is_pad):
    """With an EOS some row produces, ``min_new_tokens`` and ``output_scores``: each row's tokens
    (to its EOS, then padding) and its processed scores at the steps it was still running are
    those of its user's merged model alone; EOS may equal the pad id."""
    users, rows = case
    rt = runtime()
    m = data.draw(st.integers(0, new))
    free = [alone(ref(None if u == "none" else u), r, max_new_tokens=new, do_sample=False, pad_token_id=PAD)
            for u, r in zip(users, rows)]
    eos = data.draw(st.sampled_from(sorted({t for f in free for t in f})))
    pad = eos if eos_is_pad else PAD
    kw = dict(max_new_tokens=new, min_new_tokens=m, do_sample=False, eos_token_id=eos, pad_token_id=pad,
              output_scores=True, return_dict_in_generate=True)
    ids, mask = pad_sequences(rows, pad, side="left")
    out = rt.generate(ids, users, attention_mask=mask, **kw)
    S = ids.shape[1]
    for b, (u, r) in enumerate(zip(users, rows)):
        with torch.no_grad():
            one = ref(None if u == "none" else u).generate(
                torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kw)
        want = one.sequences[0, len(r):].tolist()
        got = out.sequences[b, S:].tolist()
        assert got[:len(want)] == want and all(t == pad for t in got[len(want):]), f"row {b} ({u!r})"
        assert eos not in want[:m], "min_new_tokens"
        for i in range(len(want)):
            torch.testing.assert_close(out.scores[i][b], one.scores[i][0], rtol=1e-6, atol=1e-6,
                                       msg=f"row {b} step {i}")


# ------------------------------------------------------------------ state: training, removal, the store
def test_a_generate_between_train_steps_changes_nothing():
    """Training with a generate and a forward between the steps gives the adapters, optimizer
    state and losses of training without them; generating after is the merged model's."""
    g = torch.Generator().manual_seed(3)
    batches_ = [(torch.randint(3, 90, (4, 6), generator=g), [0, 1, "c", 0]) for _ in range(3)]
    a, b = add_users(fresh_runtime()), add_users(fresh_runtime())
    prompts = torch.randint(3, 90, (3, 4), generator=g)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    for ids, users in batches_:
        la = a.train_step(ids, users)
        b.generate(prompts, [0, "c", None], **kw)
        with torch.no_grad():
            b.forward(prompts, [1, None, 0])
        assert b.train_step(ids, users) == la
    for u in USERS:
        sa, sb = a.adapter_state(u), b.adapter_state(u)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), u
        oa, ob = a.optimizer.user_state(a.slot(u)), b.optimizer.user_state(b.slot(u))
        assert all(torch.equal(oa[k], ob[k]) for k in oa), u
    out = b.generate(prompts, [0, 1, "c"], **kw)
    for r, u in enumerate([0, 1, "c"]):
        assert out[r, 4:].tolist() == alone(merged(b, u), prompts[r].tolist(), **kw), u


def test_generate_after_remove_and_readd_uses_the_new_users_adapters():
    """A slot freed by ``remove_user`` and taken by another user (another layout) serves the new
    user's adapters, also in a batch with the same shape as before (no stale plan)."""
    rt = add_users(fresh_runtime())
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    rt.generate(ids, [1, 0], **kw)
    slot = rt.slot(1)
    rt.remove_user(1)
    rt.add_user("new", MemoryConfig.uniform(2, modules=3, rank=2), init="random", seed=77)
    assert rt.slot("new") == slot
    out = rt.generate(ids, ["new", 0], **kw)
    assert out[0, 3:].tolist() == alone(merged(rt, "new"), [5, 6, 7], **kw)
    assert out[1, 3:].tolist() == alone(merged(rt, 0), [8, 9, 10], **kw)


@pytest.fixture(scope="module")
def store_dir():
    d = Path(tempfile.mkdtemp(prefix="milp-gen-props-"))
    for u in USERS:
        runtime().save_user(u, d / user_dirname(u))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@SETTINGS
@given(data=st.data(), slots=st.integers(1, 3), pinned=st.booleans(), batch_size=st.integers(1, 5))
def test_row_batches_groups_are_placeable_maximal_and_in_order(store_dir, data, slots, pinned, batch_size):
    """With a store: the groups are ``order`` cut in pieces of at most ``batch_size`` rows; each
    group, placed in turn as the pipeline does, is admitted and computes each row's own tokens;
    a group ends early only where the next row would name one store user too many."""
    users = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8))
    order = data.draw(st.permutations(range(len(users))))
    rt = fresh_runtime(slots, store=UserStore(store_dir))
    if pinned:
        rt.add_user("p", MemoryConfig.uniform(2, modules=1, rank=2), init="random", seed=5)
        users = [("p" if u == "none" else u) for u in users]
    free = slots - (1 if pinned else 0)
    groups = list(rt.row_batches(users, batch_size, order))
    assert [i for gr in groups for i in gr] == list(order)
    for gi, gr in enumerate(groups):
        assert 1 <= len(gr) <= batch_size
        named = {users[i] for i in gr} - {None, "p"}
        if len(named) > free:  # a group that cannot be placed even alone: one store user, no slot
            assert free == 0 and len(named) == 1
            continue
        if gi + 1 < len(groups) and len(gr) < batch_size:
            nxt = users[groups[gi + 1][0]]
            assert nxt not in named and nxt not in (None, "p") and len(named) == free
        ids = torch.tensor([[5 + i, 6 + i] for i in gr])
        out = rt.generate(ids, [users[i] for i in gr], max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        for row, i in zip(out, gr):
            u = users[i]
            model = merged(rt, u) if u == "p" else ref(None if u == "none" else u)
            assert row[2:].tolist() == alone(model, [5 + i, 6 + i], max_new_tokens=2, do_sample=False,
                                             pad_token_id=PAD), f"row {i} ({u!r})"
        assert len(rt.users) <= slots


def test_row_batches_a_user_of_a_full_group_is_new_to_the_next(store_dir):
    """Was: ``row_batches`` decided whether a row's store user was new to the group before ending
    the group at ``batch_size``, against the ended group; a user of the ended group then took no
    count in the next one, which could name one store user more than the free slots: with 1
    free slot, users ``[1, 1, 1, 0]`` in groups of 2 gave ``[[0, 1], [2, 3]]`` (users 1 and 0),
    which ``using`` refuses ("only 1 slots can be freed")."""
    rt = fresh_runtime(1, store=UserStore(store_dir))
    assert list(rt.row_batches([1, 1, 1, 0], 2)) == [[0, 1], [2], [3]]
    pinned = fresh_runtime(2, store=UserStore(store_dir))
    pinned.add_user("p", MemoryConfig.uniform(2, modules=1, rank=2))
    assert list(pinned.row_batches([1, 1, 0, 1], 2, [0, 1, 3, 2])) == [[0, 1], [3], [2]]
    for group in rt.row_batches([1, 1, 1, 0], 2):
        with rt.using([[1, 1, 1, 0][i] for i in group]):
            pass


@pytest.fixture(scope="module")
def tok(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


_PIPE: dict = {}


def pipe_runtime(tok, store: Path | None = None, slots: int | None = None) -> MilpRuntime:
    """Users u0..u4 on a model of the tokenizer's vocabulary: all loaded, or from a store."""
    names = [f"u{i}" for i in range(5)]
    if "full" not in _PIPE:
        full = MilpRuntime(tiny_model("llama", vocab_size=len(tok)).double(), max_users=5)
        for i, u in enumerate(names):
            full.add_user(u, MemoryConfig((True, i % 2 == 0), (1 + i % 2, 1 if i % 2 == 0 else 0), (4, 8)),
                          init="random", seed=i)
        with torch.no_grad():
            for m in full.state.modules():
                m.bank.lora_b.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
        _PIPE["full"] = full
    if store is None:
        return _PIPE["full"]
    for u in names:
        if not (store / user_dirname(u)).exists():
            _PIPE["full"].save_user(u, store / user_dirname(u))
    return MilpRuntime(tiny_model("llama", vocab_size=len(tok)).double(), max_users=slots, store=UserStore(store))


QUERIES = ["What should I do?", "Is it serious?", "My knee hurts when I run. Is it serious?", "Rest?"]


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), max_size=6),
       batch_size=st.integers(1, 4), slots=st.integers(1, 3))
def test_generate_responses_through_a_store_equal_each_record_alone(tok, tmp_path_factory, picks, batch_size,
                                                                    slots):
    """``generate_responses``/``response_losses`` over records of any users (duplicates, more
    distinct users than slots, batch size 1, none at all) through a store with a few slots: one
    answer per record, in the records' order, each the record's own answer alone through a
    runtime holding every user."""
    records = [Record(f"u{u}", "", [f"history {u}"], QUERIES[q], "Rest.") for u, q in picks]
    full = pipe_runtime(tok)
    rt = pipe_runtime(tok, tmp_path_factory.mktemp("store"), slots)
    kw = dict(max_new_tokens=3, max_length=64, progress=False)
    got = generate_responses(rt.model, tok, records, runtime=rt, batch_size=batch_size, **kw)
    assert got == [generate_responses(full.model, tok, [r], runtime=full, **kw)[0] for r in records]
    losses = response_losses(rt.model, tok, records, runtime=rt, batch_size=batch_size, max_length=64)
    want = [response_losses(full.model, tok, [r], runtime=full, max_length=64)[0] for r in records]
    assert losses == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert len(rt.users) <= slots


def test_generate_responses_a_user_filling_a_batch_then_another_through_one_slot(tok, tmp_path):
    """Was: records of users ``[u0, u0, u0, u1]`` in batches of 2 through a store with one slot
    raised ValueError ("the batch needs 1 users loaded from the store but only 0 slots can be
    freed"): :func:`test_row_batches_a_user_of_a_full_group_is_new_to_the_next`."""
    records = [Record(u, "", ["history"], "What should I do?", "Rest.") for u in ("u0", "u0", "u0", "u1")]
    full = pipe_runtime(tok)
    rt = pipe_runtime(tok, tmp_path, 1)
    kw = dict(max_new_tokens=3, max_length=64, progress=False)
    got = generate_responses(rt.model, tok, records, runtime=rt, batch_size=2, **kw)
    assert got == [generate_responses(full.model, tok, [r], runtime=full, **kw)[0] for r in records]
    losses = response_losses(rt.model, tok, records, runtime=rt, batch_size=2, max_length=64)
    assert losses == pytest.approx([response_losses(full.model, tok, [r], runtime=full, max_length=64)[0]
                                    for r in records], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ a compiled decode step
def _compiled_runtime() -> MilpRuntime:
    """A runtime whose model's own generation config asks transformers to compile (as it does on a
    GPU for any compileable cache, with no compile_config at all; forced on CPU here)."""
    from transformers import CompileConfig

    rt = add_users(fresh_runtime())
    cc = CompileConfig(fullgraph=True, backend="eager")
    cc._compile_all_devices = True
    rt.model.generation_config.compile_config = cc
    return rt


def _static_cache(rt: MilpRuntime):
    from transformers import StaticCache

    return StaticCache(config=rt.model.config, max_cache_len=24)


COMPILED_CASES = {
    "cache_implementation=static": lambda rt: dict(cache_implementation="static"),
    "past_key_values=StaticCache": lambda rt: dict(past_key_values=_static_cache(rt)),
    "cache=StaticCache": lambda rt: dict(cache=_static_cache(rt)),
    "cache_implementation=sliding_window": lambda rt: dict(cache_implementation="sliding_window"),
    "prefill_chunk_size=2": lambda rt: dict(cache_implementation="static", prefill_chunk_size=2),
    "prefill_chunk_size=4, beams": lambda rt: dict(cache_implementation="static", prefill_chunk_size=4,
                                                   num_beams=2, num_return_sequences=2),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_decode_gives_the_eager_tokens(case):
    """Was: ``generate`` registered the static decode plan only for ``cache_implementation="static"``,
    a ``compile_config`` kwarg or a compileable ``past_key_values``. transformers (5.x) also
    compiles with a StaticCache passed as ``cache`` (the new name of ``past_key_values``), with the
    other cache implementations that build one (``offloaded_static``, the deprecated
    ``sliding_window``/``hybrid``…), and it compiles a chunked prefill (``prefill_chunk_size``)
    too: each raised "no static plan for activations of leading shape …" under torch.compile (on
    a GPU with no compile_config at all). Now every such decode shape and each prefill chunk's
    shape gets its static plan, and the tokens are the eager ones."""
    import torch._dynamo
    import transformers

    if case == "cache=StaticCache" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 names the cache past_key_values only (cache= is refused as unused)")
    ids, mask = pad_sequences([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], PAD, side="left")
    users = [0, None, "c"]
    rt = _compiled_runtime()
    torch._dynamo.reset()
    extra = COMPILED_CASES[case](rt)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    eager_extra = {k: v for k, v in extra.items() if k in ("num_beams", "num_return_sequences")}
    want = add_users(fresh_runtime()).generate(ids, users, attention_mask=mask, **gen, **eager_extra)
    got = rt.generate(ids, users, attention_mask=mask, **gen, **extra)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("kw, compiles", [
    (dict(), False),
    (dict(cache_implementation="static"), True),
    (dict(cache_implementation="offloaded_static"), True),
    (dict(cache_implementation="hybrid"), True),
    (dict(cache_implementation="dynamic"), False),
])
def test_which_generate_calls_compile_the_decode_step(kw, compiles):
    """Was: ``offloaded_static`` (and the deprecated static names) did not count as a compiled
    decode: see :func:`test_compiled_decode_gives_the_eager_tokens` (offloading needs CUDA, so
    only the decision is checked here)."""
    assert runtime()._compiles_decode(kw) is compiles


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 12))
@example(n=9, chunk=4)
def test_prefill_chunks_are_the_lengths_torch_split_makes(n, chunk):
    """The prefill chunk shapes registered for a compiled chunked prefill are those transformers
    makes (``torch.split`` of the prompt), none without ``prefill_chunk_size``."""
    rt = runtime()
    want = sorted({c.shape[-1] for c in torch.split(torch.zeros(1, n), chunk, dim=-1)})
    assert rt._prefill_chunks({"prefill_chunk_size": chunk}, n) == want
    assert rt._prefill_chunks({}, n) == []


# ------------------------------------------------------------------ nested batches and the store
def _nested_store_runtime(store_dir) -> MilpRuntime:
    return fresh_runtime(2, store=UserStore(store_dir))


@SETTINGS
@given(outer=st.lists(st.sampled_from([0, 1, "c", None]), min_size=1, max_size=3).filter(
           lambda us: len({u for u in us if u is not None}) <= 2),  # the block itself fits the 2 slots
       inner=st.lists(st.sampled_from([0, 1, "c", None]), min_size=1, max_size=2))
@example(outer=[0, 1], inner=["c"])
def test_a_nested_batch_never_swaps_the_adapters_of_the_enclosing_block(store_dir, outer, inner):
    """Was: inside ``using(outer)`` on a runtime with a store (2 slots here), a nested call
    (``forward``/``generate``/``using``) naming another store user evicted a user of the open
    block and loaded the new one into its slot; the block's later forwards then ran that row on
    the new user's adapters, silently. Now the nested batch is placed without evicting a user
    of an open block, or refused by name with nothing changed; the outer rows stay their own."""
    rt = _nested_store_runtime(store_dir)
    ids = torch.tensor([[5 + b, 6, 7] for b in range(len(outer))])
    inner_ids = ids[:1].repeat(len(inner), 1)
    want = [ref(u)(ids[b:b + 1]).logits[0] for b, u in enumerate(outer)]
    busy = {u for u in outer if u is not None}
    with torch.no_grad(), rt.using(outer):
        before = rt.model(ids).logits
        fits = len(busy | {u for u in inner if u is not None}) <= rt.max_users
        if fits:
            got_inner = rt.forward(inner_ids, inner).logits
            for b, u in enumerate(inner):
                torch.testing.assert_close(got_inner[b], ref(u)(inner_ids[b:b + 1]).logits[0], rtol=1e-9, atol=1e-10)
        else:
            users = rt.users
            with pytest.raises(ValueError, match="in use by an enclosing using"):
                rt.forward(inner_ids, inner)
            assert rt.users == users
        after = rt.model(ids).logits
    for b, u in enumerate(outer):
        torch.testing.assert_close(before[b], want[b], rtol=1e-9, atol=1e-10, msg=f"row {b} ({u!r}) before")
        torch.testing.assert_close(after[b], want[b], rtol=1e-9, atol=1e-10, msg=f"row {b} ({u!r}) after")
    assert rt._active == []
    # after the block its users may go again
    two = torch.tensor([[5, 6], [7, 8]])
    rt.forward(two, ["none", None])
    rt.forward(two, [1, "c"])


def test_milp_exports_the_runtime():
    assert milp.MilpRuntime is MilpRuntime
