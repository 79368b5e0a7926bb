"""No host reads of device data in an eager ``lora_linear`` call, forward or backward, on any
path: once the batch's plan exists, a call only enqueues work, so on a GPU the host never
waits for the device and launches run ahead of it (eager decode and small training steps are
bound by the host).

* GPU: the real check, ``torch.cuda.set_sync_debug_mode("error")`` around the calls.
* CPU (interpreter, launches stubbed so only host code runs): a dispatch mode records every
  aten op that reads device data on the host (``_local_scalar_dense``: ``item``/``int``/
  ``bool``; ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without a size,
  ``equal``), and ``Tensor.tolist``/``cpu``/``numpy`` are wrapped. The value checks that read
  tensors only on CPU (``MILP_DEBUG`` on a GPU) are turned off, as a GPU run has them.
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import AdapterBank, BatchPlan, aot
from kernels import library as L

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
          "unique_consecutive", "repeat_interleave", "equal", "is_nonzero", "allclose"}
BIG = 2**31 - 1
PATHS = {  # dispatch knobs that force each path (and the split path's schedules)
    "split": dict(decode_max_tokens=BIG, split_expand_first_max_tokens=0),
    "split-expand-first": dict(decode_max_tokens=BIG, split_expand_first_max_tokens=BIG),
    "split-overlap": dict(decode_max_tokens=BIG, split_overlap_min_tokens=1),
    "fused": dict(decode_max_tokens=0, split_tokens_per_segment=0, fused_max_rank=BIG),
    "fused_t": dict(decode_max_tokens=0, split_tokens_per_segment=0, fused_max_rank=0),
}
SPLIT_KERNELS = {"lora_shrink", "lora_expand", "lora_grad_weights"}
KERNELS = {"split": SPLIT_KERNELS, "split-expand-first": SPLIT_KERNELS, "split-overlap": SPLIT_KERNELS,
           "fused": {"fused_lora_linear", "lora_grad_weights"},
           "fused_t": {"fused_lora_linear", "lora_shrink", "lora_grad_weights"}}


class HostReads(TorchDispatchMode):
    """Records aten ops that read tensor data on the host, with our frames that issued them."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/kernels/" in f.filename]
        self.seen[(what, " <- ".join(f"{f.name}:{f.lineno}" for f in frames[-3:]))] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in _READS:
            self.note(func._schema.name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Yields the recorder (CPU) or None (GPU: sync debug mode raises on a read)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield None
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    mode = HostReads()
    for meth in ("tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def wrapped(self, *a, _orig=orig, _meth=meth, **k):
            mode.note(f"Tensor.{_meth}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, wrapped)
    # a dispatch mode turns the eager direct call off; real eager calls take it
    monkeypatch.setattr(L, "direct_call_ok", lambda x: True)
    with mode:
        yield mode
    monkeypatch.undo()


@pytest.fixture
def host_only(monkeypatch):
    """CPU: the Triton path with every launch a no-op and no value checks (what a GPU host
    runs); yields the launch recorder (``None`` on a GPU)."""
    if CUDA:
        yield None
        return
    if not kernels.interpreting():
        pytest.skip("the CPU check runs the Triton path's host code: needs TRITON_INTERPRET=1")
    monkeypatch.setattr(L, "_values_checked", lambda t: False)
    with kernels.use_backend("triton"), aot.LaunchRecorder(launch=False) as launches:
        yield launches


def problem(tokens: int, users: int = 8, k: int = 48, n: int = 80):
    g = torch.Generator().manual_seed(tokens)
    bank = AdapterBank(k, n, max_users=users, dtype=torch.bfloat16, device=DEV)
    for u in range(users):
        bank.add(u, [(8, 16, 96)[u % 3]] + [4] * (u % 2), alpha=16.0, init="random", generator=g)
    ids = torch.arange(tokens) % (users + 1) - 1  # a share of base-only tokens
    plan = BatchPlan.build(ids.to(DEV), users)
    x = torch.randn(tokens, k, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(DEV, torch.bfloat16)
    dy = torch.randn(tokens, n, generator=g).to(DEV, torch.bfloat16)
    return bank, plan, x, w, dy


def test_the_recorder_sees_host_reads(monkeypatch):
    """The CPU check can fail: each kind of read it looks for is recorded."""
    if CUDA:
        pytest.skip("CPU recorder")
    t = torch.tensor([1.0, 0.0])
    with host_reads(monkeypatch) as rec:
        t[0].item(), int(t[0]), bool(t[0]), t.tolist(), t.nonzero(), t.cpu()
    kinds = {what for what, _ in rec.seen}
    assert {"aten::_local_scalar_dense", "aten::nonzero", "Tensor.tolist", "Tensor.cpu"} <= kinds, kinds


def check_steps(monkeypatch, host_only, tokens: int, weighted: bool, knobs: dict, kernels_expected: set) -> None:
    """One training step and one inference call (first calls outside: compile, memoise), no
    host reads during the second pair; the launched kernels are ``kernels_expected``."""
    bank, plan, x0, w, dy = problem(tokens)
    w = w if weighted else None
    x = x0.clone().requires_grad_(True)
    for p in (bank.lora_a, bank.lora_b):
        p.requires_grad_(True)

    def both():
        x.grad = bank.lora_a.grad = bank.lora_b.grad = None
        kernels.lora_linear(x, w, None, bank, plan).backward(dy)
        with torch.no_grad():
            kernels.lora_linear(x0, w, None, bank, plan)

    with kernels.use_dispatch(**knobs):
        both()
        with host_reads(monkeypatch) as rec:
            both()
    if rec is not None:
        assert not rec.seen, f"host reads of device data: {dict(rec.seen)}"
    if host_only is not None:  # the knobs chose the path named
        assert {r["kernel"] for r in host_only.records.values()} == kernels_expected


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_no_host_reads_in_eager_forward_and_backward(host_only, monkeypatch, path, tokens):
    check_steps(monkeypatch, host_only, tokens, True, PATHS[path], KERNELS[path])


@pytest.mark.parametrize("tokens", [1, 300])
def test_no_host_reads_for_the_adapters_alone(host_only, monkeypatch, tokens):
    """``weight=None`` (a base computed elsewhere): shrink and expand only."""
    check_steps(monkeypatch, host_only, tokens, False, {}, SPLIT_KERNELS)
