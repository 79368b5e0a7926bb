"""GrowingCache: a DynamicCache written in place. It gives generate() and ContinuousBatch the
tokens of Hugging Face's own cache on every supported architecture, copies O(n) bytes for n
steps (reallocations grow geometrically), survives what generate does to a cache from outside
(reordering rows, crops), and never lets attention read a column nobody wrote."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import milp.kvcache as kvcache
from milp.decode import ContinuousBatch, growing_cache_unsupported
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model
from milp.kvcache import GROWTH, MIN_ROOM, GrowingCache, SlotCache, cache_argument, stack_rows
from milp.pipeline import _growing_cache


def _cache_kw(model, cache) -> dict:
    return {cache_argument(model): cache}


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: a shorter prompt
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_generate_with_a_growing_cache_gives_the_default_caches_tokens(arch):
    model = tiny_model(arch).eval()
    ids, mask = _prompts(model.config.vocab_size)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False,
              pad_token_id=0)
    expect = model.generate(**kw)
    cache = GrowingCache(reach=ids.shape[1] + 30)
    got = model.generate(**kw, **_cache_kw(model, cache))
    assert torch.equal(got, expect)
    layers = cache.layers
    assert layers and all(isinstance(x, kvcache.GrowingLayer) for x in layers)
    assert all(x.get_seq_length() == ids.shape[1] + 29 for x in layers)  # the last token is never fed
    # 9 prompt columns grown to 38, x1.5 at least each time: 3 buffers per layer, not one per step
    assert cache.reallocations <= 3 * len(layers)
    assert all(x.capacity <= ids.shape[1] + 30 for x in layers)  # reach caps the room


def test_decode_steps_write_in_place_and_reallocate_geometrically():
    torch.manual_seed(0)
    cache = GrowingCache()
    k0, v0 = torch.randn(2, 3, 10, 4, dtype=torch.float64), torch.randn(2, 3, 10, 4, dtype=torch.float64)
    keys, values = cache.update(k0, v0, 0)
    ref_k, ref_v = [k0], [v0]
    moves, ptr = 1, keys.data_ptr()
    steps = 500
    for _ in range(steps):
        k, v = torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4, dtype=torch.float64)
        keys, values = cache.update(k, v, 0)
        ref_k.append(k)
        ref_v.append(v)
        if keys.data_ptr() != ptr:
            moves, ptr = moves + 1, keys.data_ptr()
    assert torch.equal(keys, torch.cat(ref_k, -2)) and torch.equal(values, torch.cat(ref_v, -2))
    assert moves == cache.reallocations
    # each buffer holds GROWTH x what it must: from 10 to 510 columns takes log_1.5(51) + 1 of them
    assert moves <= math.ceil(math.log(510 / 10) / math.log(GROWTH)) + 1
    assert cache.layers[0].capacity < 510 * GROWTH + MIN_ROOM


_OPS = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 20)),
    st.tuples(st.just("crop"), st.integers(1, 8)),
    st.tuples(st.just("reorder"), st.randoms(use_true_random=False)),
    st.tuples(st.just("select"), st.integers(0, 4)),  # rows kept in a new order, leading columns dropped
    st.tuples(st.just("leave"), st.tuples(st.integers(0, 5), st.integers(0, 3))),  # ContinuousBatch's leave
    st.tuples(st.just("join"), st.tuples(st.integers(1, 3), st.integers(1, 30))),  # ... and join
), min_size=1, max_size=14)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(*t.shape[:2], width - t.shape[2], t.shape[3]), t], 2)


@settings(max_examples=80, deadline=None)
@given(ops=_OPS, reach=st.one_of(st.none(), st.integers(1, 60)), rows=st.one_of(st.none(), st.integers(1, 6)))
def test_a_growing_layer_holds_what_a_dynamic_layer_holds(ops, reach, rows):
    """Any sequence of appends, crops (generate's assisted decoding), row reorders (beam search),
    row selections, and ContinuousBatch's leaves (rows from the end fill the places left) and
    joins (rows appended, right-aligned) leaves a GrowingCache with the keys and values of a
    DynamicCache put through the same by torch ops (float64, exact)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(len(ops))
    cache, ref = GrowingCache(reach=reach, rows=rows), DynamicCache()

    def rand(n: int, length: int) -> torch.Tensor:
        return torch.randn(n, 2, length, 4, generator=g, dtype=torch.float64)

    for op, arg in [("update", 5), *ops]:
        length, n = ref.get_seq_length(), ref.layers[0].keys.shape[0] if ref.layers else 3
        layer, r = (cache.layers[0], ref.layers[0]) if ref.layers else (None, None)
        if op == "update":
            k, v = rand(n, arg), rand(n, arg)
            got, want = cache.update(k, v, 0), ref.update(k, v, 0)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        elif op == "crop" and arg < length:
            cache.crop(-arg)
            ref.crop(-arg)
        elif op == "reorder":
            perm = list(range(n))
            arg.shuffle(perm)
            cache.reorder_cache(torch.tensor(perm))
            ref.reorder_cache(torch.tensor(perm))
        elif op == "select" and arg < length:
            index = torch.tensor([0, 2, 1, 1])[:n] % n
            layer.select(index, arg)
            r.keys, r.values = r.keys[index, :, arg:], r.values[index, :, arg:]
        elif op == "leave" and n > 1 and arg[1] < length:
            gone, kept = arg[0] % n, [j for j in range(n) if j != arg[0] % n]
            moves = [(n - 1, gone)] if gone < n - 1 else []
            layer.compact(moves, n - 1, arg[1])
            order = [n - 1 if j == gone else j for j in range(n - 1)]
            r.keys, r.values = r.keys[order, :, arg[1]:], r.values[order, :, arg[1]:]
            assert sorted(order) == kept
        elif op == "join" and layer is not None:
            add, width = arg[0], min(arg[1], length)
            if not layer.can_append(add, width):
                continue
            k, v = rand(add, width), rand(add, width)
            layer.append(k, v)
            r.keys = torch.cat([r.keys, _left_pad(k, length)])
            r.values = torch.cat([r.values, _left_pad(v, length)])
        assert cache.get_seq_length() == ref.get_seq_length()
        assert torch.equal(cache.layers[0].keys, ref.layers[0].keys)
        assert torch.equal(cache.layers[0].values, ref.layers[0].values)


def test_a_crop_costs_no_copy():
    cache = GrowingCache()
    x = torch.randn(1, 1, 8, 2)
    cache.update(x, x, 0)
    before = cache.reallocations
    cache.crop(-3)
    keys, _ = cache.update(x[..., :1, :], x[..., :1, :], 0)
    assert cache.reallocations == before and keys.shape[-2] == 6
    assert torch.equal(keys[..., :5, :], x[..., :5, :]) and torch.equal(keys[..., 5:, :], x[..., :1, :])


def _nan_buffers(monkeypatch):
    """Make every buffer the cache allocates start as NaN (what uninitialised memory may hold)."""
    real = kvcache._buffers

    def nan_filled(*args, **kwargs):
        return tuple(b.fill_(float("nan")) for b in real(*args, **kwargs))

    monkeypatch.setattr(kvcache, "_buffers", nan_filled)


def test_stack_rows_right_aligns_and_zeroes_the_padding(monkeypatch):
    _nan_buffers(monkeypatch)
    a = (torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    b = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    k, v = stack_rows([a, b], 5, 9)
    assert k.shape == (3, 2, 9, 4)
    want_k = torch.cat([torch.cat([torch.zeros(2, 2, 2, 4), a[0]], -2), b[0]])
    want_v = torch.cat([torch.cat([torch.zeros(2, 2, 2, 4), a[1]], -2), b[1]])
    assert torch.equal(k[:, :, :5], want_k) and torch.equal(v[:, :, :5], want_v)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_continuous_batching_never_reads_an_unwritten_column(monkeypatch, arch):
    """Buffers start as NaN: a row that joins a longer running batch (left-padded), rows that leave
    (leading columns dropped) and growth past a buffer must all give generate's tokens alone."""
    _nan_buffers(monkeypatch)
    model = tiny_model(arch).eval()
    model.generation_config.eos_token_id = None  # rows run to their lengths, in both
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = {k: torch.randint(3, vocab, (n,), generator=g).tolist() for k, n in (("a", 11), ("b", 3), ("c", 6))}
    limits = {"a": 5, "b": 40, "c": 30}
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=4)
    _each_alone(model, batch, prompts, limits, {"a": 0, "b": 2, "c": 4})


def _each_alone(model, batch: ContinuousBatch, prompts: dict, limits: dict, steps: dict) -> None:
    """Join each row of ``prompts`` before step ``steps[key]``, run ``batch`` until it is empty,
    and check each row's tokens are the ones ``model.generate`` gives it alone."""
    got: dict[str, list[int]] = {}
    for step in range(60):
        for key in [k for k, at in steps.items() if at == step]:
            batch.join(key, prompts[key], limits[key])
        for u in batch.step():
            assert u.error is None, u.error
            got[u.key] = u.tokens
        if not len(batch) and step >= max(steps.values()):
            break
    for key, prompt in prompts.items():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=limits[key], do_sample=False, pad_token_id=0)
        assert got[key] == out[0, len(prompt):].tolist(), key


