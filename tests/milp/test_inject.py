"""apply_milp / remove_milp on tiny random-init models of every supported architecture."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from milp.inject import (
    SUPPORTED_ARCHITECTURES,
    MultiLoraLinear,
    apply_milp,
    batch_users,
    ffn_target_shapes,
    ffn_targets,
    get_milp,
    is_injected,
    remove_milp,
    tiny_model,
)

GATED = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TARGETS = {  # written out here, independently of SUPPORTED_ARCHITECTURES
    **{a: GATED for a in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                          "granite", "stablelm", "cohere")},
    "starcoder2": ["mlp.c_fc", "mlp.c_proj"],
    "phi": ["mlp.fc1", "mlp.fc2"],
    "phi3": ["mlp.gate_up_proj", "mlp.down_proj"],
    "opt": ["fc1", "fc2"],
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "falcon": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "roberta": ["intermediate.dense", "output.dense"],
}
ARCHS = list(SUPPORTED_ARCHITECTURES)  # every supported model_type is tested


def test_every_supported_architecture_has_expected_targets():
    assert sorted(TARGETS) == sorted(ARCHS)


def peft_style_reference(model: nn.Module, adapters: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]):
    """A copy of ``model`` whose named target modules add ``Σ_j s_j B_j A_j x`` by forward
    hooks, straight from the definition (A_j: [r, in], B_j: [out, r])."""
    ref = copy.deepcopy(model)
    for name, mods in adapters.items():
        module = ref.get_submodule(name)

        def hook(_m, args, out, mods=mods):
            x = args[0].double()
            delta = sum(s * (x @ a.double().t()) @ b.double().t() for a, b, s in mods)
            return (out.double() + delta).to(out.dtype)

        module.register_forward_hook(hook)
    return ref


def user_modules(state, slot: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per target name, the (A_j, B_j [out, r], s_j) of ``slot`` read out of the banks."""
    out = {}
    for names, layer in zip(state.names, state.layers):
        for name, m in zip(names, layer):
            if not m.bank.has(slot):
                continue
            seg = m.bank.segment(slot)
            a, b, _ = m.bank.adapter_weights(slot)
            mods, row = [], 0
            for r, s in zip(seg.ranks, seg.scales):
                mods.append((a[row : row + r].detach().clone(), b[row : row + r].detach().t().clone(), s))
                row += r
            out[name] = mods
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_and_shapes(arch):
    model = tiny_model(arch)
    targets = ffn_targets(model)
    assert len(targets) == 2
    assert [n.split(".0.", 1)[1] for n, _ in targets[0]] == TARGETS[arch]
    shapes = ffn_target_shapes(model)
    expected = [(32, 64), (64, 32)] if len(TARGETS[arch]) == 2 else [(32, 64), (32, 64), (64, 32)]
    if arch == "phi3":  # gate and up fused: twice the FFN width out
        expected = [(32, 128), (64, 32)]
    assert shapes == [expected, expected]


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_no_adapters_equals_original_and_remove_restores(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 90, (3, 7))
    ref = model(ids).logits
    originals = {n: m for layer in ffn_targets(model) for n, m in layer}
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    state = apply_milp(model, max_users=4)
    assert is_injected(model) and get_milp(model) is state
    assert all(isinstance(model.get_submodule(n), MultiLoraLinear) for n in originals)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".bank." not in n)
    # no users set: bit-identical (each layer runs its base module)
    assert torch.equal(model(ids).logits, ref)
    # users set, none with adapters
    with batch_users(model, [0, 1, -1]):
        assert torch.equal(model(ids).logits, ref)
    # a user with adapters at layer 1 only, initialised like LoRA (B = 0): still the base output
    state.add_adapters(2, {1: [4, 4]}, init="lora")
    with batch_users(model, [2, 2, -1]):
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)

    assert remove_milp(model) is model
    assert not is_injected(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_users_match_per_user_reference(arch):
    model = tiny_model(arch)
    base = copy.deepcopy(model)
    state = apply_milp(model, max_users=5)
    gen = torch.Generator().manual_seed(0)
    state.add_adapters(0, {0: [8], 1: [2, 6]}, lora_alpha=16.0, init="random", generator=gen)
    state.add_adapters(3, {1: [5]}, lora_alpha=4.0, init="random", generator=gen)
    state.add_adapters(4, {0: [1, 2, 3]}, lora_alpha=2.0, init="random", generator=gen)
    rows = [3, 0, -1, 4, 0]
    ids = torch.randint(3, 90, (len(rows), 6))
    with batch_users(model, rows):
        out = model(ids).logits
    for b, slot in enumerate(rows):
        ref_model = base if slot < 0 else peft_style_reference(base, user_modules(state, slot))
        want = ref_model(ids[b : b + 1]).logits[0]
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5, msg=f"row {b} (slot {slot})")


