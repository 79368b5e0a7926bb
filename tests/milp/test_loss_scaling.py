"""Per-user dynamic loss scaling (milp.optim.LossScaling) for float16 training: a scaled step is
the unscaled step (bit for bit with power-of-two scales); a user whose gradients are not finite
is skipped alone (weights, moments, step count untouched) and its scale backs off, the others
step; scales grow after growth_interval finite steps; the scale survives user_state; the runtime
turns it on for float16 models and a float16 model's memory gradients get closer to float32's
with it; instruction tuning skips an overflowing step with torch.amp.GradScaler."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
import milp
from milp import MemoryConfig, MilpRuntime
from milp.inject import tiny_model
from milp.optim import AdamWConfig, LossScaling, PackedAdamW, resolve_loss_scaling

#: the optimizer tests run on the GPU too where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def two_user_bank(dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> kernels.AdapterBank:
    bank = kernels.AdapterBank(6, 5, max_users=3, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    bank.add(0, [2, 3], init="random", generator=g)
    bank.add(2, [4], init="random", generator=g)
    return bank


def set_grads(bank: kernels.AdapterBank, seed: int, factor: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    bank.lora_a.grad = (torch.randn(bank.lora_a.shape, generator=g) * factor).to(bank.lora_a)
    bank.lora_b.grad = (torch.randn(bank.lora_b.shape, generator=g) * factor).to(bank.lora_b)


def user_rows(bank: kernels.AdapterBank, u: int) -> list[torch.Tensor]:
    a, b, _ = bank.adapter_weights(u)
    return [a.detach().clone(), b.detach().clone()]


def optimizer(bank: kernels.AdapterBank, scaling: LossScaling | None, clip: float | None = None) -> PackedAdamW:
    opt = PackedAdamW([bank], max_users=3, loss_scaling=scaling)
    for u in (0, 2):
        opt.set_user(u, AdamWConfig(lr=1e-2, max_grad_norm=clip), total_steps=20)
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_scaled_step_is_the_unscaled_step(clip, device):
    """Gradients of the scaled losses, unscaled by each user's own power-of-two scale, give the
    unscaled run's weights and moments bit for bit, clipping (by the unscaled norm) included."""
    plain_bank, scaled_bank = two_user_bank(device=device), two_user_bank(device=device)
    plain = optimizer(plain_bank, None, clip)
    scaled = optimizer(scaled_bank, LossScaling(init_scale=2.0 ** 10, growth_interval=2), clip)
    for step in range(5):
        set_grads(plain_bank, step)
        # each user's rows get its own scale: user 0's rows times its scale, user 2's times its own
        set_grads(scaled_bank, step)
        for u in (0, 2):
            seg = scaled_bank.segment(u)
            rows = slice(seg.offset, seg.offset + seg.rank)
            s = scaled.loss_scale(u)
            scaled_bank.lora_a.grad[rows] *= s
            scaled_bank.lora_b.grad[rows] *= s
        assert plain.step([0, 2]) == []
        assert scaled.step([0, 2], scaled=True) == []
    assert scaled.loss_scale(0) == 2.0 ** 12  # grown twice (every 2 finite steps), from 2**10
    for u in (0, 2):
        for x, y in zip(user_rows(plain_bank, u), user_rows(scaled_bank, u)):
            assert torch.equal(x, y)
        for k, v in plain.user_state(u).items():
            assert torch.equal(v, scaled.user_state(u)[k]), k
        assert plain.step_count(u) == scaled.step_count(u) == 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_user_with_non_finite_gradients_is_skipped_alone(bad, device):
    bank = two_user_bank(torch.float16, device=device)
    opt = optimizer(bank, LossScaling(init_scale=64.0))
    set_grads(bank, 0)
    opt.step([0, 2], scaled=True)
    before = {u: (user_rows(bank, u), opt.user_state(u)) for u in (0, 2)}
    set_grads(bank, 1)
    seg = bank.segment(2)
    bank.lora_b.grad[seg.offset + 1, 3] = bad
    assert opt.step([0, 2], scaled=True) == [2]
    rows_2, state_2 = before[2]
    for x, y in zip(rows_2, user_rows(bank, 2)):
        assert torch.equal(x, y)
    for k, v in state_2.items():
        if k != "loss_scale":
            assert torch.equal(v, opt.user_state(2)[k]), k
    assert opt.step_count(2) == 1 and opt.loss_scale(2) == 32.0
    assert opt.step_count(0) == 2 and opt.loss_scale(0) == 64.0  # user 0 stepped as usual
    assert not torch.equal(before[0][0][0], user_rows(bank, 0)[0])
    for t in user_rows(bank, 0) + user_rows(bank, 2):
        assert bool(torch.isfinite(t).all())