def test_rows_join_and_leave_a_running_batch_in_its_buffers(monkeypatch):
    """A row that joins a running batch is written after its rows, and a row that leaves has its
    place taken by the last row: neither makes new buffers (nor copies the other rows), unless
    the joining prompt is longer than the batch's columns. Every row gets generate's tokens alone,
    buffers starting as NaN."""
    _nan_buffers(monkeypatch)
    model = tiny_model("llama").eval()
    model.generation_config.eos_token_id = None
    layers = model.config.num_hidden_layers
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=4)
    prompts = {"a": [5, 6, 7, 8, 9, 10], "b": [11, 12], "c": [13, 14, 15], "d": [16, 17, 18, 19] * 6}
    limits = {"a": 30, "b": 3, "c": 20, "d": 8}
    got: dict[str, list[int]] = {}

    def step() -> None:
        for u in batch.step():
            assert u.error is None, u.error
            got[u.key] = u.tokens

    batch.join("a", prompts["a"], limits["a"])
    step()
    cache = batch._cache
    assert cache is not None and cache.layers[0].row_capacity == 4  # the batch's first rows: room for max_rows
    buffers = [x._k.data_ptr() for x in cache.layers]
    moved = cache.reallocations
    batch.join("b", prompts["b"], limits["b"])  # shorter than the batch's columns: joins in place
    batch.join("c", prompts["c"], limits["c"])
    step()
    assert cache.reallocations == moved and [x._k.data_ptr() for x in cache.layers] == buffers
    assert batch.keys == ["a", "b", "c"]
    step()
    step()  # "b" ends: "c" takes its place, "a" stays
    assert batch.keys == ["a", "c"] and "b" in got and len(got["b"]) == 3
    assert cache.reallocations == moved and [x._k.data_ptr() for x in cache.layers] == buffers
    batch.join("d", prompts["d"], limits["d"])  # longer than the batch's columns: new buffers, once
    step()
    assert cache.reallocations == moved + layers
    while len(batch):
        step()
    for key, prompt in prompts.items():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=limits[key], do_sample=False, pad_token_id=0)
        assert got[key] == out[0, len(prompt):].tolist(), key


