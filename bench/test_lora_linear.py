"""Forward of ``milp::lora_linear`` (``y = x Wᵀ + Σ s ⊙ (x Aᵀ) B``) against the baselines.

Decode workloads (one token per user) take the op's decode path on CUDA when the batch has at
most ``kernels.DECODE_MAX_TOKENS`` tokens (cuBLAS base + split-K shrink + expand), the fused
kernel above; prefill workloads take the fused kernel. Decode workloads are also timed as
CUDA-graph replays (``graph_ms``): serving replays graphs, so launch gaps are not its cost.
"""

from __future__ import annotations

import _util as U
import baselines as B
import pytest

pytestmark = U.PYTESTMARK
PARAMS, IDS = U.cases("fwd")


@pytest.mark.parametrize("wl,impl", PARAMS, ids=IDS)
def test_lora_linear(benchmark, peaks, wl, impl):
    p = U.problem(wl)
    fn = B.forward_fn(impl, p)
    out = fn()
    U._sync()
    err = U.check(f"{impl} forward", out, p.ref("base" if impl == "base" else "fwd"))
    del out
    U.run_op(benchmark, peaks, wl, p, impl, "fwd", fn, {"rel_err": err}, graph=wl.phase == "decode" and impl != "peft")

