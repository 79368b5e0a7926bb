"""Isolation of non-finite values and of other users' data in a mixed batch.

Token ``i``'s output row ``y[i]`` depends only on ``x[i]``, ``W``, the bias and the adapters
of token ``i``'s own user (none for user -1); its ``dx[i]`` only on ``dy[i]``, ``W`` and
those adapters; ``dA``/``dB`` of user ``u`` only on ``u``'s tokens. So a NaN or inf in one
token's ``x`` (or ``dy``), in one user's adapter rows, or in bank rows no live adapter owns
(freed by ``remove``, grown by ``reserve``) leaves everything else bit-identical, on every
path and backend, with the launch variants a GPU's tuned tables may pick (split-K shrink,
the expand's GEMV and streaming forms, the expand-first split schedule).
"""
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import AdapterBank, BatchPlan, LaunchConfig, lora_linear, lora_shrink, use_backend, use_dispatch
from kernels.ops import fused_linear
from kernels.tuning import use_config

from .conftest import DEVICE

# the interpreter's numpy matmul warns about the NaN and inf these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

RANKS = (1, 2, 5, 8, 16, 33, 96)
BACKENDS = ("triton", "torch", "torch-loop")
PATHS_ANY = ("auto", "split", "fused", "fused_t")
#: launch variants beside the heuristics: what a tuned table or dispatch knob may choose on a GPU
VARIANTS = ("heuristic", "split_k", "gemv", "stream", "expand_first", "small_tiles")
BAD = (float("nan"), float("inf"), float("-inf"))


@contextlib.contextmanager
def _backend(name: str, variant: str = "heuristic"):
    """``name`` as in conftest's ``backend`` fixture (``torch-loop``: the torch path's loop over
    segments), with one launch ``variant`` of the Triton kernels."""
    with contextlib.ExitStack() as stack:
        if name == "torch-loop":
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(fused_linear, "GATHER_MAX_ELEMENTS", -1)
        stack.enter_context(use_backend(name.split("-")[0]))
        if variant == "split_k":
            stack.enter_context(use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16, split_k=3)))
        elif variant == "gemv":
            stack.enter_context(use_config("expand", LaunchConfig(block_m=16, block_n=16, block_r=16, split_n=2)))
        elif variant == "stream":
            stack.enter_context(use_config("expand", LaunchConfig(block_m=16, block_n=16, block_r=16, n_blocks=2)))
        elif variant == "expand_first":
            stack.enter_context(use_dispatch(split_expand_first_max_tokens=1 << 20))
        elif variant == "small_tiles":
            stack.enter_context(use_config("fused_linear", LaunchConfig(block_m=16, block_n=16, block_k=16)))
            stack.enter_context(use_config("grad_weights", LaunchConfig(block_r=16, block_n=16, block_k=16)))
        yield


def _run(x, w, b, bank, plan, path, dy, grads="x+lora"):
    """``(y, y_inf, dx, dA, dB)`` of a training step and of an inference forward (split path: the
    shrink's split-K partials handed to the expand). ``grads``: what requires a gradient (``x``
    alone: the backward's dx without ``t``; the adapters alone: their grouped launch without
    dx), or ``"op without t"``: the op called with ``save_t=False``, its backward recomputing
    ``t``. A gradient not asked for is ``None``."""
    need_x, need_lora = grads != "lora", grads != "x"
    if w is None and path != "auto":
        path = "split"  # the one path of the adapters alone
    params = (bank.lora_a, bank.lora_b)
    xg = x.clone().requires_grad_(need_x)
    try:
        for p in params:
            p.requires_grad_(need_lora)
        if grads == "op without t":
            sorted_tokens, tiles, segments, block_ms = plan.as_args()
            y, _ = torch.ops.milp.lora_linear(xg, w, b, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                                              sorted_tokens, tiles, segments, block_ms, bank.max_rank, False, path)
        else:
            y = lora_linear(xg, w, b, bank, plan, path=path)
        got = list(torch.autograd.grad(y, (xg,) * need_x + params * need_lora, dy))
    finally:
        for p in params:
            p.requires_grad_(True)
    dx = got.pop(0) if need_x else None
    da, db = got if need_lora else (None, None)
    with torch.no_grad():
        y_inf = lora_linear(x, w, b, bank, plan, path=path)
    return y.detach(), y_inf, dx, da, db


