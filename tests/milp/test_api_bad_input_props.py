"""Bad input to the public API of ``milp`` gets a clear error naming the argument, and a refused
call changes nothing (runtime slots, optimizer state, a half-injected model).

Each test's "Was:" names what it caught before its fix. The good boundary values next to each
bad one (0 modules, one user, ``seed=-1``, an empty step list…) are checked to stay accepted."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milp import (
    AdamWConfig,
    MemoryConfig,
    MilpRuntime,
    MultiLoraLinear,
    PackedAdamW,
    UserStore,
    apply_milp,
    is_injected,
    lr_multiplier,
    mixed_batches,
    pad_sequences,
    tiny_model,
    token_losses,
    user_losses,
    user_losses_from_ce,
    warmup_steps,
)
from milp.baselines import prefix_inputs
from milp.data import Record, collate, format_memory, format_prompt, tokenize_instruction, tokenize_memory
from milp.pipeline import InstructionAdapter, add_instruction_adapter, instruction_tune, memory_inject

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def runtime(max_users: int = 3) -> MilpRuntime:
    rt = MilpRuntime(tiny_model("llama"), max_users=max_users)
    rt.add_user("a", MemoryConfig.uniform(2, 1, 4), total_steps=5, init="random", seed=0)
    return rt


def ids(b: int = 2, s: int = 6) -> torch.Tensor:
    return torch.randint(3, 90, (b, s), generator=torch.Generator().manual_seed(b * 100 + s))


# --------------------------------------------------------------------------- MilpState
def slot_snapshot(state, slot):
    return [(m.bank.segment(slot), m.bank.adapter_weights(slot)[0].clone(), m.bank.adapter_weights(slot)[1].clone())
            for m in state.modules() if m.bank.has(slot)]


@pytest.mark.parametrize("layer_ranks, kwargs, exc, name", [
    ({0: (0,)}, {}, ValueError, "ranks"),
    ({0: (4,), 1: (2.5,)}, {}, TypeError, "ranks"),  # layer 0 added, layer 1 refused
    ({1: (True,)}, {}, TypeError, "ranks"),
    ({0: "ab"}, {}, TypeError, "ranks"),
    ([0, 1], {}, TypeError, "layer_ranks"),  # was an AttributeError: 'list' object has no attribute 'get'
    ({0: (4,)}, {"lora_alpha": NAN}, ValueError, "alpha"),
    ({0: (4,)}, {"lora_alpha": "x"}, TypeError, "alpha"),
    ({0: (4,)}, {"init": "bogus"}, ValueError, "init"),
    ({0: (4,)}, {"generator": 5}, TypeError, "generator"),  # was an AttributeError in the bank's draw
])
def test_add_adapters_refused_leaves_the_slot_as_it_was(layer_ranks, kwargs, exc, name):
    """Was: a refused ``MilpState.add_adapters`` had already removed the slot's adapters (and a
    list ``layer_ranks`` or an int ``generator`` failed with an AttributeError): the user lost
    its trained weights to a typo."""
    state = apply_milp(tiny_model("gpt2"), max_users=2)
    state.add_adapters(0, {0: (4, 2), 1: (8,)}, init="random", generator=torch.Generator().manual_seed(0))
    before = slot_snapshot(state, 0)
    with pytest.raises(exc, match=name):
        state.add_adapters(0, layer_ranks, **{"init": "random", **kwargs})
    after = slot_snapshot(state, 0)
    assert [s.ranks for s, _, _ in after] == [s.ranks for s, _, _ in before]
    assert all(torch.equal(a0, a1) and torch.equal(b0, b1) for (_, a0, b0), (_, a1, b1) in zip(before, after))
    state.add_adapters(1, {})  # good boundary: no layer (and a layer with no modules) gives no adapters
    state.add_adapters(1, {0: ()})
    assert not any(m.bank.has(1) for m in state.modules())


@SETTINGS
@given(prior=st.dictionaries(st.integers(0, 1), st.lists(st.integers(1, 8), min_size=1, max_size=3), max_size=2),
       good=st.dictionaries(st.integers(0, 1), st.lists(st.integers(1, 8), max_size=3), max_size=2),
       bad_layer=st.integers(0, 1), bad=st.sampled_from([0, -2, 1.0, None, "4"]))
def test_add_adapters_refusing_any_rank_restores_any_prior_layout(prior, good, bad_layer, bad):
    """Was: the slot lost every adapter it had (``prior``) whichever layer's rank was refused."""
    state = apply_milp(tiny_model("gpt2"), max_users=2)
    state.add_adapters(1, {0: (3,)}, init="random")  # another user's rows in the same banks
    state.add_adapters(0, prior, init="random")
    before = slot_snapshot(state, 0)
    layer_ranks = {**good, bad_layer: [*good.get(bad_layer, []), bad]}
    with pytest.raises((TypeError, ValueError), match="rank"):
        state.add_adapters(0, layer_ranks, init="random")
    after = slot_snapshot(state, 0)
    assert [s.ranks for s, _, _ in after] == [s.ranks for s, _, _ in before]
    assert all(torch.equal(a0, a1) and torch.equal(b0, b1) for (_, a0, b0), (_, a1, b1) in zip(before, after))
    assert state.layers[0][0].bank.rank_of(1) == 3


