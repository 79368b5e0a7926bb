"""Property tests of apply_milp against hand-merged weights, over every supported architecture.

For a tiny float64 model of each ``model_type`` of :data:`milp.inject.SUPPORTED_ARCHITECTURES`, drawn
:class:`MemoryConfig` s (layers masked off, 0–3 modules per layer, mixed ranks, several
``lora_alpha``) and random non-zero ``A``/``B`` loaded through :meth:`MilpRuntime.load_adapter_state`:

* the injected model's logits for a user equal (float64, ~1e-10) those of a deep copy of the
  original model whose targeted FFN weights were merged by hand, ``W' = W + Σ_j s_j B_j A_j``
  (``Conv1D`` weights transposed, the fused ``gate_up_proj`` as one target, biases untouched);
* rows of different users (and of no user) in one batch each match their own merged model;
* :func:`remove_milp` restores the original logits bit for bit;
* the runtime's parameter count is what the banks hold for the user and
  :meth:`MemoryConfig.num_parameters`;
* :func:`ffn_target_shapes` is each wrapped module's real ``(in, out)`` (its weight, its output),
  also for other widths, tied embeddings, ``bias=True`` FFNs and other block layouts, and the base
  models without an LM head have the same targets;
* the same holds with grad enabled, over bases the kernels do not read (``base(x)`` + adapters),
  with per-token users (mixed token by token: each token gets its own user's ``ΔW x``), through
  ``generate`` (KV cache, beams) and after users came and went (slots and bank rows reused).
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from milp.config import MemoryConfig
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
from milp.runtime import MilpRuntime

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ARCHS = sorted(SUPPORTED_ARCHITECTURES)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_MODELS: dict[tuple, nn.Module] = {}


def base_model(arch: str, layers: int, **overrides) -> nn.Module:
    """The tiny ``arch`` model in float64 (built once per key); callers deep-copy it."""
    key = (arch, layers, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, num_hidden_layers=layers, **overrides).double()
    return _MODELS[key]


@st.composite
def memory_configs(draw, layers: int):
    modules = tuple(draw(st.integers(0, 3)) for _ in range(layers))
    ranks = tuple(tuple(draw(st.sampled_from([1, 2, 3, 5, 8])) for _ in range(n)) if n > 1 and draw(st.booleans())
                  else draw(st.sampled_from([1, 2, 3, 5, 8])) for n in modules)
    mask = tuple(draw(st.booleans()) for _ in range(layers))
    return MemoryConfig(mask, modules, ranks, lora_alpha=draw(st.sampled_from([0.5, 1.0, 3.0, 16.0])))


def random_adapters(rt: MilpRuntime, user, seed: int) -> None:
    """Non-zero random A and B (float64) for every adapted target of ``user``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (torch.rand(v.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.5
               for k, v in rt.adapter_state(user).items()}
    rt.load_adapter_state(user, tensors)


def merged_model(original: nn.Module, rt: MilpRuntime, user) -> nn.Module:
    """A deep copy of the un-injected ``original`` with ``W += Σ_j s_j B_j A_j`` on each target
    ``user`` has adapters at (:func:`delta_of`; ``Conv1D`` weights are ``[in, out]``), biases
    untouched."""
    ref = copy.deepcopy(original)
    for name, delta in delta_of(rt, user).items():
        target = ref.get_submodule(name)
        with torch.no_grad():
            if isinstance(target, Conv1D):
                assert target.weight.shape == delta.t().shape
                target.weight += delta.t()
            else:
                assert isinstance(target, nn.Linear) and target.weight.shape == delta.shape
                target.weight += delta
    return ref


def delta_of(rt: MilpRuntime, user) -> dict[str, torch.Tensor]:
    """Per target name where ``user`` has adapters (the layers its MemoryConfig makes active),
    ``ΔW = Σ_j s_j B_j A_j`` ``[out, in]`` in float64 (``s_j = α / r_j`` as documented, rounded
    to the float32 the banks hold; ``B`` as :meth:`MilpRuntime.adapter_state` gives it, ``[R, out]``)."""
    cfg, state, out = rt.config(user), rt.adapter_state(user), {}
    for names, layer in zip(rt.state.names, rt.state.layers):
        ranks = cfg.layer_ranks(layer[0].layer)
        for name, m in zip(names, layer):
            key = f"layers.{m.layer}.{m.target}"
            if not ranks:
                assert key + ".lora_A" not in state
                continue
            s = torch.tensor([float(torch.tensor(cfg.lora_alpha / r, dtype=torch.float32)) for r in ranks
                              for _ in range(r)], dtype=torch.float64)
            out[name] = (state[key + ".lora_B"].double() * s[:, None]).t() @ state[key + ".lora_A"].double()
    assert set(state) == {f"layers.{m.layer}.{m.target}.lora_{x}" for layer in rt.state.layers for m in layer
                          if cfg.layer_ranks(m.layer) for x in "AB"}
    return out


def close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{msg}: {m}")


# ------------------------------------------------------------------------ logits vs merged weights
@SETTINGS
@given(arch=st.sampled_from(ARCHS), layers=st.integers(1, 3), data=st.data())
def test_every_family_computes_the_hand_merged_weights(arch, layers, data):
    original = base_model(arch, layers)
    model = copy.deepcopy(original)
    rt = MilpRuntime(model, max_users=3)
    cfgs = {u: data.draw(memory_configs(layers), label=f"cfg {u}") for u in ("a", "b")}
    for i, (u, cfg) in enumerate(cfgs.items()):
        rt.add_user(u, cfg, init="lora")
        random_adapters(rt, u, seed=i + 10 * layers)
    rows = data.draw(st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=4), label="rows")
    S = data.draw(st.integers(1, 6), label="S")
    ids = torch.randint(3, 90, (len(rows), S), generator=torch.Generator().manual_seed(S))
    with torch.no_grad():
        ref = original(ids).logits
        got = rt.forward(ids, rows).logits
        for u in cfgs:  # parameter count: what the banks hold, the config's formula
            held = sum(t.numel() for t in rt.adapter_state(u).values())
            assert rt.num_parameters(u) == held == cfgs[u].num_parameters(original)
            want = merged_model(original, rt, u)(ids).logits
            close(rt.forward(ids, [u] * len(rows)).logits, want, f"{arch} user {u} alone")
            for b, r in enumerate(rows):
                if r == u:
                    close(got[b], want[b], f"{arch} row {b} (user {u}) in a mixed batch")
        for b, r in enumerate(rows):
            if r is None:
                close(got[b], ref[b], f"{arch} row {b} (no user) in a mixed batch")
        assert torch.equal(model(ids).logits, ref)  # no users set
        remove_milp(model)
        assert not is_injected(model)
        assert torch.equal(model(ids).logits, ref)


