"""ContinuousBatch: rows joining and leaving a running greedy decode get the tokens generate()
gives each alone, with their own users' adapters, on every supported architecture."""
from __future__ import annotations

import threading

import pytest
import torch

from milp.config import MemoryConfig
from milp.decode import ContinuousBatch, Update, continuous_unsupported
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model
from milp.runtime import MilpRuntime
from milp.store import UserStore, user_dirname

USERS = {"a": MemoryConfig.uniform(2, modules=2, rank=4), "b": MemoryConfig((True, False), (1, 0), (8, 8)),
         7: MemoryConfig.uniform(2, modules=1, rank=2)}


def runtime(arch: str = "llama", max_users: int = 4, **model_kw) -> MilpRuntime:
    rt = MilpRuntime(tiny_model(arch, **model_kw), max_users=max_users)
    for i, (u, cfg) in enumerate(USERS.items()):
        rt.add_user(u, cfg, init="random", seed=10 + i)
    return rt


def alone(rt: MilpRuntime, prompt: list[int], user, limit: int, eos=None) -> list[int]:
    """What generate() gives ``prompt`` alone: its new tokens (to the end-of-text token, included)."""
    pad = rt.model.config.pad_token_id or 0
    kw = {} if eos is None else {"eos_token_id": eos}
    out = rt.generate(torch.tensor([prompt]), [user], max_new_tokens=limit, do_sample=False, pad_token_id=pad, **kw)
    new = out[0, len(prompt):].tolist()
    stop = rt.model.generation_config.eos_token_id if eos is None else eos
    if stop is not None and stop in new:
        new = new[:new.index(stop) + 1]
    return new


def drive(batch: ContinuousBatch, joins: dict[int, list[tuple]], leaves: dict[int, list] | None = None,
          widths: list[int] | None = None, last: dict | None = None) -> tuple[dict, list[Update]]:
    """Step ``batch`` until it is empty: ``joins[s]`` (key, prompt, limit, user) join before step
    ``s``, ``leaves[s]`` keys leave before it. Returns each key's last tokens (``last``: those of
    the steps taken before), and every update."""
    last = {} if last is None else last
    seen: list[Update] = []
    step = 0
    while len(batch) or any(s >= step for s in joins):
        for key in (leaves or {}).get(step, []):
            left = batch.leave(key)
            assert left is None or left == last.get(key, [])
        for key, prompt, limit, user in joins.get(step, []):
            assert batch.can_join(user)
            batch.join(key, prompt, limit, user)
        for u in batch.step():
            assert u.error is None, u.error
            assert u.tokens[:-1] == last.get(u.key, []), "a row's tokens only grow, one per step"
            last[u.key] = u.tokens
            seen.append(u)
        if widths is not None and batch._mask is not None:
            widths.append(batch._mask.shape[1])
        step += 1
        assert step < 200
    return last, seen


def check_alone(rt: MilpRuntime, got: dict, joins: dict[int, list[tuple]], left: tuple = ()) -> None:
    """Each row of ``joins`` (as :func:`drive` takes them) got the tokens ``generate`` gives it
    alone (a row of ``left``, which left early: the start of them)."""
    for key, prompt, limit, user in [j for js in joins.values() for j in js]:
        want = alone(rt, prompt, user, limit)
        assert got[key] == (want[:len(got[key])] if key in left else want), key


class AotGraphs:
    """A ``torch.compile`` backend that traces as the ``cudagraphs`` backend does (dynamo, then
    AOT autograd: functionalized, fake tensors) and runs the graph as traced, recording each
    graph's ops (``graphs``) and counting dynamo's graphs (``frame_count``)."""

    def __init__(self) -> None:
        self.frame_count, self.graphs = 0, []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def record(graph, inputs):
            self.graphs.append([n.target for n in graph.graph.nodes if n.op == "call_function"])
            return make_boxed_func(graph.forward)

        self.frame_count += 1
        return aot_autograd(fw_compiler=record, inference_compiler=record)(gm, example_inputs)


