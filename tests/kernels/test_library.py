"""The torch.library ops: opcheck, torch.compile, NVTX names, bad input, transformers coexistence."""
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import AdapterBank, BatchPlan, lora_linear, use_backend
from kernels._backend import interpreting, set_interpreter_overflow_checks
from kernels.plan import DEFAULT_BLOCK_MS
from kernels.reference import lora_linear_ref

from .cases import make_case, rel_err


def _op_args(case, save_t=True):
    sorted_tokens, tiles, segments, block_ms = case.plan.as_args()
    bank = case.bank
    return (case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots, sorted_tokens, tiles,
            segments, block_ms, bank.max_rank, save_t)


def test_opcheck_lora_linear(device):
    # schema, fake (meta) impl, autograd registration and dispatch, on the path this device takes
    case = make_case(9, 8, 10, {0: [2, 3], 1: [4]}, max_users=3, dtype=torch.float64, device=device)
    case.x.requires_grad_(True)
    case.bank.lora_a.requires_grad_(True)
    torch.library.opcheck(torch.ops.milp.lora_linear.default, _op_args(case))
    sorted_tokens, tiles, segments, block_ms = case.plan.as_args()
    bank = case.bank
    torch.library.opcheck(torch.ops.milp.lora_shrink.default,
                          (case.x.detach(), bank.lora_a.detach(), bank.scale, bank.slots, sorted_tokens, tiles,
                           segments, block_ms, bank.max_rank))
    y = torch.randn(9, 10, dtype=torch.float64, device=device)
    t = torch.randn(9, bank.max_rank, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.milp.lora_expand_.default,
                          (y, t, bank.lora_b.detach(), bank.slots, sorted_tokens, tiles, segments, block_ms))


class _TwoLayer(torch.nn.Module):
    """A gated FFN where all three linears carry per-user adapters (LLaMA's MLP)."""

    def __init__(self, hidden, inner, max_users):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate = torch.nn.Linear(hidden, inner, bias=False)
        self.up = torch.nn.Linear(hidden, inner, bias=False)
        self.down = torch.nn.Linear(inner, hidden, bias=False)
        self.banks = torch.nn.ModuleDict()
        for name, (k, n) in {"gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}.items():
            bank = AdapterBank(k, n, max_users=max_users)
            bank.add(0, [4, 2], init="random", generator=g)
            bank.add(2, [8], init="random", generator=g)
            self.banks[name] = bank

    def forward(self, x, plan):
        g = lora_linear(x, self.gate.weight, None, self.banks["gate"], plan)
        u = lora_linear(x, self.up.weight, None, self.banks["up"], plan)
        return lora_linear(torch.nn.functional.silu(g) * u, self.down.weight, None, self.banks["down"], plan)


def test_torch_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    # inductor fuses silu * up and the square's backward around the opaque op, so fp32 roundings
    # land in another order than eagerly: a few elements differed by 1.6e-6 relative (over
    # assert_close's fp32 default of 1.3e-6) in one run of the suite
    close = dict(rtol=1e-5, atol=1e-5)
    model = _TwoLayer(16, 24, 3).to(device)
    ids = torch.tensor([0, 2, -1, 0, 1, 2, 2], device=device)
    plan = BatchPlan.build(ids, 3)
    x = torch.randn(7, 16, device=device, requires_grad=True)
    eager = model(x, plan)
    eager.square().sum().backward()
    grads_eager = [x.grad.clone()] + [model.banks[n].lora_a.grad.clone() for n in ("gate", "up", "down")]
    x.grad = None
    model.zero_grad()
    # inductor (a C++ toolchain on CPU); the op stays one opaque node in the graph
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x, plan)
    torch.testing.assert_close(out, eager, **close)
    out.square().sum().backward()
    grads = [x.grad] + [model.banks[n].lora_a.grad for n in ("gate", "up", "down")]
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, **close)
    # a new batch with the same shapes reuses the compiled graph
    plan.update(torch.tensor([2, 2, 2, 0, 0, -1, -1], device=device))
    torch.testing.assert_close(compiled(x, plan), model(x, plan), **close)