@pytest.mark.parametrize("users, exc", [
    ("ab", TypeError), (5, TypeError), ([None], TypeError), ([[0], [1, 0]], TypeError),
    ([], ValueError),
])
def test_set_users_refuses_what_is_no_slot_list(users, exc):
    """Was: ``set_users("ab")`` / ``[None]`` / ragged rows failed inside torch ("too many dimensions
    'str'", "Could not infer dtype of NoneType"), and ``[]`` was called a wrong dtype."""
    state = apply_milp(tiny_model("llama"), max_users=2)
    state.set_users([0, -1])
    with pytest.raises(exc, match="users"):
        state.set_users(users)
    assert state.row_users.tolist() == [0, -1]


@pytest.mark.parametrize("bad", [-1, 0, True, "x", 2.5, None])
def test_resize_users_refuses_what_is_no_count(bad):
    """Was: ``resize_users(-1)`` and ``resize_users(True)`` were accepted as no-ops, and ``"x"``
    failed comparing str with int."""
    state = apply_milp(tiny_model("llama"), max_users=2)
    with pytest.raises(ValueError, match="max_users"):
        state.resize_users(bad)
    assert state.max_users == 2
    state.resize_users(2)  # good boundary: the same size is a no-op
    state.resize_users(3)
    assert state.max_users == 3


def test_prepare_static_and_multilora_linear_name_their_arguments():
    """Was: ``prepare_static(lead, device="bogus")`` was a RuntimeError of torch's device parser;
    ``MultiLoraLinear(layer="a", target=3)`` was accepted (its adapters then saved under
    ``layers.a.3``); ``tiny_model(seed="x")`` failed in ``int()``."""
    state = apply_milp(tiny_model("llama"), max_users=2)
    with pytest.raises(ValueError, match="device"):
        state.prepare_static((2, 1), device="bogus")
    for layer in ("a", True, -1):
        with pytest.raises(ValueError, match="layer"):
            MultiLoraLinear(torch.nn.Linear(4, 4), max_users=1, layer=layer, target="t")
    for target in (3, ""):
        with pytest.raises(TypeError, match="target"):
            MultiLoraLinear(torch.nn.Linear(4, 4), max_users=1, layer=0, target=target)
    with pytest.raises(TypeError, match="seed"):  # was "invalid literal for int() with base 10: 'x'"
        tiny_model("llama", seed="x")
    with pytest.raises(ValueError, match="arch"):  # was "unhashable type: 'list'"
        tiny_model(["llama"])


# --------------------------------------------------------------------------- MilpRuntime
def test_runtime_refusing_optim_leaves_the_model_uninjected():
    """Was: ``MilpRuntime(model, optim="x")`` raised its TypeError after ``apply_milp``: the model
    stayed injected and a corrected ``MilpRuntime(model)`` then found it holding MiLP layers."""
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="optim"):
        MilpRuntime(model, optim="x")
    assert not is_injected(model)
    MilpRuntime(model, optim=AdamWConfig())


@pytest.mark.parametrize("seed, exc", [("x", TypeError), (True, TypeError), (1.5, TypeError),
                                       (2**70, ValueError)])
def test_add_user_refuses_bad_seed_by_name(seed, exc):
    """Was: a RuntimeError of ``manual_seed`` ("expected a long, but got str") or a ValueError
    "Overflow when unpacking long long", neither naming ``seed``."""
    rt = runtime()
    with pytest.raises(exc, match="seed"):
        rt.add_user("b", MemoryConfig.uniform(2, 1, 4), seed=seed)
    assert rt.users == ["a"] and rt.state.users() == [0]
    rt.add_user("b", MemoryConfig.uniform(2, 1, 4), seed=-1)  # good boundary: torch takes negative seeds
    rt.add_user("c", MemoryConfig.uniform(2, 0, 4), seed=0)  # and 0 modules everywhere


def test_add_user_names_optim_not_the_optimizer_internals():
    """Was: ``add_user(..., optim="x")`` (and ``load_peft``/``import_peft`` with it) said "config must
    be an AdamWConfig": the name of ``PackedAdamW.set_user``'s argument, not of the caller's."""
    rt = runtime()
    with pytest.raises(TypeError, match="optim must be"):
        rt.add_user("b", MemoryConfig.uniform(2, 1, 4), optim="x")
    assert rt.users == ["a"] and rt.state.users() == [0]


