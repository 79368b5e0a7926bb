"""Properties of the PEFT interop (``milp.export_peft`` / ``MilpRuntime.load_peft``) against
adapters that PEFT itself creates and saves.

* A LoRA adapter made by ``get_peft_model`` + ``save_pretrained`` (random non-zero weights set by
  hand) on the FFN linears of a tiny model of any supported family (GPT-2's ``Conv1D`` with
  ``fan_in_fan_out``, Phi-3's fused ``gate_up_proj``, Falcon, OPT, GPT-NeoX …), with ``target_modules``
  as a list or a regex string, per-module ``rank_pattern`` / ``alpha_pattern``, rsLoRA, dropout,
  ``.bin`` or safetensors weights and a named adapter (saved in its subfolder), loads with
  ``load_peft`` as a user whose float64 logits are ``PeftModel.from_pretrained``'s to ~1e-9.
* What the runtime cannot compute is refused by name, and nothing is loaded: attention targets
  ("all-linear"), biases, DoRA, ``modules_to_save``, activated LoRA (aLoRA), adapters initialised by
  PiSSA / OLoRA (which rewrite the base weights, on save and again on load), KaSA, MonteCLoRA,
  block-diagonal LoRA.
* A float32 PEFT adapter loaded into a bf16/fp16 runtime seeds the optimizer's float32 master
  weights with its own values (README), the bank with their rounding.
* Initialisations that leave the base weights alone (MiCA, orthogonal) and one-block BD-LoRA load.
* export → ``PeftModel`` gives the runtime's logits in float32 and bfloat16 (to the dtype's
  rounding); export → ``load_peft`` → export gives bit-identical files' tensors and config; a PEFT
  adapter loaded and exported again gives PEFT's logits.
"""
from __future__ import annotations

import copy
import json
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

try:  # any import failure (an old PEFT against a new transformers, say) skips this file, not the session
    import peft
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"PEFT interop properties need the optional `peft` extra, importable ({type(exc).__name__}: {exc})",
                allow_module_level=True)

from milp.config import MemoryConfig  # noqa: E402
from milp.export import PEFT_CONFIG_FILE, export_peft, peft_adapter, read_peft  # noqa: E402
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model  # noqa: E402
from milp.runtime import MilpRuntime  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The following .*_pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:.*zero parameters pad.*:UserWarning"),
]

#: LoraConfig's fields and init names in this PEFT: the newer variants' cases need them (the GPU
#: machine's PEFT is older than CI's)
_FIELDS = {f.name: f for f in __import__("dataclasses").fields(peft.LoraConfig)}
_INITS = str(_FIELDS["init_lora_weights"].type)


def _has(*fields: str, init: str | None = None) -> bool:
    return all(f in _FIELDS for f in fields) and (init is None or f"'{init}'" in _INITS)


ARCHS = sorted(SUPPORTED_ARCHITECTURES)
_MODELS: dict[tuple[str, int], torch.nn.Module] = {}
_NAMES: dict[tuple[str, int], list[list[str]]] = {}


def model(arch: str, layers: int = 2, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    if (arch, layers) not in _MODELS:
        _MODELS[arch, layers] = tiny_model(arch, num_hidden_layers=layers)
    return copy.deepcopy(_MODELS[arch, layers]).to(dtype)


def ffn_names(arch: str, layers: int) -> list[list[str]]:
    """The runtime's FFN target names, per layer."""
    if (arch, layers) not in _NAMES:
        _NAMES[arch, layers] = [list(n) for n in MilpRuntime(model(arch, layers), max_users=1).state.names]
    return _NAMES[arch, layers]


def peft_model(arch: str, layers: int, dtype: torch.dtype, seed: int, adapter_name: str = "default",
               init=False, **lora):
    """A PEFT LoRA model of the tiny ``arch`` with every LoRA parameter set to random non-zero values."""
    torch.manual_seed(seed)
    m = peft.get_peft_model(model(arch, layers, dtype), peft.LoraConfig(init_lora_weights=init, **lora),
                            adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(0.3).to(p.dtype))
    return m.eval()


def ids_for(seed: int) -> torch.Tensor:
    return torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# PEFT-made adapters of every family load with PEFT's logits


@st.composite
def peft_cases(draw):
    arch = draw(st.sampled_from(ARCHS))
    layers = draw(st.integers(1, 3))
    names = [n for per_layer in ffn_names(arch, layers) for n in per_layer]
    chosen = sorted(draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True)))
    as_regex = draw(st.booleans())
    targets = "(" + "|".join(re.escape(n) for n in chosen) + ")" if as_regex else chosen
    keys = st.sampled_from(chosen + sorted({n.rsplit(".", 1)[1] for n in chosen}))
    lora = dict(r=draw(st.sampled_from([1, 2, 3, 4])), lora_alpha=draw(st.sampled_from([1, 3, 7.5, 16])),
                target_modules=targets, use_rslora=draw(st.booleans()),
                rank_pattern=draw(st.dictionaries(keys, st.sampled_from([1, 2, 5]), max_size=2)),
                alpha_pattern=draw(st.dictionaries(keys, st.sampled_from([0.5, 2, 7]), max_size=2)),
                lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
                fan_in_fan_out=arch == "gpt2")
    return dict(arch=arch, layers=layers, lora=lora, safe=draw(st.booleans()),
                adapter_name=draw(st.sampled_from(["default", "default", "mine"])), seed=draw(st.integers(0, 999)))


