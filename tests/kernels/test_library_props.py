"""Property-based and edge-case tests of the op layer (:mod:`kernels.library`).

* the fake impls give the real outputs' shapes, dtypes, strides and devices for drawn problems
  (no weight, bias or not, ``save_t``, every ``need_dx``/``need_dlora``, 0 and 1 tokens, max_rank
  0, every token without an adapter), on the torch path and the Triton kernels;
* gradients of ``x``, ``weight``, ``bias``, ``lora_a`` and ``lora_b`` through the wrapper, the raw
  op and :class:`~kernels.library.EagerLoraLinear` match the float64 closed forms, for every
  ``requires_grad`` combination, with ``None`` for what needs none;
* ``torch.compile(fullgraph=True)`` of the raw op agrees with eager on drawn batches and, with
  the token count marked dynamic, compiles once;
* each raw op's arguments, made wrong one at a time, are refused with a ``ValueError`` or
  ``TypeError`` naming the argument, on both backends (never an error from inside a kernel,
  a wrong result, or memory corruption on the Triton path);
* a plan updated in place with batch after batch gives the outputs of a freshly built one.

Shapes stay tiny: the Triton kernels run in the interpreter on a CPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from kernels import PATHS, AdapterBank, BatchPlan, lora_linear, use_backend
from kernels.library import EagerLoraLinear
from kernels.reference import lora_linear_grads_ref, lora_linear_ref, shrink_ref

from .cases import rel_err
from .conftest import DEVICE

BACKENDS = ("torch", "triton")
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Problem:
    bank: AdapterBank
    plan: BatchPlan
    ids: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor | None
    b: torch.Tensor | None

    def args(self, save_t: bool) -> tuple:
        """The positional arguments of ``milp::lora_linear``."""
        bank = self.bank
        return (self.x, self.w, self.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, *self.plan.as_args(),
                bank.max_rank, save_t)


def make_problem(T, k, n, ranks, none_share, weight, bias, dtype, seed) -> Problem:
    """``T`` tokens of the users in ``ranks`` (user -> module ranks) and one user without
    adapters, ``-1`` with probability ``none_share``; a bank not requiring grad."""
    g = torch.Generator().manual_seed(seed)
    users = max(ranks, default=0) + 2
    bank = AdapterBank(k, n, max_users=users, dtype=dtype, device=DEVICE)
    for u, r in ranks.items():
        bank.add(u, r, alpha=float(torch.randint(1, 16, (1,), generator=g)), init="random", generator=g)
    bank.requires_grad_(False)
    ids = torch.randint(0, users, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < none_share, torch.full_like(ids, -1), ids).to(DEVICE)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)

    x = rand(T, k)
    w = rand(n, k, scale=k**-0.5) if weight else None
    b = rand(n) if weight and bias else None
    return Problem(bank, BatchPlan.build(ids, users), ids, x, w, b)


@st.composite
def problems(draw, dtypes=(torch.float64,)):
    """Parameters of :func:`make_problem`: 1 to 6 tokens (0 in explicit examples), user 0 and
    maybe user 1 with adapters, with or without a weight and a bias."""
    ranks = {0: draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="ranks0")}
    if draw(st.booleans(), label="user1"):
        ranks[1] = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="ranks1")
    return dict(T=draw(st.integers(1, 6), label="T"), k=draw(st.integers(1, 12), label="k"),
                n=draw(st.integers(1, 12), label="n"), ranks=ranks,
                none_share=draw(st.sampled_from([0.0, 0.3]), label="none_share"),
                weight=draw(st.booleans(), label="weight"), bias=draw(st.booleans(), label="bias"),
                dtype=draw(st.sampled_from(dtypes), label="dtype"), seed=draw(st.integers(0, 2**16), label="seed"))


def _edge(T=3, ranks=None, none_share=0.0, weight=True, bias=True, dtype=torch.float64):
    """An explicit example's parameters: no tokens, every token ``-1``, no adapter (max_rank 0)..."""
    return dict(T=T, k=5, n=4, ranks={0: [2], 1: [3]} if ranks is None else ranks, none_share=none_share,
                weight=weight, bias=bias, dtype=dtype, seed=0)


