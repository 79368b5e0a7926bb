"""Property tests of apply_milp / remove_milp on tiny LLaMA, Mistral, Qwen2, GPT-2 (Conv1D) and
RoBERTa models: for drawn MemoryConfigs the parameter count is what the banks hold; adapters
whose B is zero leave the outputs bit for bit; remove_milp restores the model exactly (modules,
state_dict, requires_grad, outputs), and neither a failed apply_milp nor a failed remove_milp
leaves the model half changed."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kernels
import milp.inject as inject
from milp.config import MAX_MODULES, MemoryConfig
from milp.inject import (
    MultiLoraLinear,
    apply_milp,
    batch_users,
    ffn_targets,
    get_milp,
    is_injected,
    remove_milp,
    tiny_model,
)

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "roberta"]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(SETTINGS, max_examples=10)
_MODELS: dict[tuple[str, int], nn.Module] = {}


def model_of(arch: str, layers: int) -> nn.Module:
    """One cached tiny model per (arch, layers); every test hands it back un-injected."""
    key = (arch, layers)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, num_hidden_layers=layers)
    m = _MODELS[key]
    assert not is_injected(m)
    return m


@st.composite
def memory_configs(draw, num_layers: int, max_modules: int = MAX_MODULES):
    mask, modules, ranks = [], [], []
    for _ in range(num_layers):
        n = draw(st.integers(0, max_modules))
        mask.append(draw(st.booleans()))
        modules.append(n)
        if n and draw(st.booleans()):
            ranks.append(tuple(draw(st.lists(st.integers(8, 96), min_size=n, max_size=n))))
        else:
            ranks.append(draw(st.integers(8, 96)))
    return MemoryConfig(tuple(mask), tuple(modules), tuple(ranks), draw(st.sampled_from([1.0, 16.0, 7.5])))


def snapshot(model: nn.Module) -> dict:
    """Everything remove_milp promises to restore."""
    return {
        "modules": [(n, m) for n, m in model.named_modules()],
        "params": [(n, p, p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dict": sorted(model.__dict__),
    }


def assert_restored(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert [n for n, _ in now["modules"]] == [n for n, _ in snap["modules"]]
    assert all(a is b for (_, a), (_, b) in zip(now["modules"], snap["modules"]))
    assert [(n, id(p), g) for n, p, g in now["params"]] == [(n, id(p), g) for n, p, g in snap["params"]]
    assert list(now["state"]) == list(snap["state"])
    assert all(torch.equal(now["state"][k], v) for k, v in snap["state"].items())
    assert now["dict"] == snap["dict"]
    assert not is_injected(model)


def add_config(state, slot: int, cfg: MemoryConfig, init: str, seed: int) -> None:
    layer_ranks = {li: cfg.layer_ranks(li) for li in cfg.active_layers}
    state.add_adapters(slot, layer_ranks, cfg.lora_alpha, init=init, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parameter count
@SETTINGS
@given(data=st.data(), arch=st.sampled_from(ARCHS), layers=st.integers(1, 3))
def test_parameter_count_is_what_the_banks_hold(data, arch, layers):
    model = model_of(arch, layers)
    cfgs = [data.draw(memory_configs(layers, max_modules=12)) for _ in range(2)]
    state = apply_milp(model, max_users=3)
    try:
        for slot, cfg in enumerate(cfgs):
            add_config(state, slot, cfg, "lora", slot)
        for slot, cfg in enumerate(cfgs):
            held = 0
            for layer in state.layers:
                for m in layer:
                    if m.bank.has(slot):
                        a, b, scale = m.bank.adapter_weights(slot)
                        held += a.numel() + b.numel()
                        ranks = cfg.layer_ranks(m.layer)
                        assert m.bank.segment(slot).ranks == ranks
                        want = torch.tensor([cfg.lora_alpha / r for r in ranks for _ in range(r)])
                        torch.testing.assert_close(scale, want)
                    else:
                        assert cfg.layer_ranks(m.layer) == ()
            assert cfg.num_parameters(model) == held == state.num_parameters(slot)
        assert state.num_parameters() == sum(c.num_parameters(model) for c in cfgs)
    finally:
        remove_milp(model)


def test_parameter_count_of_the_runtime_at_the_extremes():
    """32 modules of rank 96 on every layer and none at all, through MilpRuntime.add_user."""
    from milp.runtime import MilpRuntime

    for arch in ("llama", "gpt2", "roberta"):
        model = tiny_model(arch)
        rt = MilpRuntime(model, max_users=2)
        for user, cfg in {"big": MemoryConfig.uniform(2, MAX_MODULES, 96),
                          "none": MemoryConfig((False, True), (5, 0), (8, 8))}.items():
            rt.add_user(user, cfg)
            held = sum(t.numel() for t in rt.adapter_state(user).values())
            assert rt.num_parameters(user) == held == cfg.num_parameters(model)
        assert rt.num_parameters("none") == 0


# ------------------------------------------------------------------------------- zero adapters
@HEAVY
@given(data=st.data(), arch=st.sampled_from(ARCHS), layers=st.integers(1, 2), init=st.sampled_from(["lora", "zeros"]),
       per_token=st.booleans())
def test_adapters_with_zero_b_leave_the_outputs_bit_for_bit(data, arch, layers, init, per_token):
    model = model_of(arch, layers)
    B, S = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    ids = torch.randint(3, 90, (B, S), generator=torch.Generator().manual_seed(B * 10 + S))
    with torch.no_grad():
        ref = model(ids).logits
        state = apply_milp(model, max_users=3)
        try:
            for slot in range(data.draw(st.integers(0, 3))):
                add_config(state, slot, data.draw(memory_configs(layers, max_modules=6)), init, slot)
            shape = (B, S) if per_token else (B,)
            users = torch.tensor(data.draw(st.lists(st.integers(-1, 2), min_size=B * S if per_token else B,
                                                    max_size=B * S if per_token else B))).view(shape)
            assert torch.equal(model(ids).logits, ref)  # no users set
            with batch_users(model, users):
                with kernels.use_backend("torch"):  # y = base(x) + 0 exactly; a GPU's fused GEMM rounds its own way
                    assert torch.equal(model(ids).logits, ref)
                torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-6)
        finally:
            remove_milp(model)
    assert torch.equal(model(ids).logits, ref)


# ----------------------------------------------------------------------------- apply / remove
@HEAVY
@given(data=st.data(), arch=st.sampled_from(ARCHS), rounds=st.integers(1, 2))
def test_apply_then_remove_restores_the_model_exactly(data, arch, rounds):
    """Whatever was frozen before, whatever users came and went: after remove_milp the model
    is the one it was (same module objects, parameters and their requires_grad, state_dict,
    outputs bit for bit), and it can be injected again."""
    model = model_of(arch, 2)
    params = list(model.parameters())
    frozen = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
    for p, f in zip(params, frozen):
        p.requires_grad_(not f)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(rounds))
    try:
        with torch.no_grad():
            ref = model(ids).logits
        snap = snapshot(model)
        for r in range(rounds):
            state = apply_milp(model, max_users=2, capacity=data.draw(st.integers(0, 64)))
            assert get_milp(model) is state
            assert not any(p.requires_grad for n, p in model.named_parameters() if ".bank." not in n)
            for slot in range(2):
                if data.draw(st.booleans()):
                    add_config(state, slot, data.draw(memory_configs(2, max_modules=4)), "random", r * 2 + slot)
            users = data.draw(st.lists(st.integers(-1, 1), min_size=2, max_size=2))
            with batch_users(model, users):
                out = model(ids).logits
            if r == 0 and any(u >= 0 and state.layers[0][0].bank.has(u) for u in users):
                out.float().square().sum().backward()  # gradients on the banks, dropped with them
            if data.draw(st.booleans()):  # removed while a batch's users are set
                with batch_users(model, users):
                    remove_milp(model)
            else:
                remove_milp(model)
            assert_restored(model, snap)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, ref)
        assert all(p.grad is None for p in model.parameters())
    finally:
        for p in params:
            p.requires_grad_(True)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_twice_remove_twice_and_remove_without_apply_change_nothing(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="call milp.apply_milp"):
        remove_milp(model)
    assert_restored(model, snap)
    state = apply_milp(model, max_users=2)
    state.add_adapters(0, {0: [8], 1: [4, 4]}, init="random", generator=torch.Generator().manual_seed(0))
    with batch_users(model, [0, -1]), torch.no_grad():
        want = model(ids).logits
    wrappers = [m for layer in ffn_targets(model) for _, m in layer]
    with pytest.raises(ValueError, match="already has MiLP adapters"):
        apply_milp(model, max_users=5)
    assert get_milp(model) is state and state.max_users == 2
    assert [m for layer in ffn_targets(model) for _, m in layer] == wrappers
    with batch_users(model, [0, -1]), torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    remove_milp(model)
    with pytest.raises(ValueError, match="call milp.apply_milp"):
        remove_milp(model)
    assert_restored(model, snap)


# ------------------------------------------------------------------------------ failed changes
@SETTINGS
@given(arch=st.sampled_from(ARCHS), data=st.data())
def test_a_failed_apply_leaves_the_model_untouched(arch, data):
    """apply_milp failing at any target (here: a bank that cannot be built, as for a float8
    weight, or memory running out) leaves no wrapper behind and every requires_grad as it was;
    the model can then be injected."""
    model = model_of(arch, 2)
    targets = [m for layer in ffn_targets(model) for _, m in layer]
    k = data.draw(st.integers(0, len(targets) - 1))
    first = next(model.parameters())
    first.requires_grad_(False)  # restored as it was, not to True
    snap = snapshot(model)
    real = inject.MultiLoraLinear.__init__
    built = [0]

    def failing(self, *args, **kwargs):
        if built[0] == k:
            raise MemoryError("out of memory (test)")
        built[0] += 1
        real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inject.MultiLoraLinear, "__init__", failing)
        with pytest.raises(MemoryError, match="test"):
            apply_milp(model)
    assert_restored(model, snap)
    apply_milp(model)
    remove_milp(model)
    assert_restored(model, snap)
    first.requires_grad_(True)


def test_regression_a_float8_target_fails_apply_without_corrupting_the_model():
    """A float8 down_proj at the last layer: apply_milp refuses it (the banks take 16/32/64-bit
    floats) after having wrapped the earlier targets; those used to stay wrapped (and every
    parameter frozen), and neither apply_milp nor remove_milp would touch the model again."""
    model = tiny_model("llama")
    down = model.model.layers[1].mlp.down_proj
    down.weight.data = down.weight.data.to(torch.float8_e4m3fn)
    snap = snapshot(model)
    with pytest.raises(TypeError, match="dtype"):
        apply_milp(model)
    assert_restored(model, snap)
    down.weight.data = down.weight.data.float()
    apply_milp(model)
    remove_milp(model)


@SETTINGS
@given(arch=st.sampled_from(ARCHS), data=st.data())
def test_a_failed_remove_leaves_the_model_injected(arch, data):
    """A wrapper replaced behind apply_milp's back: remove_milp refuses before changing anything,
    so putting the wrapper back makes the model removable again."""
    model = tiny_model(arch)
    snap = snapshot(model)
    state = apply_milp(model, max_users=2)
    names = [n for row in state.names for n in row]
    name = data.draw(st.sampled_from(names))
    parent, _, child = name.rpartition(".")
    wrapper = model.get_submodule(name)
    setattr(model.get_submodule(parent), child, nn.Identity())
    with pytest.raises(RuntimeError, match="no longer the MultiLoraLinear"):
        remove_milp(model)
    assert get_milp(model) is state
    assert all(isinstance(model.get_submodule(n), MultiLoraLinear) for n in names if n != name)
    setattr(model.get_submodule(parent), child, wrapper)
    remove_milp(model)
    assert_restored(model, snap)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regression_layers_sharing_an_ffn_module_are_refused(arch):
    """Two layers sharing one FFN module (weight tying by hand) used to be injected with the
    second wrapper replacing the first: the first layer's adapters silently never ran, and
    remove_milp could never take the model back."""
    model = tiny_model(arch)
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    blocks[1].mlp = blocks[0].mlp
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"\.1\.mlp\.\w+ is the same module as .*\.0\.mlp"):
        apply_milp(model)
    assert_restored(model, snap)
