"""``milp::lora_expand_`` (``y[i] += t[i, :R_u] B_u`` in place) against the per-user loop and the
padded ``bmm``; the base ``x Wᵀ`` is timed beside them for scale.

``t`` is the float64 reference shrink cast to the accumulator dtype; the check runs each
implementation once on a fresh copy of ``y``, the timing then updates a working copy in place.
"""

from __future__ import annotations

import _util as U
import baselines as B
import pytest
import torch

from kernels import reference

pytestmark = U.PYTESTMARK
PARAMS, IDS = U.cases("expand")


@pytest.mark.parametrize("wl,impl", PARAMS, ids=IDS)
def test_lora_expand(benchmark, peaks, wl, impl):
    p = U.problem(wl)
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    t = p.ref("shrink").to(acc)
    gen = torch.Generator(device=p.device).manual_seed(wl.seed + 3)
    y0 = torch.randn(wl.tokens, wl.n, device=p.device, generator=gen).to(p.dtype)
    b = p.bank
    if impl == "base":
        out, expect = B.expand_fn(impl, p, y0.clone(), t)(), p.ref("base")
    else:
        out = B.expand_fn(impl, p, y0.clone(), t)()
        expect = reference.expand_ref(y0, t, b.lora_b.detach(), b.slots, p.ids)
    U._sync()
    err = U.check(f"{impl} expand", out, expect)
    del out, expect
    fn = B.expand_fn(impl, p, y0.clone(), t)
    U.run_op(benchmark, peaks, wl, p, impl, "expand", fn, {"rel_err": err}, graph=wl.phase == "decode")
