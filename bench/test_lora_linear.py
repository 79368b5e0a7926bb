"""Forward of ``milp::lora_linear`` (``y = x Wᵀ + Σ s ⊙ (x Aᵀ) B``) against the baselines.

Decode workloads (one token per user) take the op's decode path on CUDA when the batch has at
most ``kernels.DECODE_MAX_TOKENS`` tokens (cuBLAS base + split-K shrink + expand), the fused
kernel above; prefill workloads take the fused kernel. Decode workloads are also timed as
CUDA-graph replays (``graph_ms``): serving replays graphs, so launch gaps are not its cost.
"""

from __future__ import annotations

import importlib.util

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
    flops, nbytes = U.counts("fwd", p, impl)
    U.run(
        benchmark,
        workload=wl.group,
        impl=impl,
        fn=fn,
        flops=flops,
        nbytes=nbytes,
        tokens=wl.tokens,
        peaks=peaks,
        info={**U.describe(wl, p), "rel_err": err},
        graph=wl.phase == "decode" and impl != "peft",
    )


def test_decoder_layer():
    """Hook for a whole decoder layer (attention + the three FFN linears with adapters).

    It belongs with the multi-user runtime (``milp``): build a LLaMA decoder layer with
    ``milp.apply_milp``, then call ``U.run(benchmark, workload="layer:<id>", impl=..., ...)`` for
    ``milp`` and for the same layer under PEFT / the per-user loop; conftest and report.py pick
    it up with no change (see bench/README.md, "Adding a benchmark").
    """
    if importlib.util.find_spec("milp.runtime") is None:
        pytest.skip("whole-decoder-layer benchmark waits for the multi-user runtime (milp.runtime)")
    pytest.skip("milp.runtime exists: wire the decoder-layer benchmark here (bench/README.md)")
