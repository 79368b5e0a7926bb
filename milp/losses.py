"""Next-token losses of a causal LM without the ``[B, S, V]`` logits tensor.

A language-model head turns every position into ``V`` logits (49,152 for SmolLM2, 128,256
for LLaMA-3): for a mixed-user batch of 20 users × 8 rows × 256 tokens that is 41 k × 49 k
floats, 8 GB, and the softmax and its gradient take as much again — far more than the
model and all users' adapters together. :func:`token_losses` runs the model's body once,
keeps only the positions that have a target (a prompt, padding and a row of a user without
adapters cost nothing in the head), and applies the head + cross-entropy to them in chunks
of ``chunk_tokens`` positions under activation checkpointing: a chunk's logits exist only
while that chunk is computed, in the forward and again in the backward. The idea is that of
Liger-Kernel's fused linear cross-entropy, written with torch ops (so it runs on every
device and under autograd as is).

Exact: each position's loss is the same cross-entropy of the same logits (in float32), so
results equal the full-logits computation to rounding (tested per architecture). Models
whose forward does more than ``lm_head(last_hidden_state)`` are not split: any
architecture outside :data:`SPLIT_ARCHITECTURES` takes the plain ``model(...).logits`` path.

Example:
    >>> import torch
    >>> from milp.inject import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = torch.randint(3, 90, (2, 7))
    >>> labels = ids.clone(); labels[:, :3] = -100          # only the last positions are targets
    >>> ce, valid = token_losses(model, input_ids=ids, labels=labels)
    >>> ce.shape, int(valid.sum())
    (torch.Size([2, 6]), 8)
"""
from __future__ import annotations

import functools
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels._checks import values_checked  # the kernels' rule: on CPU, or under MILP_DEBUG=1

from .data import IGNORE_INDEX

__all__ = ["SPLIT_ARCHITECTURES", "DEFAULT_CHUNK_TOKENS", "check_token_inputs", "token_losses", "mean_token_loss"]

#: Position chunk of the head: ``chunk × V`` float32 logits at a time (2048 × 49,152 = 0.4 GB).
DEFAULT_CHUNK_TOKENS = 2048
#: Causal-LM classes whose logits are exactly ``lm_head(base_model(...)[0])``.
SPLIT_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "OlmoForCausalLM", "Olmo2ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM", "FalconForCausalLM",
    "StableLmForCausalLM", "Starcoder2ForCausalLM", "GPT2LMHeadModel", "RobertaForCausalLM",
})  # not Gemma 2/3 (soft-capped logits), Granite and Cohere (scaled logits), GPT-NeoX (embed_out)


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    if type(model).__name__ not in SPLIT_ARCHITECTURES:
        return None
    body, head = getattr(model, "base_model", None), getattr(model, "lm_head", None)
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module) or body is model:
        return None
    return body, head


def _head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def _vocab(model: nn.Module | None, getter: str | None = None) -> int | None:
    """Rows of an embedding / outputs of a head, or of ``model.<getter>()`` (``None`` when it is
    neither, or the model has no such getter)."""
    module = model
    if getter is not None:
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError, TypeError):
            return None
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def check_ids_in_vocab(input_ids: torch.Tensor, vocab: int) -> None:
    """``ValueError`` unless every id of ``input_ids`` is in ``[0, vocab)`` (an id beyond the
    embedding's rows is an ``IndexError`` deep in it on CPU, a device-side assert on a GPU);
    checked where :func:`values_checked` says so."""
    if input_ids.numel() and values_checked(input_ids):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), "
                             f"got values in [{lo}, {hi}]")


def check_token_inputs(model: nn.Module, input_ids: Any, attention_mask: Any = None,
                       inputs_embeds: Any = None, *, cached: bool = False) -> None:
    """``ValueError``/``TypeError`` naming the argument unless ``input_ids`` is a non-empty ``[B, S]``
    integer tensor of ids in ``[0, vocab)`` (the model's input embedding rows; an id beyond
    them is an ``IndexError`` deep in the embedding on CPU and a device-side assert on a GPU)
    and a 2-D ``attention_mask`` is a tensor of that shape (with a KV cache, ``cached``: ``[B, past + S]``;
    a 4-D one is the model's to check).

    Example:
        >>> from milp.inject import tiny_model
        >>> check_token_inputs(tiny_model("llama"), torch.tensor([[5, 96]]))
        Traceback (most recent call last):
        ValueError: input_ids must be token ids in [0, 96) (the model's vocabulary), got values in [5, 96]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
    x = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a [B, S] tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids must hold at least one row and one token, got shape {list(input_ids.shape)}")
        vocab = _vocab(model, "get_input_embeddings")
        if vocab is not None:
            check_ids_in_vocab(input_ids, vocab)
    elif inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor):
            raise TypeError(f"inputs_embeds must be a [B, S, hidden] tensor, got {type(inputs_embeds).__name__}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be [B, S, hidden] with B, S >= 1, "
                             f"got shape {list(inputs_embeds.shape)}")
        try:
            emb = cast(Any, model).get_input_embeddings()  # a transformers model's method
        except (AttributeError, NotImplementedError):
            emb = None
        if isinstance(emb, nn.Embedding) and inputs_embeds.shape[-1] != emb.embedding_dim:
            raise ValueError(f"inputs_embeds must be [B, S, hidden] with the model's hidden = {emb.embedding_dim}, "
                             f"got shape {list(inputs_embeds.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() < 2:
            raise ValueError(f"attention_mask must be [B, S] (or a model's 4-D mask), got shape "
                             f"{list(attention_mask.shape)}")
        if x is not None and attention_mask.dim() == 2:
            (B, S), (mb, ms) = x.shape[:2], attention_mask.shape
            if mb != B or ms < S or (ms != S and not cached):
                raise ValueError(f"attention_mask must be [B, S] = {[B, S]} (input_ids' shape"
                                 + (", or [B, past + S] with the cache" if cached else "")
                                 + f"), got {list(attention_mask.shape)}")


def _cached(kwargs: Any) -> bool:
    """Whether a model call's keyword arguments hand it a KV cache (its mask then covers the past)."""
    return any(kwargs.get(k) is not None for k in ("past_key_values", "cache"))