def check_no_cache_copy(graphs: list, layers: int) -> None:
    """No traced step writes the static cache where torch sees it (a functionalized write is a
    copy of the whole cache per layer, written back): each layer's write is one opaque
    ``milp::slot_cache_step``."""
    aten = torch.ops.aten
    copies = {aten.copy_.default, aten.copy.default, aten.scatter.src, aten.slice_scatter.default,
              aten.index_put.default, aten.index_copy.default, aten.select_scatter.default}
    assert graphs
    for ops in graphs:
        assert not copies & set(ops), sorted(map(str, copies & set(ops)))
        assert ops.count(torch.ops.milp.slot_cache_step.default) == layers


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("chunk,static", [(None, None), (3, None), (None, 24)],
                         ids=["whole", "chunked", "static"])  # chunks of 3 tokens a step (1 per row of 2);
@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHITECTURES))  # static: a SlotCache of 24 columns a row, its
def test_rows_joining_a_running_batch_get_their_tokens_alone(arch, chunk, static):  # steps of 1, 2, 4 or 6 rows
    rt = runtime(arch)
    rt.model.generation_config.eos_token_id = None  # every row runs to its length: the most steps compared
    assert continuous_unsupported(rt.model, reach=64) is None
    ps = prompts(6, seed=1)
    users = ["a", None, "b", 7, "a", None]
    limits = [7, 2, 9, 4, 6, 3]
    at = [0, 0, 1, 3, 3, 8]  # two join together, one a step later, two more, one after a gap
    joins: dict[int, list[tuple]] = {}
    for i, s in enumerate(at):
        joins.setdefault(s, []).append((i, ps[i], limits[i], users[i]))
    buckets = [1, 2, 4] if static else None  # rows that leave have their place taken: moved rows' caches copied
    got, _ = drive(ContinuousBatch(rt.model, runtime=rt, max_rows=6, prefill_chunk=chunk, max_length=static,
                                   row_buckets=buckets), joins)
    for i in range(6):
        assert got[i] == alone(rt, ps[i], users[i], limits[i]), f"row {i} (user {users[i]!r})"


def test_rows_of_one_prompt_and_user_are_prefilled_once():
    """Rows joining together with one prompt and one user (a request's n choices) share one
    prefill row; each still gets its own tokens: sampled with its own seed, greedy as alone."""
    from milp.sampling import Sampling

    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    p, q = prompts(2, seed=3)
    rows: list[int] = []
    handle = rt.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape),
                                                with_kwargs=True)
    joins = [("s0", p, "a", Sampling(0.9, seed=1)), ("s1", p, "a", Sampling(0.9, seed=2)), ("g", p, "a", None),
             ("other user", p, "b", None), ("other prompt", q, "a", None)]
    try:
        batch = ContinuousBatch(rt.model, runtime=rt, max_rows=8)
        for key, prompt, user, sampling in joins:
            batch.join(key, prompt, 5, user, sampling=sampling)
        got: dict = {}
        while len(batch):
            got.update((u.key, u.tokens) for u in batch.step())
    finally:
        handle.remove()
    assert rows[0][0] == 3  # the prefill: p for "a", p for "b", q for "a"
    for key, prompt, user, sampling in joins:  # each row as it is alone
        one = ContinuousBatch(rt.model, runtime=rt, max_rows=1)
        one.join(key, prompt, 5, user, sampling=sampling)
        while len(one):
            alone_tokens = [u.tokens for u in one.step()][-1]
        assert got[key] == alone_tokens, key
    assert got["s0"] != got["s1"]  # the seeds differ


def test_a_long_prompt_is_prefilled_in_chunks_beside_the_running_rows():
    """With prefill_chunk, a 20-token prompt that joins a running row is prefilled 4 columns a
    step: the running row gets a token at every one of those steps, each step runs its decode
    and one chunk, and the new row gets its first token at the step of its last chunk, the
    tokens it gets alone."""
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    short, long = prompts(1, seed=4)[0], list(range(3, 23))
    shapes: list[tuple[int, int]] = []
    handle = rt.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                with_kwargs=True)
    try:
        batch = ContinuousBatch(rt.model, runtime=rt, max_rows=2, prefill_chunk=4)
        batch.join("running", short, 12, "a")
        got: dict = {}
        while "running" not in got:  # its own prompt's chunks
            got.update((u.key, u.tokens) for u in batch.step())
        shapes.clear()
        batch.join("long", long, 3, "b")
        for step in range(5):
            updates = {u.key: u for u in batch.step()}
            assert set(updates) == ({"running", "long"} if step == 4 else {"running"}), step
            got.update((k, u.tokens) for k, u in updates.items())
        assert shapes == [(1, 1), (1, 4)] * 5  # a decode step and a chunk, five times
        assert len(batch) == 2 and batch.keys == ["running", "long"]
        got, _ = drive(batch, {}, last=got)
    finally:
        handle.remove()
    assert got["running"] == alone(rt, short, "a", 12) and got["long"] == alone(rt, long, "b", 3)