EDGES = [_edge(T=0), _edge(T=1), _edge(none_share=1.0), _edge(ranks={}), _edge(T=0, ranks={}, weight=False),
         _edge(T=1, none_share=1.0, weight=False)]


def _meta(t):
    if t is None:
        return None
    return tuple(t.shape), t.dtype, t.device, tuple(t.stride()) if t.numel() else None


def _fake_call(op, args):
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


# --------------------------------------------------------------------------- fake impls
def _examples(*names_values):
    """Stack ``@example`` decorators: one per explicit edge problem, with the other arguments."""
    def deco(f):
        for edge, kw in itertools.product(EDGES, names_values):
            f = example(params=edge, **kw)(f)
        return f
    return deco


@settings(max_examples=60, **_SETTINGS)
@given(problems(dtypes=(torch.float64, torch.float32, torch.float16)), st.booleans(),
       st.sampled_from(("auto",) + PATHS), st.sampled_from(BACKENDS))
@_examples(*[dict(save_t=s, path="auto", backend=b) for s in (False, True) for b in BACKENDS])
def test_fake_impls_give_the_real_outputs_metadata(params, save_t, path, backend):
    """Each op's fake impl gives the real outputs' shape, dtype, device and strides (the layout a
    compiled graph assumes), for every combination of ``need_dx``/``need_dlora``."""
    p = make_problem(**params)
    if p.w is None and path in ("fused", "fused_t"):
        path = "split"  # the only path without a base weight
    bank, T = p.bank, p.x.shape[0]
    sorted_tokens, tiles, segments, block_ms = p.plan.as_args()
    with use_backend(backend):
        fwd = (*p.args(save_t), path)
        real = torch.ops.milp.lora_linear(*fwd)
        assert [_meta(t) for t in _fake_call(torch.ops.milp.lora_linear, fwd)] == [_meta(t) for t in real]
        dy = torch.randn(T, bank.out_features, dtype=torch.float64).to(p.x)
        for need_dx, need_dlora in itertools.product((False, True), repeat=2):
            bwd = (dy, p.x, p.w, bank.lora_a, bank.lora_b, bank.scale, bank.slots, sorted_tokens, tiles, segments,
                   block_ms, bank.max_rank, real[1], need_dx, need_dlora, path)
            got = [_meta(t) for t in _fake_call(torch.ops.milp.lora_linear_backward, bwd)]
            assert got == [_meta(t) for t in torch.ops.milp.lora_linear_backward(*bwd)], (need_dx, need_dlora)
        shrink = (p.x, bank.lora_a, bank.scale, bank.slots, sorted_tokens, tiles, segments, block_ms, bank.max_rank)
        t = torch.ops.milp.lora_shrink(*shrink)
        assert _meta(_fake_call(torch.ops.milp.lora_shrink, shrink)) == _meta(t)
        y = torch.zeros(T, bank.out_features, dtype=p.x.dtype, device=DEVICE)
        expand = (y, t, bank.lora_b, bank.slots, sorted_tokens, tiles, segments, block_ms)
        assert _fake_call(torch.ops.milp.lora_expand_, expand) is None and not y.any()  # the fake writes nothing
        assert torch.ops.milp.lora_expand_(*expand) is None


# --------------------------------------------------------------------------- autograd
_DIFFERENTIABLE = ("x", "weight", "bias", "lora_a", "lora_b")


@settings(max_examples=100, **_SETTINGS)
@given(problems(), st.sets(st.sampled_from(_DIFFERENTIABLE), min_size=1),
       st.sampled_from(["wrapper", "op", "function"]), st.booleans(), st.sampled_from(BACKENDS), st.integers(0, 2**16))
