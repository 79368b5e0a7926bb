"""PEFT interop. Export: a user's multi-module adapters fold into one PEFT LoRA per target.
Import: a PEFT LoRA adapter of the FFN linears loads as a runtime user with PEFT's outputs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

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