@pytest.mark.parametrize("T", [5, 80])  # decode path, the path a GPU's dispatch picks for 80 tokens
def test_nvtx_ranges_show_in_profiler(monkeypatch, device, T):
    case = make_case(T, 8, 10, {0: [2]}, max_users=1, device=device)
    with use_backend("triton"):
        monkeypatch.setenv("MILP_NVTX", "1")
        with torch.profiler.profile() as prof:
            lora_linear(case.x, case.w, case.b, case.bank, case.plan)
        names = {e.name for e in prof.events()}
        assert "milp.lora_linear" in names
        path = kernels.choose_path(T, case.bank.max_rank, num_segments=case.plan.num_segments, device=case.x.device)
        kernel = "milp.kernel.lora_shrink" if path == "split" else "milp.kernel.fused_lora_linear"
        assert kernel in names
        monkeypatch.setenv("MILP_NVTX", "0")
        with torch.profiler.profile() as prof:
            lora_linear(case.x, case.w, case.b, case.bank, case.plan)
        assert not {e.name for e in prof.events() if e.name.startswith("milp.")}


@pytest.mark.skipif(not interpreting(), reason="checks the interpreter's int32 overflow assertions")
def test_kernels_pass_with_interpreter_overflow_checks_on():
    old = set_interpreter_overflow_checks(True)
    try:
        with use_backend("triton"):
            for T in (5, 70):  # decode path and fused path
                case = make_case(T, 20, 24, {0: [4], 1: [8, 200]}, max_users=3, seed=T)
                x = case.x.clone().requires_grad_(True)
                y = lora_linear(x, case.w, case.b, case.bank, case.plan)
                y.sum().backward()
                bank = case.bank
                ref = lora_linear_ref(case.x, case.w, case.b, bank.lora_a, bank.lora_b, bank.scale, bank.slots,
                                      case.ids)
                assert rel_err(y, ref) < 2e-5
    finally:
        set_interpreter_overflow_checks(old)


# --------------------------------------------------------------------------- bad input
def _raw(case, **over):
    args = dict(zip(
        ["x", "weight", "bias", "lora_a", "lora_b", "lora_scale", "slots", "sorted_tokens", "tiles", "segments",
         "block_ms", "max_rank", "save_t"], _op_args(case, save_t=False)))
    args.update(over)
    return torch.ops.milp.lora_linear(*args.values())


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (lambda c: {"x": c.x[:, :7].contiguous()}, ValueError, r"weight must have shape \[N, 7\]"),
        (lambda c: {"x": c.x.double()}, TypeError, "weight must have dtype in"),
        (lambda c: {"x": c.x.long()}, TypeError, "x must have dtype in"),
        (lambda c: {"x": c.x[0]}, ValueError, "x must be 2-D"),
        (lambda c: {"bias": c.b[:3]}, ValueError, r"bias must have shape \[10\]"),
        (lambda c: {"lora_a": c.bank.lora_a[:, :5]}, ValueError, "lora_a must have shape"),
        (lambda c: {"lora_b": c.bank.lora_b.half()}, TypeError, "lora_b must have dtype"),
        (lambda c: {"lora_scale": c.bank.scale.double()}, TypeError, "lora_scale must have dtype in"),
        (lambda c: {"lora_scale": torch.full_like(c.bank.scale, math.nan)}, ValueError, "lora_scale contains NaN"),
        (lambda c: {"slots": c.bank.slots.long()}, TypeError, "slots must have dtype in"),
        (lambda c: {"slots": _slots_with(c, 0, rank=0 - 3)}, ValueError, "ranks >= 0"),
        (lambda c: {"slots": _slots_with(c, 0, offset=c.bank.capacity)}, ValueError, "past lora_a"),
        (lambda c: {"max_rank": 1}, ValueError, "max_rank=1 is smaller"),
        (lambda c: {"max_rank": -1}, ValueError, "max_rank must be an int >= 0"),
        (lambda c: {"sorted_tokens": c.plan.sorted_tokens[:2]}, ValueError, "fewer than x's"),
        (lambda c: {"segments": c.plan.segments[:, :2].contiguous()}, ValueError, "segments and tiles"),
        (lambda c: {"block_ms": []}, ValueError, "block_ms"),
        (lambda c: {"x": c.x.t().contiguous().t()}, ValueError, "unit stride"),
    ],
)
def test_bad_raw_op_input(over, exc, match):
    case = make_case(9, 8, 10, {0: [2, 3], 1: [4]}, max_users=3)
    with pytest.raises(exc, match=match):
        _raw(case, **over(case))