@_examples(*[dict(wants=w, entry=e, save_t=False, backend=b, seed=0) for w in (set(), set(_DIFFERENTIABLE))
             for e in ("wrapper", "op") for b in BACKENDS])
def test_gradients_match_the_float64_closed_forms(params, wants, entry, save_t, backend, seed):
    """``<dy, y>``'s gradients through the wrapper, the raw op (``t`` kept or recomputed) and
    ``EagerLoraLinear``, for any set of inputs requiring grad (none too): each one asked for
    matches the closed forms, the others stay ``None``; ``y`` matches the reference too."""
    p = make_problem(**params)
    if p.w is None:
        wants = wants - {"weight", "bias"}
    elif p.b is None:
        wants = wants - {"bias"}
    bank, T, n = p.bank, p.x.shape[0], p.bank.out_features
    dy = torch.randn(T, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(p.x)
    leaves = {"x": p.x.clone(), "weight": None if p.w is None else p.w.clone(),
              "bias": None if p.b is None else p.b.clone(), "lora_a": bank.lora_a, "lora_b": bank.lora_b}
    try:
        for name in wants:
            leaves[name].requires_grad_(True)
        with use_backend(backend):
            if entry == "wrapper":
                y = lora_linear(leaves["x"], leaves["weight"], leaves["bias"], bank, p.plan)
            else:
                args = list(p.args(save_t))
                args[:5] = [leaves[k] for k in _DIFFERENTIABLE]
                if entry == "op":
                    y = torch.ops.milp.lora_linear(*args)[0]
                else:
                    y = EagerLoraLinear.apply(*args[:-1], "auto")
            assert y.requires_grad == bool(wants)
            if wants:
                (y * dy).sum().backward()
        w = p.w if p.w is not None else torch.zeros(n, bank.in_features, dtype=p.x.dtype)
        ref = lora_linear_ref(p.x, w, p.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, p.ids)
        assert rel_err(y, ref) < 1e-12
        dx, da, db = lora_linear_grads_ref(p.x, w, bank.lora_a, bank.lora_b, bank.scale, bank.slots, p.ids, dy)
        want = {"x": dx, "weight": dy.t() @ p.x, "bias": dy.sum(0), "lora_a": da, "lora_b": db}
        for name in _DIFFERENTIABLE:
            grad = None if leaves[name] is None else leaves[name].grad
            if name in wants:
                assert grad is not None and rel_err(grad, want[name]) < 1e-12, name
            else:
                assert grad is None, name
    finally:
        bank.lora_a.grad = bank.lora_b.grad = None
        bank.requires_grad_(False)


def test_wrapper_differentiates_a_base_weight_alone():
    """``lora_linear`` decided on autograd by x's and the bank's ``requires_grad`` only: a weight
    or bias that alone required grad took the no-autograd forward, and the Triton fused path
    then gave it no gradient."""
    bank = AdapterBank(6, 5, max_users=2, dtype=torch.float64, device=DEVICE)
    bank.add(0, [3], init="random")
    bank.requires_grad_(False)
    plan = BatchPlan.build(torch.tensor([0, -1, 0, 1], device=DEVICE), 2)
    x = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        y = lora_linear(x, w, None, bank, plan, path="fused")
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(5, 4, dtype=torch.float64) @ x)  # dy = 1: dW = 1ᵀ x


def test_functorch_transform_of_the_weight_alone_takes_the_op():
    """``vmap`` over the weight with a plain ``x``: the eager fast path must not hand the
    kernels batched tensors (it did: ``direct_call_ok`` looked at ``x`` only, and the Triton
    launch failed on "Cannot access storage of BatchedTensorImpl")."""
    bank = AdapterBank(6, 5, max_users=2, dtype=torch.float64, device=DEVICE)
    bank.add(0, [3], init="random")
    bank.add(1, [2], init="random")
    bank.requires_grad_(False)
    plan = BatchPlan.build(torch.tensor([0, -1, 1, 0], device=DEVICE), 2)
    x = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    ws = torch.randn(3, 5, 6, dtype=torch.float64, device=DEVICE)
    for backend in BACKENDS:
        with use_backend(backend):
            kernels.backend_for(x)  # the interpreter probe, outside the transform
            got = torch.func.vmap(lambda w: lora_linear(x, w, None, bank, plan))(ws)
            want = torch.stack([lora_linear(x, w, None, bank, plan) for w in ws])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- torch.compile