def test_a_row_that_leaves_while_its_prompt_is_prefilled_leaves_the_others_of_its_prefill():
    """Three rows join together, two of them one prompt and user (prefilled once): the one whose
    prompt's row the other copies leaves after the first chunk, and the rows left get their
    tokens alone."""
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    p, q = prompts(2, seed=5)
    p = p + list(range(3, 13))  # at least 3 chunks
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=4, prefill_chunk=4)
    for key, prompt in (("first", p), ("copy", p), ("other", q)):
        batch.join(key, prompt, 5, "a")
    assert batch.step() == []  # the first chunk (2 prompts of 2 columns)
    assert batch.leave("first") == [] and batch.keys == ["copy", "other"] and len(batch) == 2
    got, _ = drive(batch, {})
    assert "first" not in got and got["copy"] == alone(rt, p, "a", 5) and got["other"] == alone(rt, q, "a", 5)
    batch.join("x", p, 2, "b")
    batch.step()
    assert batch.leave("x") == [] and len(batch) == 0 and batch.step() == [] and batch._cache is None


def test_a_row_ends_at_its_end_of_text_token_and_one_that_leaves_keeps_the_others_as_they_were():
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    ps = prompts(4, seed=2)
    free = alone(rt, ps[0], "a", 8)
    eos = free[3]  # row 0 says it fourth: it ends there (and the others where they say it, if they do)
    joins = {0: [(0, ps[0], 8, "a"), (1, ps[1], 8, "b")], 2: [(2, ps[2], 8, None), (3, ps[3], 8, 7)]}
    widths: list[int] = []
    got, seen = drive(ContinuousBatch(rt.model, runtime=rt, eos_token_id=eos, max_rows=4), joins,
                      leaves={3: [1]}, widths=widths)
    assert got[0] == free[:free.index(eos) + 1] and got[0][-1] == eos
    assert [u.done for u in seen if u.key == 0][-1] and sum(u.done for u in seen if u.key == 0) == 1
    assert got[1] == alone(rt, ps[1], "b", 8, eos)[:3]  # left before step 3: the three tokens it had
    assert not any(u.done for u in seen if u.key == 1)  # it left: no update ends it
    for i, u in ((2, None), (3, 7)):
        assert got[i] == alone(rt, ps[i], u, 8, eos)
    # the cache never grows past the longest row since the oldest running one joined
    assert max(widths) <= max(len(p) for p in ps) + 8


def test_the_cache_drops_the_columns_no_running_row_uses():
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    long, short = list(range(3, 40)), [5, 6]
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=2)
    widths: list[int] = []
    got, _ = drive(batch, {0: [("long", long, 3, "a")], 1: [("short", short, 10, "b")]}, widths=widths)
    assert widths[:2] == [len(long), len(long) + 1]  # the short row joined padded to the long one's length
    assert widths[2] == len(short) + 1  # the long row left: the short row's own columns only (one token fed)
    assert widths[-1] == len(short) + 8  # its ninth token fed
    assert got["short"] == alone(rt, short, "b", 10) and got["long"] == alone(rt, long, "a", 3)


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_row_whose_prefill_fails_gets_the_error_and_the_others_go_on(monkeypatch, chunk):
    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    ps = prompts(3, seed=3)
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=4, prefill_chunk=chunk)
    batch.join("ok", ps[0], 12, "a")  # runs on while the others' chunks are prefilled
    last: dict = {}
    while "ok" not in last:  # its prompt's chunks
        last.update((u.key, u.tokens) for u in batch.step())
    real = rt.using

    def using(users, *a, **k):
        if "b" in list(users):  # the group's prefill, then b's alone
            raise OSError("user b's adapters are damaged")
        return real(users, *a, **k)

    monkeypatch.setattr(rt, "using", using)
    batch.join("bad", ps[1], 4, "b")
    batch.join("fine", ps[2], 4, 7)
    updates: dict = {}
    while "fine" not in updates:  # the group's first chunk fails: then each row's chunks, alone
        for u in batch.step():
            assert u.key not in updates or u.key == "ok"
            updates[u.key] = u
    assert isinstance(updates["bad"].error, OSError) and updates["bad"].done and updates["bad"].tokens == []
    assert updates["ok"].error is None and updates["fine"].error is None
    assert sorted(batch.keys, key=str) == ["fine", "ok"]
    monkeypatch.undo()
    got, _ = drive(batch, {}, last={k: u.tokens for k, u in updates.items() if k != "bad"})
    assert got["ok"] == alone(rt, ps[0], "a", 12) and got["fine"] == alone(rt, ps[2], 7, 4)


