import math

import pytest
import torch

from kernels import AdapterBank


def test_add_packs_modules_contiguously_with_per_row_scales():
    bank = AdapterBank(8, 12, max_users=4)
    seg = bank.add(1, [4, 2], alpha=[8.0, 4.0])
    assert seg.rank == 6 and bank.rank_of(1) == 6 and bank.rank_of(0) == 0
    off, rank = bank.slots[1].tolist()
    assert rank == 6
    assert bank.scale[off : off + 6].tolist() == [2.0] * 4 + [2.0] * 2
    a, b, s = bank.adapter_weights(1)
    assert a.shape == (6, 8) and b.shape == (6, 12) and s.shape == (6,)
    assert torch.count_nonzero(b) == 0  # "lora" init: B = 0, A random
    assert torch.count_nonzero(a) > 0
    assert bank.num_parameters(1) == 6 * (8 + 12)
    assert bank.max_rank == 6


def test_max_rank_is_a_high_water_mark():
    """Like the capacity, ``max_rank`` does not shrink when users leave (an int the compiled op
    reads: evictions must not re-trace it); a larger user raises it."""
    bank = AdapterBank(8, 12, max_users=4)
    bank.add(0, [4])
    bank.add(1, [16, 8])
    assert bank.max_rank == 24
    bank.remove(1)
    assert bank.max_rank == 24 and bank.rank_of(0) == 4
    bank.add(2, [2])
    assert bank.max_rank == 24
    bank.add(3, [32])
    assert bank.max_rank == 32


def test_remove_frees_rows_for_reuse_without_reallocation():
    bank = AdapterBank(4, 4, max_users=8, capacity=64)
    for u in range(4):
        bank.add(u, 16)
    ptr, version = bank.lora_a.data_ptr(), bank.version
    bank.remove(1)
    bank.add(5, [8, 8])  # fits the hole left by user 1
    assert bank.lora_a.data_ptr() == ptr and bank.version == version
    assert bank.slots[5].tolist() == [16, 16]
    assert bank.slots[1].tolist() == [0, 0]
    assert sorted(bank.users) == [0, 2, 3, 5]


def test_fragmented_free_space_is_compacted_in_place():
    bank = AdapterBank(4, 6, max_users=8, capacity=40)
    g = torch.Generator().manual_seed(0)
    for u in range(4):
        bank.add(u, 10, init="random", generator=g)
    kept = {u: [t.clone() for t in bank.adapter_weights(u)] for u in (1, 3)}
    bank.remove(0)
    bank.remove(2)  # two holes of 10 rows: 20 free, none contiguous
    ptr = bank.lora_a.data_ptr()
    bank.add(6, 20)
    assert bank.lora_a.data_ptr() == ptr  # compacted, not grown
    for u, (a, b, s) in kept.items():
        a2, b2, s2 = bank.adapter_weights(u)
        assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(s, s2)
    assert bank.used_rows == 40


def test_growth_reallocates_and_bumps_version():
    bank = AdapterBank(4, 4, max_users=2)
    assert bank.capacity == 0
    bank.add(0, 8, init="random")
    a0 = bank.adapter_weights(0)[0].clone()
    v = bank.version
    bank.add(1, 100)
    assert bank.capacity >= 108 and bank.version > v
    assert torch.equal(bank.adapter_weights(0)[0], a0)


def test_replacing_a_user_and_setting_weights():
    bank = AdapterBank(3, 5, max_users=2)
    bank.add(0, 4)
    bank.add(0, [2, 1], alpha=3.0)
    assert bank.rank_of(0) == 3
    a, b = torch.randn(3, 3), torch.randn(3, 5)
    bank.set_adapter_weights(0, a, b)
    a2, b2, s = bank.adapter_weights(0)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    assert s.tolist() == pytest.approx([1.5, 1.5, 3.0])


def test_bank_moves_and_casts_with_module_api():
    bank = AdapterBank(3, 5, max_users=2, dtype=torch.float16)
    bank.add(1, 2)
    assert bank.lora_a.dtype == torch.float16 and bank.scale.dtype == torch.float32
    state = bank.state_dict()
    assert set(state) == {"lora_a", "lora_b", "scale", "slots"}


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda b: b.add(0, 0), ValueError, "ranks"),
        (lambda b: b.add(0, -4), ValueError, "ranks"),
        (lambda b: b.add(0, []), ValueError, "ranks"),
        (lambda b: b.add(0, 4, alpha=math.nan), ValueError, "alpha"),
        (lambda b: b.add(0, [4, 4], alpha=[1.0]), ValueError, "alpha"),
        (lambda b: b.add(9, 4), ValueError, "user"),
        (lambda b: b.add(-1, 4), ValueError, "user"),
        (lambda b: b.add("a", 4), TypeError, "user"),
        (lambda b: b.add(0, 4, init="xavier"), ValueError, "init"),
        (lambda b: b.remove(1), KeyError, "user 1"),
        (lambda b: b.set_adapter_weights(0, torch.zeros(4, 3), torch.zeros(4, 5)), KeyError, "user 0"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    bank = AdapterBank(3, 5, max_users=2)
    with pytest.raises(exc, match=match):
        call(bank)


def test_bad_weights_and_constructor_args():
    with pytest.raises(ValueError, match="in_features"):
        AdapterBank(0, 5, max_users=2)
    with pytest.raises(TypeError, match="dtype"):
        AdapterBank(3, 5, max_users=2, dtype=torch.int32)
    bank = AdapterBank(3, 5, max_users=2)
    bank.add(0, 4)
    with pytest.raises(ValueError, match=r"a must have shape \[4, 3\]"):
        bank.set_adapter_weights(0, torch.zeros(4, 4), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        bank.set_adapter_weights(0, torch.full((4, 3), math.nan), torch.zeros(4, 5))


def test_module_casts_keep_scale_float32():
    """``model.to(torch.bfloat16)`` (or ``.half()``, ``.double()``) casts the adapters with the
    model, but the per-row scales stay float32, the kernels' contract: they used to be cast too,
    rounding a rank-3 module's 16/3 and making every later forward raise."""
    bank = AdapterBank(6, 5, max_users=2)
    bank.add(0, [3, 2], alpha=16.0, init="random")
    scale = bank.scale.clone()
    for cast, dtype in ((lambda b: b.to(torch.bfloat16), torch.bfloat16), (lambda b: b.half(), torch.float16),
                        (lambda b: b.double(), torch.float64), (lambda b: b.float(), torch.float32)):
        cast(bank)
        assert bank.lora_a.dtype == bank.lora_b.dtype == dtype
        assert bank.scale.dtype == torch.float32 and torch.equal(bank.scale, scale)
        assert bank.slots.dtype == torch.int32