def _check(clean, dirty, token_rows, bank_rows, what="changed"):
    """The rows ``token_rows`` of ``y``, ``y_inf``, ``dx`` and ``bank_rows`` of ``dA``, ``dB``
    bit-identical between two :func:`_run` results."""
    names = ("y", "y (inference)", "dx", "dA", "dB")
    for i, (name, c, d) in enumerate(zip(names, clean, dirty)):
        if c is not None:
            assert _rows_equal(d, c, token_rows if i < 3 else bank_rows), f"{name}: {what}"


def _rows_equal(a, b, rows):
    """``a[rows]`` and ``b[rows]`` bit-identical (the clean run's rows finite)."""
    rows = torch.as_tensor(rows, dtype=torch.bool, device=a.device)
    assert torch.isfinite(b[rows]).all(), "the clean run itself is not finite"
    return torch.equal(a[rows], b[rows])


def _bank(k, n, max_users, ranks, seed, *, capacity=0):
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank(k, n, max_users=max_users, capacity=capacity, device=DEVICE)
    for u, r in ranks.items():
        bank.add(u, r, alpha=float(torch.randint(1, 32, (1,), generator=g)), init="random", generator=g)
    return bank, g


@st.composite
def problems(draw, max_tokens=40):
    T = draw(st.integers(1, max_tokens))
    k = draw(st.integers(16, 40))
    n = draw(st.integers(16, 40))
    users = draw(st.integers(1, 6))
    ranks = {}
    for u in range(users):
        if u == 0 or draw(st.booleans()):
            ranks[u] = draw(st.lists(st.sampled_from(RANKS), min_size=1, max_size=2))
    none_share = draw(st.sampled_from([0.0, 0.3]))
    spare = draw(st.sampled_from([0, 0, 9]))  # a plan with room for more tokens (reused, as in a CUDA graph)
    seed = draw(st.integers(0, 2**16))
    return T, k, n, users, ranks, none_share, spare, seed


def _batch(T, k, n, users, none_share, g, bias):
    ids = torch.randint(0, users, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < none_share, torch.full_like(ids, -1), ids).to(DEVICE)
    x = torch.randn(T, k, generator=g).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    dy = torch.randn(T, n, generator=g).to(DEVICE)
    if bias is None:  # no weight: the adapters' contribution alone
        w = b = None
    return ids, x, w, b, dy


def _plan(ids, users, spare=0):
    return BatchPlan(ids.numel() + spare, users, device=DEVICE).update(ids)


def _user_rows(bank, users):
    """Bool mask over the bank's rows held by ``users``."""
    mask = torch.zeros(bank.capacity, dtype=torch.bool, device=DEVICE)
    for u in users:
        if bank.has(u):
            seg = bank.segment(u)
            mask[seg.offset : seg.offset + seg.rank] = True
    return mask


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GRADS = ("x+lora", "x+lora", "x", "lora", "op without t")
#: with a bias, without, or no weight at all (``None``: the adapters' contribution alone)
BIAS = (True, False, None)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(problems(), st.sampled_from(PATHS_ANY), st.sampled_from(VARIANTS), st.sampled_from(GRADS),
       st.sampled_from(BAD), st.sampled_from(["x", "dy"]), st.sampled_from(BIAS), st.data())
def test_one_tokens_nonfinite_input_stays_in_its_row(backend, problem, path, variant, grads, bad, where, bias, data):
    """A NaN/inf in ``x[j]`` (or ``dy[j]``) changes no other token's ``y``/``dx`` row and no
    other user's ``dA``/``dB``."""
    T, k, n, users, ranks, none_share, spare, seed = problem
    bank, g = _bank(k, n, users, ranks, seed)
    ids, x, w, b, dy = _batch(T, k, n, users, none_share, g, bias)
    plan = _plan(ids, users, spare)
    j = data.draw(st.integers(0, T - 1), label="token")
    col = data.draw(st.integers(0, (k if where == "x" else n) - 1), label="column")
    x2, dy2 = x.clone(), dy.clone()
    (x2 if where == "x" else dy2)[j, col] = bad
    with _backend(backend, variant):
        clean = _run(x, w, b, bank, plan, path, dy, grads)
        dirty = _run(x2, w, b, bank, plan, path, dy2, grads)
    _check(clean, dirty, torch.arange(T, device=DEVICE) != j, ~_user_rows(bank, [int(ids[j])]),
           "rows of other tokens or users changed")


