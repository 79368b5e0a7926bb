"""milp.losses: the chunked head + cross-entropy equals the full-logits loss, values and gradients."""
from __future__ import annotations

import pytest
import torch

from milp import MemoryConfig, MilpRuntime
from milp.inject import SUPPORTED_ARCHITECTURES, tiny_model
from milp.losses import SPLIT_ARCHITECTURES, mean_token_loss, token_losses


def _full(model, ids, labels, **kw):
    logits = model(input_ids=ids, **kw).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                             ignore_index=-100, reduction="none")


# logits = lm_head(body): split; the others (softcapped, scaled or differently named heads) are not
NOT_SPLIT = {"gemma2", "gemma3_text", "granite", "cohere", "gpt_neox"}


@pytest.mark.parametrize("arch", list(SUPPORTED_ARCHITECTURES))
def test_chunked_equals_full_logits(arch):
    """Every supported architecture: the split path where the head is a plain ``lm_head``,
    the plain path otherwise, equal to the full logits' loss in values and gradients."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    assert (type(model).__name__ in SPLIT_ARCHITECTURES) == (arch not in NOT_SPLIT)
    ids = torch.randint(3, 90, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[mask == 0] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    want = _full(model, ids, labels, attention_mask=mask)
    g_want = torch.autograd.grad(want.sum(), params, allow_unused=True)
    ce, valid = token_losses(model, input_ids=ids, attention_mask=mask, labels=labels, chunk_tokens=4)  # 4 chunks
    g = torch.autograd.grad(ce.sum(), params, allow_unused=True)
    assert valid.tolist() == (labels[:, 1:] != -100).tolist()
    assert torch.allclose(ce, want, atol=1e-5) and bool((ce[~valid] == 0).all())
    for a, b in zip(g, g_want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.isclose(mean_token_loss(model, input_ids=ids, attention_mask=mask, labels=labels), hf, atol=1e-5)


def test_inputs_embeds_and_no_target():
    model = tiny_model("llama")
    emb = torch.randn(2, 6, model.config.hidden_size)
    labels = torch.full((2, 6), -100)
    ce, valid = token_losses(model, inputs_embeds=emb, labels=labels)
    assert ce.shape == (2, 5) and not valid.any() and float(ce.abs().sum()) == 0.0
    labels[1, 3:] = 5
    ce, valid = token_losses(model, inputs_embeds=emb, labels=labels)
    want = _full(model, None, labels, inputs_embeds=emb)
    assert int(valid.sum()) == 3 and torch.allclose(ce, want, atol=1e-5)


def test_mean_loss_without_a_target_is_zero_and_backward_runs():
    """A batch whose targets were all cut away (say, prompts longer than max_length): the mean
    loss is 0, not Hugging Face's NaN, and a training loop's backward runs on it and gives the
    model no gradient; under no_grad it stays a plain constant."""
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 6))
    loss = mean_token_loss(model, input_ids=ids, labels=torch.full_like(ids, -100))
    assert float(loss) == 0.0
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert not mean_token_loss(model, input_ids=ids, labels=torch.full_like(ids, -100)).requires_grad
    loss = mean_token_loss(model, input_ids=ids, labels=ids)  # with targets: the real graph
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_an_unknown_architecture_takes_the_plain_path(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 5))
    monkeypatch.setattr("milp.losses.SPLIT_ARCHITECTURES", frozenset())
    ce, _ = token_losses(model, input_ids=ids, labels=ids)
    assert torch.allclose(ce, _full(model, ids, ids), atol=1e-6)


def test_runtime_step_is_unchanged_by_the_chunking():
    """The multi-user loss through the adapters: chunked == full logits, per user and in gradient."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    rt = MilpRuntime(model, max_users=2)
    for u in ("a", "b"):
        rt.add_user(u, MemoryConfig.uniform(2, modules=2, rank=4), init="random", seed=1)
    ids = torch.randint(3, 90, (4, 9))
    total, per_user = rt.loss(ids, ["a", "b", "a", None])
    from milp.runtime import user_losses

    with rt.using(["a", "b", "a", None]) as slots:
        logits = model(input_ids=ids).logits
        want_total, want_mean, _ = user_losses(logits, ids, slots, 2)
    assert torch.isclose(total, want_total, atol=1e-5)
    assert float(per_user["a"]) == pytest.approx(float(want_mean[rt.slot("a")]), abs=1e-5)


def test_bad_arguments():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 5))
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_losses(model, input_ids=ids, labels=ids, chunk_tokens=0)
    with pytest.raises(ValueError, match="exactly one of"):
        token_losses(model, labels=ids)
    with pytest.raises(ValueError, match="labels must be"):
        token_losses(model, input_ids=ids, labels=ids[:, :3])


def test_integer_labels_of_any_dtype_and_bad_labels_by_name():
    """Regression: int32 token ids (numpy's, a collator's) crashed in cross_entropy ("expected
    target dtype to be Long"), also through MilpRuntime.train_step, whose input check accepts
    any integer ids; a list of labels raised AttributeError ('list' has no attribute 'dim')."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 6))
    ce, valid = token_losses(model, input_ids=ids, labels=ids)
    ce32, valid32 = token_losses(model, input_ids=ids.int(), labels=ids.int())
    assert torch.equal(ce, ce32) and torch.equal(valid, valid32)
    rt = MilpRuntime(model, max_users=1)
    rt.add_user("a", MemoryConfig.uniform(2), init="random", seed=0)
    assert rt.loss(ids.int(), "a")[1]["a"].item() == pytest.approx(rt.loss(ids, "a")[1]["a"].item())
    assert set(rt.train_step(ids.int(), "a")) == {"a"}
    with pytest.raises(TypeError, match="labels must be a tensor"):
        token_losses(model, input_ids=ids, labels=ids.tolist())
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        token_losses(model, input_ids=ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        token_losses(model, input_ids=ids[0], labels=ids[0])