def _save(m, tmp: str, safe: bool, adapter_name: str) -> str:
    m.save_pretrained(tmp, safe_serialization=safe)
    return tmp if adapter_name == "default" else f"{tmp}/{adapter_name}"  # PEFT saves a named adapter in a subfolder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=peft_cases())
@example(case=dict(arch="phi3", layers=2, safe=True, adapter_name="mine", seed=1,
                   lora=dict(r=2, lora_alpha=3, target_modules=["gate_up_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"model.layers.1.mlp.gate_up_proj": 5}, alpha_pattern={"down_proj": 7},
                             lora_dropout=0.25, fan_in_fan_out=False)))
def test_peft_made_adapters_of_every_family_load_with_peft_logits(case):
    arch, L, seed = case["arch"], case["layers"], case["seed"]
    trained = peft_model(arch, L, torch.float64, seed, adapter_name=case["adapter_name"], **case["lora"])
    ids = ids_for(seed)
    rt = MilpRuntime(model(arch, L), max_users=2)
    rt.add_user("w", MemoryConfig.uniform(L, 1, 2), init="random", seed=seed)
    kept = rt.adapter_state("w")
    with tempfile.TemporaryDirectory() as tmp:
        d = _save(trained, tmp, case["safe"], case["adapter_name"])
        try:
            ref = peft.PeftModel.from_pretrained(model(arch, L), d).eval()
        except RuntimeError as e:  # overlapping rank_pattern keys: PEFT's own load fails (see test_export.py)
            assert "size mismatch" in str(e)
            with pytest.raises(ValueError, match="its weights have rank"):
                rt.load_peft(d, "p")
            assert rt.users == ["w"]
            return
        rt.load_peft(d, "p")
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        base = model(arch, L)(input_ids=ids).logits
        got = rt.forward(torch.cat([ids, ids]), ["p", "w", None, "p"]).logits
    assert float((want - base).abs().max()) > 1e-6  # the adapter does something
    scale = float(want.abs().max())
    torch.testing.assert_close(got[[0, 3]], want, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(got[2], base[0], rtol=1e-9, atol=1e-9 * scale)
    now = rt.adapter_state("w")
    assert all(torch.equal(now[k], kept[k]) for k in kept)


# ------------------------------------------------------------------------------------------------
# what a LoRA sum cannot compute is refused by name (and nothing is loaded)


def _refusals():
    ffn = ["gate_proj", "up_proj", "down_proj"]
    cases = [
        ("all-linear", dict(target_modules="all-linear"), r"does not wrap, e\.g\. \['model\.layers\.0\.self_attn"),
        ("bias_all", dict(bias="all"), "bias='all'"),
        ("bias_lora_only", dict(bias="lora_only"), "bias='lora_only'"),
        ("lora_bias", dict(lora_bias=True), "lora_bias=True"),
        ("dora", dict(use_dora=True), "use_dora=True: DoRA"),
        ("modules_to_save", dict(modules_to_save=["lm_head"]), "modules_to_save"),
        ("pissa", dict(init="pissa", dtype=torch.float32), "init_lora_weights='pissa'"),
        ("pissa_niter", dict(init="pissa_niter_2", dtype=torch.float32), "init_lora_weights='pissa_niter_2'"),
        ("olora", dict(init="olora", dtype=torch.float32), "init_lora_weights='olora'"),
    ]
    if _has("alora_invocation_tokens"):
        cases.append(("alora", dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"),
                      "alora_invocation_tokens"))
    if _has("use_bdlora"):
        from peft.tuners.lora.config import BdLoraConfig

        cases.append(("bdlora", dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["up_proj", "gate_proj"],
                                                             target_modules_bd_b=["down_proj"], nblocks=2), r=4),
                      "use_bdlora"))
    try:
        from peft.tuners.lora.config import KasaConfig

        cases.append(("kasa", dict(kasa_config=KasaConfig(), dtype=torch.float32), "kasa"))
    except ImportError:  # older PEFT
        pass
    try:
        from peft import MontecloraConfig

        cases.append(("monteclora", dict(monteclora_config=MontecloraConfig()), "monteclora"))
    except ImportError:
        pass
    return [pytest.param(kw | {"target_modules": kw.get("target_modules", ffn)}, match, id=name)
            for name, kw, match in cases]


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")
@pytest.mark.parametrize(("lora", "match"), _refusals())
def test_what_a_lora_sum_cannot_compute_is_refused_by_name(lora, match, tmp_path):
    """Was: an activated-LoRA adapter (``alora_invocation_tokens``: PEFT applies it only from the
    invocation tokens on, so without them its logits are the base model's) loaded as a plain LoRA
    applied to every token; a PiSSA / OLoRA adapter (saved without conversion: PEFT subtracts the
    initial principal components from the base weights, at creation and again on
    ``from_pretrained``) loaded on the unmodified base weights: logits off by ~0.1 from PEFT's,
    silently. Block-diagonal LoRA was refused with a bare shape mismatch."""
    lora = dict(lora)
    dtype, init = lora.pop("dtype", torch.float64), lora.pop("init", False)
    trained = peft_model("llama", 2, dtype, 0, init=init, **lora)
    trained.save_pretrained(str(tmp_path / "a"))
    rt = MilpRuntime(model("llama", 2, dtype), max_users=2)
    rt.add_user("w", MemoryConfig.uniform(2, 1, 2), init="random", seed=0)
    kept = rt.adapter_state("w")
    with pytest.raises(ValueError, match=match):
        rt.load_peft(tmp_path / "a", "p")
    assert rt.users == ["w"]
    now = rt.adapter_state("w")
    assert all(torch.equal(now[k], kept[k]) for k in kept)


