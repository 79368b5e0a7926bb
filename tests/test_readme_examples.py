"""The README's Python examples run as written, on CPU, with small stand-ins for the names they
take as given (``model``, ``input_ids``, ``prompts``; ``token_user``, ``x``, ``W``), so the README
stays true as the API moves. ``device="cuda"`` becomes the CPU where there is no GPU."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(marker: str) -> str:
    """The README's ```python block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README.md should hold one python example with {marker!r}, found {len(found)}"
    return found[0]


def _model(num_layers: int = 30):
    """A tiny random LLaMA with SmolLM2's layer count (the examples' configs name 30 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_the_runtime_example_runs(tmp_path, monkeypatch):
    import milp

    monkeypatch.chdir(tmp_path)  # it saves a user under adapters/
    ns = {"model": _model(), "input_ids": torch.randint(3, 96, (4, 8)), "prompts": torch.randint(3, 96, (2, 5))}
    exec(_example("milp.MilpRuntime(model, max_users=64)"), ns)
    rt = ns["rt"]
    assert ns["out"].shape[0] == 2 and ns["out"].shape[1] <= 5 + 32
    assert set(ns["losses"]) == {"alice", "bob"}
    assert not rt.has_user("alice") and rt.has_user("bob")
    assert ns["update"].key in {"req-1", "req-2"} and ns["update"].done and 1 <= len(ns["update"].tokens) <= 32
    assert len(ns["batch"]) == 0
    assert (tmp_path / "adapters" / "alice" / "adapters.safetensors").is_file()
    assert milp.MemoryConfig.from_json(tmp_path / "adapters" / "alice" / "memory_config.json") \
        == milp.MemoryConfig.uniform(30, modules=2, rank=8)


def test_the_store_example_runs(tmp_path, monkeypatch):
    import milp

    monkeypatch.chdir(tmp_path)
    model = _model()
    users = ["meddia-d2-0001", "meddia-d3-0042"]  # the example's ids, saved as milp.train saves them
    saver = milp.MilpRuntime(model, max_users=2)
    for i, u in enumerate(users):
        saver.add_user(u, milp.MemoryConfig.uniform(30, modules=1, rank=4), init="random", seed=i)
        saver.evict_user(u, tmp_path / "runs" / "milp" / "users" / milp.user_dirname(u))
    milp.remove_milp(model)
    ns = {"milp": milp, "torch": torch, "model": model, "prompts": torch.randint(3, 96, (2, 5))}  # after the first
    exec(_example("milp.UserStore("), ns)
    assert ns["out"].shape[0] == 2 and ns["rt"].cache_info().loads == 2


def test_the_kernels_example_runs():
    import kernels
    from kernels.reference import lora_linear_ref

    code = _example("kernels.AdapterBank(4096, 11008")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = 5
    token_user = torch.tensor([7, -1, 42, 7, 42], device=device)
    x = torch.randn(T, 4096, dtype=torch.bfloat16, device=device)
    W = torch.randn(11008, 4096, dtype=torch.bfloat16, device=device) * 0.02
    ns = {"token_user": token_user, "x": x, "W": W}
    exec(code.replace('device="cuda"', f'device="{device}"'), ns)
    bank, plan, y = ns["bank"], ns["plan"], ns["y"]
    assert y.shape == (T, 11008) and y.dtype == torch.bfloat16
    with torch.no_grad():
        bank.lora_b.normal_(0, 0.02)  # B starts at zero: give the adapters something to add
        y = kernels.lora_linear(x, W, None, bank, plan)
    want = lora_linear_ref(x.double(), W.double(), None, bank.lora_a.double(), bank.lora_b.double(),
                           bank.scale, bank.slots, token_user)
    assert torch.allclose(y.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("marker", ["milp.MilpRuntime(model, max_users=64)", "milp.UserStore(",
                                    "kernels.AdapterBank(4096, 11008"])
def test_each_example_is_found_once(marker):
    assert _example(marker)