@pytest.mark.parametrize("call, exc, name", [
    (lambda rt: rt.train_step(torch.full((2, 4), 500), "a"), ValueError, "input_ids"),  # was IndexError
    (lambda rt: rt.train_step(torch.full((2, 4), -5), "a"), ValueError, "input_ids"),  # was IndexError
    (lambda rt: rt.train_step(torch.zeros(2, 0, dtype=torch.long), "a"), ValueError, "input_ids"),
    (lambda rt: rt.train_step(torch.zeros(0, 4, dtype=torch.long), []), ValueError, "input_ids"),  # named users
    (lambda rt: rt.train_step(ids(), "a", attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
    (lambda rt: rt.train_step(ids(), "a", attention_mask=[[1] * 6] * 2), TypeError, "attention_mask"),
    (lambda rt: rt.train_step(ids(), "a", labels=torch.full((2, 6), 500)), ValueError, "labels"),
    (lambda rt: rt.train_step(ids(), "a", labels=torch.full((2, 6), -5)), ValueError, "labels"),
    (lambda rt: rt.loss(ids(), "a", labels=torch.full((2, 6), 96)), ValueError, "labels"),
    (lambda rt: rt.generate(torch.full((1, 3), 96), ["a"], max_new_tokens=1), ValueError, "input_ids"),
    (lambda rt: rt.forward(ids(), "a", attention_mask=torch.ones(2, 7)), ValueError, "attention_mask"),
])
def test_runtime_token_inputs_are_checked_by_name(call, exc, name):
    """Was: token ids beyond the vocabulary were an IndexError deep in the embedding (a device-side
    assert on a GPU), labels beyond it one in cross_entropy, ``[B, 0]`` ids a reshape error in
    attention, a mask of the wrong shape a broadcast error; nothing was trained."""
    rt = runtime()
    before = rt.adapter_state("a")
    with pytest.raises(exc, match=name):
        call(rt)
    assert rt.optimizer.step_count(rt.slot("a")) == 0
    assert all(torch.equal(v, rt.adapter_state("a")[k]) for k, v in before.items())
    labels = ids().clone()
    labels[:, 0] = -7  # good boundary: position 0 is never a target, and -100 elsewhere is no target
    labels[0, 3] = -100
    assert set(rt.train_step(ids(), "a", labels=labels)) == {"a"}


def test_a_cached_forward_keeps_its_longer_mask():
    """Good boundary of the mask check: with a KV cache the mask covers ``past + S`` tokens."""
    rt = runtime()
    x = ids(1, 6)
    with torch.no_grad():
        past = rt.forward(x[:, :4], "a", attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=True)
        step = rt.forward(x[:, 4:], "a", attention_mask=torch.ones(1, 6, dtype=torch.long),
                          past_key_values=past.past_key_values)
        assert torch.allclose(step.logits, rt.forward(x, "a").logits[:, 4:], atol=1e-5)
        with pytest.raises(ValueError, match="attention_mask"):
            rt.forward(x[:, 4:], "a", attention_mask=torch.ones(1, 6, dtype=torch.long))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, None, "x"])
def test_row_slots_and_using_refuse_bad_batch_size(bad):
    """Was: ``row_slots("a", 0)`` gave an empty tensor, ``using("a", True)`` one row, ``-1`` an
    error about ``users`` and ``1.5``/``None`` "can't multiply sequence by non-int"."""
    rt = runtime()
    with pytest.raises(ValueError, match="batch_size"):
        rt.row_slots("a", bad)
    with pytest.raises(ValueError, match="batch_size"):
        with rt.using("a", bad):
            pass
    assert rt.row_slots("a", 1).tolist() == [0]


def test_row_batches_refuses_an_order_of_non_ints():
    """Was: ``order=[0.0, 1.0]`` passed the permutation check (``0.0 == 0``) and failed indexing
    the rows; ``[None, 1]`` failed inside ``sorted``."""
    rt = runtime()
    for order in ([0.0, 1.0], [None, 1], [True, 0]):
        with pytest.raises(ValueError, match="order"):
            list(rt.row_batches(["a", "a"], 1, order))
    assert list(rt.row_batches(["a", "a"], 1, np.array([1, 0]))) == [[1], [0]]