@pytest.mark.parametrize(
    "over",
    [
        lambda c: {"x": c.x[:, :7].contiguous()},
        lambda c: {"x": c.x.double()},
        lambda c: {"x": c.x.long()},
        lambda c: {"x": c.x[0]},
        lambda c: {"x": c.x.t().contiguous().t()},
        lambda c: {"x": c.x.numpy()},
        lambda c: {"weight": c.w.t()},
        lambda c: {"bias": c.b[:3]},
        lambda c: {"bias": c.b.double()},
        lambda c: {"lora_a": c.bank.lora_a[:, :5]},
        lambda c: {"lora_a": c.bank.lora_a[:3]},
        lambda c: {"lora_b": c.bank.lora_b.half()},
        lambda c: {"lora_b": c.bank.lora_b.t().contiguous().t()},
        lambda c: {"lora_scale": c.bank.scale.double()},
        lambda c: {"lora_scale": c.bank.scale[:2]},
        lambda c: {"slots": c.bank.slots.long()},
        lambda c: {"slots": c.bank.slots.t().contiguous().t()},
        lambda c: {"sorted_tokens": c.plan.sorted_tokens[:2]},
        lambda c: {"sorted_tokens": c.plan.sorted_tokens.long()},
        lambda c: {"segments": c.plan.segments[:, :2].contiguous()},
        lambda c: {"tiles": c.plan.tiles.t().contiguous().t()},
        lambda c: {"block_ms": []},
        lambda c: {"max_rank": -1},
        lambda c: {"max_rank": True},
        lambda c: {"max_rank": 4.0},
    ],
)
def test_structure_checks_reject_each_bad_argument(over):
    """``check_lora_args``'s structural checks (no value reads) refuse each of these with a
    ``TypeError``/``ValueError`` and accept the good arguments."""
    from kernels.library import check_lora_args

    case = make_case(9, 8, 10, {0: [2, 3], 1: [4]}, max_users=3)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "lora_scale", "slots", "sorted_tokens", "tiles", "segments",
             "block_ms", "max_rank"]
    good = dict(zip(names, _op_args(case, save_t=False)))

    def check(a):
        check_lora_args(a["x"], a["lora_a"], a["lora_scale"], a["slots"], a["sorted_tokens"], a["tiles"],
                        a["segments"], a["block_ms"], a["max_rank"], weight=a["weight"], bias=a["bias"],
                        lora_b=a["lora_b"], values=False)

    check(good)
    with pytest.raises((TypeError, ValueError)):
        check(dict(good, **over(case)))


def test_eager_backward_gets_a_checked_dy():
    """The eager autograd path (``EagerLoraLinear``) skips the backward's argument checks: its
    forward checked the tensors, and autograd refuses a ``dy`` unlike ``y`` before our code runs."""
    case = make_case(9, 8, 10, {0: [2, 3], 1: [4]}, max_users=3)
    x = case.x.clone().requires_grad_(True)
    y = lora_linear(x, case.w, case.b, case.bank, case.plan)
    with pytest.raises(RuntimeError, match="shape"):
        y.backward(torch.ones(y.shape[0] + 1, y.shape[1]))
    y.backward(torch.ones(y.shape, dtype=torch.int64), retain_graph=True)  # autograd casts it to y's dtype
    dx_int, x.grad = x.grad, None
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(dx_int, x.grad)


def _slots_with(case, user, offset=None, rank=None):
    slots = case.bank.slots.clone()
    if offset is not None:
        slots[user, 0] = offset
    if rank is not None:
        slots[user, 1] = rank
    return slots