def test_model_cast_after_injection_keeps_working():
    """The usual order: inject, add users, then ``model.to(torch.bfloat16)``. The adapters follow
    the model's dtype, their scales stay float32, and the forward runs (it used to refuse the
    bf16 scales) and matches the float32 model to bf16 precision."""
    model = tiny_model("llama")
    state = apply_milp(model, max_users=2)
    state.add_adapters(0, {0: [3], 1: [8]}, lora_alpha=16.0, init="random", generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 90, (2, 6))
    with batch_users(model, [0, -1]):
        ref = model(ids).logits
        model.to(torch.bfloat16)
        out = model(ids).logits
    assert out.dtype == torch.bfloat16
    assert all(m.bank.scale.dtype == torch.float32 for m in state.modules())
    assert float((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_per_token_users_and_plan_reuse():
    model = tiny_model("llama")
    state = apply_milp(model, max_users=3)
    state.add_adapters(1, {0: [4], 1: [4]}, init="random", generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 90, (2, 5))
    with batch_users(model, [1, -1]):
        builds = state.plan_builds
        per_row = model(ids).logits
        assert state.plan_builds == builds + 1  # one plan for all 6 injected layers
        model(ids)
        assert state.plan_builds == builds + 1  # same users, same shape: reused
    tok = torch.tensor([[1] * 5, [-1] * 5])
    with batch_users(model, tok):
        torch.testing.assert_close(model(ids).logits, per_row)


def test_gradients_reach_banks_only():
    model = tiny_model("gpt2")
    state = apply_milp(model, max_users=2)
    state.add_adapters(0, {0: [4], 1: [8]}, init="random", generator=torch.Generator().manual_seed(0))
    with batch_users(model, [0, -1]):
        model(torch.randint(3, 90, (2, 5))).logits.sum().backward()
    for m in state.modules():
        assert m.bank.lora_a.grad is not None and m.bank.lora_a.grad.abs().sum() > 0
        assert m.base.weight.grad is None


def test_bad_input():
    with pytest.raises(ValueError, match=r"unsupported architecture.*qwen3.*gemma2.*LLaMA-family.*GPT-2.*RoBERTa"):
        apply_milp(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_milp("llama")
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='bert'.*supported"):
        apply_milp(bert)
    with pytest.raises(ValueError, match="no FFN targets"):
        apply_milp(tiny_model("llama", num_hidden_layers=0))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="call milp.apply_milp"):
        remove_milp(model)
    with pytest.raises(ValueError, match="max_users"):
        apply_milp(model, max_users=0)
    state = apply_milp(model, max_users=2)
    with pytest.raises(ValueError, match="already has MiLP adapters"):
        apply_milp(model)
    with pytest.raises(ValueError, match=r"slots in \[-1, 2\)"):
        with batch_users(model, [0, 2]):
            pass
    with pytest.raises(TypeError, match="integer user slots"):
        with batch_users(model, torch.tensor([0.0])):
            pass
    with pytest.raises(ValueError, match="layer indices"):
        state.add_adapters(0, {5: [4]})
    with pytest.raises(KeyError, match="no adapters"):
        state.remove_adapters(1)
    state.add_adapters(0, {0: [4]}, init="random")
    with batch_users(model, [0, 0, 0]):
        with pytest.raises(ValueError, match="does not split into the 3 batch rows"):
            model(torch.ones(2, 4, dtype=torch.long))


def test_generate_builds_two_plans_and_expands_rows():
    model = tiny_model("llama")
    state = apply_milp(model, max_users=2)
    state.add_adapters(0, {0: [4], 1: [4]}, init="random", generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 90, (2, 4))
    with batch_users(model, [0, -1]):
        builds = state.plan_builds
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert state.plan_builds - builds == 2  # prefill, then every decode step shares one plan
        two = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             num_beams=2, num_return_sequences=2, pad_token_id=0)
    assert two.shape == (4, 7)


# --------------------------------------------------------------------------- compiled forwards
def _injected_llama(seed: int = 0):
    model = tiny_model("llama")
    state = apply_milp(model, max_users=4)
    g = torch.Generator().manual_seed(seed)
    state.add_adapters(0, {0: [4], 1: [8]}, init="random", generator=g)
    state.add_adapters(1, {0: [8, 4]}, init="random", generator=g)  # layer 1 has none of user 1's
    state.add_adapters(3, {1: [16]}, init="random", generator=g)
    return model, state


def test_static_plan_follows_set_users_in_place():
    model, state = _injected_llama()
    plan = state.prepare_static((3, 2))
    buffers = [t.data_ptr() for t in plan.as_args()[:3]]
    with batch_users(model, [0, -1, 3]):
        assert plan.token_user_host().tolist() == [0, 0, -1, -1, 3, 3]
        with batch_users(model, [3, 1, 1]):
            assert plan.token_user_host().tolist() == [3, 3, 1, 1, 1, 1]
        assert plan.token_user_host().tolist() == [0, 0, -1, -1, 3, 3]  # restored with the outer users
        with batch_users(model, [0, 1]):  # 2 rows cannot fill a (3, 2) shape: left alone, unused
            assert plan.token_user_host().tolist() == [0, 0, -1, -1, 3, 3]
    assert [t.data_ptr() for t in plan.as_args()[:3]] == buffers  # CUDA graphs keep their addresses
    assert state.prepare_static((3, 2)) is plan
    # a wider slot space: new static plans (a compiled graph re-traces once), filled when they fit
    with batch_users(model, [0, 3]):
        state.resize_users(6)  # the (3, 2) plan does not fit a 2-row batch: registered, not filled
    wide = state.prepare_static((3, 2))
    assert wide is not plan and wide.max_users == 6
    with batch_users(model, [5, 0, 0]):
        assert wide.token_user_host().tolist() == [5, 5, 0, 0, 0, 0]
        state.resize_users(8)
        assert state.prepare_static((3, 2)).token_user_host().tolist() == [5, 5, 0, 0, 0, 0]


def test_prepare_static_bad_input():
    model, state = _injected_llama()
    for bad in [(), 3, (0, 1), (2.0, 1), (True, 1)]:
        with pytest.raises(ValueError, match="lead must be"):
            state.prepare_static(bad)
    with batch_users(model, [0, 1, 3]):
        with pytest.raises(ValueError, match="does not split"):
            state.prepare_static((2, 1))


def test_compiled_forward_serves_every_batch_from_one_graph():
    """torch.compile(fullgraph) of the injected model: the layers read the static plan, so
    batches with other users reuse the graph (no re-trace) and match the eager logits."""
    import torch._dynamo

    model, state = _injected_llama()
    state.prepare_static((3, 5))
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for users in ([0, 1, 3], [3, -1, 0], [1, 1, 1], [-1, -1, -1], [2, 0, 1]):
            with batch_users(model, users):
                want = model(ids).logits
                got = compiled(ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1


def test_compiled_forward_without_static_plan_names_the_fix():
    import torch._dynamo

    model, state = _injected_llama()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with batch_users(model, [0, 1]), pytest.raises(Exception, match="prepare_static"):
        compiled(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("path", ["split", "fused", "fused_t"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_triton_kernels_through_whole_models(arch, path, tmp_path, monkeypatch):
    """Injected models on the Triton kernels (a GPU, or the interpreter here), each path forced
    by a dispatch table: logits and every adapter gradient as on the torch path (fp32), with a
    row without a user and users of different ranks in one batch."""
    import json

    import kernels
    from kernels import aot
    from kernels._backend import interpreter_problem
    from kernels.tuning import _load_table
    from milp import MemoryConfig, MilpRuntime

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and interpreter_problem():
        pytest.skip(interpreter_problem())
    knobs = {"decode_max_tokens": 10**6 if path == "split" else 0, "split_tokens_per_segment": 0,
             "fused_max_rank": 10**6 if path == "fused" else 0}
    table = tmp_path / "dispatch.json"
    table.write_text(json.dumps({"ops": {}, "dispatch": knobs}))
    monkeypatch.setenv("MILP_KERNEL_CONFIGS", str(table))  # over a GPU's own file too
    _load_table.cache_clear()
    model = tiny_model(arch).to(dev)
    rt = MilpRuntime(model, max_users=3)
    layers = rt.num_layers
    rt.add_user("a", MemoryConfig.uniform(layers, rank=3), init="random", seed=0)
    rt.add_user("b", MemoryConfig.uniform(layers, modules=2, rank=8), init="random", seed=1)
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0)).to(dev)
    users = ["a", None, "b"]

    def run(backend):
        with kernels.use_backend(backend):
            model.zero_grad(set_to_none=True)
            total, _ = rt.loss(ids, users)
            total.backward()
            with torch.no_grad():
                logits = rt.forward(ids, users).logits
        return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        ref_logits, ref_grads = run("torch")
        with aot.LaunchRecorder() as rec:
            logits, grads = run("triton")
    finally:
        _load_table.cache_clear()
    kinds = {r["kernel"] for r in rec.records.values()}
    assert ("fused_lora_linear" in kinds) == (path != "split"), kinds  # the forced path ran
    assert set(grads) == set(ref_grads) and ref_grads
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < 1e-4
    for name, g in grads.items():
        want = ref_grads[name]
        assert float((g - want).norm() / want.norm().clamp_min(1e-30)) < 1e-4, name


# --------------------------------------------------------------------- quantized base linears
class Int8Linear(nn.Module):
    """A weight-only int8 linear (per-row scales), as quantized linears are: no float ``weight``,
    ``in_features``/``out_features`` attributes, its own forward."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scales", scale)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.qweight.to(x.dtype) * self.scales[:, None].to(x.dtype), self.bias)


def quantized(arch: str = "llama", dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_model(arch).to(dtype)
    for layer in ffn_targets(model):
        for name, m in layer:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int8Linear(m))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_quantized_base_linears_get_the_adapters_added(arch):
    """Linears the kernels cannot read (int8 here; bitsandbytes, GPTQ, AWQ, torchao alike) keep
    computing themselves; the adapters' contribution is added (``weight=None``), in the model's
    float dtype. Outputs match per-user references, gradients reach the banks only."""
    model = quantized(arch)
    base = copy.deepcopy(model)
    ids = torch.randint(3, 90, (4, 6))
    ref = model(ids).logits
    state = apply_milp(model, max_users=3)
    assert all(not m.dense and m.bank.lora_a.dtype == torch.float32 for m in state.modules())
    assert "dense=False" in repr(state.layers[0][0])
    assert torch.equal(model(ids).logits, ref)
    gen = torch.Generator().manual_seed(0)
    state.add_adapters(0, {0: [8], 1: [2, 6]}, lora_alpha=16.0, init="random", generator=gen)
    state.add_adapters(2, {1: [5]}, lora_alpha=4.0, init="random", generator=gen)
    rows = [2, 0, -1, 0]
    with batch_users(model, rows):
        out = model(ids).logits
        out.square().sum().backward()
    for b, slot in enumerate(rows):
        ref_model = base if slot < 0 else peft_style_reference(base, user_modules(state, slot))
        torch.testing.assert_close(out[b], ref_model(ids[b : b + 1]).logits[0], rtol=1e-5, atol=1e-5)
    assert all(m.bank.lora_a.grad is not None for m in state.modules())
    assert all(p.grad is None for n, p in model.named_parameters() if ".bank." not in n)
    remove_milp(model)
    assert all(isinstance(m, Int8Linear) for layer in ffn_targets(model) for _, m in layer)


def test_quantized_base_in_bfloat16_runs_the_adapters_in_the_models_dtype():
    model = quantized("llama", torch.bfloat16)
    state = apply_milp(model, max_users=1)
    assert {m.bank.lora_a.dtype for m in state.modules()} == {torch.bfloat16}
    state.add_adapters(0, {0: [4]}, init="random", generator=torch.Generator().manual_seed(0))
    with batch_users(model, [0]):
        assert model(torch.randint(3, 90, (1, 5))).logits.dtype == torch.bfloat16


def test_a_module_that_is_not_linear_like_is_refused():
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj = nn.Identity()
    with pytest.raises(TypeError, match=r"layers\.0\.mlp\.up_proj is a Identity, expected nn\.Linear, .*in_features"):
        apply_milp(model)
    with pytest.raises(TypeError, match=r"base must be a linear-like module \(in_features/out_features\), got Ident"):
        MultiLoraLinear(nn.Identity(), max_users=1, layer=0, target="mlp.up_proj")


def test_runtime_on_a_quantized_base_trains_jointly_and_generates_mixed():
    """The runtime on a quantized base (float64 adapters and activations, int8 weights): a joint
    step of two users equals each user's own step, and mixed-user generation equals per-user."""
    from milp import MemoryConfig, MilpRuntime

    def runtime(users):
        rt = MilpRuntime(quantized("llama", torch.float64), max_users=2)
        for i, u in enumerate(users):
            rt.add_user(u, MemoryConfig.uniform(2, 1 + i, 4), total_steps=5, init="random", seed=10 + i)
        return rt

    joint, alone = runtime(["a", "b"]), {"a": runtime(["a"]), "b": runtime(["a", "b"])}
    alone["b"].remove_user("a")
    start = joint.adapter_state("b")
    ids = torch.randint(3, 90, (4, 7), generator=torch.Generator().manual_seed(1))
    joint.train_step(ids, ["a", "b", "a", "b"])
    alone["a"].train_step(ids[0::2], "a")
    alone["b"].train_step(ids[1::2], "b")
    for u, rt in alone.items():
        for k, v in rt.adapter_state(u).items():
            torch.testing.assert_close(joint.adapter_state(u)[k], v, rtol=1e-9, atol=1e-11)
    assert any((joint.adapter_state("b")[k] - v).abs().max() > 1e-4 for k, v in start.items())  # it trained
    joint.model.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = joint.generate(ids[:2], ["a", "b"], **kw)
    for b, u in enumerate(["a", "b"]):
        assert out[b].tolist() == joint.generate(ids[b : b + 1], [u], **kw)[0].tolist()