# --------------------------------------------------------------------- shapes, ties, biases
VARIANTS = {  # config overrides: tied embeddings, biased FFNs, other block layouts real checkpoints use
    "llama": [dict(tie_word_embeddings=True), dict(mlp_bias=True)],
    "falcon": [dict(bias=True), dict(new_decoder_architecture=True, num_kv_heads=2), dict(parallel_attn=False)],
    "gpt_neox": [dict(tie_word_embeddings=True), dict(use_parallel_residual=False)],
    "granite": [dict(mlp_bias=True), dict(residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=3.0)],
    "stablelm": [dict(use_parallel_residual=True, qk_layernorm=True)],
    "gemma2": [dict(final_logit_softcapping=5.0)],
    "starcoder2": [dict(use_bias=False)],
    "qwen2": [dict(tie_word_embeddings=True)],
    "gemma": [dict(tie_word_embeddings=True)],
    "phi3": [dict(tie_word_embeddings=True)],
    "opt": [dict(enable_bias=False), dict(do_layer_norm_before=False)],
    "gpt2": [dict(n_inner=None)],
}
CASES = [(a, {}) for a in ARCHS] + [(a, v) for a, vs in VARIANTS.items() for v in vs]


def real_in_out(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (int(w.shape[0]), int(w.shape[1])) if isinstance(m, Conv1D) else (int(w.shape[1]), int(w.shape[0]))


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=[f"{a}-{'-'.join(v) or 'default'}" for a, v in CASES])
def test_shapes_ties_and_biases_against_merged_weights(arch, overrides):
    """ffn_target_shapes is each target's real (in, out) (weights and outputs); with tied
    embeddings or FFN biases the adapters still add exactly Σ s B A x (biases untouched), and
    remove_milp gives the original logits bit for bit."""
    import transformers

    if overrides.get("qk_layernorm") and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 cannot build StableLM with qk_layernorm (its _init_weights zeroes the "
                    "bias of a LayerNorm that has none)")
    for hidden, inter in ((32, 64), (16, 40)):
        kw = dict(overrides, hidden_size=hidden, intermediate_size=inter)
        if "n_inner" in overrides:  # GPT-2's default FFN width, 4 * n_embd
            del kw["intermediate_size"]
        if arch == "opt":
            kw["word_embed_proj_dim"] = hidden
        original = base_model(arch, 2, **kw)
        shapes = ffn_target_shapes(original)
        targets = ffn_targets(original)
        x_by_in = {}
        for row_shapes, row in zip(shapes, targets):
            assert len(row_shapes) == len(row)
            for (i, o), (name, m) in zip(row_shapes, row):
                assert real_in_out(m) == (i, o), name
                x = x_by_in.setdefault(i, torch.randn(3, i, dtype=torch.float64))
                assert m(x).shape == (3, o), name
        if arch == "gpt2" and "n_inner" in overrides:
            assert shapes[0] == [(hidden, 4 * hidden), (4 * hidden, hidden)]
        biases = {n: p.clone() for n, p in original.named_parameters() if n.endswith("bias")}
        model = copy.deepcopy(original)
        rt = MilpRuntime(model, max_users=2)
        assert ffn_target_shapes(model) == shapes == rt.state.target_shapes()
        cfg = MemoryConfig((True, True), (2, 1), ((3, 5), 2), lora_alpha=3.0)
        rt.add_user("u", cfg)
        random_adapters(rt, "u", seed=hidden)
        assert rt.num_parameters("u") == cfg.num_parameters(shapes) == cfg.num_parameters(original)
        ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = original(ids).logits
            want = merged_model(original, rt, "u")(ids).logits
            close(rt.forward(ids, ["u", "u"]).logits, want, f"{arch} {kw}")
            close(rt.forward(ids, [None, "u"]).logits[0], ref[0], f"{arch} {kw} no user")
            remove_milp(model)
            assert torch.equal(model(ids).logits, ref)
        assert {n: p for n, p in model.named_parameters() if n.endswith("bias")}.keys() == biases.keys()
        assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_base_model_without_its_head_has_the_same_targets(arch):
    """The second layer path (the bare model under the LM head) finds the same FFN modules."""
    lm = tiny_model(arch)
    full = ffn_targets(lm)
    bare = next(m for n, m in lm.named_children() if any(True for _ in m.parameters()) and n not in (
        "lm_head", "embed_out", "output", "lm_head_out"))
    inner = ffn_targets(bare)
    assert [[m for _, m in row] for row in inner] == [[m for _, m in row] for row in full]
    for row_full, row_inner in zip(full, inner):
        for (nf, _), (ni, _) in zip(row_full, row_inner):
            assert nf.endswith("." + ni)
    state = apply_milp(bare, max_users=1)
    assert all(isinstance(m, MultiLoraLinear) for layer in ffn_targets(lm) for _, m in layer)
    assert get_milp(bare) is state
    remove_milp(bare)
    assert [[m for _, m in row] for row in ffn_targets(lm)] == [[m for _, m in row] for row in full]