@st.composite
def churned_banks(draw):
    """A bank whose users came and went: freed rows between live segments, rows grown by
    ``reserve`` past the last one, users of the batch without an adapter any more."""
    problem = draw(problems())
    removed = [u for u in problem[4] if draw(st.booleans())]
    late = draw(st.lists(st.sampled_from(RANKS), min_size=0, max_size=1))  # re-added into a freed gap
    extra = draw(st.integers(0, 40))
    return problem, removed, late, extra


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(churned_banks(), st.sampled_from(PATHS_ANY), st.sampled_from(VARIANTS), st.sampled_from(GRADS),
       st.sampled_from(BAD), st.sampled_from(BIAS))
def test_nonfinite_in_rows_no_adapter_owns_changes_nothing(backend, bank_case, path, variant, grads, bad, bias):
    """NaN/inf in every bank row no live adapter holds (freed, or grown by ``reserve``) leave
    every output and gradient bit-identical."""
    (T, k, n, users, ranks, none_share, spare, seed), removed, late, extra = bank_case
    bank, g = _bank(k, n, users, ranks, seed)
    for u in removed:
        bank.remove(u)
    if late and removed:
        bank.add(removed[0], late, init="random", generator=g)
    bank.reserve(bank.capacity + extra)
    ids, x, w, b, dy = _batch(T, k, n, users, none_share, g, bias)
    plan = _plan(ids, users, spare)
    free = ~_user_rows(bank, bank.users)
    with _backend(backend, variant):
        clean = _run(x, w, b, bank, plan, path, dy, grads)
        with torch.no_grad():
            bank.lora_a[free] = bad
            bank.lora_b[free] = bad
        dirty = _run(x, w, b, bank, plan, path, dy, grads)
    _check(clean, dirty, [True] * T, [True] * bank.capacity, "a row no adapter holds was read")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, **SETTINGS)
@given(problems(), st.sampled_from(PATHS_ANY), st.sampled_from(VARIANTS), st.sampled_from(GRADS),
       st.sampled_from(BAD), st.sampled_from(["a", "b", "both"]), st.sampled_from(BIAS), st.data())
def test_nonfinite_adapter_of_one_user_stays_with_its_tokens(backend, problem, path, variant, grads, bad, which,
                                                             bias, data):
    """NaN/inf in user ``u``'s ``A`` or ``B`` changes only ``u``'s tokens' rows of ``y`` and
    ``dx`` and ``u``'s rows of ``dA``/``dB``."""
    T, k, n, users, ranks, none_share, spare, seed = problem
    bank, g = _bank(k, n, users, ranks, seed)
    ids, x, w, b, dy = _batch(T, k, n, users, none_share, g, bias)
    plan = _plan(ids, users, spare)
    u = data.draw(st.sampled_from(sorted(ranks)), label="user")
    seg = bank.segment(u)
    r = data.draw(st.integers(seg.offset, seg.offset + seg.rank - 1), label="row")
    whole_rows = data.draw(st.booleans(), label="whole rows")
    with _backend(backend, variant):
        clean = _run(x, w, b, bank, plan, path, dy, grads)
        with torch.no_grad():
            for p in (bank.lora_a,) * (which != "b") + (bank.lora_b,) * (which != "a"):
                if whole_rows:
                    p[seg.offset : seg.offset + seg.rank] = bad
                else:
                    p[r, data.draw(st.integers(0, p.shape[1] - 1), label="column")] = bad
        dirty = _run(x, w, b, bank, plan, path, dy, grads)
    _check(clean, dirty, ids != u, ~_user_rows(bank, [u]), "rows of other users or their tokens changed")


@pytest.mark.parametrize("backend, variant", [("triton", "heuristic"), ("triton", "expand_first"),
                                              ("triton", "gemv"), ("torch", "heuristic"), ("torch-loop", "heuristic")])
