"""The direct launch path (:mod:`kernels._launch`) passes Triton's launcher exactly what
``JITFunction.run`` passes: the same compiled kernel, grid, stream and arguments, for every
launcher, and a kernel of its own wherever Triton would specialise differently (a misaligned
pointer, a stride that is not 1, another dtype).

Compiled kernels cannot run here, so a probe process (``TRITON_INTERPRET=0``) puts Triton on a
stand-in CUDA driver (``kernels._fake_cuda``: real sm_90 compiles, recorded launches) and launches each
kernel once through Triton's path (``MILP_TRITON_LAUNCH=jit``) and three times through the
direct path: the first two of those go through Triton (it picks and compiles the kernel; then
its launcher call is checked against the direct path's), the third must not call
``JITFunction.run`` at all and must record the same launch. On a GPU the whole
kernel suite runs through the direct path against float64 references.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels._launch import Launch, direct_launch_enabled

HERE = Path(__file__).resolve().parent


def test_switch_names_its_values(monkeypatch):
    monkeypatch.setenv("MILP_TRITON_LAUNCH", "jit")
    assert direct_launch_enabled() is False
    monkeypatch.setenv("MILP_TRITON_LAUNCH", "direct")
    assert direct_launch_enabled() is True
    monkeypatch.setenv("MILP_TRITON_LAUNCH", "fast")
    with pytest.raises(ValueError, match="MILP_TRITON_LAUNCH must be 'direct' or 'jit', got 'fast'"):
        direct_launch_enabled()


def test_launch_takes_the_given_path_for_anything_but_a_compiled_kernel():
    """The interpreter's kernels, the launch recorder's wrappers: ``fn[grid](*args, **kw)``."""
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((grid, args, kw))

    Launch((3, 2), {"BLOCK": 16})(Kernel(), 1, "a")
    assert seen == [((3, 2), (1, "a"), {"BLOCK": 16})]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The probe's report: ``{case: {"jit": launch, "direct": launch, "jit_runs": n, ...}}``."""
    tmp = tmp_path_factory.mktemp("launch")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "cache"),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("MILP_TRITON_LAUNCH", None)
    env.pop("MILP_RECORD_LAUNCHES", None)
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: the kernels must state the option themselves
    out = subprocess.run([sys.executable, str(HERE / "test_launch.py"), str(tmp / "report.json")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((tmp / "report.json").read_text())


CASES = ["shrink", "shrink_partials", "shrink_fp32", "shrink_misaligned_x", "shrink_strided_x", "expand_add",
         "expand_write", "expand_partials", "expand_gemv", "fused", "fused_t", "grad_weights"]


@pytest.mark.parametrize("case", CASES)
def test_direct_launch_passes_what_triton_passes(probe, case):
    r = probe["cases"][case]
    assert r["jit"] is not None, "Triton's path launched nothing"
    assert r["direct"] == r["jit"], "the direct launch differs from Triton's"
    assert r["verified"] == r["jit"]
    assert r["direct_first_runs"] == r["direct_verify_runs"] == 1  # Triton picks the kernel, then is watched
    assert r["direct_runs"] == 0, "the third direct call went through JITFunction.run"


def test_every_kernel_is_compiled_with_fp_fusion_whatever_tritons_default(probe):
    """The launch options state ``enable_fp_fusion=True`` (``LaunchConfig.kwargs``): with Triton's
    default set to off (``TRITON_DEFAULT_FP_FUSION=0`` in the probe, Triton 3.10's default) every
    kernel still compiles with FMA contraction, so numerics and speed do not follow the environment."""
    for case, r in probe["cases"].items():
        assert r["jit"]["fp_fusion"] is True, case


def test_a_plan_goes_direct_from_its_fourth_call(probe):
    """First call: Triton's path (a one-shot plan, autotuning's under ``use_config``, costs what
    Triton's path costs); second: Triton's, remembering its kernel; third: Triton's with its
    launcher call checked against the direct one; then direct."""
    assert probe["runs_per_call"] == {"memoised": [1, 1, 1, 0, 0], "use_config": [1] * 5}


def test_a_launcher_call_unlike_tritons_is_refused_with_a_warning(probe):
    r = probe["refused"]
    assert r["runs_per_call"] == [1] * 5
    assert len(r["warnings"]) == 1 and "differs from the direct path's" in r["warnings"][0]


def test_a_new_specialisation_gets_its_own_kernel(probe):
    """Aligned, misaligned, then aligned again through the direct path: the kernels Triton picks
    for each, one compiled variant per specialisation."""
    s = probe["sequence"]
    assert s["direct"] == s["jit"]
    aligned, misaligned, again = s["direct"]
    assert aligned == again != misaligned
    assert s["direct_runs"] == [0, 0, 0]  # each specialisation known and verified: all direct
    # a 1 stride is specialised away by Triton: a strided x is another kernel too
    assert probe["cases"]["shrink_strided_x"]["jit"]["launcher"] != probe["cases"]["shrink"]["jit"]["launcher"]
    assert probe["cases"]["expand_gemv"]["jit"]["name"] == "_expand_gemv_kernel"


def test_launch_hooks_are_honoured(probe):
    """With a launch hook installed (Triton's profiler), the direct path builds the launch
    metadata and passes the hooks, as Triton does; without one it passes none."""
    h = probe["hooks"]
    assert h["with_hook"]["hooks"] == [True, False] and h["names"] == [h["with_hook"]["name"]]
    assert probe["cases"]["shrink"]["direct"]["hooks"] == probe["cases"]["shrink"]["jit"]["hooks"]


# ----------------------------------------------------------------------------------------------
# the probe (run as a script in its own process, TRITON_INTERPRET=0)


def _probe(report_path: str) -> None:  # pragma: no cover - runs in the probe process
    from kernels import _fake_cuda  # first: the stand-in driver must be active before any launch

    launches = _fake_cuda.install(arch=90, stream=7)
    import torch
    from cases import make_case
    from triton.runtime.jit import JITFunction

    from kernels.ops.expand import lora_expand_
    from kernels.ops.fused_linear import fused_lora_linear
    from kernels.ops.grad_weights import lora_grad_weights
    from kernels.ops.shrink import lora_shrink

    runs = [0]
    jit_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs[0] += 1
        return jit_run(self, *args, **kwargs)

    JITFunction.run = counting_run

    def problem(dtype):
        return make_case(40, 48, 56, {0: [8], 1: [3, 5], 2: [16]}, max_users=4, dtype=dtype, seed=1)

    bf, fp = problem(torch.bfloat16), problem(torch.float32)
    # the expand's decode (GEMV) form for batches of at most 4 tokens
    table = Path(report_path).with_name("configs.json")
    table.write_text(json.dumps({"ops": {"expand": [dict(max_tokens=4, n=None, k=None, block_m=16, block_n=32,
                                                             block_r=16, split_n=2)]}}))
    os.environ["MILP_KERNEL_CONFIGS"] = str(table)
    decode = make_case(4, 48, 56, {0: [8], 1: [3, 5]}, max_users=4, dtype=torch.bfloat16, seed=2)

    def shrink_args(c, x=None, **kw):
        p, b = c.plan, c.bank
        return lambda: lora_shrink(c.x if x is None else x, b.lora_a, b.scale, b.slots, p.sorted_tokens, p.tiles,
                                   p.segments, list(p.block_ms), b.max_rank, **kw)

    def shifted(x):  # the same values one element into a buffer: data_ptr() % 16 == 2 or 4
        buf = torch.empty(x.numel() + 1, dtype=x.dtype)
        out = buf[1:].view_as(x)
        out.copy_(x)
        return out

    def strided(x):  # column stride 2
        buf = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        out = buf[:, ::2]
        out.copy_(x)
        return out

    def expand(c, *, partials=False, accumulate=True):
        p, b = c.plan, c.bank
        t = torch.randn(3 if partials else 1, c.x.shape[0], b.max_rank)
        t = t if partials else t[0]
        y = torch.zeros(c.x.shape[0], b.out_features, dtype=c.x.dtype)
        return lambda: lora_expand_(y, t, b.lora_b, b.slots, p.sorted_tokens, p.tiles, p.segments,
                                    list(p.block_ms), accumulate=accumulate)

    def fused(c, precompute_t):
        p, b = c.plan, c.bank
        return lambda: fused_lora_linear(c.x, c.w, c.b, b.lora_a, b.lora_b, b.scale, b.slots, p.sorted_tokens,
                                         p.tiles, p.segments, list(p.block_ms), b.max_rank,
                                         precompute_t=precompute_t)

    def grad_weights(c):
        p, b = c.plan, c.bank
        T = c.x.shape[0]
        dy = torch.randn(T, b.out_features, dtype=c.x.dtype)
        t_bwd, t_fwd = torch.randn(T, b.max_rank), torch.randn(T, b.max_rank)
        return lambda: lora_grad_weights(c.x, dy, t_bwd, t_fwd, b.slots, p.sorted_tokens, p.segments, b.capacity,
                                         b.max_rank)

    calls = {
        "shrink": shrink_args(bf),
        "shrink_partials": shrink_args(bf, partials=True),
        "shrink_fp32": shrink_args(fp),
        "shrink_misaligned_x": shrink_args(bf, x=shifted(bf.x)),
        "shrink_strided_x": shrink_args(bf, x=strided(bf.x)),
        "expand_add": expand(bf),
        "expand_write": expand(bf, accumulate=False),
        "expand_partials": expand(bf, partials=True),
        "expand_gemv": expand(decode, partials=True),
        "fused": fused(bf, False),
        "fused_t": fused(bf, True),
        "grad_weights": grad_weights(bf),
    }

    def last_launch(call, mode):
        os.environ["MILP_TRITON_LAUNCH"] = mode
        del launches[:]
        runs[0] = 0
        call()
        return (launches[-1] if launches else None), runs[0]

    report = {"cases": {}}
    for name, call in calls.items():
        jit, _ = last_launch(call, "jit")
        _, first_runs = last_launch(call, "direct")
        verified, verify_runs = last_launch(call, "direct")
        direct, direct_runs = last_launch(call, "direct")
        report["cases"][name] = dict(jit=jit, verified=verified, direct=direct, direct_first_runs=first_runs,
                                     direct_verify_runs=verify_runs, direct_runs=direct_runs)

    # a problem not seen before, three direct calls: Triton's path twice (the plan's first call;
    # then the second binds the plan and asks Triton for the kernel), then the direct path; a
    # plan that is not memoised (inside use_config) is called once: Triton's path each time
    from kernels.tuning import LaunchConfig, use_config

    fresh = shrink_args(make_case(24, 48, 56, {0: [8]}, max_users=2, dtype=torch.bfloat16, seed=3))
    report["runs_per_call"] = {"memoised": [last_launch(fresh, "direct")[1] for _ in range(5)]}
    with use_config("shrink", LaunchConfig(block_m=16, block_r=16, block_k=16)):
        report["runs_per_call"]["use_config"] = [last_launch(fresh, "direct")[1] for _ in range(5)]

    # a Triton whose launcher call is not the one the direct path would make (here: the direct
    # path's is one argument longer): verification refuses it, with one warning, and the plan
    # keeps Triton's path
    import warnings

    from kernels._launch import Launch

    serve = Launch._serve

    def longer_call(self, fn, args):
        bound = serve(self, fn, args)
        if bound:
            self._tail = self._tail + (0,)
        return bound

    Launch._serve = longer_call
    other = shrink_args(make_case(20, 48, 56, {0: [8]}, max_users=2, dtype=torch.bfloat16, seed=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused = [last_launch(other, "direct")[1] for _ in range(5)]
    Launch._serve = serve
    report["refused"] = {"runs_per_call": refused, "warnings": [str(w.message) for w in caught]}

    # one launch plan (the same problem), three specialisations in turn
    seq = [shrink_args(bf), shrink_args(bf, x=shifted(bf.x)), shrink_args(bf)]
    report["sequence"] = {mode: [last_launch(call, mode)[0]["launcher"] for call in seq] for mode in ("jit", "direct")}
    report["sequence"]["direct_runs"] = [last_launch(call, "direct")[1] for call in seq]

    import triton.knobs as knobs

    names = []

    def hook(metadata):
        names.append(metadata.get()["name"])  # a LazyDict

    hooks = knobs.runtime.launch_enter_hook
    if hasattr(hooks, "add"):
        hooks.add(hook)
    else:  # a triton whose hooks are plain callables
        knobs.runtime.launch_enter_hook = hook
    with_hook, _ = last_launch(calls["shrink"], "direct")
    report["hooks"] = {"with_hook": with_hook, "names": names}
    Path(report_path).write_text(json.dumps(report))


if __name__ == "__main__":
    _probe(sys.argv[1])
