"""PEFT export: a user's multi-module adapters fold into one PEFT LoRA per target."""
from __future__ import annotations

import json

import pytest
import torch

from milp.config import MemoryConfig
from milp.export import export_peft, peft_adapter
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
@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
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