def test_the_cache_says_how_many_bytes_it_holds():
    """GrowingCache.nbytes: its buffers' bytes, room included; ContinuousBatch.cache_bytes: the
    running rows' cache and the prompts being prefilled (milp.serve's milp_kv_cache_bytes)."""
    cache = GrowingCache()
    assert cache.nbytes == 0
    x = torch.zeros(2, 3, 10, 4, dtype=torch.float16)
    cache.update(x, x, 0)
    cache.update(x, x, 1)
    layer = cache.layers[0]
    assert cache.nbytes == 2 * 2 * (2 * 3 * layer.capacity * 4 * 2) and layer.capacity >= 10
    model = tiny_model("llama").eval()
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=3, prefill_chunk=2)
    assert batch.cache_bytes == 0
    batch.join("a", list(range(3, 13)), 4)
    batch.step()  # a first chunk: the prefill's buffers only
    pending = batch.cache_bytes
    assert pending > 0 and batch._cache is None
    running = 0
    while len(batch):
        batch.step()
        if batch._cache is not None:  # its prompt done: the running row's buffers
            assert batch.cache_bytes == batch._cache.nbytes > 0
            running += 1
    assert running == 3 and batch.cache_bytes == 0  # 4 tokens: the last step ends it


def test_continuous_batching_reallocates_rarely_and_within_reach():
    model = tiny_model("llama").eval()
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=4)
    batch.join("a", [5, 6, 7, 8], 120)
    batch.join("b", [9, 4], 60)
    batch.step()
    cache = batch._cache
    assert cache is not None
    start = cache.reallocations
    for _ in range(119):
        batch.step()
        if batch._cache is not None:
            layer = batch._cache.layers[0]
            assert layer.capacity <= max(layer.get_seq_length(), batch._cache.reach)
    layers = model.config.num_hidden_layers
    # 4 prompt columns grown by 119: a handful of buffers per layer (a DynamicCache: one per step),
    # the selection when "b" left included
    assert cache.reallocations - start <= 8 * layers