def _plain_at_eval():
    cases = []
    if _has(init="mica"):
        cases.append(pytest.param(dict(init="mica"), id="mica"))  # B from the base's minor singular vectors
    if _has(init="orthogonal"):
        cases.append(pytest.param(dict(init="orthogonal"), id="orthogonal"))
    if _has("use_bdlora"):
        from peft.tuners.lora.config import BdLoraConfig

        cases.append(pytest.param(dict(init="gaussian", use_bdlora=BdLoraConfig(
            target_modules_bd_a=["up_proj"], target_modules_bd_b=["down_proj"], nblocks=1)), id="bdlora_one_block"))
    return cases


def _assert_loads_with_peft_logits(path, tol: float) -> None:
    """The float32 llama adapter saved in ``path``, loaded by ``load_peft``, gives
    ``PeftModel.from_pretrained``'s logits to ``tol``."""
    ids = ids_for(0)
    ref = peft.PeftModel.from_pretrained(model("llama", 2, torch.float32), str(path)).eval()
    rt = MilpRuntime(model("llama", 2, torch.float32), max_users=1)
    rt.load_peft(path, "p")
    with torch.no_grad():
        torch.testing.assert_close(rt.forward(ids, "p").logits, ref(input_ids=ids).logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("lora", _plain_at_eval())
def test_lora_variants_that_are_plain_loras_at_eval_load_with_peft_logits(lora, tmp_path):
    """Initialisations that leave the base weights alone, and BD-LoRA of one block, are plain LoRAs
    once trained: they load (not refused with the others), with PEFT's logits."""
    lora = dict(lora)
    trained = peft_model("llama", 2, torch.float32, 0, init=lora.pop("init"), r=4, lora_alpha=8,
                         target_modules=["up_proj", "down_proj"], **lora)
    trained.save_pretrained(str(tmp_path / "a"))
    _assert_loads_with_peft_logits(tmp_path / "a", tol=1e-5)


@pytest.mark.skipif(not _has("alora_invocation_tokens"), reason="this PEFT has no activated LoRA")
def test_an_activated_lora_is_not_peft_s_plain_lora():
    """Was (the premise of the aLoRA refusal): PEFT's logits for an aLoRA adapter without its
    invocation tokens are the base model's, a plain LoRA's are not: loading it as one is wrong."""
    trained = peft_model("llama", 2, torch.float64, 0, target_modules=["up_proj"],
                         alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    ids = ids_for(0)
    with torch.no_grad():
        torch.testing.assert_close(trained(input_ids=ids).logits, model("llama", 2)(input_ids=ids).logits)


def test_peft_rewrites_the_base_weights_when_it_loads_a_pissa_adapter(tmp_path):
    """Was (the premise of the PiSSA/OLoRA refusal): ``PeftModel.from_pretrained`` of an unconverted
    PiSSA adapter subtracts the principal components from the base weights again, so the adapter
    applies to other weights than the runtime's base model's."""
    trained = peft_model("llama", 2, torch.float32, 0, init="pissa", r=2, lora_alpha=4, target_modules=["up_proj"])
    trained.save_pretrained(str(tmp_path / "a"))
    ref = peft.PeftModel.from_pretrained(model("llama", 2, torch.float32), str(tmp_path / "a"))
    w = ref.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert not torch.allclose(w, model("llama", 2, torch.float32).model.layers[0].mlp.up_proj.weight, atol=1e-3)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_pissa_converted_to_plain_lora_loads_with_peft_logits(tmp_path):
    """PEFT's documented fix for PiSSA (``path_initial_model_for_weight_conversion``) saves a plain
    LoRA (``init_lora_weights`` true, rank doubled) that applies to the original base weights: it
    loads, with PEFT's logits on the original model."""
    torch.manual_seed(0)
    base = model("llama", 2, torch.float32)
    m = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights="pissa", r=2, lora_alpha=4,
                                                   target_modules=["up_proj", "down_proj"]))
    m.peft_config["default"].init_lora_weights = True  # what PEFT's PiSSA example does before saving the init
    m.save_pretrained(str(tmp_path / "init"))
    m.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    m.save_pretrained(str(tmp_path / "a"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert json.loads((tmp_path / "a" / PEFT_CONFIG_FILE).read_text())["init_lora_weights"] is True
    _assert_loads_with_peft_logits(tmp_path / "a", tol=1e-4)


# ------------------------------------------------------------------------------------------------
# export


@st.composite
def memory_configs(draw, layers: int):
    modules = tuple(draw(st.integers(0, 3)) for _ in range(layers))
    ranks = tuple(tuple(draw(st.sampled_from([1, 2, 3, 5])) for _ in range(n)) if n > 1 and draw(st.booleans())
                  else draw(st.sampled_from([1, 2, 3, 5])) for n in modules)
    alpha = draw(st.sampled_from([0.5, 1.0, 3.0, 16.0]))
    mask = tuple(draw(st.sampled_from([True, True, False])) for _ in range(layers))
    if not any(m and n for m, n in zip(mask, modules)):
        mask, modules = (True,) + mask[1:], (max(1, modules[0]),) + modules[1:]
        if isinstance(ranks[0], tuple) and len(ranks[0]) != modules[0]:
            ranks = (1,) + ranks[1:]
    return MemoryConfig(mask, modules, ranks, lora_alpha=alpha)


@st.composite
def export_cases(draw):
    arch = draw(st.sampled_from(ARCHS))
    layers = draw(st.integers(1, 3))
    return dict(arch=arch, layers=layers, cfg=draw(memory_configs(layers)), seed=draw(st.integers(0, 999)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=export_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_export_gives_the_runtimes_logits_in_float32_and_bf16(case, dtype):
    arch, L, seed = case["arch"], case["layers"], case["seed"]
    rt = MilpRuntime(model(arch, L, dtype), max_users=1)
    rt.add_user("u", case["cfg"], init="random", seed=seed)
    ids = ids_for(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_peft(rt, "u", Path(tmp) / "a")
        loaded = peft.PeftModel.from_pretrained(model(arch, L, dtype), str(path)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
            want = rt.forward(ids, "u").logits
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # bf16: the fold and the order of the sums round differently; a few ulps of the logits' scale
        err = float((got.double() - want.double()).abs().max())
        assert err <= 0.02 * max(1.0, float(want.double().abs().max())), err  # seen: ~0.004


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=export_cases(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_export_load_export_is_bit_identical(case, dtype):
    """An exported user loaded back (one module per target, of the target's folded rank, scaling 1)
    exports to the same config and the same ``lora_A``, bit for bit; ``lora_B`` too where the loaded
    user's ``lora_alpha / r`` is 1 in every layer (all its layers of one rank), else to the rounding
    of the fold (``B · (1 / applied scale)``, then ``· applied scale``: two roundings)."""
    arch, L, seed = case["arch"], case["layers"], case["seed"]
    rt = MilpRuntime(model(arch, L, dtype), max_users=2)
    rt.add_user("u", case["cfg"], init="random", seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_peft(rt, "u", Path(tmp) / "a")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got_cfg = rt.load_peft(path, "v")
    sd_u, cfg_u = peft_adapter(rt, "u")
    sd_v, cfg_v = peft_adapter(rt, "v")
    assert cfg_u == cfg_v
    assert sd_u.keys() == sd_v.keys()
    no_fold = len({got_cfg.layer_ranks(li) for li in got_cfg.active_layers}) == 1
    eps = torch.finfo(dtype).eps
    for k in sd_u:
        assert sd_u[k].dtype == sd_v[k].dtype == dtype, k
        if no_fold or k.endswith("lora_A.weight"):
            assert torch.equal(sd_u[k], sd_v[k]), k
        else:
            torch.testing.assert_close(sd_v[k], sd_u[k], rtol=2 * eps, atol=torch.finfo(dtype).tiny)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=peft_cases())
def test_a_loaded_peft_adapter_exports_with_peft_logits(case):
    """PEFT adapter → ``load_peft`` (padding, folded scalings) → ``export_peft`` → ``PeftModel``:
    PEFT's logits of the original adapter directory, in float64."""
    arch, L, seed = case["arch"], case["layers"], case["seed"]
    trained = peft_model(arch, L, torch.float64, seed, **case["lora"])
    rt = MilpRuntime(model(arch, L), max_users=1)
    ids = ids_for(seed)
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_pretrained(f"{tmp}/in")
        try:
            rt.load_peft(f"{tmp}/in", "p")
        except ValueError as e:  # overlapping rank_pattern keys (PEFT cannot load it either)
            assert "its weights have rank" in str(e)
            return
        path = export_peft(rt, "p", f"{tmp}/out")
        _, modules = read_peft(path)
        again = peft.PeftModel.from_pretrained(model(arch, L), str(path)).eval()
        # PEFT as it loads the saved adapter (overlapping alpha_pattern keys are saved sorted: another may win)
        ref = peft.PeftModel.from_pretrained(model(arch, L), f"{tmp}/in").eval()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
            got = again(input_ids=ids).logits
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale)
    assert all(s == 1.0 for _, _, s in modules.values())


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_float32_peft_adapter_seeds_a_half_precision_users_master_with_its_own_values(half, tmp_path):
    """Was: ``load_peft`` rounded a float32 PEFT adapter to the bf16/fp16 bank's dtype before
    handing it to ``load_adapter_state``, so the optimizer's float32 master weights started from the
    rounded rows, not from the adapter's values, contrary to the README ("Float32 adapters loaded
    into a bf16 runtime (a user trained in float32, a PEFT adapter) seed the master with their own
    values, not with their bf16 rounding"). The bank still holds their rounding."""
    trained = peft_model("llama", 2, torch.float32, 0, r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"],
                         rank_pattern={"model.layers.1.mlp.up_proj": 2})  # layer 1 padded, its up_proj folded
    trained.save_pretrained(str(tmp_path / "a"))
    _, modules = read_peft(tmp_path / "a")
    rt = MilpRuntime(model("llama", 2, half), max_users=1)
    rt.load_peft(tmp_path / "a", "p")
    slot = rt.slot("p")
    state = rt.optimizer.user_state(slot)
    checked = 0
    names = {id(m): n for ns, layer in zip(rt.state.names, rt.state.layers) for n, m in zip(ns, layer)}
    for i, m in enumerate(rt.state.modules()):  # the optimizer's banks, in order
        name = names[id(m)]
        if name not in modules:
            continue
        a, b, s = modules[name]
        r = a.shape[0]
        wa, wb, applied = m.bank.adapter_weights(slot)
        folded = (b.double().t() * (s / applied[:r].double())[:, None]).float()  # what PEFT's B is in the bank's scale
        master_a, master_b = state[f"{i}.master_a"], state[f"{i}.master_b"]
        assert torch.equal(master_a[:r], a), name  # the adapter's own float32 values ...
        assert torch.equal(master_b[:r], folded), name
        assert torch.equal(wa[:r], a.to(half)) and torch.equal(wb[:r], folded.to(half)), name  # ... the bank's rounding
        assert not torch.equal(master_a[:r], a.to(half).float()), name  # the rounding is visible in the draw
        checked += 1
    assert checked == 4
