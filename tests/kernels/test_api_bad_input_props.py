"""Bad input to the public API of ``kernels`` gets a ``TypeError``/``ValueError`` naming the
argument, and a refused call changes nothing; good boundary values stay accepted."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels import AdapterBank, BatchPlan, LaunchConfig, choose_path, get_config, lora_expand_, lora_linear

CPU = torch.device("cpu")


def _bank() -> AdapterBank:
    bank = AdapterBank(8, 6, max_users=3)
    bank.add(0, 2, init="random")
    bank.add(2, [1, 3], init="random")
    return bank


def _state(bank: AdapterBank) -> tuple:
    return (bank.slots.tolist(), dict(bank._segments), list(bank._free), bank.max_rank, bank.scale.tolist(),
            bank.lora_a.detach().clone(), bank.version)


def _same(a: tuple, b: tuple) -> bool:
    return a[:5] == b[:5] and torch.equal(a[5], b[5]) and a[6] == b[6]


@pytest.mark.parametrize("generator", [123, "cpu", torch.zeros(1)])
@pytest.mark.parametrize("user", [1, 0], ids=["new", "replaced"])
def test_add_with_a_bad_generator_changes_nothing(user, generator):
    """Was: ``AttributeError: 'int' object has no attribute 'device'`` after the bank had
    registered the segment (a replaced user already removed) but not written its slot: the
    bank listed a user whose ``slots`` row said rank 0."""
    bank = _bank()
    before = _state(bank)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got"):
        bank.add(user, 3, init="random", generator=generator)
    assert _same(_state(bank), before)
    g = torch.Generator().manual_seed(0)  # a real one still works
    assert bank.add(user, 3, init="random", generator=g).rank == 3


@pytest.mark.parametrize("user", [True, "1", 1.0])
def test_has_refuses_what_is_no_int_id(user):
    """Was: ``bank.has(True)`` answered for user 1 (``True == 1``) and ``has("1")`` said
    ``False``, where every other method refuses a bool or non-int id."""
    bank = _bank()
    bank.add(1, 2)
    with pytest.raises(TypeError, match="user must be an int id"):
        bank.has(user)
    assert bank.has(1) and not bank.has(99) and not bank.has(-1)  # out of range: just absent


@pytest.mark.parametrize("bad", ["weight", "bias"])
def test_lora_linear_names_a_bad_weight_or_bias_of_a_frozen_bank(bad):
    """Was: with nothing requiring grad (a frozen bank, inference), ``weight.requires_grad``
    was read first: ``AttributeError: 'str' object has no attribute 'requires_grad'``."""
    bank = _bank().requires_grad_(False)
    plan = BatchPlan.build(torch.tensor([0, 2, -1, 2]), 3)
    args = {"weight": torch.randn(6, 8), "bias": torch.randn(6)}
    args[bad] = [0.0] * 6
    with pytest.raises(TypeError, match=f"{bad} must be a torch.Tensor or None, got list"):
        lora_linear(torch.randn(4, 8), args["weight"], args["bias"], bank, plan)


def _expand_cases():
    bank = _bank()
    plan = BatchPlan.build(torch.tensor([0, 2, -1, 2]), 3)
    y, t = torch.zeros(4, 6), torch.zeros(4, 4)
    # a plan for more users than the bank has: ids here are < 3, so the op's value check passed
    wide = BatchPlan.build(torch.tensor([0, 2, -1, 2]), 5)
    return [
        ((y, t, None, plan), TypeError, "bank must be an AdapterBank"),
        ((y, t, bank, None), TypeError, "plan must be a BatchPlan"),
        ((y.tolist(), t, bank, plan), TypeError, "y must be a torch.Tensor"),
        ((y, t.tolist(), bank, plan), TypeError, "t must be a torch.Tensor"),
        ((y, t, bank, wide), ValueError, r"plan.max_users=5 exceeds bank.max_users=3"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_lora_expand_checks_its_bank_plan_y_and_t(case):
    """Was: ``lora_expand_`` skipped the bank/plan checks of ``lora_linear`` and
    ``lora_shrink``: ``AttributeError`` for a non-bank or non-plan, ``ValueError`` for a
    non-tensor ``y``, a dispatcher ``RuntimeError`` for a list ``t``, and a plan for more users
    than the bank silently accepted (on a GPU its user ids would index past ``slots``)."""
    args, exc, match = _expand_cases()[case]
    y = args[0]
    before = y.clone() if isinstance(y, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        lora_expand_(*args)
    if before is not None:
        assert torch.equal(y, before)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_tokens=-1, max_rank=8), ValueError, "num_tokens must be >= 0"),
    (dict(num_tokens="8", max_rank=8), TypeError, "num_tokens must be an int"),
    (dict(num_tokens=True, max_rank=8), TypeError, "num_tokens must be an int"),
    (dict(num_tokens=100, max_rank=float("nan")), TypeError, "max_rank must be an int"),
    (dict(num_tokens=100, max_rank=-1), ValueError, "max_rank must be >= 0"),
    (dict(num_tokens=100, max_rank=8, num_segments=-3), ValueError, "num_segments must be >= 0"),
    (dict(num_tokens=100, max_rank=8, device=1.5), TypeError, "device must be a torch.device"),
    (dict(num_tokens=100, max_rank=8, device="gpu"), ValueError, "device must name a device"),
])
def test_choose_path_names_a_bad_argument(kwargs, exc, match):
    """Was: no checks: a negative token count chose ``"split"``, a NaN rank ``"fused_t"``,
    a negative ``num_segments`` was ignored, a string count raised a bare ``'<=' not
    supported``, and a device string ``AttributeError: 'str' object has no attribute 'type'``."""
    with pytest.raises(exc, match=match):
        choose_path(kwargs.pop("num_tokens"), kwargs.pop("max_rank"), **kwargs)


def test_choose_path_takes_boundary_values_and_a_device_string():
    # the knobs forced: CI's Triton 3.6 leg runs with the H200's config (split at every size)
    with kernels.use_dispatch(decode_max_tokens=64, split_tokens_per_segment=0, fused_max_rank=16):
        assert choose_path(0, 0) == "split"
        assert choose_path(4096, 0, num_segments=0) == "fused"
        assert choose_path(4096, 96, device="cpu") == choose_path(4096, 96, device=CPU) == "fused_t"


_GOOD = dict(num_tokens=8, n=8, k=8, max_rank=8, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("change, exc, match", [
    (dict(dtype="float64"), TypeError, "dtype must be one of"),
    (dict(device=None), TypeError, "device must be a torch.device"),
    (dict(num_tokens=-5), ValueError, "num_tokens must be >= 0"),
    (dict(k="8"), TypeError, "k must be an int"),
    (dict(block_ms=16), TypeError, "block_ms must be a sequence of ints"),
    (dict(block_ms=[16, 24]), ValueError, "block_ms must be distinct powers of two"),
])
def test_get_config_names_a_bad_argument(change, exc, match):
    """Was: ``dtype="float64"`` (a string) silently gave the float32 heuristic config, a
    negative token count a config, ``device=None`` or a string ``AttributeError``, and
    ``block_ms=16`` a bare ``'int' object is not iterable``."""
    with pytest.raises(exc, match=match):
        get_config("shrink", **{**_GOOD, **change})


def test_get_config_takes_a_device_string_and_zero_sizes():
    assert get_config("shrink", **{**_GOOD, "device": "cpu"}) == get_config("shrink", **_GOOD)
    get_config("expand", **{**_GOOD, "num_tokens": 0, "k": 0, "max_rank": 0}, block_ms=[])


def test_backend_for_and_nvtx_range_name_a_bad_argument():
    """Was: ``backend_for([1])`` raised ``AttributeError: 'list' object has no attribute
    'is_cuda'``; ``nvtx_range(5)`` was accepted (and failed inside the profiler under
    ``MILP_NVTX=1``)."""
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        kernels.backend_for([1.0])
    with pytest.raises(TypeError, match="name must be a str"):
        kernels.nvtx_range(5)


def test_launch_config_takes_numpy_ints():
    """Was: ``LaunchConfig(block_m=np.int64(32))`` was refused as "must be a power of two >=
    16, got np.int64(32)" (it is one), where a plan's ``block_ms`` takes numpy ints."""
    cfg = LaunchConfig(block_m=np.int64(32), split_k=np.int32(2), split_n=np.uint8(0))
    assert cfg == LaunchConfig(block_m=32, split_k=2) and type(cfg.block_m) is int and type(cfg.split_k) is int
    with pytest.raises(ValueError, match="LaunchConfig.block_m must be a power of two"):
        LaunchConfig(block_m=np.int64(24))
    with pytest.raises(ValueError, match="LaunchConfig.block_m"):
        LaunchConfig(block_m=np.bool_(True))