@pytest.mark.parametrize("bias", [False, True, None], ids=["no_bias", "bias", "no_weight"])
def test_rows_without_adapter_are_the_base_linear_exactly(backend, variant, bias):
    """On the split path (and ``auto``, which is split for a batch this size), rows of user -1
    and of users without adapters at this layer (never had one, or removed) are ``x Wᵀ + b``
    (zeros without a weight) bit for bit, even with every bank row NaN or inf; on every path
    they do not depend on the bank at all, nor do their ``dx`` rows."""
    bank, g = _bank(24, 20, 6, {0: [1], 1: [96], 2: [5, 33], 4: [8]}, seed=3)
    bank.remove(4)
    ids, x, w, b, dy = _batch(37, 24, 20, 6, 0.3, g, bias)
    ids[:4] = torch.tensor([-1, 3, 4, 5])
    plan = _plan(ids, 6)
    base = (ids < 0) | (ids == 3) | (ids == 4) | (ids == 5)
    ref = torch.zeros_like(dy) if w is None else torch.nn.functional.linear(x, w, b)
    with _backend(backend, variant):
        clean = {p: _run(x, w, b, bank, plan, p, dy) for p in PATHS_ANY}
        with torch.no_grad():
            bank.lora_a.fill_(float("nan"))
            bank.lora_b.fill_(float("inf"))
        for p in PATHS_ANY:
            dirty = _run(x, w, b, bank, plan, p, dy)
            _check(clean[p][:3], dirty[:3], base, None, f"{p}: rows without adapter depend on the bank")
            if p in ("split", "auto"):
                for y in dirty[:2]:
                    assert _rows_equal(y, ref, base), f"{p}: rows without adapter are not x Wᵀ + b"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS_ANY)
def test_rank_one_beside_rank_96_reads_no_other_rows(backend, path):
    """Was: the torch path's gather form (``fused_lora_linear_torch`` on short batches: every
    batch of a CPU serving stack) read row 0 of ``lora_b`` (of ``lora_a`` for the backward's
    ``dx``) in every rank column past a token's own rank, up to the batch's largest, and
    multiplied it by a zero ``t``: ``0 * NaN = NaN``. A NaN/inf in another user's adapter at
    row 0, or in row 0 once freed, made every token of a smaller-rank user (rank 1 or 5 beside
    96) NaN in ``y`` and ``dx``."""
    for ranks in ({0: [1], 1: [96], 2: [5]}, {0: [96], 1: [1], 2: [5]}):
        bank, g = _bank(24, 20, 4, ranks, seed=5)
        ids, x, w, b, dy = _batch(23, 24, 20, 4, 0.2, g, True)
        ids[:4] = torch.tensor([0, 1, 2, -1])
        plan = _plan(ids, 4)
        with _backend(backend):
            clean = _run(x, w, b, bank, plan, path, dy)
            with torch.no_grad():
                bank.lora_a[0] = float("nan")
                bank.lora_b[0] = float("inf")
            dirty = _run(x, w, b, bank, plan, path, dy)
            _check(clean, dirty, ids != 0, ~_user_rows(bank, [0]), "other users read user 0's row 0")
            bank.remove(0)  # its rows freed, still NaN/inf at row 0; its tokens now have no adapter
            with torch.no_grad():
                bank.lora_a[0] = bank.lora_b[0] = 0.0
            clean = _run(x, w, b, bank, plan, path, dy)
            with torch.no_grad():
                bank.lora_a[0] = float("inf")
                bank.lora_b[0] = float("nan")
            dirty = _run(x, w, b, bank, plan, path, dy)
        _check(clean, dirty, [True] * ids.numel(), [True] * bank.capacity, "a freed row was read")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", BAD)
def test_shrink_t_is_zero_past_the_rank_of_a_nonfinite_token(backend, bad):
    """Was: the Triton shrink (``split_k`` 1, which writes ``t`` whole) scaled the rank columns
    past a token's rank by a zero scale instead of selecting zeros, so a token with a NaN/inf in
    ``x`` got ``x · 0 · 0 = NaN`` there: ``t`` (``lora_shrink``, the op's saved ``t``) broke its
    contract of zeros past the rank and differed from the torch path's. Other tokens' rows were
    and are unchanged."""
    bank, g = _bank(24, 20, 3, {0: [1], 1: [33], 2: [5]}, seed=7)
    ids, x, w, b, dy = _batch(9, 24, 20, 3, 0.2, g, False)
    ids[:3] = torch.tensor([0, 1, 2])
    plan = _plan(ids, 3)
    x2 = x.clone()
    x2[0, 3] = x2[2, 5] = bad
    with _backend(backend):
        t = lora_shrink(x, bank, plan)
        t2 = lora_shrink(x2, bank, plan)
    assert torch.equal(t2[[1, *range(3, 9)]], t[[1, *range(3, 9)]])
    assert not t2[0, 1:].any() and not t2[2, 5:].any(), t2[[0, 2]]