def test_bad_input_is_refused_by_name():
    for bad in (0, -1, True, 2.5, "8"):
        with pytest.raises(ValueError, match="reach"):
            GrowingCache(reach=bad)
        with pytest.raises(ValueError, match="rows"):
            GrowingCache(rows=bad)
    cache = GrowingCache(rows=2)
    y = torch.zeros(2, 1, 3, 2)
    cache.update(y, y, 0)
    with pytest.raises(ValueError, match="cache's 2 rows, got 1"):  # copy_ would broadcast the one row
        cache.update(y[:1], y[:1], 0)
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="do not fit"):
        layer.append(y[:1], y[:1])  # no row left
    with pytest.raises(ValueError, match="compact needs moves"):
        layer.compact([(0, 1)], 1)
    x = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="width <= room"):
        stack_rows([(x, x)], 5, 4)
    with pytest.raises(ValueError, match="parts"):
        stack_rows([], 1, 4)
    with pytest.raises(RuntimeError, match="no keys"):
        GrowingCache()._layer().filled  # noqa: B018


def test_static_generation_uses_a_growing_cache_only_where_it_is_generates_own():
    model = tiny_model("llama")
    kw = _growing_cache(model, 40)
    assert len(kw) == 1 and isinstance(next(iter(kw.values())), GrowingCache)
    assert next(iter(kw.values())).reach == 40
    windowed = tiny_model("mistral", sliding_window=16)
    assert growing_cache_unsupported(windowed, 40) is not None and _growing_cache(windowed, 40) == {}
    assert _growing_cache(windowed, 12) != {}  # a window longer than the batch can grow changes nothing
    model.generation_config.cache_implementation = "static"  # the user asked for another cache
    assert _growing_cache(model, 40) == {}


def test_generate_responses_static_path_passes_a_growing_cache(monkeypatch, tiny_tokenizer):
    """generate_responses(batching='static') hands generate a GrowingCache reaching the batch's
    prompt width plus its new tokens; the answers are those of the default cache."""
    from milp.data import Record
    from milp.pipeline import generate_responses

    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    records = [Record(user_id="u", profile="", history=["h"], query=q, response="x") for q in ("hi there", "ok")]
    seen: list[GrowingCache] = []
    real = kvcache.GrowingCache.__init__

    def spy(self, reach=None):
        real(self, reach)
        seen.append(self)

    expect = generate_responses(model, tiny_tokenizer, records, max_new_tokens=6, batching="static", progress=False)
    assert seen == []  # not called through the spy yet
    monkeypatch.setattr(kvcache.GrowingCache, "__init__", spy)
    got = generate_responses(model, tiny_tokenizer, records, max_new_tokens=6, batching="static", progress=False)
    assert got == expect
    assert len(seen) == 1 and seen[0].get_seq_length() > 0 and seen[0].reach is not None