def test_bool_and_float_ids_do_not_name_the_int_user():
    """Was: with user ``1`` loaded, ``slot(True)``, ``slot(1.0)`` and a batch ``[True]`` silently
    ran user 1's adapters (``True == 1.0 == 1``), though ``add_user`` refuses such ids and the store
    says "``True`` or ``1.0`` is no user here"."""
    rt = MilpRuntime(tiny_model("llama"), max_users=2)
    rt.add_user(1, MemoryConfig.uniform(2, 1, 4))
    for bad in (True, 1.0, np.float32(1.0)):
        with pytest.raises(TypeError, match="user"):
            rt.slot(bad)
        with pytest.raises(TypeError, match="user"):
            rt.row_slots([bad], 1)
        with pytest.raises(TypeError, match="user"):
            rt.check_user(bad)
        assert not rt.has_user(bad)
    assert rt.row_slots([np.int64(1), None], 2).tolist() == [0, -1]  # a numpy int is the int id
    assert rt.has_user(1) and not rt.has_user([1])


def test_save_and_load_user_flags_must_be_bools():
    """Was: ``save_user(..., include_optimizer="no")`` wrote the optimizer state ("no" is truthy) and
    ``load_user(..., load_optimizer="no")`` loaded it; an int directory was pathlib's TypeError,
    naming no argument."""
    rt = runtime()
    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(TypeError, match="include_optimizer"):
            rt.save_user("a", Path(d) / "x", include_optimizer="no")
        assert not (Path(d) / "x").exists()
        rt.save_user("a", Path(d) / "a", include_optimizer=False)
        with pytest.raises(TypeError, match="load_optimizer"):
            rt.load_user(Path(d) / "a", "b", load_optimizer=0)
        assert rt.users == ["a"]
        with pytest.raises(TypeError, match="tensors"):
            rt.load_adapter_state("a", [rt.adapter_state("a")])  # was a KeyError "lack layers.0…"
    for call in (lambda: rt.save_user("a", 5), lambda: rt.load_user(5), lambda: UserStore(5)):
        with pytest.raises(TypeError, match="directory|root"):  # was pathlib's "expected str, bytes or…"
            call()
    with pytest.raises(TypeError, match="users"):  # was "object of type 'list_iterator' has no len()"
        with rt.using(iter(["a", "a"])):
            pass


# --------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kwargs, exc, name", [
    ({"attention_mask": torch.ones(2, 3)}, ValueError, "attention_mask"),  # was accepted: a wrong loss
    ({"labels": torch.full((2, 5), 500)}, ValueError, "labels"),
    ({"labels": torch.full((2, 5), -7)}, ValueError, "labels"),
    ({"input_ids": torch.full((2, 5), 96)}, ValueError, "input_ids"),
    ({"input_ids": [[5] * 5] * 2}, TypeError, "input_ids"),
    ({"input_ids": torch.ones(2, 5)}, TypeError, "input_ids"),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long), "labels": torch.zeros(2, 0, dtype=torch.long)},
     ValueError, "input_ids"),
    ({"input_ids": None, "inputs_embeds": torch.randn(2, 5, 7)}, ValueError, "inputs_embeds"),
])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # split head / the model's own logits
def test_token_losses_checks_its_inputs(kwargs, exc, name, arch):
    """Was: an ``attention_mask`` of another shape than the ids was silently accepted (a loss over
    the wrong positions); labels or ids beyond the vocabulary were IndexErrors of cross_entropy or
    the embedding; list ids an AttributeError; float ids, ``[B, 0]`` ids and embeddings of the wrong
    width RuntimeErrors inside the model."""
    model = tiny_model(arch)
    base = {"input_ids": ids(2, 5), "labels": ids(2, 5)}
    with pytest.raises(exc, match=name):
        token_losses(model, **{**base, **kwargs})
    ce, valid = token_losses(model, input_ids=ids(2, 1), labels=ids(2, 1))  # good boundary: one token
    assert ce.shape == valid.shape == (2, 0)
    with pytest.raises(TypeError, match="model"):
        token_losses("model", **base)


@pytest.mark.parametrize("slots, max_users, exc, name", [
    (torch.tensor([0, 5]), 2, ValueError, "row_slots"),  # was IndexError
    (torch.tensor([0, -3]), 2, ValueError, "row_slots"),  # was silently "no user"
    (torch.tensor([0]), 2, ValueError, "row_slots"),  # was a view error
    (torch.tensor([0.0, 1.0]), 2, TypeError, "row_slots"),
    ([0, 1], 2, TypeError, "row_slots"),  # was AttributeError
    (torch.tensor([0, 0]), 0, ValueError, "max_users"),  # was IndexError
])
def test_user_losses_check_slots(slots, max_users, exc, name):
    """Was: slots beyond ``max_users`` were IndexErrors of ``index_add``, ``-3`` rows were silently
    dropped like ``-1``, a list or float slots failed inside torch."""
    logits, labels = torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(exc, match=name):
        user_losses(logits, labels, slots, max_users)
    ce = torch.ones(2, 2)
    with pytest.raises(exc, match=name):
        user_losses_from_ce(ce, ce > 0, slots, max_users)
    with pytest.raises(ValueError, match="labels"):  # was IndexError "Target 7 is out of bounds"
        user_losses(logits, torch.full((2, 3), 7), torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="valid"):  # was NotImplementedError "bitwise_and_cpu"
        user_losses_from_ce(ce, ce, torch.tensor([0, 1]), 2)
    assert user_losses(logits, labels, torch.tensor([-1, -1]), 1)[0] == 0  # good boundary: no user