def _check_labels(labels: torch.Tensor, vocab: int | None) -> None:
    """Every target (``labels[:, 1:]``) is ``-100`` or a token id in ``[0, vocab)``."""
    if vocab is None or labels.shape[1] < 2 or not values_checked(labels):
        return
    t = labels[:, 1:]
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        v = t[bad]
        raise ValueError(f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX} (no target), got values in "
                         f"[{int(v.min())}, {int(v.max())}]")


def token_losses(
    model: nn.Module,
    *,
    labels: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token cross-entropy of a causal LM, Hugging Face's shift included.

    ``labels [B, S]`` (``-100`` = no target); position ``s`` of the result is the loss of
    predicting ``labels[:, s + 1]``. Returns ``(ce [B, S-1] float32, 0 where there is no
    target; valid [B, S-1] bool)``. Extra keyword arguments go to the model (e.g.
    ``position_ids``).

    ``labels`` of any integer dtype are token ids (taken as int64).

    Raises ``ValueError`` for ``input_ids`` that are not ``[B, S]`` (``inputs_embeds`` not
    ``[B, S, hidden]``), a ``labels`` shape that does not match them or a ``chunk_tokens``
    below 1; ``TypeError`` for ``labels`` that are not a tensor of integers.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    check_token_inputs(model, input_ids, attention_mask, inputs_embeds, cached=_cached(model_kwargs))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids (-100 = no target), got dtype {labels.dtype}")
    given = input_ids if input_ids is not None else inputs_embeds
    assert given is not None  # exactly one of the two (checked above)
    shape = tuple(given.shape[:2])
    if labels.dim() != 2 or tuple(labels.shape) != shape:
        raise ValueError(f"labels must be [B, S] = {list(shape)}, got {list(labels.shape)}")
    labels = labels.long()  # cross_entropy takes int64 targets only (int32 ids, e.g. from numpy)
    inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    split = _split(model)
    if split is None:  # plain path: the model's own logits
        vocab = _vocab(model, "get_output_embeddings")
        _check_labels(labels, vocab)
        logits = model(**inputs, attention_mask=attention_mask, **model_kwargs).logits
        if vocab is None:
            _check_labels(labels, logits.shape[-1])
        targets = labels[:, 1:].to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                               ignore_index=IGNORE_INDEX, reduction="none")
        return ce, targets != IGNORE_INDEX
    body, head = split
    _check_labels(labels, _vocab(head))
    hidden = body(**inputs, attention_mask=attention_mask, **model_kwargs)[0]
    targets = labels[:, 1:].to(hidden.device)
    valid = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][valid], targets[valid]  # only the positions with a target
    parts = []
    fn = functools.partial(_head_ce, head)
    for start in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[start:start + chunk_tokens], y[start:start + chunk_tokens]
        parts.append(checkpoint(fn, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else fn(hc, yc))
    ce = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        ce = ce.masked_scatter(valid, torch.cat(parts))
    return ce, valid


def mean_token_loss(model: nn.Module, **kwargs: Any) -> torch.Tensor:
    """Mean next-token loss over the positions with a target (Hugging Face's ``outputs.loss``),
    by :func:`token_losses`; takes its arguments. A batch without a target gives 0, where
    Hugging Face's loss is NaN; with gradients enabled ``backward`` on it still runs and gives
    the model no gradient (the parameters' ``grad`` stay ``None``: optimizers skip them).

    Example:
        >>> import torch
        >>> from milp.inject import tiny_model
        >>> model, ids = tiny_model("gpt2"), torch.randint(3, 90, (2, 6))
        >>> bool(torch.isclose(mean_token_loss(model, input_ids=ids, labels=ids), model(ids, labels=ids).loss))
        True
    """
    ce, valid = token_losses(model, **kwargs)
    loss = ce.sum() / valid.sum().clamp(min=1)
    if not loss.requires_grad and torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        loss.requires_grad_()  # no target: a constant 0, which backward must still accept
    return loss
