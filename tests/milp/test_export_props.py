"""Properties of the PEFT export over every supported architecture family.

For a tiny random model of a drawn ``model_type`` of :data:`milp.inject.SUPPORTED_ARCHITECTURES`
and a drawn :class:`MemoryConfig` (layers masked off, several modules per layer with mixed ranks,
any ``lora_alpha``) of a user among others: the exported directory loads with
``PeftModel.from_pretrained`` and gives the runtime's logits for that user (float64, to rounding);
read back it holds each target's ``Σ_j s_j B_j A_j``, also for bf16/fp16 runtimes (to the dtype's
rounding of the folded ``B``); an export over an older one replaces it whole, and a failed export
leaves the older one as it was.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milp.config import MemoryConfig
from milp.export import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_peft, peft_adapter, read_peft
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model
from milp.runtime import MilpRuntime

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ARCHS = sorted(SUPPORTED_ARCHITECTURES)
_MODELS: dict[tuple[str, int], torch.nn.Module] = {}


def model(arch: str, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """A fresh copy of the tiny ``arch`` model (built once per (arch, layers), then deep-copied)."""
    import copy

    if (arch, layers) not in _MODELS:
        _MODELS[arch, layers] = tiny_model(arch, num_hidden_layers=layers)
    return copy.deepcopy(_MODELS[arch, layers]).to(dtype)


@st.composite
def memory_configs(draw, layers: int):
    modules = tuple(draw(st.integers(0, 3)) for _ in range(layers))
    ranks = tuple(tuple(draw(st.sampled_from([1, 2, 3, 5])) for _ in range(n)) if n > 1 and draw(st.booleans())
                  else draw(st.sampled_from([1, 2, 3, 5])) for n in modules)
    mask = tuple(draw(st.sampled_from([True, True, False])) for _ in range(layers))
    if not any(m and n for m, n in zip(mask, modules)):
        mask, modules = (True,) + mask[1:], (max(1, modules[0]),) + modules[1:]
        if isinstance(ranks[0], tuple) and len(ranks[0]) != modules[0]:
            ranks = (1,) + ranks[1:]
    return MemoryConfig(mask, modules, ranks, lora_alpha=draw(st.sampled_from([0.5, 1.0, 3.0, 16.0])))


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(ARCHS))
    layers = draw(st.integers(1, 3))
    return dict(arch=arch, layers=layers, cfg=draw(memory_configs(layers)),
                other=draw(memory_configs(layers)), first=draw(st.booleans()), seed=draw(st.integers(0, 999)))


def delta_weights(rt: MilpRuntime, user) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module name: (Σ_j s_j B_j^T A_j, its bound Σ_j |s_j B_j|^T |A_j|) in float64."""
    slot, out = rt.slot(user), {}
    for names, layer in zip(rt.state.names, rt.state.layers):
        for name, m in zip(names, layer):
            if m.bank.has(slot):
                a, b, s = (t.detach().double() for t in m.bank.adapter_weights(slot))
                sb = b.t() * s
                out[name] = (sb @ a, sb.abs() @ a.abs())
    return out


def runtime_with(case, dtype: torch.dtype) -> MilpRuntime:
    rt = MilpRuntime(model(case["arch"], case["layers"], dtype), max_users=2)
    order = [("o", case["other"]), ("u", case["cfg"])]
    for name, cfg in order if case["first"] else order[::-1]:
        rt.add_user(name, cfg, init="random", seed=case["seed"] + (name == "u"))
    return rt


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_every_family_exports_to_peft_with_the_runtimes_logits(case):
    peft = pytest.importorskip("peft", reason="comparing with PEFT needs the optional `peft` extra")
    rt = runtime_with(case, torch.float64)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(case["seed"]))
    with torch.no_grad():
        want = rt.forward(ids, "u").logits
    with tempfile.TemporaryDirectory() as tmp:
        path = export_peft(rt, "u", Path(tmp) / "a")
        loaded = peft.PeftModel.from_pretrained(model(case["arch"], case["layers"], torch.float64), str(path))
        with torch.no_grad():
            got = loaded.eval()(input_ids=ids).logits
        cfg, modules = read_peft(path)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    dw = delta_weights(rt, "u")
    assert sorted(modules) == sorted(dw) == sorted(cfg["target_modules"])
    for name, (a, b, s) in modules.items():
        torch.testing.assert_close(s * b.double() @ a.double(), dw[name][0], rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(case=cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_exports_hold_the_folded_adapters_to_the_dtypes_rounding(case, dtype):
    """``lora_B`` is the bank's ``B`` times the per-module scale, rounded once to the dtype: each
    element of PEFT's ΔW is within the dtype's unit roundoff (relative) of the runtime's, term by
    term (plus half of fp16's smallest subnormal, for folded values that underflow)."""
    rt = runtime_with(case, dtype)
    sd, cfg = peft_adapter(rt, "u")
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for name, (want, bound) in delta_weights(rt, "u").items():
        a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        assert a.dtype == b.dtype == dtype
        r = a.shape[0]
        alpha = next((v for k, v in cfg["alpha_pattern"].items() if k.endswith(name.replace(".", r"\."))),
                     cfg["lora_alpha"])
        got = (alpha / r) * b.double() @ a.double()
        assert ((got - want).abs() <= unit * bound + 2.0**-25 * a.double().abs().sum(0)).all(), name


def test_export_replaces_an_older_export_whole_and_a_failed_one_keeps_it(tmp_path, monkeypatch):
    """An export into a directory holding an older adapter (and a stray ``adapter_model.bin``, which
    PEFT would read if the safetensors file were missing) leaves exactly the new files; an export
    that fails while writing leaves the older directory byte for byte, and no temporary folder."""
    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    rt.add_user("u", MemoryConfig((True, True), (2, 1), ((1, 3), 2), lora_alpha=4.0), init="random", seed=0)
    rt.add_user("v", MemoryConfig((False, True), (0, 1), (8, 8)), init="random", seed=1)
    d = tmp_path / "out"
    export_peft(rt, "v", d)
    (d / "adapter_model.bin").write_bytes(b"stale")
    export_peft(rt, "u", d)
    assert sorted(p.name for p in d.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    assert len(json.loads((d / PEFT_CONFIG_FILE).read_text())["target_modules"]) == 6
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_peft(rt, "v", d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
