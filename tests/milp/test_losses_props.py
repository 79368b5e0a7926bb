"""Property tests of milp.losses and of the runtime's per-user reductions: drawn label masks
(every position ignored, a single target, padded rows, prompts), chunk sizes and user layouts
against brute-force references written position by position; bad arguments refused by name."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milp.config import MemoryConfig
from milp.inject import tiny_model
from milp.losses import mean_token_loss, token_losses
from milp.runtime import MilpRuntime, user_losses, user_losses_from_ce

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_MODELS: dict[str, torch.nn.Module] = {}


def model_of(arch: str) -> torch.nn.Module:
    """One tiny float64 model per architecture (llama: the split path; gemma2: the plain path)."""
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch).double()
    return _MODELS[arch]


@st.composite
def batches(draw, max_b: int = 3, max_s: int = 7):
    """``(ids, attention_mask, labels)``: ragged right-padded rows, each position's label kept
    or ignored at random, plus the edge cases (all ignored, one target) drawn often."""
    B = draw(st.integers(1, max_b))
    S = draw(st.integers(1, max_s))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(3, 90, (B, S), generator=g)
    lengths = [draw(st.integers(1, S)) for _ in range(B)]
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    kind = draw(st.sampled_from(["random", "none", "one", "all"]))
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "random":
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))).view(B, S)
        labels = labels.masked_fill(~keep, -100)
    elif kind == "none":
        labels = torch.full_like(ids, -100)
    elif kind == "one":
        b, s = draw(st.integers(0, B - 1)), draw(st.integers(0, S - 1))
        labels = torch.full_like(ids, -100)
        labels[b, s] = ids[b, s]
    return ids, mask, labels


def brute_force(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``ce[b, s] = -log softmax(logits[b, s])[labels[b, s + 1]]`` (0 where ignored), one position at a time."""
    B, S, _ = logits.shape
    rows = []
    for b in range(B):
        row = []
        for s in range(S - 1):
            y = int(labels[b, s + 1])
            row.append(-torch.log_softmax(logits[b, s].double(), -1)[y] if y != -100 else logits.new_zeros(()))
        rows.append(torch.stack(row) if row else logits.new_zeros(0))
    return torch.stack(rows)


@SETTINGS
@given(batch=batches(), arch=st.sampled_from(["llama", "gemma2"]), chunk=st.integers(1, 9),
       weights_seed=st.integers(0, 100))
def test_token_losses_equal_brute_force(batch, arch, chunk, weights_seed):
    """Values, target mask and gradients (of a random weighting of the positions) equal the
    position-by-position reference, for every chunk size, on the split and the plain path."""
    ids, mask, labels = batch
    model = model_of(arch)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)
    try:
        ce, valid = token_losses(model, input_ids=ids, attention_mask=mask, labels=labels, chunk_tokens=chunk)
        want = brute_force(model(input_ids=ids, attention_mask=mask).logits, labels)
        assert ce.shape == (ids.shape[0], ids.shape[1] - 1) and ce.dtype == torch.float32
        assert valid.tolist() == (labels[:, 1:] != -100).tolist()
        assert bool((ce[~valid] == 0).all())
        torch.testing.assert_close(ce.double(), want, rtol=1e-5, atol=1e-5)
        w = torch.rand(ce.shape, generator=torch.Generator().manual_seed(weights_seed), dtype=torch.float64)
        if valid.any():
            (g,) = torch.autograd.grad((ce.double() * w).sum(), head)
            (g_want,) = torch.autograd.grad((want * w).sum(), head)
            torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)
        n = int(valid.sum())
        mean = mean_token_loss(model, input_ids=ids, attention_mask=mask, labels=labels, chunk_tokens=chunk)
        assert float(mean.detach()) == pytest.approx(float(want.detach().sum()) / n if n else 0.0, rel=1e-5, abs=1e-6)
    finally:
        head.requires_grad_(False)


@SETTINGS
@given(batch=batches(max_s=6), dtype=st.sampled_from([torch.int32, torch.int16, torch.uint8]))
def test_any_integer_labels_dtype_gives_the_int64_losses(batch, dtype):
    """Integer labels of another dtype (numpy int32, a collator's int16; uint8 when nothing is
    ignored) are token ids too: the same losses as int64. Before, a RuntimeError deep in
    cross_entropy ("expected target dtype to be Long")."""
    ids, mask, labels = batch
    if dtype == torch.uint8:
        labels = ids.clone()
    model = model_of("llama")
    want = token_losses(model, input_ids=ids, attention_mask=mask, labels=labels)
    got = token_losses(model, input_ids=ids, attention_mask=mask, labels=labels.to(dtype))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_arguments_are_refused_by_name():
    model = model_of("llama")
    ids = torch.randint(3, 90, (2, 5))
    with pytest.raises(TypeError, match="labels must be a tensor"):
        token_losses(model, input_ids=ids, labels=ids.tolist())
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        token_losses(model, input_ids=ids, labels=ids.double())
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        token_losses(model, input_ids=ids, labels=ids > 4)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        token_losses(model, input_ids=ids[0], labels=ids[0])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, S, hidden\]"):
        token_losses(model, inputs_embeds=torch.randn(5, 32), labels=ids)
    with pytest.raises(ValueError, match=r"labels must be \[B, S\] = \[2, 5\]"):
        token_losses(model, input_ids=ids, labels=ids[:, :4])
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="chunk_tokens"):
            token_losses(model, input_ids=ids, labels=ids, chunk_tokens=bad)
    with pytest.raises(ValueError, match="exactly one of"):
        token_losses(model, input_ids=ids, inputs_embeds=torch.randn(2, 5, 32), labels=ids)


