"""``milp::lora_shrink`` (``t[i, :R_u] = s ⊙ x_i A_uᵀ``, fp32 ``[T, R_T]``) against the per-user
loop and the padded ``bmm``; the base ``x Wᵀ`` is timed beside them for scale (what the
adapters' shrink costs relative to the layer it rides on)."""

from __future__ import annotations

import _util as U
import baselines as B
import pytest

pytestmark = U.PYTESTMARK
PARAMS, IDS = U.cases("shrink")


@pytest.mark.parametrize("wl,impl", PARAMS, ids=IDS)
def test_lora_shrink(benchmark, peaks, wl, impl):
    p = U.problem(wl)
    fn = B.shrink_fn(impl, p)
    out = fn()
    U._sync()
    err = U.check(f"{impl} shrink", out, p.ref("base" if impl == "base" else "shrink"))
    del out
    U.run_op(benchmark, peaks, wl, p, impl, "shrink", fn, {"rel_err": err}, graph=wl.phase == "decode")