def test_a_user_that_never_gets_a_finite_gradient_backs_off_to_the_floor_and_stays_put():
    """A user whose loss itself is NaN skips every step; its scale stops at 2**-100 (not 0, whose
    inverse would make the unscaling inf) and its rows never change."""
    bank = two_user_bank(torch.float16)
    opt = optimizer(bank, LossScaling(init_scale=2.0 ** -98))
    start = user_rows(bank, 0)
    for _ in range(4):
        set_grads(bank, 0)
        bank.lora_a.grad[bank.segment(0).offset] = math.nan
        assert opt.step([0, 2], scaled=True) == [0]
    assert opt.loss_scale(0) == 2.0 ** -100 and opt.step_count(0) == 0 and opt.step_count(2) == 4
    assert all(torch.equal(x, y) for x, y in zip(start, user_rows(bank, 0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync is a GPU matter (CPU: no device to wait for)")
def test_a_scaled_step_syncs_once_on_the_gpu():
    """The one read back of a scaled step is its users' finite flags (as GradScaler.step reads
    its found_inf); the skip, the unscaling and the new scales stay on the device."""
    import warnings

    bank = two_user_bank(torch.float16, device="cuda")
    opt = optimizer(bank, LossScaling(init_scale=64.0, growth_interval=1))
    set_grads(bank, 0)
    bank.lora_a.grad[bank.segment(2).offset] = math.inf
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.step([0, 2], scaled=True) == [2]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1, [str(w.message) for w in caught]
    assert (opt.loss_scale(0), opt.loss_scale(2)) == (128.0, 32.0)


def test_scale_losses_weighs_each_user_by_its_own_scale():
    opt = PackedAdamW([], max_users=3, loss_scaling=LossScaling(init_scale=8.0, growth_interval=1))
    opt.set_user(0)
    opt.set_user(2)
    opt.step([2], scaled=True)  # user 2's scale grows to 16
    losses = torch.tensor([1.0, 5.0, 0.25])  # slot 1 has no user: scale 1
    assert opt.scale_losses(losses).item() == 8.0 + 5.0 + 4.0
    assert PackedAdamW([], max_users=3).scale_losses(losses).item() == 6.25
    with pytest.raises(ValueError, match=r"losses must be a \[max_users\] = \[3\] tensor"):
        opt.scale_losses(torch.ones(2))
    with pytest.raises(ValueError, match="scaled=True needs a PackedAdamW made with loss_scaling="):
        PackedAdamW([], max_users=1).step([0], scaled=True)
    with pytest.raises(TypeError, match="scaled must be"):
        opt.step([0], scaled=1)


def test_the_scale_survives_user_state_and_set_total_steps():
    bank = two_user_bank(torch.float16)
    opt = optimizer(bank, LossScaling(init_scale=64.0, growth_interval=3))
    set_grads(bank, 0)
    bank.lora_a.grad[bank.segment(0).offset] = math.inf
    opt.step([0, 2], scaled=True)
    set_grads(bank, 1)
    opt.step([0, 2], scaled=True)
    state = opt.user_state(0)
    assert state["loss_scale"].tolist() == [32.0, 1.0]
    opt.set_total_steps(0, 50)
    assert opt.loss_scale(0) == 32.0
    opt.set_user(0)  # a fresh start: the initial scale
    assert opt.loss_scale(0) == 64.0
    opt.load_user_state(0, state)
    assert opt.loss_scale(0) == 32.0
    opt.step([0], scaled=True)
    opt.step([0], scaled=True)  # the third finite step in a row: grows
    assert opt.loss_scale(0) == 64.0
    # a state without a scale keeps the user's; an optimizer without loss scaling ignores it
    opt.load_user_state(0, {k: v for k, v in state.items() if k != "loss_scale"})
    assert opt.loss_scale(0) == 64.0
    unscaled = optimizer(two_user_bank(torch.float16), None)
    unscaled.load_user_state(0, state)
    assert unscaled.loss_scale(0) == 1.0 and "loss_scale" not in unscaled.user_state(0)
    for bad in ([0.0, 1.0], [2.0 ** -101, 0.0], [math.inf, 0.0], [math.nan, 0.0], [4.0, -1.0], [4.0, 0.5],
                [4.0, math.inf], [4.0]):
        with pytest.raises(ValueError, match="optimizer state 'loss_scale' must hold"):
            opt.load_user_state(0, {**state, "loss_scale": torch.tensor(bad, dtype=torch.float64)})
    assert opt.loss_scale(0) == 64.0  # nothing loaded from a refused state


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"init_scale": 0.0}, ValueError, "init_scale must be in"),
    ({"init_scale": math.inf}, TypeError, "init_scale must be a finite number"),
    ({"init_scale": "1"}, TypeError, "init_scale must be a finite number"),
    ({"growth_factor": 1.0}, ValueError, "growth_factor must be in"),
    ({"backoff_factor": 1.0}, ValueError, "backoff_factor must be in"),
    ({"backoff_factor": 0.0}, ValueError, "backoff_factor must be in"),
    ({"growth_interval": 0}, ValueError, "growth_interval must be an int >= 1"),
    ({"growth_interval": 2.0}, ValueError, "growth_interval must be an int >= 1"),
])
def test_loss_scaling_refuses_bad_settings_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossScaling(**kwargs)