# ---------------------------------------------------------------- SlotCache (ContinuousBatch's max_length)
def test_a_slot_cache_writes_each_row_at_its_own_column():
    """A decode step writes row r's key and value at columns[r] (rows at different lengths), and
    attention gets the first ``width`` columns; place writes a prefill from column 0 and zeroes
    the rest of its row."""
    cache = SlotCache(rows=3, capacity=10)
    torch.manual_seed(0)
    pre = {0: torch.randn(2, 4, 3), 2: torch.randn(2, 7, 3)}
    for row, k in pre.items():
        cache.place(row, [(k, -k)])
    assert cache.columns.tolist() == [4, 0, 7]
    cache.width = 8
    step = torch.randn(3, 2, 1, 3)
    keys, values = cache.update(step, -step, 0)
    assert keys.shape == (3, 2, 8, 3) and cache.layers[0].keys is keys
    torch.testing.assert_close(keys[0, :, :4], pre[0], rtol=0, atol=0)
    torch.testing.assert_close(keys[0, :, 4], step[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[1, :, 0], step[1, :, 0], rtol=0, atol=0)  # an empty row: column 0
    torch.testing.assert_close(keys[2, :, 7], step[2, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(values, -keys, rtol=0, atol=0)
    cache.layers[0]._k.fill_(float("nan"))  # what a row with NaN keys leaves behind
    cache.place(0, [(pre[2][:, :2], pre[2][:, :2])])
    assert not cache.layers[0]._k[0].isnan().any() and cache.layers[0]._k[0, :, 2:].eq(0).all()
    assert cache.nbytes == 2 * 3 * 2 * 10 * 3 * 4


def test_a_slot_cache_refuses_bad_input_by_name():
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="rows must be an int >= 1"):
            SlotCache(rows=bad, capacity=4)
        with pytest.raises(ValueError, match="capacity must be an int >= 1"):
            SlotCache(rows=2, capacity=bad)
    cache = SlotCache(rows=2, capacity=4)
    x = torch.zeros(1, 3, 2)
    with pytest.raises(RuntimeError, match="written by SlotCache.place"):
        cache._layer().update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2))
    with pytest.raises(ValueError, match=r"row must be in \[0, 2\)"):
        cache.place(2, [(x, x)])
    with pytest.raises(ValueError, match="at most capacity=4"):
        cache.place(0, [(torch.zeros(1, 5, 2),) * 2])
    cache.place(0, [(x, x)])
    with pytest.raises(ValueError, match="the cache's 1 layers, got 2"):
        cache.place(1, [(x, x), (x, x)])
    with pytest.raises(ValueError, match="one token for each of its first step_rows=2 rows"):
        cache.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), 0)
    with pytest.raises(ValueError, match="one token for each of its first step_rows=2 rows"):
        cache.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)
    for bad in (0, 5, True):
        with pytest.raises(ValueError, match=r"width must be an int in \[1, capacity=4\]"):
            cache.width = bad
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match=r"step_rows must be an int in \[1, rows=2\]"):
            cache.step_rows = bad
    for row, length in ((2, 1), (-1, 1), (0, 0), (0, 5)):
        with pytest.raises(ValueError, match=r"row must be in \[0, 2\) and length in \[1, 4\]"):
            cache.row(row, length)
    with pytest.raises(RuntimeError, match="no rows to read before its first place"):
        SlotCache(rows=2, capacity=4).row(0, 1)