# ------------------------------------------------------------------ other paths through the layer
class _OwnForwardLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: not ``dense``, so the layer adds the
    adapters' contribution to ``base(x)`` (the quantized-base path)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class _OwnForwardConv1D(Conv1D):
    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def with_non_dense_targets(model: nn.Module) -> nn.Module:
    for layer in ffn_targets(model):
        for name, m in layer:
            parent, _, child = name.rpartition(".")
            if isinstance(m, Conv1D):
                new = _OwnForwardConv1D(m.nf, m.weight.shape[0]).to(m.weight.dtype)
            else:
                new = _OwnForwardLinear(m.in_features, m.out_features, bias=m.bias is not None).to(m.weight.dtype)
            new.load_state_dict(m.state_dict())
            setattr(model.get_submodule(parent), child, new)
    return model


@settings(SETTINGS, max_examples=20)
@given(arch=st.sampled_from(ARCHS), layers=st.integers(1, 2), grad=st.booleans(), non_dense=st.booleans(),
       per_token=st.booleans(), data=st.data())
def test_grad_non_dense_and_per_token_paths_compute_the_merged_weights(arch, layers, grad, non_dense, per_token,
                                                                        data):
    """The same property through the autograd path (grad enabled), through bases the kernels do
    not read (``base(x)`` + the adapters alone) and with per-token users ``[B, S]`` (each row's
    tokens one user, given token by token)."""
    original = base_model(arch, layers)
    if non_dense:
        original = with_non_dense_targets(copy.deepcopy(original))
    model = copy.deepcopy(original)
    rt = MilpRuntime(model, max_users=3)
    # Falcon's FalconLinear has a forward of its own: never dense
    assert all(m.dense == (not non_dense and arch != "falcon") for m in rt.state.modules())
    cfgs = {u: data.draw(memory_configs(layers), label=f"cfg {u}") for u in ("a", "b")}
    for i, (u, cfg) in enumerate(cfgs.items()):
        rt.add_user(u, cfg)
        random_adapters(rt, u, seed=100 + i)
    rows = data.draw(st.lists(st.sampled_from(["a", "b", None]), min_size=1, max_size=3), label="rows")
    S = data.draw(st.integers(1, 5), label="S")
    ids = torch.randint(3, 90, (len(rows), S), generator=torch.Generator().manual_seed(S))
    slots = torch.tensor([rt.slot(r) if r is not None else -1 for r in rows])
    users = slots[:, None].expand(len(rows), S).contiguous() if per_token else slots
    with torch.set_grad_enabled(grad):
        with batch_users(model, users):
            got = model(ids).logits
        if grad and got.requires_grad:  # (no adapter in the batch: nothing to differentiate)
            got.sum().backward()
    with torch.no_grad():
        ref = original(ids).logits
        for b, r in enumerate(rows):
            want = ref[b] if r is None else merged_model(original, rt, r)(ids[b : b + 1]).logits[0]
            close(got[b].detach(), want, f"{arch} row {b} (user {r})")
        remove_milp(model)
        assert torch.equal(model(ids).logits, ref)