def test_a_failed_step_ends_every_running_row_and_the_batch_goes_on(monkeypatch):
    rt = runtime()
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=4)
    batch.join("x", [5, 6], 5, "a")
    batch.join("y", [7], 5, None)
    batch.step()

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batch, "_forward", boom)
    updates = batch.step()
    assert {u.key for u in updates} == {"x", "y"} and all(u.done and isinstance(u.error, RuntimeError)
                                                         for u in updates)
    assert len(batch) == 0
    monkeypatch.undo()
    rt.model.generation_config.eos_token_id = None
    got, _ = drive(batch, {0: [("z", [5, 6], 3, "b")]})
    assert got["z"] == alone(rt, [5, 6], "b", 3)


def test_the_runtime_is_free_for_other_threads_once_the_rows_end():
    rt = runtime()
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=2)
    batch.join(0, [5, 6, 7], 2, "a")
    batch.step()
    batch.step()  # the decode step held the runtime's using block; the row ended: released

    def other() -> None:
        with rt.using(["b"]):
            pass

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    batch.join(1, [5, 6, 7], 5, "a")
    batch.step()
    batch.step()
    batch.close()  # rows still running: close() releases the block
    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive() and len(batch) == 0


def test_a_store_backed_runtime_lets_in_only_the_users_it_can_place(tmp_path):
    writer = runtime()
    for u in USERS:
        writer.save_user(u, tmp_path / user_dirname(u))
    rt = MilpRuntime(tiny_model("llama"), max_users=2, store=UserStore(tmp_path))
    rt.model.generation_config.eos_token_id = None
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=4)
    batch.join(0, [5, 6], 6, "a")
    assert batch.can_join("b") and batch.can_join("a") and batch.can_join(None)
    batch.join(1, [7, 8, 9], 6, "b")
    last = {u.key: u.tokens for u in batch.step()}
    assert not batch.can_join(7)  # two slots, both in use by running rows
    assert batch.can_join("a") and batch.can_join(None)
    batch.join(2, [3], 2, None)
    got, _ = drive(batch, {}, last=last)
    assert batch.can_join(7)
    got.update(drive(batch, {0: [(3, [5, 6], 6, 7)]})[0])
    writer.model.generation_config.eos_token_id = None
    for key, (p, u) in {0: ([5, 6], "a"), 1: ([7, 8, 9], "b"), 3: ([5, 6], 7)}.items():
        assert got[key] == alone(writer, p, u, 6)


def test_models_it_cannot_decode_as_generate_does_are_named():
    m = tiny_model("llama")
    assert continuous_unsupported(m) is None
    m.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty=1.3" in continuous_unsupported(m)
    w = tiny_model("mistral", sliding_window=16)
    assert continuous_unsupported(w, reach=16) is None
    assert "sliding attention window (16 tokens)" in continuous_unsupported(w, reach=17)
    assert "sliding" in continuous_unsupported(w)
    assert continuous_unsupported(torch.nn.Linear(2, 2)) is not None


@pytest.mark.parametrize("call, match", [
    (lambda b: b.join("k", [5], 3), "already a row"),
    (lambda b: b.join("n", [], 3), "prompt must be a non-empty sequence"),
    (lambda b: b.join("n", "hello", 3), "prompt must be a non-empty sequence"),
    (lambda b: b.join("n", [5, -1], 3), "prompt must hold token ids"),
    (lambda b: b.join("n", [5], 0), "max_new_tokens must be an int >= 1"),
    (lambda b: b.join("n", [5], True), "max_new_tokens must be an int >= 1"),
])
def test_bad_joins_are_refused_by_name(call, match):
    b = ContinuousBatch(tiny_model("llama"), max_rows=3)
    b.join("k", [5], 3)
    with pytest.raises(ValueError, match=match):
        call(b)
    assert b.keys == ["k"]