# --------------------------------------------------------------------------- optim
@pytest.mark.parametrize("call, name", [
    (lambda: warmup_steps(-5, 0.1), "total_steps"), (lambda: warmup_steps(2.5, 0.1), "total_steps"),
    (lambda: warmup_steps(10, NAN), "warmup_ratio"), (lambda: warmup_steps(10, INF), "warmup_ratio"),
    (lambda: warmup_steps(10, 2.0), "warmup_ratio"), (lambda: warmup_steps(10, -0.5), "warmup_ratio"),
    (lambda: lr_multiplier(5, 10, 0.1, "cosine"), "decay"), (lambda: lr_multiplier(0, 10), "step"),
    (lambda: lr_multiplier(-3, 10), "step"), (lambda: lr_multiplier(NAN, 10), "step"),
    (lambda: lr_multiplier(2, -5), "total_steps"), (lambda: lr_multiplier(2, 10, NAN), "warmup_ratio"),
])
def test_schedule_functions_refuse_bad_arguments(call, name):
    """Was: ``lr_multiplier(5, 10, 0.1, "cosine")`` silently gave 1.0 (the constant schedule), a
    negative step a negative factor, ``warmup_steps(10, 2.0)`` 20 warm-up steps of 10, ``-0.5``
    -5; NaN/inf ratios failed in ``math.ceil``."""
    with pytest.raises(ValueError, match=name):
        call()


@SETTINGS
@given(total=st.one_of(st.none(), st.integers(0, 50)), ratio=st.sampled_from([0.0, 0.25, 1.0, 1]),
       decay=st.sampled_from(["linear", "constant"]))
def test_schedule_functions_accept_the_boundaries(total, ratio, decay):
    W = warmup_steps(total, ratio)
    assert 0 <= W <= (total or 0)
    assert 0.0 <= lr_multiplier(1, total, ratio, decay) <= 1.0


def test_adamw_config_numbers_and_from_dict():
    """Was: ``lr=np.float32(1e-3)`` was refused (a float64 accepted), ``lr=10**400`` an
    OverflowError; ``from_dict`` of a list or with ``betas=5`` failed with "cannot convert dictionary
    update sequence" / "'int' object is not iterable", an unknown key a bare ``__init__`` error."""
    cfg = AdamWConfig(lr=np.float32(1e-3), betas=(np.float32(0.9), 0.99), max_grad_norm=np.float64(1))
    assert type(cfg.lr) is float and type(cfg.max_grad_norm) is float and AdamWConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="lr"):
        AdamWConfig(lr=10**400)
    with pytest.raises(TypeError, match="d must be a mapping"):
        AdamWConfig.from_dict([("lr", 1e-3)])
    with pytest.raises(TypeError, match="betas"):
        AdamWConfig.from_dict({"betas": 5})
    with pytest.raises(ValueError, match="lrr"):
        AdamWConfig.from_dict({"lrr": 1e-3})


def test_packed_adamw_refuses_bad_banks_and_slots():
    """Was: ``PackedAdamW(5, 2)`` failed with "'int' object is not iterable", ``max_users="2"`` said
    "banks[0].max_users=2 differs from max_users=2", and ``step({0})``/``step(None)`` were
    RuntimeErrors of ``torch.as_tensor``."""
    import kernels

    bank = kernels.AdapterBank(8, 4, max_users=2)
    bank.add(0, [2], init="random")
    with pytest.raises(TypeError, match="banks"):
        PackedAdamW(5, 2)
    with pytest.raises(ValueError, match="max_users"):
        PackedAdamW([bank], "2")
    opt = PackedAdamW([bank], 2)
    opt.set_user(0)
    for bad in ({0}, None, "0", [None], 0):
        with pytest.raises(TypeError, match="slots"):
            opt.step(bad)
    assert opt.step_count(0) == 0
    opt.step([])  # good boundary: no user, no step
    opt.step(np.array([0]))
    opt.step(torch.tensor([0]))
    assert opt.step_count(0) == 2


