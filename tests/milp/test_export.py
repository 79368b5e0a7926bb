"""PEFT interop. Export: a user's multi-module adapters fold into one PEFT LoRA per target.
Import: a PEFT LoRA adapter of the FFN linears loads as a runtime user with PEFT's outputs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milp.config import MemoryConfig
from milp.export import export_peft, import_peft, peft_adapter, read_peft
from milp.inject import tiny_model
from milp.runtime import MilpRuntime

# per-layer ranks differ (rank_pattern), several modules with different ranks fold into one
CFG = MemoryConfig((True, True), (2, 1), ((4, 8), 16), lora_alpha=32.0)


def runtime(arch: str) -> MilpRuntime:
    rt = MilpRuntime(tiny_model(arch), max_users=3)
    rt.add_user("other", MemoryConfig.uniform(2, 1, 8), init="random", seed=1)
    rt.add_user("u", CFG, init="random", seed=0)
    return rt


def test_fold_is_exact_without_peft():
    rt = runtime("llama")
    sd, cfg = peft_adapter(rt, "u")
    name = "model.layers.0.mlp.up_proj"
    a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
    assert a.shape == (12, 32) and b.shape == (64, 12)
    x = torch.randn(5, 32)
    bank = rt.model.get_submodule(name).bank
    ranks, scales = bank.segment(rt.slot("u")).ranks, bank.segment(rt.slot("u")).scales
    A, B, _ = bank.adapter_weights(rt.slot("u"))
    want = sum(s * (x @ A[o : o + r].t()) @ B[o : o + r]
               for r, s, o in zip(ranks, scales, (0, ranks[0])))
    peft_scaling = cfg["alpha_pattern"].get("^" + name.replace(".", r"\."), cfg["lora_alpha"]) / 12
    torch.testing.assert_close(peft_scaling * (x @ a.t()) @ b.t(), want.detach(), rtol=1e-5, atol=1e-6)
    assert cfg["r"] in (12, 16) and set(cfg["target_modules"]) == {
        f"model.layers.{li}.mlp.{t}" for li in (0, 1) for t in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta", "phi3", "starcoder2"])
def test_peft_round_trip_same_logits(arch, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT export round trip needs the optional `peft` extra")
    rt = runtime(arch)
    path = export_peft(rt, "u", tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")

    ids = torch.randint(3, 90, (2, 7))
    want = rt.forward(ids, ["u", "u"]).logits
    base = tiny_model(arch)
    assert not torch.allclose(base(ids).logits, want, atol=1e-3)  # the adapters matter
    model = peft.PeftModel.from_pretrained(base, str(path))
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_export_errors_and_atomicity(tmp_path, monkeypatch):
    rt = runtime("llama")
    rt.add_user("empty", MemoryConfig((False, False), (1, 1), (8, 8)))
    with pytest.raises(ValueError, match="no adapters"):
        export_peft(rt, "empty", tmp_path / "e")
    with pytest.raises(KeyError, match="unknown user"):
        export_peft(rt, "nobody", tmp_path / "n")
    with pytest.raises(TypeError, match="MilpRuntime"):
        export_peft(object(), "u", tmp_path / "n")
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        export_peft(rt, "u", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- import
def test_import_round_trip_same_outputs_in_one_mixed_batch(tmp_path):
    """export → import gives a user with the same outputs (no padding: nothing to warn
    about), served beside the original and another user in one batch."""
    for arch in ("llama", "gpt2", "roberta"):
        rt = runtime(arch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cfg = import_peft(rt, "v", export_peft(rt, "u", tmp_path / arch))
        assert cfg.layer_ranks(0) == (12,) and cfg.layer_ranks(1) == (16,)  # 4 + 8 folded into one module
        assert rt.num_parameters("v") == rt.num_parameters("u")
        ids = torch.randint(3, 90, (1, 6)).repeat(4, 1)  # the same prompt for each user
        with torch.no_grad():
            out = rt.forward(ids, ["u", "v", "other", None]).logits
            base = rt.forward(ids, None).logits
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[0], base[0], atol=1e-3) and not torch.allclose(out[0], out[2], atol=1e-3)
        torch.testing.assert_close(out[3], base[3])


def _peft_model(peft, arch: str, **lora):
    base = tiny_model(arch)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora))
    return base, model.eval()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@pytest.mark.parametrize("rslora", [False, True])
def test_import_matches_peft_with_patterns_padding_and_missing_targets(tmp_path, rslora):
    """Targets of one layer with different ranks and alphas (rank_pattern, alpha_pattern,
    rsLoRA) and a target left out (gate_proj): padded with zeros, scalings folded into B,
    and the user's logits are PEFT's; a second imported user of another rank shares the batch."""
    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    _, model = _peft_model(peft, "llama", r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"],
                           rank_pattern={"layers.1.mlp.down_proj": 6}, alpha_pattern={"down_proj": 3},
                           use_rslora=rslora)
    model.save_pretrained(str(tmp_path / "a"))
    ids = torch.randint(3, 90, (3, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rt = MilpRuntime(tiny_model("llama"), max_users=3)
    rt.add_user("other", MemoryConfig.uniform(2, 2, 8), init="random", seed=3)
    with pytest.warns(UserWarning, match="zero parameters pad"):
        cfg = rt.load_peft(tmp_path / "a", "p")
    assert cfg.active_layers == (0, 1) and cfg.layer_ranks(0) == (4,) and cfg.layer_ranks(1) == (6,)
    _, b, s = read_peft(tmp_path / "a")[1]["model.layers.1.mlp.down_proj"]
    assert s == pytest.approx(3 / 6**0.5 if rslora else 3 / 6) and b.shape == (32, 6)
    with torch.no_grad():
        got = rt.forward(ids, ["p", "other", "p"]).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], want[1], atol=1e-3)
    # the imported user trains on like any other (its padding rows included)
    rt.set_total_steps("p", 10)
    before = rt.adapter_state("p")["layers.1.mlp.down_proj.lora_B"].clone()
    rt.train_step(ids, ["p", "other", "p"])
    assert not torch.equal(rt.adapter_state("p")["layers.1.mlp.down_proj.lora_B"], before)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_import_matches_peft_on_gpt2_conv1d_and_bin_weights(tmp_path):
    """GPT-2's Conv1D targets (fan_in_fan_out) and an adapter saved as adapter_model.bin."""
    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    _, model = _peft_model(peft, "gpt2", r=8, lora_alpha=16, target_modules=["c_fc", "mlp.c_proj"],
                           fan_in_fan_out=True, layers_to_transform=[1])
    model.save_pretrained(str(tmp_path / "a"), safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rt = MilpRuntime(tiny_model("gpt2"), max_users=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = rt.load_peft(tmp_path / "a", "p")
    assert cfg.active_layers == (1,)
    with torch.no_grad():
        torch.testing.assert_close(rt.forward(ids, "p").logits, want, rtol=1e-5, atol=1e-5)



@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_import_in_float64_matches_peft_to_float64_precision(tmp_path):
    """Regression: the import folded PEFT's scaling into B relative to the exact ``alpha / r``, but the
    bank applies its scale rounded to float32 (1/3 here), so in a float64 model the imported user's
    outputs were off by ~1e-8 relative; the fold is now relative to the scale the bank applies."""
    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    _, model = _peft_model(peft, "llama", r=3, lora_alpha=1, target_modules=["up_proj", "down_proj"],
                           rank_pattern={"layers.1.mlp.down_proj": 6})
    model = model.double()
    model.save_pretrained(str(tmp_path / "a"))
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rt = MilpRuntime(tiny_model("llama").double(), max_users=1)
    with pytest.warns(UserWarning, match="zero parameters pad"):
        rt.load_peft(tmp_path / "a", "p")
    with torch.no_grad():
        got = rt.forward(ids, "p").logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

def _write(d, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))


def test_import_errors_name_the_problem_and_load_nothing(tmp_path):
    rt = runtime("llama")
    ok = export_peft(rt, "u", tmp_path / "ok")
    config = json.loads((ok / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(ok / "adapter_model.safetensors"))
    up = "base_model.model.model.layers.0.mlp.up_proj"
    users = list(rt.users)

    def refused(exc, match, cfg=None, sd=None, name="bad"):
        _write(tmp_path / name, config if cfg is None else cfg, tensors if sd is None else sd)
        with pytest.raises(exc, match=match):
            import_peft(rt, "x", tmp_path / name)
        assert rt.users == users  # nothing half-loaded

    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_peft(rt, "x", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(rt, "x", tmp_path / "empty")
    with pytest.raises(ValueError, match="already loaded"):
        import_peft(rt, "u", ok)
    with pytest.raises(TypeError, match="MilpRuntime"):
        import_peft(object(), "x", ok)
    refused(ValueError, "peft_type 'IA3'", cfg=dict(config, peft_type="IA3"))
    refused(ValueError, "use_dora=True: DoRA", cfg=dict(config, use_dora=True))
    refused(ValueError, "bias='all'", cfg=dict(config, bias="all"))
    refused(ValueError, "modules_to_save", cfg=dict(config, modules_to_save=["lm_head"]))
    refused(ValueError, "lora_alpha must be a number > 0", cfg=dict(config, lora_alpha=0))
    refused(ValueError, "lora_alpha -2; expected a number > 0", cfg=dict(config, alpha_pattern={"up_proj": -2}))
    refused(ValueError, "rank 16, its weights have rank 12", cfg=dict(config, rank_pattern={}, r=16))
    # config fields of the wrong JSON type or with a broken regex: named, not a crash inside the lookup
    refused(ValueError, "target_modules must be a list of module names", cfg=dict(config, target_modules=5))
    refused(ValueError, "target_modules must be a list", cfg=dict(config, target_modules=["up_proj", 3]))
    refused(ValueError, "rank_pattern must be an object", cfg=dict(config, rank_pattern=["up_proj"]))
    refused(ValueError, "alpha_pattern key '\\(' is not a valid regular expression",
            cfg=dict(config, alpha_pattern={"(": 2}))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    refused(ValueError, r"does not wrap, e\.g\. \['model\.layers\.0\.self_attn\.q_proj'\]; MiLP adapters sit on",
            sd=dict(tensors, **{q + ".lora_A.weight": torch.zeros(4, 32), q + ".lora_B.weight": torch.zeros(32, 4)}),
            cfg=dict(config, rank_pattern={**config["rank_pattern"], "q_proj": 4}))
    refused(ValueError, "needs lora_A and lora_B", sd={k: v for k, v in tensors.items() if k != up + ".lora_B.weight"})
    refused(ValueError, "not a lora_A/lora_B matrix",
            sd=dict(tensors, **{up + ".lora_magnitude_vector": torch.ones(64)}))
    refused(ValueError, r"lora_B \(64, 3\); expected \[r, in\] and \[out, r\]",
            sd=dict(tensors, **{up + ".lora_B.weight": torch.zeros(64, 3)}))
    small = MilpRuntime(tiny_model("llama", hidden_size=16, intermediate_size=48), max_users=1)
    with pytest.raises(ValueError, match="down_proj' maps 64 → 32 features, the model's maps 48 → 16"):
        import_peft(small, "x", ok)
    assert small.users == []


# ------------------------------------------------------------------------------------------------
# properties over drawn runtimes: architecture, depth, dtype, several users with per-layer module counts
# (0 included), ragged per-module ranks and alphas; the exported user sits anywhere among the others


@st.composite
def _memory_configs(draw, num_layers):
    modules = tuple(draw(st.integers(0, 3)) for _ in range(num_layers))
    ranks = tuple(tuple(draw(st.sampled_from([1, 2, 3, 5, 8])) for _ in range(n)) if n > 1 and draw(st.booleans())
                  else draw(st.sampled_from([1, 2, 3, 5, 8])) for n in modules)
    mask = tuple(draw(st.sampled_from([True, True, False])) for _ in range(num_layers))
    return MemoryConfig(mask, modules, ranks, lora_alpha=draw(st.sampled_from([0.5, 1.0, 3.0, 16.0, 32.0])))


@st.composite
def _export_cases(draw):
    arch = draw(st.sampled_from(["llama", "gpt2", "roberta"]))
    layers = draw(st.sampled_from([1, 2, 2, 3, 11]))  # 11: layer 1's names are prefixes of layer 10's
    others = draw(st.lists(_memory_configs(layers), max_size=2))
    return dict(arch=arch, layers=layers, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                others=others, cfg=draw(_memory_configs(layers)), position=draw(st.integers(0, len(others))),
                fragment=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def _delta_weights(rt: MilpRuntime, user) -> dict[str, torch.Tensor]:
    """Each adapted target's Σ_j s_j B_j^T A_j in float64, from the bank as the forward uses it."""
    slot, out = rt.slot(user), {}
    for m in rt.state.modules():
        if m.bank.has(slot):
            a, b, s = m.bank.adapter_weights(slot)
            out[f"layers.{m.layer}.{m.target}"] = (b.double().t() * s.double()) @ a.double()
    return out


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
@settings(max_examples=25, deadline=None)
@given(case=_export_cases())
def test_drawn_users_export_to_peft_and_import_back_exactly(case):
    """export → ``PeftModel`` gives the runtime's logits for that user; import of the export into a
    fresh runtime (no padding, so no warning) has the same ΔW at every target and the same logits;
    no other user, in either runtime, changes."""
    import tempfile

    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    arch, L, dtype, cfg = case["arch"], case["layers"], case["dtype"], case["cfg"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    dw_tol = 1e-6 if dtype == torch.float32 else 1e-12

    def model():
        return tiny_model(arch, num_hidden_layers=L).to(dtype)

    rt = MilpRuntime(model(), max_users=len(case["others"]) + 2)
    if case["fragment"]:  # a user that leaves again: the exported one's rows need not start at 0
        rt.add_user("gone", MemoryConfig.uniform(L, 2, 3), init="random", seed=99)
    names = [f"o{i}" for i in range(len(case["others"]))]
    names.insert(case["position"], "u")
    for i, name in enumerate(names):
        rt.add_user(name, cfg if name == "u" else case["others"][int(name[1:])], init="random", seed=case["seed"] + i)
        if name == "u" and case["fragment"]:
            rt.remove_user("gone")
    before = {name: rt.adapter_state(name) for name in names}
    g = torch.Generator().manual_seed(case["seed"])
    ids = torch.randint(3, 90, (2, 6), generator=g)

    def unchanged(runtime, states):
        for name, state in states.items():
            now = runtime.adapter_state(name)
            assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), name

    with tempfile.TemporaryDirectory() as tmp:
        if not cfg.active_layers:
            with pytest.raises(ValueError, match="no adapters"):
                export_peft(rt, "u", f"{tmp}/a")
            unchanged(rt, before)
            return
        path = export_peft(rt, "u", f"{tmp}/a")
        unchanged(rt, before)  # exporting reads only
        with torch.no_grad():
            want = rt.forward(ids, "u").logits
            got = peft.PeftModel.from_pretrained(model(), str(path)).eval()(input_ids=ids).logits
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)

        fresh = MilpRuntime(model(), max_users=2)
        fresh.add_user("w", case["others"][0] if case["others"] else MemoryConfig.uniform(L, 1, 4),
                       init="random", seed=7)
        kept = {"w": fresh.adapter_state("w")}
        with torch.no_grad():
            w_logits = fresh.forward(ids, "w").logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the export's targets of one layer share a rank: nothing to pad
            got_cfg = import_peft(fresh, "v", path)
        unchanged(fresh, kept)
        assert got_cfg.active_layers == cfg.active_layers
        assert all(got_cfg.layer_ranks(li) == (sum(cfg.layer_ranks(li)),) for li in cfg.active_layers)
        assert fresh.num_parameters("v") == rt.num_parameters("u")
        mine, theirs = _delta_weights(fresh, "v"), _delta_weights(rt, "u")
        assert mine.keys() == theirs.keys()
        for k, dw in theirs.items():
            err = float((mine[k] - dw).detach().abs().max())
            assert err <= dw_tol * float(dw.detach().abs().max()), (k, err)
        with torch.no_grad():
            mixed = fresh.forward(torch.cat([ids, ids]), ["v", "v", "w", "w"]).logits
        torch.testing.assert_close(mixed[:2], want, **tol)
        torch.testing.assert_close(mixed[2:], w_logits, **tol)


# FFN targets as PEFT's target_modules may name them (suffixes that hit no attention module, so RoBERTa's
# output.dense is named per layer), each with the key of one layer's module for rank_pattern / alpha_pattern
# (PEFT matches ``(.*\.)?(key)$``)
_PEFT_TARGETS = {
    "llama": lambda L: [(t, f"layers.{{}}.mlp.{t}") for t in ("gate_proj", "up_proj", "down_proj")],
    "gpt2": lambda L: [("c_fc", "h.{}.mlp.c_fc"), ("mlp.c_proj", "h.{}.mlp.c_proj")],
    "roberta": lambda L: [("intermediate.dense", "layer.{}.intermediate.dense")]
    + [(f"layer.{i}.output.dense", f"layer.{i}.output.dense") for i in range(L)],
}


@st.composite
def _peft_cases(draw):
    arch = draw(st.sampled_from(sorted(_PEFT_TARGETS)))
    L = draw(st.sampled_from([1, 2, 3]))
    chosen = draw(st.lists(st.sampled_from(_PEFT_TARGETS[arch](L)), min_size=1, unique=True))
    targets = [t for t, _ in chosen]
    keys = st.sampled_from(sorted({*targets, *(k.format(i) for _, k in chosen for i in range(L))}))
    lora = dict(r=draw(st.sampled_from([1, 2, 3, 4])), lora_alpha=draw(st.sampled_from([1, 3, 8, 16])),
                target_modules=targets, fan_in_fan_out=arch == "gpt2", use_rslora=draw(st.booleans()),
                rank_pattern=draw(st.dictionaries(keys, st.sampled_from([1, 2, 5]), max_size=2)),
                alpha_pattern=draw(st.dictionaries(keys, st.sampled_from([0.5, 2, 7]), max_size=2)))
    layers = draw(st.none() | st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True))
    if layers is not None and arch == "roberta" and "intermediate.dense" not in targets:
        layers.append(int(targets[0].split(".")[1]))  # PEFT refuses an adapter that adapts nothing
    if layers is not None:
        lora.update(layers_to_transform=sorted(set(layers)), layers_pattern={"llama": "layers", "gpt2": "h",
                                                                        "roberta": "layer"}[arch])
    return dict(arch=arch, layers=L, dtype=draw(st.sampled_from([torch.float32, torch.float64])), lora=lora,
                seed=draw(st.integers(0, 1000)))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:The following .*_pattern keys did not match:RuntimeWarning")  # layers_to_transform
@settings(max_examples=25, deadline=None)
@given(case=_peft_cases())
def test_drawn_peft_adapters_import_with_peft_outputs(case):
    """A drawn PEFT LoRA adapter of FFN targets (subsets of the targets and layers, rank and alpha
    patterns, rsLoRA), saved: where ``PeftModel.from_pretrained`` loads it, it imports as a user whose
    ΔW at every target is PEFT's ``scaling · B A`` (zero where PEFT adapts nothing in an adapted layer)
    and whose logits are PEFT's, and padding warns exactly when a layer's targets differ in rank; where
    PEFT cannot load it (overlapping rank_pattern keys: PEFT saves them sorted, so another key wins on
    load) the import refuses it. The runtime's other user is untouched either way."""
    import tempfile

    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    arch, L, dtype = case["arch"], case["layers"], case["dtype"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    dw_tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.manual_seed(case["seed"])
    trained = peft.get_peft_model(tiny_model(arch, num_hidden_layers=L),
                                  peft.LoraConfig(init_lora_weights=False, **case["lora"])).to(dtype)
    rt = MilpRuntime(tiny_model(arch, num_hidden_layers=L).to(dtype), max_users=2)
    rt.add_user("w", MemoryConfig.uniform(L, 2, 3), init="random", seed=1)
    kept = rt.adapter_state("w")
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(case["seed"]))
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_pretrained(tmp)
        try:
            model = peft.PeftModel.from_pretrained(tiny_model(arch, num_hidden_layers=L).to(dtype), tmp).eval()
        except RuntimeError as e:  # PEFT's own load fails: the file's patterns give weights of another rank
            assert "size mismatch" in str(e)
            with pytest.raises(ValueError, match="its weights have rank"):
                import_peft(rt, "p", tmp)
            assert rt.users == ["w"]
            model = None
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cfg = import_peft(rt, "p", tmp)
    now = rt.adapter_state("w")
    assert now.keys() == kept.keys() and all(torch.equal(now[k], kept[k]) for k in kept)
    if model is None:
        return
    # PEFT's ΔW per adapted module, and which FFN targets of each layer it adapts (rank 0: not adapted)
    want_dw, ranks = {}, {}
    for li, (names, layer) in enumerate(zip(rt.state.names, rt.state.layers)):
        for name, m in zip(names, layer):
            mod = model.base_model.model.get_submodule(name)
            r = mod.r["default"] if hasattr(mod, "lora_A") and "default" in mod.lora_A else 0
            ranks.setdefault(li, []).append(r)
            if r:
                b, a = mod.lora_B["default"].weight.double(), mod.lora_A["default"].weight.double()
                want_dw[f"layers.{li}.{m.target}"] = mod.scaling["default"] * (b @ a)
    adapted = [li for li, rs in ranks.items() if any(rs)]
    pads = [str(w.message) for w in caught if "zero parameters pad" in str(w.message)]
    assert bool(pads) == any(len(set(ranks[li])) > 1 for li in adapted), (ranks, pads)
    assert cfg.active_layers == tuple(adapted)
    assert all(cfg.layer_ranks(li) == (max(ranks[li]),) for li in adapted)
    got_dw = _delta_weights(rt, "p")
    assert set(got_dw) == {f"layers.{li}.{m.target}" for li in adapted for m in rt.state.layers[li]}
    for k, dw in got_dw.items():
        ref = want_dw.get(k, torch.zeros_like(dw))
        err = float((dw - ref).detach().abs().max())
        assert err <= dw_tol * max(float(ref.detach().abs().max()), 1e-30), (k, err)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = rt.forward(torch.cat([ids, ids]), ["p", "p", "w", None]).logits
        base = rt.forward(ids, None).logits
    torch.testing.assert_close(got[:2], want, **tol)
    torch.testing.assert_close(got[3], base[1], **tol)


def test_export_takes_a_path_as_base_model_and_refuses_other_types(tmp_path):
    """Regression: ``base_model_name_or_path=Path(...)`` (a local checkpoint) crashed in json with
    "Object of type PosixPath is not JSON serializable"; an int was written into the config."""
    rt = runtime("llama")
    d = export_peft(rt, "u", tmp_path / "a", base_model_name_or_path=tmp_path / "ckpt")
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "ckpt")
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str, a path or None, got int"):
        export_peft(rt, "u", tmp_path / "b", base_model_name_or_path=123)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_export_refuses_a_fold_that_overflows_half_precision(tmp_path):
    """Regression: ``lora_B`` is written with the module's scale folded in, in the bank's dtype; an
    fp16 user with a large ``lora_alpha`` exported an inf ``lora_B`` silently (NaN logits in PEFT)."""
    rt = MilpRuntime(tiny_model("llama").half(), max_users=1)
    rt.add_user("u", MemoryConfig.uniform(2, 1, 1, lora_alpha=1e5), init="random", seed=0)
    with pytest.raises(ValueError, match=r"lora_B times its scale \(100000\) overflows torch.float16"):
        export_peft(rt, "u", tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