# ------------------------------------------------------------------ per-user reductions
@st.composite
def mixed_ce(draw):
    B = draw(st.integers(1, 5))
    S1 = draw(st.integers(0, 5))
    U = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ce = torch.rand(B, S1, generator=g, dtype=torch.float64) * 5
    valid = torch.rand(B, S1, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    slots = torch.tensor([draw(st.integers(-1, U - 1)) for _ in range(B)])
    return ce, valid, slots, U


def per_user_reference(ce, valid, slots, U):
    sums, counts = [0.0] * U, [0] * U
    for b in range(ce.shape[0]):
        if slots[b] < 0:
            continue
        for s in range(ce.shape[1]):
            if valid[b, s]:
                sums[slots[b]] += float(ce[b, s])
                counts[slots[b]] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts)], counts


@settings(max_examples=60, deadline=None)
@given(case=mixed_ce(), poison=st.sampled_from([None, math.nan, math.inf]))
def test_user_losses_from_ce_is_the_per_user_mean(case, poison):
    """Each user's mean over its own target positions; users without targets 0 and absent from
    nothing else; rows of slot -1 and positions without a target ignored, whatever they hold
    (a non-finite value there used to turn slot 0's mean and the total into NaN)."""
    ce, valid, slots, U = case
    if poison is not None:  # what an ignored position holds must not matter
        ce = ce.masked_fill(~valid | (slots < 0)[:, None], poison)
    total, mean, count = user_losses_from_ce(ce, valid, slots, U)
    want, counts = per_user_reference(ce, valid, slots, U)
    assert count.tolist() == counts
    assert mean.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(total) == pytest.approx(sum(want), rel=1e-12, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(case=mixed_ce(), nonfinite_base_rows=st.booleans())
def test_user_losses_from_logits_is_the_per_user_mean(case, nonfinite_base_rows):
    """:func:`user_losses` (full logits): the per-user mean of the brute-force position losses;
    a base row (slot -1) with non-finite logits (an overflow in a row nobody trains) changes nothing."""
    ce0, valid, slots, U = case
    B, S1 = ce0.shape
    g = torch.Generator().manual_seed(B * 31 + S1)
    logits = torch.randn(B, S1 + 1, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (B, S1 + 1), generator=g)
    labels[:, 1:] = labels[:, 1:].masked_fill(~valid, -100)
    if nonfinite_base_rows:
        logits[slots < 0] = math.nan
    total, mean, count = user_losses(logits, labels, slots, U)
    want, counts = per_user_reference(brute_force(logits, labels), valid, slots, U)
    assert count.tolist() == counts
    assert mean.tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)  # float32 logits
    assert float(total) == pytest.approx(sum(want), rel=1e-6, abs=1e-6)


@st.composite
def runtime_batches(draw):
    users = draw(st.lists(st.sampled_from(["a", "b", 7, None]), min_size=1, max_size=4))
    ids, mask, labels = draw(batches(max_b=len(users), max_s=6))
    users = (users * 4)[: ids.shape[0]]
    return ids, mask, labels, users, draw(st.booleans())


_RT: list[MilpRuntime] = []


def runtime() -> MilpRuntime:
    if not _RT:
        rt = MilpRuntime(tiny_model("llama").double(), max_users=4)
        rt.add_user("a", MemoryConfig.uniform(2, modules=2, rank=4), init="random", seed=1)
        rt.add_user("b", MemoryConfig((True, False), (1, 0), (8, 8), lora_alpha=4.0), init="random", seed=2)
        rt.add_user(7, MemoryConfig((False, False), (0, 0), (8, 8)))  # no adapters: the base model's loss
        _RT.append(rt)
    return _RT[0]


@SETTINGS
@given(case=runtime_batches())
def test_runtime_loss_is_each_users_mean_over_its_own_rows(case):
    """``MilpRuntime.loss``: ``{user: mean token loss of its rows}`` for the users with at least
    one target (others absent; None rows never), each equal to the brute-force loss of its rows
    run alone through that user's adapters; the total is the sum of the means."""
    ids, mask, labels, users, pass_labels = case
    rt = runtime()
    if not pass_labels:
        labels = ids.masked_fill(mask == 0, -100)  # the default labels
    with torch.no_grad():
        total, per_user = rt.loss(ids, users, attention_mask=mask, labels=labels if pass_labels else None)
    want = {}
    for u in dict.fromkeys(users):
        if u is None:
            continue
        rows = [b for b, v in enumerate(users) if v == u]
        with torch.no_grad():
            logits = rt.forward(ids[rows], u, attention_mask=mask[rows]).logits
        ref = brute_force(logits, labels[rows])
        n = int((labels[rows][:, 1:] != -100).sum())
        if n:
            want[u] = float(ref.sum()) / n
    assert set(per_user) == set(want)
    # the runtime's loss is float32 cross-entropy by design (token_losses), even for this float64
    # model: a few float32 ulp (1 ulp = 1.2e-7 relative) apart from the float64 brute force
    for u, v in want.items():
        assert float(per_user[u]) == pytest.approx(v, rel=1e-6, abs=1e-9), u
    assert float(total) == pytest.approx(sum(want.values()), rel=1e-6, abs=1e-9)