@pytest.mark.parametrize("edit, exc", [
    (lambda s: [s], TypeError),  # was AttributeError: 'list' object has no attribute 'items'
    (lambda s: {**s, "step": torch.tensor([NAN])}, ValueError),  # was "cannot convert float NaN"
    (lambda s: {**s, "step": torch.tensor([-4])}, ValueError),  # was accepted: step count -4
    (lambda s: {**s, "step": torch.tensor([2.7])}, ValueError),  # was accepted as 2
    (lambda s: {**s, "step": torch.tensor([])}, ValueError),  # was IndexError
    (lambda s: {**s, "step": 3}, TypeError),  # was AttributeError
    (lambda s: {**s, "0.exp_avg_a": s["0.exp_avg_a"].tolist()}, TypeError),  # was AttributeError
    (lambda s: {**s, "0.exp_avg_a": torch.full_like(s["0.exp_avg_a"], NAN)}, ValueError),  # was loaded
    (lambda s: {**s, "0.exp_avg_sq_b": -torch.ones_like(s["0.exp_avg_sq_b"])}, ValueError),  # was loaded
])
def test_load_user_state_refuses_bad_state_and_changes_nothing(edit, exc):
    """Was: NaN moments and a negative second moment were loaded (the user's next step NaN), a
    negative or fractional step count was taken, and non-tensor entries failed with AttributeErrors."""
    import kernels

    bank = kernels.AdapterBank(8, 4, max_users=1)
    bank.add(0, [2], init="random")
    opt = PackedAdamW([bank], 1)
    opt.set_user(0)
    bank.lora_a.grad = torch.ones_like(bank.lora_a)
    opt.step([0])
    state = opt.user_state(0)
    with pytest.raises(exc, match="state"):
        opt.load_user_state(0, edit(state))
    assert all(torch.equal(v, opt.user_state(0)[k]) for k, v in state.items())


# --------------------------------------------------------------------------- runtime helpers
def test_pad_sequences_and_mixed_batches_refuse_what_is_no_token_list():
    """Was: ``pad_sequences([[1.5, 2]], 0)`` silently truncated 1.5 to token 1, ``[[True, 2]]`` gave
    token 1, a str row failed in torch ("too many dimensions 'str'"); ``mixed_batches`` of a list
    was an AttributeError and ``shuffle="no"`` shuffled."""
    for bad in ([[1.5, 2]], [[True, 2]], ["ab"], [5], None):
        with pytest.raises(TypeError, match="sequences"):
            pad_sequences(bad, 0)
    for kwargs in ({"per_user": [[1]]}, {"shuffle": "no"}, {"seed": "x"}, {"epoch": 1.5},
                   {"per_user": {"a": 5}}):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            list(mixed_batches(**{"per_user": {"a": [[1], [2]]}, "pad_token_id": 0, **kwargs}))
    # good boundaries: a negative pad (memory_inject pads with -1), tensor/numpy rows, one user
    assert pad_sequences([torch.tensor([1, 2]), np.array([3])], -1)[0].tolist() == [[1, 2], [3, -1]]
    assert len(list(mixed_batches({"a": [[1]]}, -1))) == 1


def test_memory_config_checks_num_layers_and_shapes():
    """Was: ``check_num_layers("2")`` said "has 2 layers but the model has 2" and ``2.0`` passed;
    ``num_parameters("ab")`` was "not enough values to unpack"; ``from_search(num_layers="1")`` as
    ``check_num_layers``."""
    cfg = MemoryConfig.uniform(2)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="num_layers"):
            cfg.check_num_layers(bad)
    with pytest.raises(TypeError, match="model_or_shapes"):
        cfg.num_parameters("ab")
    with pytest.raises(ValueError, match="model_or_shapes"):
        cfg.num_parameters([[(1,)], [(1, 2)]])
    with pytest.raises(TypeError, match="num_layers"):  # was "layer_mask has 1 entries but the model has 1 layers"
        MemoryConfig.from_search({"layer_mask": [1], "modules": 1, "ranks": 4}, num_layers="1")
    assert MemoryConfig.uniform(2, 0).num_parameters([[(4, 4)], [(4, 4)]]) == 0  # good boundary


def test_store_save_path_refuses_what_it_never_saves():
    """Was: ``save_path(True)`` and ``save_path([1])`` gave directories for ids a store never holds."""
    with tempfile.TemporaryDirectory() as d:
        store = UserStore(d)
        for bad in (True, [1], 1.5, None):
            with pytest.raises(TypeError, match="user"):
                store.save_path(bad)
        assert store.save_path(7).parent == Path(d)


# --------------------------------------------------------------------------- data, pipeline, baselines
REC = Record("u", "I run", ["My knee hurts"], "What now?", "Rest.")