def test_resolve_and_the_runtimes_default():
    assert resolve_loss_scaling("auto", torch.float16) == LossScaling()
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        assert resolve_loss_scaling("auto", dt) is None
    assert resolve_loss_scaling(True, torch.float32) == LossScaling()
    assert resolve_loss_scaling(False, torch.float16) is None
    mine = LossScaling(init_scale=2.0)
    assert resolve_loss_scaling(mine, torch.float32) is mine
    with pytest.raises(TypeError, match="loss_scaling must be 'auto', a bool, None or a milp.LossScaling"):
        resolve_loss_scaling("on", torch.float16)
    assert MilpRuntime(tiny_model("llama").half(), max_users=1).optimizer.loss_scaling == LossScaling()
    assert MilpRuntime(tiny_model("llama"), max_users=1).optimizer.loss_scaling is None
    assert MilpRuntime(tiny_model("llama").bfloat16(), max_users=1).optimizer.loss_scaling is None
    assert MilpRuntime(tiny_model("llama").half(), max_users=1, loss_scaling=None).optimizer.loss_scaling is None
    with pytest.raises(TypeError, match="loss_scaling must be 'auto', a bool, None or a milp.LossScaling"):
        MilpRuntime(tiny_model("llama"), max_users=1, loss_scaling="yes")
    assert milp.LossScaling is LossScaling


def _first_gradient(model: torch.nn.Module, loss_scaling, ids: torch.Tensor) -> torch.Tensor:
    """The memory adapters' gradient of one train_step, read from AdamW's first moment
    (``exp_avg = (1 - beta1) g`` after one step)."""
    rt = MilpRuntime(model, max_users=1, loss_scaling=loss_scaling)
    rt.add_user("u", MemoryConfig.uniform(2, 2, 4), init="random", seed=0, total_steps=4)
    rt.train_step(ids, ["u"] * ids.shape[0])
    state = rt.optimizer.user_state(rt.slot("u"))
    return torch.cat([v.double().flatten() / 0.1 for k, v in sorted(state.items()) if ".exp_avg_" in k
                      and "_sq_" not in k])


def test_a_float16_models_gradient_is_closer_to_float32s_with_loss_scaling():
    """Many target tokens (2,040) over a 1,024-token vocabulary make each logit's share of the
    mean loss's gradient small (~1e-6): in float16 the unscaled backward loses it to underflow
    (subnormals), the scaled one keeps it. Measured: 1.40% off float32's gradient unscaled,
    0.26% scaled (on SmolLM2-135M and a MedDia batch: 12% and 0.5%)."""
    ids = torch.randint(3, 1024, (8, 256), generator=torch.Generator().manual_seed(0))
    ref = _first_gradient(tiny_model("llama", seed=0, vocab_size=1024), False, ids)
    err = {}
    for scaling in (False, "auto"):
        got = _first_gradient(tiny_model("llama", seed=0, vocab_size=1024).half(), scaling, ids)
        err[scaling] = float((got - ref).norm() / ref.norm())
    assert err["auto"] < err[False] / 3, err