def test_bad_settings_and_users_are_refused_by_name():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="max_rows must be an int >= 1"):
        ContinuousBatch(m, max_rows=0)
    for bad in (0, -4, True, 2.0, "8"):
        with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
            ContinuousBatch(m, prefill_chunk=bad)
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        ContinuousBatch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eos_token_id must hold token ids"):
        ContinuousBatch(m, eos_token_id=[2, -3])
    with pytest.raises(ValueError, match="runtime must be the MilpRuntime of model"):
        ContinuousBatch(m, runtime=runtime())
    with pytest.raises(ValueError, match="needs a runtime"):
        ContinuousBatch(m).join("k", [5], 2, user="a")
    rt = runtime()
    with pytest.raises(KeyError, match="zed"):
        ContinuousBatch(rt.model, runtime=rt).join("k", [5], 2, user="zed")
    for bad in (1, 0, True, 8.0):
        with pytest.raises(ValueError, match="max_length must be an int >= 2"):
            ContinuousBatch(m, max_length=bad)
    with pytest.raises(ValueError, match="compile needs max_length"):
        ContinuousBatch(m, compile=True)
    with pytest.raises(TypeError, match="compile must be a bool or a mapping"):
        ContinuousBatch(m, max_length=8, compile="inductor")
    for bad in ([], [2, 1], [1, 1], [0], [9], [True], (2.0,), "12", 4):
        with pytest.raises(ValueError, match=r"row_buckets must be ascending distinct ints in \[1, max_rows=8\]"):
            ContinuousBatch(m, max_rows=8, max_length=16, row_buckets=bad)
    with pytest.raises(ValueError, match="row_buckets needs max_length"):
        ContinuousBatch(m, row_buckets=[1])
    with pytest.raises(ValueError, match=r"prompt's 3 tokens plus max_new_tokens=6 exceed the batch's max_length=8"):
        ContinuousBatch(m, max_length=8).join("k", [5, 6, 7], 6)
    full = ContinuousBatch(m, max_rows=1)
    full.join(1, [5], 2)
    assert not full.can_join()
    with pytest.raises(ValueError, match="the batch is full"):
        full.join(2, [5], 2)


@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHITECTURES))
def test_a_compiled_decode_step_traces_whole_on_every_architecture(arch):
    """``compile`` with ``fullgraph=True``: every supported architecture's decode step, adapters
    and static cache included, is one graph (no break: a CUDA graph replays the whole step),
    traced as the ``cudagraphs`` backend traces it (AOT autograd) without a copy of the cache,
    and rows that join at different steps, of different users, get their tokens alone."""
    rt = runtime(arch)
    rt.model.generation_config.eos_token_id = None
    counter = AotGraphs()
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=3, max_length=48,
                            compile={"backend": counter, "fullgraph": True})
    ps = prompts(3, seed=2)
    joins = {0: [(0, ps[0], 5, "a"), (1, ps[1], 3, None)], 2: [(2, ps[2], 4, 7)]}
    check_alone(rt, drive(batch, joins)[0], joins)
    assert counter.frame_count == 1
    check_no_cache_copy(counter.graphs, len(batch._slots.layers))


def test_a_compiled_static_batch_runs_one_graph_per_width_whoever_joins_and_leaves():
    """``max_length`` + ``compile``: rows of other users join and leave at every few steps, and a
    row grows past the first width (80 of 160 columns): the decode step is traced twice (once per
    width, fullgraph) and its tokens are each row's alone; a second schedule of other users,
    prompts and leaves traces nothing more. Rows that leave free their rows of the static cache
    for later ones, and its bytes are the rows × columns allocated once."""
    from torch._dynamo.testing import CompileCounter

    from milp.decode import static_widths

    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    counter = CompileCounter()
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=4, max_length=160,
                            compile={"backend": counter, "fullgraph": True})
    assert static_widths(160) == [80, 160]
    ps = prompts(5, seed=7)
    long = list(range(3, 76))  # 75 columns after its prefill: past 80 at its sixth token
    joins = {0: [("a0", ps[0], 6, "a"), ("long", long, 12, None)], 2: [("b1", ps[1], 3, "b")],
             4: [("x2", ps[2], 9, 7)], 9: [("a3", ps[3], 4, "a"), ("n4", ps[4], 2, None)]}
    check_alone(rt, drive(batch, joins, leaves={6: ["x2"]})[0], joins, left=("x2",))
    assert counter.frame_count == 2  # widths 80 and 160
    assert len(batch) == 0 and batch._free == [0, 1, 2, 3] and batch.cache_bytes == batch._slots.nbytes > 0
    nbytes = batch.cache_bytes
    again = {0: [("b0", ps[4], 5, "b"), ("c1", ps[0], 7, 7), ("d2", ps[2], 2, "a")], 3: [("e3", ps[3], 6, None)]}
    check_alone(rt, drive(batch, again, leaves={2: ["c1"]})[0], again, left=("c1",))
    assert counter.frame_count == 2 and batch.cache_bytes == nbytes