def test_data_flags_and_ids_are_checked(tiny_tokenizer):
    """Was: ``include_profile="no"``/``add_response="no"``/``use_chat_template="no"`` were taken as
    True, ``system_prompt=5`` an AttributeError (``strip``), ``collate`` truncated float ids and
    labels to other tokens and took ``pad_to_multiple_of=True`` as 1."""
    for call, name in [
        (lambda: tokenize_memory(REC, tiny_tokenizer, include_profile="no"), "include_profile"),
        (lambda: format_memory(REC, include_profile=0), "include_profile"),
        (lambda: tokenize_instruction(REC, tiny_tokenizer, add_response="no"), "add_response"),
        (lambda: tokenize_instruction(REC, tiny_tokenizer, use_chat_template="no"), "use_chat_template"),
        (lambda: tokenize_instruction(REC, tiny_tokenizer, system_prompt=5), "system_prompt"),
        (lambda: format_prompt("q", tiny_tokenizer, system_prompt=5), "system_prompt"),
        (lambda: collate([{"input_ids": [1.5, 2]}], 0), "input_ids"),
        (lambda: collate([{"input_ids": [1, 2], "labels": [1.5, 2]}], 0), "labels"),
    ]:
        with pytest.raises(TypeError, match=name):
            call()
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate([{"input_ids": [1, 2]}], 0, pad_to_multiple_of=True)
    with pytest.raises(ValueError, match="use_chat_template=True"):  # was a plain prompt
        format_prompt("q", tiny_tokenizer, use_chat_template=True)
    assert collate([{"input_ids": np.array([1, 2]), "labels": [-100, 2]}], 0)["labels"].tolist() == [[-100, 2]]


def test_pipeline_objects_are_checked_by_name(tiny_tokenizer):
    """Was: ``add_instruction_adapter(model, seed="x")`` a RuntimeError of ``manual_seed``;
    ``instruction_tune`` with ``adapter="x"``, ``runtime="x"`` or ``prefix=5`` AttributeErrors, and
    ``memory_inject(None, ...)`` "'NoneType' object has no attribute 'slot'"; ``InstructionAdapter(0, 1.0)``
    a ZeroDivisionError and ``(2, nan)`` / ``(2, -1.0)`` accepted (a NaN / negative scale)."""
    for seed in ("x", True):
        with pytest.raises(TypeError, match="seed"):
            add_instruction_adapter(tiny_model("llama"), seed=seed)
    for rank, alpha in ((0, 1.0), ("a", 1.0), (True, 1.0), (2, NAN), (2, -1.0)):  # was ZeroDivisionError…
        with pytest.raises(ValueError, match="rank|alpha"):
            InstructionAdapter(rank, alpha)
    with pytest.raises(TypeError, match="model"):
        add_instruction_adapter("model")
    model = tiny_model("llama", vocab_size=400)
    add_instruction_adapter(model, rank=2)
    for kwargs, name in [({"adapter": "x"}, "adapter"), ({"runtime": "x"}, "runtime"), ({"prefix": 5}, "prefix"),
                         ({"all_reduce": 5}, "all_reduce"), ({"context_fn": "x"}, "context_fn")]:
        with pytest.raises(TypeError, match=name):
            instruction_tune(model, tiny_tokenizer, [REC], steps=1, progress=False, **kwargs)
    with pytest.raises(TypeError, match="runtime"):
        memory_inject(None, [REC], tiny_tokenizer, steps=1, progress=False)
    rt = MilpRuntime(tiny_model("llama", vocab_size=400), max_users=1)
    rt.add_user("u", MemoryConfig.uniform(2, 1, 2), total_steps=1)
    with pytest.raises(TypeError, match="user_key"):
        memory_inject(rt, [REC], tiny_tokenizer, steps=1, user_key="u", progress=False)
    assert rt.optimizer.step_count(0) == 0


def test_prefix_inputs_checks_ids_and_flag(llama):
    """Was: ids beyond the vocabulary were an IndexError of the embedding; ``with_position_ids="no"``
    added position ids."""
    x, mask, prefix = ids(2, 5), torch.ones(2, 5, dtype=torch.long), torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="input_ids"):
        prefix_inputs(llama, x + 96, mask, prefix)
    with pytest.raises(TypeError, match="with_position_ids"):
        prefix_inputs(llama, x, mask, prefix, with_position_ids="no")
    assert prefix_inputs(llama, x, mask, torch.randn(2, 0, 32))["inputs_embeds"].shape == (2, 5, 32)



def test_metrics_refuse_nan_tie_band_and_non_bool_swap(tiny_tokenizer):
    """Was: ``LMJudge(tie_band=nan)`` passed ``tie_band < 0`` (no pair was ever a tie, silently),
    ``win_rate(..., swap="no")`` judged every pair twice, ``paired_difference(confidence=None)``
    failed comparing None with 0."""
    from milp.metrics import LMJudge, paired_difference, win_rate

    model = tiny_model("llama", vocab_size=400)
    for tie_band in (NAN, INF):
        with pytest.raises(ValueError, match="tie_band"):
            LMJudge(model, tiny_tokenizer, tie_band=tie_band)

    class AlwaysA:
        def judge(self, *args, **kwargs):
            return "A"

    for swap in ("no", 1):
        with pytest.raises(TypeError, match="swap"):
            win_rate(["a"], ["b"], ["q"], [""], judge=AlwaysA(), swap=swap)
    for confidence in (None, "0.9"):
        with pytest.raises(ValueError, match="confidence"):
            paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0], confidence=confidence)
    assert win_rate(["a"], ["b"], ["q"], [""], judge=AlwaysA(), swap=False).wins == 1  # good boundary: one example