@settings(SETTINGS, max_examples=12)
@given(arch=st.sampled_from([a for a in ARCHS if a != "roberta"]), beams=st.sampled_from([1, 2]), data=st.data())
def test_generation_with_the_kv_cache_follows_the_merged_model(arch, beams, data):
    """Decode steps (one token per row, plans reused; with beams ``B*k`` rows, row ``i`` of
    prompt ``i // k``) give each row its merged model's continuation and, greedy, the same
    per-step logits."""
    original = base_model(arch, 2)
    model = copy.deepcopy(original)
    rt = MilpRuntime(model, max_users=2)
    cfg = data.draw(memory_configs(2), label="cfg")
    rt.add_user("a", cfg)
    random_adapters(rt, "a", seed=7)
    rows = data.draw(st.lists(st.sampled_from(["a", None]), min_size=1, max_size=3), label="rows")
    ids = torch.randint(3, 90, (len(rows), 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
              num_beams=beams, num_return_sequences=beams, output_logits=beams == 1)
    out = rt.generate(ids, rows, **kw)
    merged = merged_model(original, rt, "a")
    for b, r in enumerate(rows):
        ref = (merged if r == "a" else original).generate(ids[b : b + 1], **kw)
        assert torch.equal(out.sequences[b * beams : (b + 1) * beams], ref.sequences), (arch, b, r)
        if beams == 1:
            for step, (g, w) in enumerate(zip(out.logits, ref.logits)):
                close(g[b], w[0], f"{arch} row {b} step {step}")


@settings(SETTINGS, max_examples=15)
@given(arch=st.sampled_from(ARCHS), data=st.data())
def test_users_mixed_token_by_token_add_each_tokens_own_delta(arch, data):
    """Per-token users ``[B, S]`` (``-1`` tokens among them): every FFN target adds, at each
    token, ``ΔW_u x`` of that token's user ``u`` only (a reference built by forward hooks on the
    original model from the hand-merged ``ΔW``)."""
    original = base_model(arch, 2)
    model = copy.deepcopy(original)
    rt = MilpRuntime(model, max_users=3)
    for i, u in enumerate(("a", "b")):
        rt.add_user(u, data.draw(memory_configs(2), label=f"cfg {u}"))
        random_adapters(rt, u, seed=20 + i)
    B, S = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 5), label="S")
    slots = torch.tensor(data.draw(st.lists(st.sampled_from([-1, rt.slot("a"), rt.slot("b")]), min_size=B * S,
                                            max_size=B * S), label="token users")).view(B, S)
    ids = torch.randint(3, 90, (B, S), generator=torch.Generator().manual_seed(B * S))
    deltas = {rt.slot(u): delta_of(rt, u) for u in ("a", "b")}
    ref = copy.deepcopy(original)
    for name in [n for row in rt.state.names for n in row]:
        def hook(_m, args, out, name=name):
            x = args[0]
            add = torch.zeros_like(out)
            for slot, d in deltas.items():
                if name in d:
                    add = add + (slots == slot).reshape(*x.shape[:-1], 1).to(x.dtype) * (x @ d[name].t())
            return out + add

        ref.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad(), batch_users(model, slots):
        got = model(ids).logits
    with torch.no_grad():
        close(got, ref(ids).logits, f"{arch} token users {slots.tolist()}")