def test_a_step_runs_the_smallest_row_bucket_holding_the_running_rows():
    """``row_buckets``: the running rows are kept in the static cache's first rows (a row that
    leaves has its place taken by the last one, its cache copied), and a step runs the smallest
    bucket that holds them: 16 rows by default run in steps of 8 while at most 8 run. Compiled,
    one graph per bucket and width (``warm_up`` compiles them all: nothing traces after); every
    row, moved ones included, gets its tokens alone."""
    from torch._dynamo.testing import CompileCounter

    from milp.decode import static_row_buckets

    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    counter = CompileCounter()
    assert static_row_buckets(16) == [8, 16] and static_row_buckets(4) == [4]
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=16, max_length=160,
                            compile={"backend": counter, "fullgraph": True})
    assert batch.warm_up() == [(8, 80), (8, 160), (16, 80), (16, 160)] and counter.frame_count == 4
    ps = prompts(12, seed=3)
    seen: list[tuple[int, int, list[int]]] = []  # each step's rows, its step_rows, the running rows' slots
    run = batch._run_static

    def spy(width, rows):
        seen.append((len(batch._rows), rows, sorted(r.slot for r in batch._rows)))
        logits = run(width, rows)
        keys = batch._slots.layers[0].keys
        assert logits.shape[0] == keys.shape[0] == rows and keys.shape[2] == width
        return logits

    batch._run_static = spy
    users = ["a", "b", 7, None]
    joins = {0: [(i, ps[i], 3 + (5 * i) % 9, users[i % 4]) for i in range(10)], 4: [(10, ps[10], 5, "b")],
             6: [(11, list(range(3, 80)), 6, "a")]}  # 77 columns: the wider width too
    check_alone(rt, drive(batch, joins, leaves={2: [3, 0]})[0], joins, left=(3, 0))
    assert counter.frame_count == 4  # nothing traced after warm_up
    assert {rows for _, rows, _ in seen} == {8, 16}
    for running, rows, slots in seen:
        assert rows == (8 if running <= 8 else 16) and slots == list(range(running))  # the first rows
    assert batch._free == list(range(16)) and not batch._slots.columns.any()  # free rows decode at column 0


def test_a_step_torch_cannot_compile_runs_eagerly_with_a_warning():
    """A backend that fails (or anything torch.compile raises before the graph runs): the step runs
    eagerly, then and after, with a RuntimeWarning; the rows get their tokens alone."""
    calls: list[int] = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no such compiler")

    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=2, max_length=64, compile={"backend": broken})
    joins = {0: [("a", [5, 6, 7], 4, "a"), ("n", [9, 4], 3, None)]}
    with pytest.warns(RuntimeWarning, match="could not compile the decode step .*no such compiler.*runs eagerly"):
        got, _ = drive(batch, joins)
    check_alone(rt, got, joins)
    assert calls == [1]  # tried once


def test_warm_up_compiles_every_width_before_the_first_row():
    """``warm_up`` (what ``milp.serve --compile`` runs at its start) compiles the step at every
    width with no row running; rows then reaching both widths trace nothing more, and get their
    tokens alone. Without ``compile`` it does nothing; a batch with rows refuses it."""
    from torch._dynamo.testing import CompileCounter

    from milp.decode import static_widths

    rt = runtime()
    rt.model.generation_config.eos_token_id = None
    counter = CompileCounter()
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=2, max_length=200,
                            compile={"backend": counter, "fullgraph": True})
    assert batch.warm_up() == [(2, 100), (2, 200)] and static_widths(200) == [100, 200]
    assert counter.frame_count == 2 and len(batch) == 0 and batch._free == [0, 1] and batch._block is None
    long = [3 + i % 80 for i in range(97)]  # 97 columns: past 100 at its fourth token
    joins = {0: [("long", long, 8, "b"), ("short", [5, 6], 3, "a")]}
    check_alone(rt, drive(batch, joins)[0], joins)
    assert counter.frame_count == 2
    assert ContinuousBatch(rt.model, runtime=rt, max_length=200).warm_up() == []  # eager: nothing to compile
    busy = ContinuousBatch(rt.model, runtime=rt, max_length=200, compile={"backend": "eager"})
    busy.join("k", [5], 2)
    with pytest.raises(RuntimeError, match="warm_up needs an empty batch, 1 rows have joined"):
        busy.warm_up()