def test_an_overflowing_user_is_skipped_until_its_scale_backs_off():
    """A float16 model's users start at a scale their gradients overflow at: a step whose
    gradients overflow moves nothing, counts no step and halves the user's scale; a finite one
    updates the adapters; a user trained in a mixed batch gets the scales and steps it gets
    trained alone."""
    ids = torch.randint(3, 90, (4, 12), generator=torch.Generator().manual_seed(1))
    steps = 16

    def run(users, rows, batch):
        scaling = LossScaling(init_scale=2.0 ** 24)
        rt = MilpRuntime(tiny_model("llama", seed=0).half(), max_users=2, loss_scaling=scaling)
        for u in users:
            rt.add_user(u, MemoryConfig.uniform(2, 1, 4), init="random", seed=0, total_steps=steps)
        history = [{u: (rt.optimizer.loss_scale(rt.slot(u)), 0, False) for u in users}]
        for _ in range(steps):
            before = {u: rt.adapter_state(u) for u in users}
            rt.train_step(batch, rows)
            now = {}
            for u in users:
                after = rt.adapter_state(u)
                moved = any(not torch.equal(v, after[k]) for k, v in before[u].items())
                now[u] = (rt.optimizer.loss_scale(rt.slot(u)), rt.optimizer.step_count(rt.slot(u)), moved)
                assert all(bool(torch.isfinite(t).all()) for t in after.values())
            history.append(now)
        return rt, history

    rt, history = run(["a", "b"], ["a", "b", "a", "b"], ids)
    for u, rows in (("a", [0, 2]), ("b", [1, 3])):
        n = rt.skipped_steps[u]
        assert 3 <= n < steps and not history[1][u][2]  # the first step overflows
        for (scale0, count0, _), (scale, count, moved) in zip((h[u] for h in history), (h[u] for h in history[1:])):
            assert (scale, count) == ((scale0, count0 + 1) if moved else (scale0 / 2, count0))
        assert history[-1][u][:2] == (2.0 ** (24 - n), steps - n)
        alone, alone_history = run([u], [u, u], ids[rows])
        assert alone.skipped_steps == {u: n} and [h[u] for h in alone_history] == [h[u] for h in history]


def test_instruction_tuning_a_float16_model_skips_overflowing_steps(tiny_chat_tokenizer):
    """GradScaler's rule: steps whose scaled gradients overflow change nothing; at a scale that
    does not overflow the adapter trains; a float32 model is not scaled ("auto")."""
    from milp.data import Record

    records = [Record(f"u{i}", "", ["My knee hurts."], "What should I do?", "Rest and drink water.")
               for i in range(2)]

    def tuned(model, scaling, steps=3):
        adapter = milp.add_instruction_adapter(model, rank=2)
        start = {k: v.clone() for k, v in adapter.state_dict().items()}
        losses = milp.instruction_tune(model, tiny_chat_tokenizer, records, adapter=adapter, steps=steps,
                                       batch_size=2, lr=1e-2, progress=False, loss_scaling=scaling)
        assert len(losses) == steps and all(math.isfinite(v) for v in losses)
        return start, adapter.state_dict()

    start, end = tuned(tiny_model("llama", vocab_size=400).half(), LossScaling(init_scale=2.0 ** 80))
    assert all(torch.equal(v, end[k]) for k, v in start.items())  # every step overflowed: skipped
    start, end = tuned(tiny_model("llama", vocab_size=400).half(), LossScaling(init_scale=2.0 ** 4))
    assert any(not torch.equal(v, end[k]) for k, v in start.items())
    _, auto = tuned(tiny_model("llama", vocab_size=400), "auto")
    _, off = tuned(tiny_model("llama", vocab_size=400), False)
    assert all(torch.equal(v, off[k]) for k, v in auto.items())


def test_milp_train_in_float16_trains_with_loss_scaling(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """``python -m milp.train --dtype float16``: the whole pipeline runs, every memory step is a
    scaled one, the steps skipped are reported, and its losses and float16 adapters are finite."""
    import json

    from safetensors.torch import load_file

    import milp.runtime
    from milp import train

    calls = []
    step = PackedAdamW.step

    def recorded(self, slots, **kwargs):
        calls.append(kwargs.get("scaled", False))
        return step(self, slots, **kwargs)

    monkeypatch.setattr(PackedAdamW, "step", recorded)
    # a first scale the tiny model's gradients overflow at: the first steps are skipped, and said so
    resolve = milp.runtime.resolve_loss_scaling
    monkeypatch.setattr(milp.runtime, "resolve_loss_scaling",
                        lambda value, dtype: resolve(LossScaling(init_scale=2.0 ** 40) if value == "auto" else value,
                                                     dtype))
    out = tmp_path / "run"
    assert train.main(["--model", str(tiny_checkpoint), "--output", str(out), "--dtype", "float16", "--users", "7",
                       "--memory-steps", "2", "--instruct-steps", "2", "--max-new-tokens", "3", "--max-length", "96",
                       "--no-progress"]) == 0
    assert "memory injection: loss scaling skipped 14 of the users' 14 steps" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["dtype"] == "float16"
    assert calls and all(calls)
    losses = json.loads((out / "memory_losses.json").read_text())
    assert len(losses) == 7 and all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values())
    for f in (out / "users").glob("*/adapters.safetensors"):
        assert all(t.dtype == torch.float16 and bool(torch.isfinite(t).all()) for t in load_file(str(f)).values())