@settings(SETTINGS, max_examples=15)
@given(arch=st.sampled_from(ARCHS), data=st.data())
def test_users_added_and_removed_in_any_order_keep_their_own_merged_weights(arch, data):
    """Users come and go (slots and bank rows reused, banks grown past their capacity): every
    user still loaded computes its own merged weights, set when it was added; a mixed batch of
    all of them too."""
    original = base_model(arch, 2)
    model = copy.deepcopy(original)
    rt = MilpRuntime(model, max_users=4, capacity=data.draw(st.sampled_from([0, 4]), label="capacity"))
    ids = torch.randint(3, 90, (1, 4), generator=torch.Generator().manual_seed(0))
    want: dict[str, torch.Tensor] = {}
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        if want and (len(want) == 4 or data.draw(st.booleans(), label="remove")):
            u = data.draw(st.sampled_from(sorted(want)), label="removed")
            rt.remove_user(u)
            del want[u]
            continue
        u = f"u{step}"
        rt.add_user(u, data.draw(memory_configs(2), label=f"cfg {u}"))
        random_adapters(rt, u, seed=step)
        with torch.no_grad():
            want[u] = merged_model(original, rt, u)(ids).logits[0]
        assert rt.num_parameters(u) == rt.config(u).num_parameters(original)
    users = sorted(want)
    if users:
        with torch.no_grad():
            got = rt.forward(ids.expand(len(users), -1), users).logits
        for b, u in enumerate(users):
            close(got[b], want[u], f"{arch} {u} (slot {rt.slot(u)})")
    remove_milp(model)


# ------------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_regression_a_non_dense_float_base_gets_adapters_of_its_weights_dtype(dtype):
    """Was: MultiLoraLinear over a base the kernels do not read (a subclass with its own forward,
    such as Falcon's FalconLinear) holding a float weight, with no ``dtype`` given, got adapters
    of the default float dtype (float32), not of its weight's dtype as its docstring says: a
    float64 FalconLinear's adapters ran in float32 and a bfloat16 one's took twice the memory.
    An int8 weight (a quantized base) still gets the default float dtype; an explicit ``dtype``
    (apply_milp passes the model's) still wins."""
    base = _OwnForwardLinear(8, 4).to(dtype)
    m = MultiLoraLinear(base, max_users=1, layer=0, target="mlp.up_proj")
    assert not m.dense and m.bank.lora_a.dtype == m.bank.lora_b.dtype == dtype
    assert MultiLoraLinear(base, max_users=1, layer=0, target="t", dtype=torch.float32).bank.lora_a.dtype \
        == torch.float32  # an explicit dtype (apply_milp's: the model's) wins
    falcon = tiny_model("falcon", num_hidden_layers=1).to(dtype).transformer.h[0].mlp.dense_h_to_4h
    assert MultiLoraLinear(falcon, max_users=1, layer=0, target="t").bank.lora_a.dtype == dtype
    int8 = nn.Module()
    int8.in_features, int8.out_features = 8, 4
    int8.register_buffer("weight", torch.zeros(4, 8, dtype=torch.int8))
    assert MultiLoraLinear(int8, max_users=1, layer=0, target="t").bank.lora_a.dtype == torch.get_default_dtype()


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_regression_tiny_model_is_float32_whatever_the_default_dtype(default):
    """Was: tiny_model, documented as float32, built its model in torch's default dtype (float64
    or bfloat16 after ``torch.set_default_dtype``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for arch in ("llama", "gpt2"):
            m = tiny_model(arch)
            assert {p.dtype for p in m.parameters()} == {torch.float32} and not m.training
    finally:
        torch.set_default_dtype(old)