@pytest.mark.parametrize("make", [
    lambda d: AdapterBank(8, 6, max_users=2, device=d),
    lambda d: BatchPlan(4, 2, device=d),
])
def test_bad_device_is_named(make):
    """Was: torch's ``RuntimeError: Expected one of cpu, cuda, ... device string: gpu`` (no
    argument named) and ``zeros(): argument 'device' must be torch.device, not float``."""
    with pytest.raises(ValueError, match="device must name a device such as 'cpu'"):
        make("gpu")
    with pytest.raises(TypeError, match="device must be a torch.device, a device string or None"):
        make(1.5)
    assert make("cpu") is not None and make(CPU) is not None and make(None) is not None


@pytest.mark.parametrize("bad", ["2", 2.0, np.int64(2), True])
def test_update_num_segments_of_a_wrong_type_is_a_type_error(bad):
    """Was: a ``ValueError`` for a wrong type; the rule is ``TypeError`` for a type,
    ``ValueError`` for a value (a negative count still is one)."""
    plan = BatchPlan(4, 3)
    with pytest.raises(TypeError, match="num_segments must be an int"):
        plan.update(torch.tensor([0, 1]), validate=False, num_segments=bad)
    with pytest.raises(ValueError, match="num_segments must be >= 0"):
        plan.update(torch.tensor([0, 1]), validate=False, num_segments=-1)
    assert plan.update(torch.tensor([0, 1]), validate=False, num_segments=0).num_segments == 0


def test_tiles_for_shows_a_string_block_m_as_one():
    """Was: ``tiles_for("16")`` said ``block_m=16 is not one of the plan's block_ms [16, ...]``."""
    with pytest.raises(ValueError, match=r"block_m='16' is not one of"):
        BatchPlan(4, 3).tiles_for("16")