def test_bad_wrapper_input():
    case = make_case(9, 8, 10, {0: [2, 3], 1: [4]}, max_users=3)
    with pytest.raises(ValueError, match="plan was built for 9"):
        lora_linear(case.x[:5], case.w, case.b, case.bank, case.plan)
    with pytest.raises(ValueError, match="bank.in_features"):
        lora_linear(torch.randn(9, 6), case.w[:, :6], case.b, case.bank, case.plan)
    with pytest.raises(TypeError, match="bank must be an AdapterBank"):
        lora_linear(case.x, case.w, case.b, "bank", case.plan)
    with pytest.raises(TypeError, match="plan must be a BatchPlan"):
        lora_linear(case.x, case.w, case.b, case.bank, None)
    small = AdapterBank(8, 10, max_users=2)
    with pytest.raises(ValueError, match="exceeds bank.max_users"):
        lora_linear(case.x, case.w, case.b, small, case.plan)
    with pytest.raises(ValueError, match=r"token_user ids must be in \[-1, 3\)"):
        BatchPlan.build(torch.tensor([0, 3]), 3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight must be on"):
            lora_linear(case.x, case.w.cuda(), case.b, case.bank, case.plan)


def test_backend_selection(monkeypatch):
    x = torch.zeros(1)
    with use_backend("torch"):
        assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv("MILP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="MILP_KERNELS"):
        kernels.backend_for(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cuda"):
            pass


def test_interpreter_probe_and_its_error(monkeypatch):
    """The interpreter probe passes where the suite runs the kernels interpreted; where it
    fails (triton < 3.7 with NumPy >= 2.4) the triton backend on CPU refuses with the reason
    instead of a TypeError from inside a kernel."""
    from kernels import _backend

    if kernels.interpreting():
        assert _backend.interpreter_problem() is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "interpreter_problem", lambda: "install triton>=3.7 or 'numpy<2.4'")
    with use_backend("triton"), pytest.raises(RuntimeError, match="numpy<2.4"):
        kernels.backend_for(torch.zeros(1))


def test_interpreter_probe_gives_the_same_answer_inside_a_torch_func_transform():
    """Its first call inside ``torch.func.grad`` made the probe's tensor a wrapper the
    interpreter cannot read, and the cached failure refused the interpreter for the process."""
    from kernels import _backend

    outside = _backend.interpreter_problem()
    seen = []

    def f(x):
        _backend.interpreter_problem.cache_clear()
        seen.append(_backend.interpreter_problem())
        return (x * 2).sum()

    try:
        torch.func.grad(f)(torch.ones(3))
    finally:
        _backend.interpreter_problem.cache_clear()
    assert seen == [outside] and _backend.interpreter_problem() == outside


def test_env_reads_follow_os_environ(monkeypatch):
    from kernels._backend import env

    monkeypatch.delenv("MILP_TEST_ENV_VAR", raising=False)
    assert env("MILP_TEST_ENV_VAR", "d") == "d"
    monkeypatch.setenv("MILP_TEST_ENV_VAR", "é1")
    assert env("MILP_TEST_ENV_VAR") == "é1"
    os.environ["MILP_TEST_ENV_VAR"] = "2"
    assert env("MILP_TEST_ENV_VAR") == "2"
    for value in ("1", "0", "1", "10", "1"):  # the decoded text is reused only for the same raw value
        os.environ["MILP_TEST_ENV_VAR"] = value
        assert env("MILP_TEST_ENV_VAR") == value
    monkeypatch.delenv("MILP_TEST_ENV_VAR")
    assert env("MILP_TEST_ENV_VAR") is None


def test_direct_call_only_where_the_op_adds_nothing(monkeypatch, backend, device):
    """Eager work skips the dispatcher (same functions, same result): without autograd the
    forward runs directly, with it ``EagerLoraLinear`` (the op's autograd functions); profiling,
    torch function modes and ``torch.func`` go through ``milp::lora_linear``."""
    from kernels.library import EagerLoraLinear, direct_call_ok

    case = make_case(9, 12, 20, {0: [4], 2: [8, 3]}, max_users=3, seed=3, device=device)
    via_op = torch.ops.milp.lora_linear(*_op_args(case, save_t=False))[0]
    op_calls = []
    real_op = torch.ops.milp.lora_linear
    monkeypatch.setattr(torch.ops.milp, "lora_linear", lambda *a: op_calls.append(1) or real_op(*a))
    with torch.no_grad():
        direct = lora_linear(case.x, case.w, case.b, case.bank, case.plan)
    assert op_calls == []
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    x = case.x.clone().requires_grad_(True)
    assert direct_call_ok(x)
    with torch.profiler.profile():
        assert not direct_call_ok(x)
    with torch.overrides.TorchFunctionMode():
        assert not direct_call_ok(x)
    assert not torch.func.vmap(lambda v: torch.tensor(direct_call_ok(v)))(x.detach()).any()
    # autograd in eager mode: the Function, not the op; the same values and gradients as the op's
    a, b = case.bank.lora_a, case.bank.lora_b
    try:
        a.requires_grad_(True)
        b.requires_grad_(True)
        y = lora_linear(x, case.w, case.b, case.bank, case.plan)
        node = y.grad_fn.next_functions[0][0] if type(y.grad_fn).__name__.startswith("View") else y.grad_fn
        assert op_calls == [] and type(node).__name__ == f"{EagerLoraLinear.__name__}Backward"
        torch.testing.assert_close(y.detach(), via_op, rtol=0, atol=0)
        dy = torch.randn_like(y)
        y.backward(dy)
        eager = [x.grad, a.grad, b.grad]
        x.grad = a.grad = b.grad = None
        with torch.profiler.profile():  # the op and its registered autograd
            y_op = lora_linear(x, case.w, case.b, case.bank, case.plan)
        assert op_calls == [1]
        y_op.backward(dy)
        for got, want in zip(eager, [x.grad, a.grad, b.grad], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        a.requires_grad_(False)
        b.requires_grad_(False)
        a.grad = b.grad = None


def test_transformers_still_works_with_our_kernels_package_installed():
    # transformers probes for Hugging Face's `kernels` package; ours must not be mistaken for it
    code = (
        "import transformers, kernels\n"
        "from transformers.utils import import_utils as iu\n"
        "assert not iu.is_kernels_available(), 'transformers thinks HF kernels is installed'\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "import torch\n"
        "m = LlamaForCausalLM(cfg)\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3, 64])" in out.stdout


def test_hugging_face_kernels_installed_alongside_is_named(tmp_path):
    """transformers 5.25 requires Hugging Face's ``kernels`` (our import name). Where it is
    installed, ``import kernels`` warns, and ``import milp`` refuses with the fix exactly when
    transformers would fail on ``from kernels import CUDAProperties`` (5.x, once its probe accepts the
    version; 4.x catches that itself). A stand-in distribution's metadata, at a version
    transformers' probe accepts, makes the environment."""
    from transformers.utils import import_utils as iu

    version = getattr(iu, "KERNELS_MIN_VERSION", "0.9.0")  # 4.x: any version (it requires <= 0.9)
    dist = tmp_path / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import kernels\n"
        "print('WARNED', [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)])\n"
        "try:\n"
        "    import milp\n"
        "except ImportError as e:\n"
        "    print('REFUSED', e)\n"
        "else:\n"
        "    print('IMPORTED')\n"
        "try:\n"
        "    from transformers import LlamaConfig, LlamaForCausalLM\n"
        "    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,\n"
        "                                 num_attention_heads=2, num_key_value_heads=1))\n"
        "except ImportError as e:\n"
        "    print('TRANSFORMERS FAILS', e)\n"
        "else:\n"
        "    print('TRANSFORMERS WORKS')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warned, milp_import, transformers_import = out.stdout.splitlines()[:3]
    assert f"Hugging Face's `kernels` {version} is installed" in warned and "transformers<5.25" in warned
    # refused exactly when transformers' model classes fail, and then with the fix
    assert milp_import.startswith("REFUSED") == transformers_import.startswith("TRANSFORMERS FAILS"), out.stdout
    if hasattr(iu, "KERNELS_MIN_VERSION"):  # transformers 5.x: its probe accepts the stand-in, and it fails
        assert transformers_import.startswith("TRANSFORMERS FAILS") and "CUDAProperties" in transformers_import
    if milp_import.startswith("REFUSED"):
        assert "transformers will import its hub-kernel API" in milp_import
        assert "pip uninstall -y kernels" in milp_import
    # and without the stand-in: nothing to say (milp-toolkit's own environment)
    from kernels import _name_clash

    assert _name_clash.hf_kernels_version() is None


def test_torch_compile_fullgraph_adapters_alone(device):
    """``lora_linear(x, None, None, ...)`` beside a base computed by another module: the op with
    ``weight=None`` traces (fake impl, schema) and its backward runs, fullgraph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).to(device)
    bank = AdapterBank(16, 24, max_users=3, device=device)
    bank.add(0, [4], init="random")
    bank.add(2, [2, 3], init="random")
    plan = BatchPlan.build(torch.tensor([0, 2, -1, 0, 1, 2, 2], device=device), 3)

    def f(x):
        return base(x) + lora_linear(x, None, None, bank, plan)

    x = torch.randn(7, 16, device=device, requires_grad=True)
    eager = f(x)
    eager.square().sum().backward()
    want = (x.grad.clone(), bank.lora_a.grad.clone(), bank.lora_b.grad.clone())
    x.grad = bank.lora_a.grad = bank.lora_b.grad = None
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager)
    out.square().sum().backward()
    for a, b in zip((x.grad, bank.lora_a.grad, bank.lora_b.grad), want):
        torch.testing.assert_close(a, b)


class _ServingLinear(torch.nn.Module):
    """What a serving stack embeds: its own base linear and the raw ops. The adapter pool and the
    batch's plan are inputs (the stack loads adapters and builds plans outside the graph), and
    ``max_rank`` is the pool's ceiling, not the ranks loaded at export time."""

    MAX_RANK = 16

    def __init__(self, device):
        super().__init__()
        self.base = torch.nn.Linear(16, 24, device=device)
        self.block_ms = list(DEFAULT_BLOCK_MS)

    def forward(self, x, lora_a, lora_b, scale, slots, sorted_tokens, tiles, segments):
        bm, r = self.block_ms, self.MAX_RANK
        fused, _ = torch.ops.milp.lora_linear(x, self.base.weight, self.base.bias, lora_a, lora_b, scale, slots,
                                              sorted_tokens, tiles, segments, bm, r, False)
        y = self.base(x)  # the same through shrink + in-place expand (auto-functionalized by export)
        t = torch.ops.milp.lora_shrink(x, lora_a, scale, slots, sorted_tokens, tiles, segments, bm, r)
        torch.ops.milp.lora_expand_(y, t, lora_b, slots, sorted_tokens, tiles, segments, bm)
        return fused, y


def _export_serving_linear(device, capacity=32):
    torch.manual_seed(0)
    m = _ServingLinear(device)
    bank = AdapterBank(16, 24, max_users=3, device=device)
    bank.add(0, [4], init="random")
    bank.add(2, [2, 3], init="random")
    plan = BatchPlan(capacity, 3, device=device)
    plan.update(torch.tensor([0, 2, -1, 0, 1, 2, 2], device=device))
    x = torch.randn(7, 16, device=device)
    T = torch.export.Dim("T", min=1, max=capacity)  # any batch the plan's capacity holds
    rows = torch.export.Dim("rows", min=2)  # the adapter pool may grow
    dyn = ({0: T}, {0: rows}, {0: rows}, {0: rows}, None, None, None, None)
    ep = torch.export.export(m, (x, *_pool(bank), *plan.as_args()[:3]), dynamic_shapes=dyn)
    return m, bank, plan, ep


def _pool(bank):
    return bank.lora_a.detach(), bank.lora_b.detach(), bank.scale, bank.slots


def _check_serving(m, bank, plan, run, T, device):
    x = torch.randn(T, 16, device=device)
    plan.update(torch.randint(-1, 3, (T,), device=device))
    want = lora_linear(x, m.base.weight, m.base.bias, bank, plan).detach()
    fused, split = run(x, *_pool(bank), *plan.as_args()[:3])
    # on a GPU the eager call may dispatch another path than the op's run-time choice: other sums
    for got in (fused, split):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_ops_and_serves_new_batches_and_adapters(device, tmp_path):
    """``torch.export`` with a dynamic token count and adapter pool: the ops stay opaque nodes
    (the in-place expand auto-functionalized by ``run_decompositions``), and the program, saved
    and loaded back, serves other batches and a user whose adapters were loaded after export."""
    m, bank, plan, ep = _export_serving_linear(device)
    ops = lambda g: sorted(str(n.target) for n in g.nodes if "milp" in str(n.target))  # noqa: E731
    assert ops(ep.graph) == ["milp.lora_expand_.default", "milp.lora_linear.default", "milp.lora_shrink.default"]
    decomposed = ep.run_decompositions()
    assert ops(decomposed.graph) == ["milp.lora_linear.default", "milp.lora_shrink.default"]
    assert "auto_functionalized" in str(decomposed.graph) and "lora_expand_" in str(decomposed.graph)
    for T in (7, 1, 32):
        _check_serving(m, bank, plan, ep.module(), T, device)
    torch.export.save(ep, tmp_path / "serving.pt2")
    loaded = torch.export.load(tmp_path / "serving.pt2").module()
    bank.add(1, [12], init="random")  # after export: the pool grows, up to the exported ceiling
    assert bank.max_rank > 5 and bank.capacity > 9
    for T in (19, 3):
        _check_serving(m, bank, plan, loaded, T, device)
    too_many = BatchPlan(33, 3, device=device)
    with pytest.raises(AssertionError, match=r"x.size\(\)\[0\] <= 32"):  # the plan's capacity
        loaded(torch.randn(33, 16, device=device), *_pool(bank), *too_many.as_args()[:3])


def test_aot_inductor_package_runs_the_ops(device, tmp_path):
    """AOTInductor compiles the exported program into a package (a C++ toolchain on CPU) that
    calls our ops on batches and adapter pools of other sizes."""
    import torch._inductor

    m, bank, plan, ep = _export_serving_linear(device)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "serving_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    _check_serving(m, bank, plan, runner, 7, device)
    bank.add(1, [12], init="random")
    _check_serving(m, bank, plan, runner, 12, device)