def _packs(arch: str) -> bool:
    """Whether ``arch``'s decode steps run packed grouped-query attention: grouped-query heads,
    ``sdpa``, attention through transformers' attention functions (stablelm's own sdpa class under
    transformers 4.x does not), and no logit softcap (gemma2's, which sdpa leaves to eager)."""
    import inspect as _inspect

    model = tiny_model(arch)
    cfg = model.config
    attn = next((m for n, m in model.named_modules() if n.endswith("self_attn")), None)
    return (0 < getattr(cfg, "num_key_value_heads", 0) < cfg.num_attention_heads and cfg._attn_implementation == "sdpa"
            and attn is not None and "ALL_ATTENTION_FUNCTIONS" in _inspect.getsource(type(attn).forward)
            and getattr(cfg, "attn_logit_softcapping", None) is None)


_GQA_ARCHS = [a for a in SUPPORTED_ARCHITECTURES if _packs(a)]


@pytest.mark.parametrize("static", [None, 48], ids=["growing", "static"])
@pytest.mark.parametrize("arch", _GQA_ARCHS)
def test_grouped_query_decode_steps_read_each_cached_column_once(arch, static, monkeypatch):
    """A grouped-query attention model (``sdpa``): every decode step's attention runs on the
    key/value heads (queries packed per group: ``milp.decode.packed_sdpa_attention``), never on
    keys and values repeated per query head, also compiled (through AOT autograd, as the
    ``cudagraphs`` backend traces it); the rows get their tokens alone, and the model's
    attention implementation is ``sdpa`` again between steps."""
    import torch.nn.functional as F

    rt = runtime(arch)
    rt.model.generation_config.eos_token_id = None
    cfg = rt.model.config
    assert len(_GQA_ARCHS) >= 10
    seen: list[tuple[int, int]] = []  # (query heads or groups, key heads) of each decode-step attention
    real = F.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        if recording:
            seen.append((query.shape[1], key.shape[1]))
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    compile = {"backend": AotGraphs()} if static else False
    batch = ContinuousBatch(rt.model, runtime=rt, max_rows=3, max_length=static, compile=compile)
    ps = prompts(3, seed=5)
    recording = False
    for i, u in enumerate(["a", None, 7]):
        batch.join(i, ps[i], 5, u)
    got = {u.key: u.tokens for u in batch.step()}  # the prefill: not recorded
    recording = True
    while len(batch):
        got.update({u.key: u.tokens for u in batch.step()})
        assert cfg._attn_implementation == "sdpa"
    assert seen and all(kv == cfg.num_key_value_heads and q == cfg.num_key_value_heads for q, kv in seen), seen
    for i, u in enumerate(["a", None, 7]):
        assert got[i] == alone(rt, ps[i], u, 5), i


def test_nvtx_ranges_name_the_prefill_and_the_steps(monkeypatch):
    """MILP_NVTX=1: a prefill and a decode step show as ``milp.decode.prefill`` / ``.step``."""
    rt = runtime()
    monkeypatch.setenv("MILP_NVTX", "1")
    batch = ContinuousBatch(rt.model, runtime=rt, eos_token_id=[])
    batch.join(0, [5, 6], 2, "a")
    with torch.profiler.profile() as prof:
        batch.step()
        batch.step()
    names = {e.name for e in prof.events()}
    assert {"milp.decode.prefill", "milp.decode.step", "milp.lora_linear"} <= names


def test_steps_run_the_model_in_eval_mode_and_restore_its_mode():
    rt = runtime()
    rt.model.train()
    seen: list[bool] = []
    rt.model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    batch = ContinuousBatch(rt.model, runtime=rt, eos_token_id=[])
    batch.join(0, [5, 6], 2, "a")
    batch.step()
    batch.step()
    assert seen == [False, False] and rt.model.training