def test_baselines_name_record_and_refuse_nan_embeddings(tiny_tokenizer):
    """Was: ``MemoryRetriever.context({})`` and ``user_vector({})`` blamed ``records[0]`` (an argument
    neither has), and an embedder returning NaN gave NaN user vectors (and a garbage ranking)."""
    from milp.baselines import MemoryRetriever, user_vector, user_vectors

    class Embedder:
        def __init__(self, value: float) -> None:
            self.value = value

        def encode(self, texts):
            return torch.full((len(texts), 4), self.value)

    with pytest.raises(TypeError, match="^record must"):
        MemoryRetriever(Embedder(1.0)).context({"profile": "p"}, tiny_tokenizer)
    with pytest.raises(TypeError, match="^record must"):
        user_vector({"profile": "p"}, Embedder(1.0))
    for bad in (NAN, INF):
        with pytest.raises(ValueError, match="NaN or inf"):
            user_vectors([REC], Embedder(bad))
        with pytest.raises(ValueError, match="NaN or inf"):
            MemoryRetriever(Embedder(bad), k_short=0).context(REC, tiny_tokenizer)
    assert user_vector(REC, Embedder(1.0)).shape == (4,)


def test_atomic_writers_name_path_and_data():
    """Was: ``atomic_write_text(path, b"x")`` an AttributeError (``bytes.encode``),
    ``atomic_write_bytes(path, "x")`` "memoryview: a bytes-like object is required", an int path
    pathlib's TypeError; none named the argument."""
    from milp import atomic_directory, atomic_write_bytes, atomic_write_text

    with tempfile.TemporaryDirectory() as d:
        with pytest.raises(TypeError, match="text"):
            atomic_write_text(Path(d) / "a", b"x")
        with pytest.raises(TypeError, match="data"):
            atomic_write_bytes(Path(d) / "a", "x")
        for call in (lambda: atomic_write_bytes(5, b"x"), lambda: atomic_directory(5).__enter__()):
            with pytest.raises(TypeError, match="path"):
                call()
        assert not any(Path(d).iterdir())
        assert atomic_write_bytes(Path(d) / "b", bytearray(b"")).read_bytes() == b""  # good boundary: empty


def test_seed_master_checks_both_tensors_before_writing():
    """Was: ``seed_master(slot, bank, a, b)`` wrote ``a`` into the float32 master rows, then refused a
    ``b`` of the wrong shape (half of the pair seeded); a list ``a`` was an AttributeError (``shape``)
    and, for a bank without a master, silently "nothing to seed"."""
    import kernels

    bf = kernels.AdapterBank(4, 2, max_users=1, dtype=torch.bfloat16)
    bf.add(0, [1])
    opt = PackedAdamW([bf], max_users=1)
    opt.set_user(0)
    master = opt._moments[0]["master_a"].clone()
    with pytest.raises(ValueError, match="b has shape"):
        opt.seed_master(0, bf, torch.full((1, 4), 1 + 2**-10), torch.zeros(1, 3))
    assert torch.equal(opt._moments[0]["master_a"], master)
    f32 = kernels.AdapterBank(4, 2, max_users=1)
    f32.add(0, [1])
    opt32 = PackedAdamW([f32], max_users=1)
    opt32.set_user(0)
    for o, bank in ((opt, bf), (opt32, f32)):
        with pytest.raises(TypeError, match="a must be"):
            o.seed_master(0, bank, [[1.0] * 4], torch.zeros(1, 2))
    with pytest.raises(TypeError, match="missing_ok"):  # was taken by truthiness
        apply_milp(tiny_model("llama"), max_users=1).remove_adapters(0, missing_ok="yes")


def test_layer_ranks_takes_a_numpy_layer_index():
    """Was: ``layer_ranks(np.int64(0))`` said "layer must be in [0, 2), got np.int64(0)": a layer
    index from ``np.nonzero(cfg.layer_mask)`` refused with a message claiming it out of range."""
    cfg = MemoryConfig((True, False), (2, 0), ((4, 8), 8))
    assert [cfg.layer_ranks(li) for li in np.arange(2)] == [(4, 8), ()]
    for bad in (np.int64(2), np.int64(-1), np.bool_(True)):
        with pytest.raises(ValueError, match="layer must be in"):
            cfg.layer_ranks(bad)