def test_a_slot_cache_step_runs_its_first_rows_and_a_row_moves_by_place():
    """``step_rows``: a step writes and reads the first rows only (the others untouched); a row's
    :meth:`SlotCache.row` placed into another row moves it (its columns, the rest zeroed)."""
    cache = SlotCache(rows=4, capacity=6)
    torch.manual_seed(1)
    pre = [torch.randn(2, n, 3) for n in (2, 5, 1, 3)]
    for row, k in enumerate(pre):
        cache.place(row, [(k, k + 1)])
    before = cache.layers[0]._k.clone()
    cache.step_rows, cache.width = 2, 6
    step = torch.randn(2, 2, 1, 3)
    keys, values = cache.update(step, step + 1, 0)
    assert keys.shape == (2, 2, 6, 3) and values.shape == (2, 2, 6, 3)
    torch.testing.assert_close(keys[1, :, 5], step[1, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0]._k[2:], before[2:], rtol=0, atol=0)  # rows 2 and 3 untouched
    cache.place(1, cache.row(3, 3))  # row 3 takes row 1's place
    assert cache.columns[1] == 3
    torch.testing.assert_close(cache.layers[0]._k[1, :, :3], pre[3], rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0]._v[1, :, :3], pre[3] + 1, rtol=0, atol=0)
    assert cache.layers[0]._k[1, :, 3:].eq(0).all()  # row 1's own columns past 3 zeroed


def test_the_compiled_write_is_an_opaque_op_writing_the_layer_in_place():
    """``milp::slot_cache_step`` (what a compiled step's layers call): the layer's first rows get
    the step's keys and values at their columns in its own buffers, and the views returned are of
    those buffers (no copy); its fake impl gives the real output's shape and strides
    (``torch.library.opcheck``); compiled, the graph holds the op and no write torch sees."""
    from operator import getitem

    from milp.kvcache import slot_cache_step

    cache = SlotCache(rows=3, capacity=8)
    torch.manual_seed(2)
    cache.place(0, [(torch.randn(2, 4, 3), torch.randn(2, 4, 3))])
    cache.place(1, [(torch.randn(2, 2, 3), torch.randn(2, 2, 3))])
    layer = cache.layers[0]
    k, v = torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3)
    keys, values = slot_cache_step(k, v, cache.columns, layer._key, 5)
    assert keys.shape == (2, 2, 5, 3) and keys.data_ptr() == layer._k.data_ptr() and keys.stride() == layer._k.stride()
    torch.testing.assert_close(layer._k[0, :, 4], k[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(layer._v[1, :, 2], v[1, :, 0], rtol=0, atol=0)
    assert layer._k[2].eq(0).all()  # a row past the step's untouched
    for check in ("test_schema", "test_faketensor", "test_aot_dispatch_static"):
        torch.library.opcheck(slot_cache_step, (k, v, cache.columns, layer._key, 5), test_utils=(check,))
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not getitem])
        return gm.forward

    cache.step_rows, cache.width = 2, 6
    cache.columns[:2] += 1
    step = torch.compile(lambda a, b: cache.update(a, b, 0), backend=backend, fullgraph=True)
    got_k, _ = step(-k, -v)
    assert got_k.shape == (2, 2, 6, 3) and graphs == [[torch.ops.milp.slot_cache_step.default]]
    torch.testing.assert_close(layer._k[1, :, 3], -k[1, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(got_k[0, :, 5], -k[0, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_a_static_batch_never_reads_a_stale_column(arch):
    """A static cache's rows hold what earlier rows left past their own columns (NaN here, as a
    row with NaN keys leaves): rows placed there later get generate's tokens alone."""
    model = tiny_model(arch).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = {k: torch.randint(3, vocab, (n,), generator=g).tolist() for k, n in (("a", 11), ("b", 3), ("c", 6))}
    limits = {"a": 5, "b": 12, "c": 9}
    batch = ContinuousBatch(model, eos_token_id=[], max_rows=2, max_length=32, row_buckets=[1])  # b moves to row 0
    batch.join("warm", [5, 6], 1)
    batch.step()  # the static cache allocated; the row ended
    for layer in batch._slots.layers:
        layer._k.fill_(float("nan"))
        layer._v.fill_(float("nan"))
    _each_alone(model, batch, prompts, limits, {"a": 0, "b": 2, "c": 6})  # c: in a's row, freed at step 4