_CAPACITY, _K, _N = 8, 8, 12


class _Compiled:
    """One bank and one compiled raw-op function (dynamic token count) shared by the draws."""

    def __init__(self):
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        g = torch.Generator().manual_seed(0)
        self.bank = AdapterBank(_K, _N, max_users=3, dtype=torch.float64, device=DEVICE)
        self.bank.add(0, [2], init="random", generator=g)
        self.bank.add(2, [3, 1], init="random", generator=g)
        self.bank.requires_grad_(False)
        self.w = torch.randn(_N, _K, generator=g, dtype=torch.float64).to(DEVICE)
        self.counter = CompileCounterWithBackend("aot_eager")
        self.fn = torch.compile(self.eager, backend=self.counter, fullgraph=True)

    def eager(self, x, lora_a, sorted_tokens, tiles, segments):
        b = self.bank
        y, _ = torch.ops.milp.lora_linear(x, self.w, None, lora_a, b.lora_b, b.scale, b.slots, sorted_tokens,
                                          tiles, segments, [16, 32, 64, 128], b.max_rank, True)
        return y.square().sum(1)


def test_compiled_raw_op_agrees_with_eager_and_keeps_one_graph():
    """Forward and gradients of a ``fullgraph`` compile of the op agree with eager for drawn
    batches of 2..8 tokens (``x`` marked dynamic: one graph for every token count)."""
    c = _Compiled()

    @settings(max_examples=8, **_SETTINGS)
    @given(st.lists(st.integers(-1, 2), min_size=2, max_size=_CAPACITY), st.sampled_from(BACKENDS),
           st.integers(0, 2**16))
    def check(ids, backend, seed):
        plan = BatchPlan(_CAPACITY, 3, device=DEVICE).update(torch.tensor(ids, device=DEVICE))
        x = torch.randn(len(ids), _K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
        a = c.bank.lora_a.detach().clone()
        outs = []
        for fn in (c.fn, c.eager):
            xi, ai = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
            if fn is c.fn:
                torch._dynamo.mark_dynamic(xi, 0)
            with use_backend(backend):
                y = fn(xi, ai, *plan.as_args()[:3])
                y.sum().backward()
            outs.append((y.detach(), xi.grad, ai.grad))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert c.counter.frame_count == 1

    check()


def test_compiled_wrapper_takes_a_dynamic_token_count():
    """``_check_plan`` compared x's rows with ``plan.num_tokens``, a Python int that dynamo
    specializes, so a token count marked dynamic was refused (ConstraintViolationError)."""
    torch._dynamo.reset()
    bank = AdapterBank(_K, _N, max_users=3, dtype=torch.float64, device=DEVICE)
    bank.add(0, [2], init="random")
    bank.requires_grad_(False)
    w = torch.randn(_N, _K, dtype=torch.float64, device=DEVICE)
    fn = torch.compile(lambda x, plan: lora_linear(x, w, None, bank, plan), backend="eager", fullgraph=True)
    for T in (3, 5):
        plan = BatchPlan(_CAPACITY, 3, device=DEVICE).update(torch.zeros(T, dtype=torch.long, device=DEVICE))
        x = torch.randn(T, _K, dtype=torch.float64, device=DEVICE)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(fn(x, plan), lora_linear(x, w, None, bank, plan), rtol=0, atol=0)


# --------------------------------------------------------------------------- bad arguments
def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a tensor with stride 2 along its first dimension."""
    return torch.stack([t, torch.full_like(t, 7)], 1).flatten(0, 1)[::2]


def _stale(p: Problem, T: int) -> tuple:
    """The plan of a bigger batch (``T`` tokens) for the same users."""
    big = BatchPlan.build(torch.arange(T, device=DEVICE) % p.plan.max_users, p.plan.max_users)
    return big.sorted_tokens, big.tiles, big.segments


def _with(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _bad_problem() -> Problem:
    g = torch.Generator().manual_seed(1)
    bank = AdapterBank(8, 10, max_users=3, device=DEVICE)
    bank.add(0, [2, 3], init="random", generator=g)
    bank.add(1, [4], init="random", generator=g)
    bank.requires_grad_(False)
    ids = torch.tensor([0, 1, -1, 0, 2, 1, 0, 0, 1], device=DEVICE)
    return Problem(bank, BatchPlan.build(ids, 3), ids, torch.randn(9, 8, generator=g).to(DEVICE),
                   torch.randn(10, 8, generator=g).to(DEVICE), torch.randn(10, generator=g).to(DEVICE))


_TABLE = ("sorted_tokens", "tiles", "segments")
# each: (what is made wrong, the argument the error must name)
_COMMON = [
    (lambda p: {"lora_a": p.bank.lora_a[:, :5]}, "lora_a"),
    (lambda p: {"lora_a": p.bank.lora_a.to("meta")}, "lora_a"),
    (lambda p: {"lora_a": p.bank.lora_a.t().contiguous().t()}, "lora_a"),
    (lambda p: {"lora_scale": _strided(p.bank.scale)}, "lora_scale"),
    (lambda p: {"lora_scale": p.bank.scale.double()}, "lora_scale"),
    (lambda p: {"slots": p.bank.slots.long()}, "slots"),
    (lambda p: {"slots": p.bank.slots.to("meta")}, "slots"),
    (lambda p: {"slots": _with(p.bank.slots, (0, 0), p.bank.capacity)}, "slots"),
    (lambda p: {"slots": _with(p.bank.slots, 0, torch.tensor([2**31 - 1, 1]))}, "slots"),  # off + rank wraps
    (lambda p: {"sorted_tokens": _strided(p.plan.sorted_tokens)}, "sorted_tokens"),
    (lambda p: {"sorted_tokens": p.plan.sorted_tokens[:4]}, "sorted_tokens"),
    (lambda p: {"sorted_tokens": _with(p.plan.sorted_tokens, 0, 40)}, "sorted_tokens"),
    (lambda p: {"segments": _with(p.plan.segments, (1, 2), 3)}, "segments"),  # a user beyond slots
    (lambda p: {"segments": _with(p.plan.segments, (1, 0), p.plan.segments[1, 1] + 1)}, "segments"),  # start > end
    (lambda p: dict(zip(_TABLE, _stale(p, 20))), "segments"),  # the plan of a bigger batch
    (lambda p: {"tiles": p.plan.tiles[:, :2].contiguous()}, "tiles"),
    (lambda p: {"block_ms": []}, "block_ms"),
]
_RANKED = [  # the ops with a max_rank argument
    (lambda p: {"max_rank": -1}, "max_rank"),
    (lambda p: {"max_rank": 2}, "max_rank"),
    (lambda p: {"max_rank": 5.0}, "max_rank"),
]
BAD = {
    "lora_linear": _COMMON + _RANKED + [
        (lambda p: {"x": p.x.long()}, "x"),
        (lambda p: {"x": p.x.t().contiguous().t()}, "x"),
        (lambda p: {"weight": p.w[:, :5]}, "weight"),
        (lambda p: {"weight": p.w.to("meta")}, "weight"),
        (lambda p: {"bias": _strided(p.b)}, "bias"),
        (lambda p: {"bias": p.b[:4]}, "bias"),
        (lambda p: {"lora_b": p.bank.lora_b[:, :4]}, "lora_b"),
        (lambda p: {"lora_b": p.bank.lora_b.t().contiguous().t()}, "lora_b"),
        (lambda p: {"path": "fastest"}, "path"),
    ],
    "lora_shrink": _COMMON + _RANKED + [(lambda p: {"x": p.x.half()}, "lora_a")],  # x and lora_a disagree
    "lora_linear_backward": _COMMON + _RANKED + [
        (lambda p: {"dy": torch.zeros(9, 11)}, "dy"),
        (lambda p: {"dy": torch.zeros(9, 10, dtype=torch.float64)}, "dy"),
        (lambda p: {"t_fwd": torch.zeros(9, 2)}, "t_fwd"),
        (lambda p: {"t_fwd": torch.zeros(9, p.bank.max_rank, device="meta")}, "t_fwd"),
        (lambda p: {"t_fwd": torch.zeros(8, p.bank.max_rank)}, "t_fwd"),
        (lambda p: {"t_fwd": torch.zeros(9, p.bank.max_rank, dtype=torch.float64)}, "t_fwd"),
        (lambda p: {"t_fwd": torch.zeros(p.bank.max_rank, 9).t()}, "t_fwd"),
        (lambda p: {"weight": p.w[:, :5]}, "weight"),
    ],
}
BAD["lora_expand_"] = [c for c in _COMMON if c[1] not in ("lora_a", "lora_scale")] + [
    (lambda p: {"y": torch.zeros(9, 10, dtype=torch.long)}, "y"),
    (lambda p: {"y": torch.zeros(10, 9).t()}, "y"),
    (lambda p: {"t": torch.zeros(8, p.bank.max_rank)}, "t"),
    (lambda p: {"t": torch.zeros(9, p.bank.max_rank, device="meta")}, "t"),
    (lambda p: {"t": torch.zeros(9, 2)}, "t"),  # fewer columns than a slot's rank
    (lambda p: {"t": torch.zeros(9, p.bank.max_rank, dtype=torch.float64)}, "t"),
    (lambda p: {"lora_b": p.bank.lora_b[:, :4]}, "lora_b"),
    (lambda p: {"lora_b": p.bank.lora_b.double()}, "lora_b"),
    (lambda p: {"lora_b": p.bank.lora_b[:6]}, "lora_b"),  # slots point past it
    (lambda p: {"lora_b": p.bank.lora_b.t().contiguous().t()}, "lora_b"),
]


def _good_args(op: str, p: Problem) -> dict:
    bank = p.bank
    sorted_tokens, tiles, segments, block_ms = p.plan.as_args()
    plan = dict(slots=bank.slots, sorted_tokens=sorted_tokens, tiles=tiles, segments=segments, block_ms=block_ms)
    if op == "lora_linear":
        return dict(x=p.x, weight=p.w, bias=p.b, lora_a=bank.lora_a, lora_b=bank.lora_b, lora_scale=bank.scale,
                    **plan, max_rank=bank.max_rank, save_t=False, path="auto")
    if op == "lora_shrink":
        return dict(x=p.x, lora_a=bank.lora_a, lora_scale=bank.scale, **plan, max_rank=bank.max_rank)
    if op == "lora_expand_":
        return dict(y=torch.zeros(9, 10), t=torch.randn(9, bank.max_rank), lora_b=bank.lora_b, **plan)
    return dict(dy=torch.randn(9, 10), x=p.x, weight=p.w, lora_a=bank.lora_a, lora_b=bank.lora_b,
                lora_scale=bank.scale, **plan, max_rank=bank.max_rank, t_fwd=torch.randn(9, bank.max_rank),
                need_dx=True, need_dlora=True, path="auto")


@pytest.mark.skipif(DEVICE != "cpu", reason="the value checks read tensors on a CPU (MILP_DEBUG=1 on a GPU)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, i", [(op, i) for op, cases in BAD.items() for i in range(len(cases))])
def test_each_bad_argument_is_refused_naming_it(monkeypatch, op, i, backend):
    """Every raw op, with one argument made wrong, raises a ``ValueError``/``TypeError`` naming
    it on both backends; with the good arguments it runs."""
    over, name = BAD[op][i]
    p = _bad_problem()
    monkeypatch.setenv("MILP_KERNELS", backend)
    fn = getattr(torch.ops.milp, op)
    if i == 0:
        fn(*_good_args(op, p).values())
    args = dict(_good_args(op, p), **over(p))
    if name == "max_rank" and not isinstance(args["max_rank"], int):  # refused by the schema's int
        with pytest.raises(RuntimeError, match="max_rank"):
            fn(*args.values())
        return
    with pytest.raises((ValueError, TypeError), match=rf"(^|\W){name}\W") as info:
        fn(*args.values())
    assert "Triton" not in str(info.value)


def test_a_last_dimension_of_size_one_may_have_any_stride():
    """``torch.randn(0, 1) * 2`` has strides ``(1, 0)``: contiguous for torch (a size-1
    dimension's stride means nothing) and so left as it is by ``.contiguous()``. The checks
    took it for a strided ``x`` and told to call ``.contiguous()``, which changes nothing."""
    for T, backend in itertools.product((0, 3), BACKENDS):
        p = make_problem(**dict(_edge(T=T), k=1, n=1))
        x = torch.as_strided(p.x.clone(), (T, 1), (1, 0))
        assert x.is_contiguous() and x.contiguous().stride() == (1, 0)
        y1 = torch.as_strided(torch.zeros(T, dtype=torch.float64), (T, 1), (1, 0))
        t1 = torch.randn(T, p.bank.max_rank, dtype=torch.float64)
        with use_backend(backend):
            y = lora_linear(x, p.w, p.b, p.bank, p.plan)
            torch.testing.assert_close(y, lora_linear(p.x, p.w, p.b, p.bank, p.plan), rtol=0, atol=0)
            torch.ops.milp.lora_expand_(y1, t1, p.bank.lora_b, p.bank.slots, *p.plan.as_args())


# --------------------------------------------------------------------------- plan reuse
@settings(max_examples=25, **_SETTINGS)
@given(st.lists(st.lists(st.integers(-1, 2), max_size=8), min_size=2, max_size=4), st.lists(st.booleans(), min_size=4,
       max_size=4), st.sampled_from(BACKENDS), st.integers(0, 2**16))
def test_reused_plan_gives_what_a_fresh_one_does(batches, validate, backend, seed):
    """One plan of capacity 8, updated in place batch after batch (shrinking after bigger ones,
    validated or not), gives the outputs (forward, shrink, input gradient) of a plan built for
    each batch alone."""
    g = torch.Generator().manual_seed(seed)
    bank = AdapterBank(7, 6, max_users=3, dtype=torch.float64, device=DEVICE)
    bank.add(0, [2, 1], init="random", generator=g)
    bank.add(2, [3], init="random", generator=g)
    bank.requires_grad_(False)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64).to(DEVICE)
    plan = BatchPlan(8, 3, device=DEVICE)
    for ids, check in zip(batches, validate):
        ids_t = torch.tensor(ids, dtype=torch.long, device=DEVICE)
        plan.update(ids_t, validate=check)
        fresh = BatchPlan.build(ids_t, 3)
        x = torch.randn(len(ids), 7, generator=g, dtype=torch.float64).to(DEVICE)
        outs = []
        for pl in (plan, fresh):
            xi = x.clone().requires_grad_(True)
            with use_backend(backend):
                y = lora_linear(xi, w, None, bank, pl)
                y.square().sum().backward()
                outs.append((y.detach(), xi.grad, kernels.lora_shrink(x, bank, pl)))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        ref = shrink_ref(x, bank.lora_a, bank.scale, bank.slots, ids_t, bank.max_rank)
        assert rel_err(outs[0][2], ref) < 1e-12
