"""The MiLP pipeline stages, as library functions: memory injection, instruction tuning,
response loss, generation and scoring.

The stages (``python -m milp.train`` runs them in this order):

1. **Memory injection** (:func:`memory_inject`): every user gets LoRA adapters on the FFN
   linears laid out by its :class:`~milp.config.MemoryConfig`; the adapters learn the
   user's own history and profile by next-token prediction (labels only on the user's
   content). Many users train together in mixed batches through the multi-user runtime.
2. **Configuration search** (optional, :mod:`milp.train` ``--search``): see there.
3. **Instruction tuning** (:func:`instruction_tune`): a *shared* LoRA on the attention
   projections (:class:`InstructionAdapter`) learns query → response on the training
   users' pairs, with each row running through its own user's (frozen) memory adapters.
   The memory adapters hold what the user said; the shared adapter learns to *answer with
   it*. Because the training and test users are disjoint, the shared adapter is the only
   thing that can transfer from training users to test users: it must learn to use
   memory in general, not memorise answers. The baselines get the same shared adapter,
   so every method has the same instruction-tuning capacity.
4. **Evaluation**: :func:`generate_responses` (mixed-user batches, greedy) and
   :func:`score` (ROUGE-1/ROUGE-L/Persona-F1 of :mod:`milp.metrics`).

Every stage takes optional ``context_fn`` (a per-record system prompt: how the text-prompt
and retrieval baselines personalise) and ``prefix`` (a module mapping records to soft
prompt vectors: how the user-embedding baseline personalises), so the baselines of
:mod:`milp.baselines` run through the very same code.

Example:
    >>> import torch, milp
    >>> from milp.pipeline import add_instruction_adapter
    >>> model = milp.tiny_model("llama")
    >>> adapter = add_instruction_adapter(model, rank=4)
    >>> sum(p.numel() for p in adapter.parameters())
    896
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from .data import IGNORE_INDEX, Record, collate, tokenize_instruction, tokenize_memory
from .detok import AnswerText, cut_at_stops, decode
from .losses import token_losses
from .optim import LossScaling, lr_multiplier, resolve_loss_scaling
from .sampling import (
    MAX_TOP_LOGPROBS,
    LogprobSteps,
    Sampling,
    TokenLogprob,
    check_logprobs,
    pick_tokens,
    row_sampler,
    sampling_per_record,
)

__all__ = [
    "Answer",
    "INSTRUCTION_TARGETS",
    "InstructionAdapter",
    "PrefixEncoder",
    "add_instruction_adapter",
    "generate_responses",
    "get_instruction_adapter",
    "instruction_tune",
    "memory_inject",
    "memory_total_steps",
    "remove_instruction_adapter",
    "response_losses",
    "score",
    "user_content",
]

_QV = ("self_attn.q_proj", "self_attn.v_proj")
#: Attention projections that get the shared instruction adapter, per ``model_type``.
INSTRUCTION_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                     "granite", "stablelm", "cohere", "starcoder2", "phi", "opt"), _QV),
    "phi3": ("self_attn.qkv_proj",),
    "gpt_neox": ("attention.query_key_value",),
    "falcon": ("self_attention.query_key_value",),
    "gpt2": ("attn.c_attn",),
    "roberta": ("attention.self.query", "attention.self.value"),
}

ContextFn = Callable[[Record], "str | None"]
_ADAPTER_ATTR = "_milp_instruction_adapter"


class PrefixEncoder(nn.Module):
    """Protocol-like base for soft-prompt conditioning: ``forward(records) -> [B, P, hidden]``.

    Subclass it (the UeLP baseline does) and pass the instance as ``prefix=`` to the stages;
    its parameters are trained by :func:`instruction_tune` together with the shared adapter.
    """

    def forward(self, records: Sequence[Record]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- shared adapter
class _SharedLoRA(nn.Module):
    """``base(x) + s · (x Aᵀ) Bᵀ`` with ``A``, ``B`` owned by the :class:`InstructionAdapter`."""

    def __init__(self, base: nn.Module, name: str, owner: InstructionAdapter) -> None:
        super().__init__()
        self.base = base
        self.name = name
        object.__setattr__(self, "_owner", owner)  # not a submodule: its parameters stay the adapter's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner: InstructionAdapter = self._owner  # type: ignore[assignment]
        if not owner.enabled:
            return y
        a = owner.lora_A[self.name]
        b = owner.lora_B[self.name]
        # in float32 at least (a bf16/fp16 model), in the model's own float64 where it is one:
        # casting a float64 model's activations to float32 here made its outputs depend, in
        # float32's last bits, on the batch's shape (its padding)
        dt = torch.promote_types(x.dtype, a.dtype)
        return y + (x.to(dt) @ a.t().to(dt) @ b.t().to(dt)).to(y.dtype) * owner.scale


def _linear_shape(m: nn.Module) -> tuple[int, int]:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"instruction adapter target {type(m).__name__} has no 2-D weight")
    if type(m).__name__ == "Conv1D":  # GPT-2: weight [in, out]
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


class InstructionAdapter(nn.Module):
    """The shared LoRA (on attention projections) that instruction tuning trains.

    Built by :func:`add_instruction_adapter`; ``state_dict()`` holds only its ``A``/``B``
    (keys are the wrapped modules' names with ``.`` → ``__``), and ``enabled = False`` turns
    it off without unwrapping (the "memory injection only" ablation).

    Example:
        >>> import milp
        >>> a = add_instruction_adapter(milp.tiny_model("gpt2"), rank=2)
        >>> sorted(a.state_dict())[:1]
        ['lora_A.transformer__h__0__attn__c_attn']
    """

    def __init__(self, rank: int, alpha: float) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.enabled = True
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._wrapped: list[tuple[nn.Module, str, _SharedLoRA]] = []


def _check_rank_alpha(rank: Any, alpha: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def add_instruction_adapter(
    model: nn.Module,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] | None = None,
    seed: int = 0,
) -> InstructionAdapter:
    """Wrap ``model``'s attention projections with a shared LoRA (``B = 0`` at start, so the
    model's output is unchanged) and return the adapter holding the trainable weights.

    ``targets`` are module-name suffixes (default :data:`INSTRUCTION_TARGETS` for the
    model's ``model_type``).

    Example:
        >>> import milp
        >>> m = milp.tiny_model("llama")
        >>> a = add_instruction_adapter(m, rank=4)
        >>> len(a.lora_A), get_instruction_adapter(m) is a
        (4, True)
    """
    _check_rank_alpha(rank, alpha)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if getattr(model, _ADAPTER_ATTR, None) is not None:
        raise ValueError("model already has an instruction adapter; remove_instruction_adapter(model) first")
    if targets is None:
        mt = str(getattr(getattr(model, "config", None), "model_type", ""))
        if mt not in INSTRUCTION_TARGETS:
            raise ValueError(f"no default instruction-adapter targets for model_type {mt!r}; "
                             f"pass targets= (known: {sorted(INSTRUCTION_TARGETS)})")
        targets = INSTRUCTION_TARGETS[mt]
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not all(
            isinstance(t, str) and t for t in targets):
        raise TypeError(f"targets must be a sequence of module-name suffixes (non-empty str), got {targets!r}")
    adapter = InstructionAdapter(rank, float(alpha))
    try:
        gen = torch.Generator().manual_seed(seed)
    except (RuntimeError, ValueError, OverflowError):  # beyond torch's 64-bit seeds
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}") from None
    found = [(n, m) for n, m in model.named_modules() if any(n.endswith("." + t) or n == t for t in targets)]
    if not found:
        raise ValueError(f"model has no module named like {list(targets)}")
    shapes = [_linear_shape(m) for _, m in found]  # every target checked before the model is changed
    for (name, m), (k, d) in zip(found, shapes):
        w = m.weight
        key = name.replace(".", "__")
        a = torch.empty(rank, k, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        adapter.lora_A[key] = nn.Parameter(a.to(w.device))
        adapter.lora_B[key] = nn.Parameter(torch.zeros(d, rank, dtype=torch.float32, device=w.device))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = _SharedLoRA(m, key, adapter)
        setattr(parent, child, wrapper)
        adapter._wrapped.append((parent, child, wrapper))
    object.__setattr__(model, _ADAPTER_ATTR, adapter)
    return adapter


def get_instruction_adapter(model: nn.Module) -> InstructionAdapter | None:
    """The model's :class:`InstructionAdapter`, or ``None``."""
    return getattr(model, _ADAPTER_ATTR, None)


def remove_instruction_adapter(model: nn.Module) -> InstructionAdapter:
    """Unwrap the attention projections; returns the (detached) adapter.

    Example:
        >>> import milp
        >>> m = milp.tiny_model("llama"); _ = add_instruction_adapter(m)
        >>> _ = remove_instruction_adapter(m); get_instruction_adapter(m) is None
        True
    """
    adapter = get_instruction_adapter(model)
    if adapter is None:
        raise ValueError("model has no instruction adapter")
    for parent, child, wrapper in adapter._wrapped:
        setattr(parent, child, wrapper.base)
    adapter._wrapped = []
    object.__delattr__(model, _ADAPTER_ATTR)
    return adapter


# --------------------------------------------------------------------------- helpers
def _progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
              enabled: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def _check_records(records: Any, name: str = "records") -> list[Record]:
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TypeError(f"{name} must be a sequence of Record, got {type(records).__name__}")
    out = list(records)
    for i, r in enumerate(out):
        if not isinstance(r, Record):
            raise TypeError(f"{name}[{i}] must be a Record, got {type(r).__name__}")
    return out


def _pos_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _number(v: Any, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return float(v)


def _check_stage_args(runtime: Any = None, adapter: Any = None, prefix: Any = None, **callables: Any) -> None:
    """The objects a stage takes, refused by name before anything runs (an ``AttributeError``
    or a bare "'int' object is not callable" part-way otherwise)."""
    from .runtime import MilpRuntime

    if runtime is not None and not isinstance(runtime, MilpRuntime):
        raise TypeError(f"runtime must be a milp.MilpRuntime or None, got {type(runtime).__name__}")
    if adapter is not None and not isinstance(adapter, InstructionAdapter):
        raise TypeError(f"adapter must be an InstructionAdapter (add_instruction_adapter) or None, "
                        f"got {type(adapter).__name__}")
    if prefix is not None and not isinstance(prefix, nn.Module):
        raise TypeError(f"prefix must be a PrefixEncoder (an nn.Module mapping records to soft prompts) or None, "
                        f"got {type(prefix).__name__}")
    for name, fn in callables.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its input embeddings' (its first floating-point parameter's
    where it has none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
    return int(pad)


def user_content(record: Record) -> list[str]:
    """The user's own content (profile + history), what Persona-F1 compares against."""
    return ([record.profile] if record.profile.strip() else []) + list(record.history)


def _runtime_users(runtime: Any, records: Sequence[Record], user_key: Callable[[Record], Hashable] | None
                   ) -> list[Hashable | None] | None:
    if runtime is None:
        return None
    key = user_key or (lambda r: r.user_id)
    users = [key(r) for r in records]
    for u in dict.fromkeys(users):
        if u is not None:
            runtime.check_user(u)  # KeyError naming the unknown user (a store's users are known)
    return users


def _batches(runtime: Any, users: list[Hashable | None] | None, batch_size: int,
             order: Sequence[int]) -> Iterator[list[int]]:
    """Groups of row indices in ``order``: ``batch_size`` rows each, split further where a
    store-backed runtime has fewer slots than a group names users (:meth:`MilpRuntime.row_batches`)."""
    if runtime is None or users is None:
        order = list(order)
        return iter([order[s:s + batch_size] for s in range(0, len(order), batch_size)])
    return runtime.row_batches(users, batch_size, order)


def _using(runtime: Any, users: list[Hashable | None] | None,
           rows: Iterable[int]) -> contextlib.AbstractContextManager[Any]:
    """``runtime.using`` the users of ``rows`` (a null context without a runtime)."""
    if runtime is None or users is None:
        return contextlib.nullcontext()
    return runtime.using([users[i] for i in rows])


def _instruction_examples(records: Sequence[Record], tokenizer: Any, context_fn: ContextFn | None,
                          max_length: int, add_response: bool) -> list[dict[str, Any]]:
    out = []
    for r in records:
        system = context_fn(r) if context_fn is not None else None
        out.append(tokenize_instruction(r, tokenizer, max_length=max_length, system_prompt=system or None,
                                        add_response=add_response))
    return out


def _with_prefix(model: nn.Module, prefix: PrefixEncoder | None, records: Sequence[Record],
                 batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs of a batch; with a prefix encoder, ``inputs_embeds`` with the soft prompt
    before each row's first real token (:func:`milp.baselines.prefix_inputs`)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
    if prefix is None:
        out = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = labels
        return out
    from .baselines import prefix_inputs

    return prefix_inputs(model, ids, mask, prefix(list(records)), labels)


# --------------------------------------------------------------------------- stages
def memory_inject(
    runtime: Any,
    records: Sequence[Record],
    tokenizer: Any,
    *,
    steps: int = 10,
    rows_per_user: int = 8,
    max_length: int = 256,
    user_key: Callable[[Record], Hashable] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[Hashable, list[float]]:
    """Write each record's user memory (profile + history) into its user's adapters.

    The users must already be loaded in ``runtime`` (``add_user`` with ``total_steps`` =
    ``steps`` × batches per epoch, the paper's warm-up/decay schedule). ``steps`` epochs over
    each user's memory chunks run in mixed-user batches (``rows_per_user`` rows of each user
    per batch: the paper's batch 8); every user sees exactly the batches it would see trained
    alone. Returns each user's loss after every step (the loss *before* that step's update);
    users whose configuration has no adapter are skipped (an empty list). The users come in the
    records' order, those trained first, then those skipped.

    ``user_key(record)`` names the runtime user of a record (default ``record.user_id``); the
    search uses it to train one user's memory into several *virtual users*.

    Example:
        >>> rt = milp.MilpRuntime(milp.tiny_model("llama"), max_users=2)  # doctest: +SKIP
        >>> rt.add_user("u1", milp.MemoryConfig.uniform(2), total_steps=10)  # doctest: +SKIP
        >>> memory_inject(rt, [record_of_u1], tokenizer, steps=10)  # doctest: +SKIP
        {'u1': [5.1, 4.7, ...]}
    """
    from .runtime import mixed_batches

    records = _check_records(records)
    _pos_int(steps, "steps")
    _pos_int(rows_per_user, "rows_per_user")
    if runtime is None:
        raise TypeError("runtime must be a milp.MilpRuntime holding the records' users, got None")
    _check_stage_args(runtime, user_key=user_key)
    key = user_key or (lambda r: r.user_id)
    chunks_of: dict[Hashable, list[dict[str, Any]]] = {}
    # an ordered set: the history lists the skipped users in the records' order (a set's order of
    # str ids changed with the process's hash seed, PYTHONHASHSEED)
    skipped: dict[Hashable, None] = {}
    for r in records:
        u = key(r)
        runtime.slot(u)  # KeyError naming an unknown user
        if u in chunks_of or u in skipped:
            continue  # one memory per user (records of one user share the history)
        if runtime.num_parameters(u) == 0:  # a configuration without adapters: nothing to inject
            skipped[u] = None
            continue
        chunks = tokenize_memory(r, tokenizer, max_length=max_length)
        if not chunks:
            raise ValueError(f"user {r.user_id!r} has no memory to inject (empty profile and history)")
        chunks_of[u] = chunks
    if not chunks_of:
        return {u: [] for u in skipped}
    device = _device_of(runtime.model)
    pad = _pad_id(tokenizer)
    # mixed_batches schedules chunk *indices* (one-token rows), so each user sees exactly the
    # batches it would see trained alone; the rows are then built from the chunks.
    index_rows = {u: [[i] for i in range(len(c))] for u, c in chunks_of.items()}
    history: dict[Hashable, list[float]] = {u: [] for u in [*chunks_of, *skipped]}
    n_batches = max(math.ceil(len(v) / rows_per_user) for v in chunks_of.values())
    was_training = runtime.model.training
    runtime.model.train()
    skipped_before = sum(runtime.skipped_steps.values())
    try:
        bar = _progress(total=steps * n_batches, desc="memory injection", enabled=progress)
        for epoch in range(steps):
            for idx, _, users in mixed_batches(index_rows, -1, rows_per_user=rows_per_user, seed=seed, epoch=epoch):
                rows = [chunks_of[u][int(i)] for u, i in zip(users, idx[:, 0].tolist())]
                batch = collate(rows, pad)
                losses = runtime.train_step(batch["input_ids"].to(device), users, batch["attention_mask"].to(device),
                                            batch["labels"].to(device))
                for u, v in losses.items():
                    history[u].append(v)
                bar.update(1)
                if losses:  # and the users' steps loss scaling skipped (float16), if any
                    n_skip = sum(runtime.skipped_steps.values()) - skipped_before
                    bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.3f}",
                                    **({"skipped": n_skip} if n_skip else {}))
        bar.close()
    finally:
        runtime.model.train(was_training)
    return history


def memory_total_steps(record: Record, tokenizer: Any, *, steps: int, rows_per_user: int = 8,
                       max_length: int = 256) -> int:
    """Optimizer steps :func:`memory_inject` takes for ``record``'s user (its ``total_steps``
    for :meth:`~milp.runtime.MilpRuntime.add_user`, which sets the warm-up/decay schedule).

    Example:
        >>> memory_total_steps(record, tok, steps=10)  # one chunk of memory  # doctest: +SKIP
        10
    """
    _pos_int(steps, "steps")
    _pos_int(rows_per_user, "rows_per_user")
    n = len(tokenize_memory(record, tokenizer, max_length=max_length))
    return steps * max(1, math.ceil(n / rows_per_user))


def instruction_tune(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    runtime: Any = None,
    adapter: InstructionAdapter | None = None,
    context_fn: ContextFn | None = None,
    prefix: PrefixEncoder | None = None,
    steps: int = 20,
    batch_size: int = 8,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    warmup_ratio: float = 0.1,
    max_length: int = 384,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    all_reduce: Callable[[list[torch.Tensor]], None] | None = None,
    shard: tuple[int, int] | None = None,
    loss_scaling: LossScaling | bool | str | None = "auto",
) -> list[float]:
    """Teach the model to answer: train the shared ``adapter`` (and the ``prefix`` encoder, if
    any) on query → response pairs of ``records`` (labels on the response only).

    With a ``runtime``, row ``b`` runs through the memory adapters of ``records[b]``'s user
    (frozen: only the shared weights learn). ``context_fn(record)`` puts a per-record
    system prompt in front (the text-prompt baselines). AdamW with the paper's settings
    (lr 5e-4, 10% linear warm-up then linear decay, weight decay 1e-4). A step takes the next
    ``batch_size`` examples of a stream of shuffled epochs: a batch may span two epochs (and
    then hold an example twice), and with fewer records than ``batch_size`` a batch is every
    record once. With a store-backed runtime, a batch that names more users than it has free
    slots runs in groups it can place (:meth:`MilpRuntime.row_batches`) whose gradients add up
    to the batch's: the step is the same, to rounding, whatever the slots. ``all_reduce`` is
    called with the gradients before each step (data parallelism across processes).
    ``shard=(rank, world)``: this process is ``rank`` of ``world`` that share every step's batch
    (the same ``seed`` on each: the same batches); it runs rows ``rank::world`` of it, and
    ``all_reduce`` must *sum* the gradients and, last in its list, the step's loss: the step and
    the losses are those of one process, to rounding, whatever ``world``.
    ``loss_scaling``: dynamic loss scaling (``torch.amp.GradScaler`` with the settings of a
    :class:`~milp.optim.LossScaling`); ``"auto"``: on for a float16 model, whose gradients
    underflow otherwise. A step whose gradients overflow is skipped (the learning-rate schedule
    waits for it), as ``GradScaler`` does; every process of a sharded step skips it alike.
    Returns the loss of every step.

    Example:
        >>> losses = instruction_tune(model, tok, train, runtime=rt, adapter=adapter, steps=20)  # doctest: +SKIP
    """
    records = _check_records(records)
    if not records:
        raise ValueError("records must hold at least one example to instruction-tune on")
    _pos_int(steps, "steps")
    _pos_int(batch_size, "batch_size")
    _number(lr, "lr", 0.0)
    _number(weight_decay, "weight_decay", 0.0)
    _number(warmup_ratio, "warmup_ratio", 0.0, 1.0)
    _number(max_grad_norm, "max_grad_norm", 0.0, lo_open=True)
    _check_stage_args(runtime, adapter, prefix, context_fn=context_fn, all_reduce=all_reduce)
    scaling = resolve_loss_scaling(loss_scaling, _compute_dtype(model))
    if shard is not None:
        if (not isinstance(shard, tuple) or len(shard) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in shard) or not 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be a tuple (rank, world) of ints with 0 <= rank < world, got {shard!r}")
        if all_reduce is None:
            raise ValueError("shard needs all_reduce (summing the gradients and the loss of the processes)")
    adapter = adapter if adapter is not None else get_instruction_adapter(model)
    params: list[nn.Parameter] = []
    if adapter is not None and adapter.enabled:  # a disabled adapter is skipped by the forward: no gradient
        params += list(adapter.parameters())
    elif adapter is not None and prefix is None:
        raise ValueError("adapter is disabled (adapter.enabled is False): instruction tuning would train nothing; "
                         "set adapter.enabled = True first")
    if prefix is not None:
        params += [p for p in prefix.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: pass an adapter (add_instruction_adapter) and/or a prefix encoder")
    users = _runtime_users(runtime, records, None)
    examples = _instruction_examples(records, tokenizer, context_fn, max_length, add_response=True)
    pad = _pad_id(tokenizer)
    device = _device_of(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = None if scaling is None else torch.amp.GradScaler(
        device.type, init_scale=scaling.init_scale, growth_factor=scaling.growth_factor,
        backoff_factor=scaling.backoff_factor, growth_interval=scaling.growth_interval)
    skipped = 0
    # LambdaLR counts from 0 (the lr of the first update); lr_multiplier's steps are 1-based
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s + 1, steps, warmup_ratio))
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        bar = _progress(range(steps), desc="instruction tuning", enabled=progress)
        for _ in bar:
            if len(order) < batch_size:
                perm = list(range(len(records)))
                rng.shuffle(perm)
                order += perm
            idx, order = order[:batch_size], order[batch_size:]
            mine = idx if shard is None else idx[shard[0] :: shard[1]]
            opt.zero_grad(set_to_none=True)
            # the rows a store-backed runtime can place at once (one group without a store, or
            # with enough free slots); a step over several groups is the same step: each group's
            # summed token loss over the whole batch's target count (mean_token_loss's division,
            # for one group), gradients accumulated
            groups: list[list[int]] = []  # none for a process beyond the batch's rows (more processes than rows)
            if mine:
                named = None if users is None else [users[i] for i in mine]
                groups = [[mine[j] for j in g] for g in _batches(runtime, named, len(mine), range(len(mine)))]
            parts: list[tuple[list[int], dict[str, Any]]] = []  # (rows, model keyword arguments)
            for g in groups:
                batch = collate([examples[i] for i in g], pad)
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                parts.append((g, _with_prefix(model, prefix, [records[i] for i in g], batch)))
            if shard is None:
                n_targets = sum(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, inputs in parts)
            else:  # the whole batch's, every process's rows, from the token lists (no device read): the
                # shifted labels drop each row's first token, unless a prefix comes before it
                first = 1 if prefix is None else 0
                n_targets = sum(sum(t != IGNORE_INDEX for t in examples[i]["labels"][first:]) for i in idx)
            loss = torch.zeros((), device=device)
            part: torch.Tensor | None
            for g, inputs in parts:
                # gradients go to the trained parameters alone: the memory adapters stay frozen here,
                # and an unfrozen base model gathers no .grad (it used to, step after step)
                with _using(runtime, users, g):
                    part = token_losses(model, **inputs)[0].sum() / max(n_targets, 1)
                    if part.requires_grad:  # not without a target: no gradient, as mean_token_loss gives
                        (part if scaler is None else scaler.scale(part)).backward(inputs=params)
                loss = loss + part.detach()
                # no graph outlives its group: the next group's users may grow the adapter banks
                # (kernels.AdapterBank.reserve swaps their .data), and a live graph keeps the banks'
                # gradient accumulators at the old shape, which the next backward then fails on
                part = None
            if all_reduce is not None:
                grads: list[torch.Tensor] = []
                for p in params:  # reduce into .grad itself: a rank without a gradient still gets the others'
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
                all_reduce(grads + ([loss] if shard is not None else []))
            if scaler is None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
            else:  # unscaled before clipping; a step with inf/NaN gradients skipped, the scale backed off
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                if scaler.get_scale() < before:
                    skipped += 1
                else:
                    sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"skipped": skipped} if skipped else {}))
        bar.close()
    finally:
        model.train(was_training)
        opt.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def response_losses(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    runtime: Any = None,
    user_key: Callable[[Record], Hashable] | None = None,
    context_fn: ContextFn | None = None,
    prefix: PrefixEncoder | None = None,
    batch_size: int = 8,
    max_length: int = 384,
) -> list[float]:
    """Mean cross-entropy of each record's response given its query (the validation loss the
    search minimises), one float per record, in order. Batches hold ``batch_size`` records,
    fewer where a store-backed ``runtime`` has fewer free slots than a batch names users.

    Example:
        >>> response_losses(model, tok, val_records, runtime=rt)  # doctest: +SKIP
        [2.31, 2.08]
    """
    records = _check_records(records)
    _pos_int(batch_size, "batch_size")
    _check_stage_args(runtime, None, prefix, user_key=user_key, context_fn=context_fn)
    users = _runtime_users(runtime, records, user_key)
    examples = _instruction_examples(records, tokenizer, context_fn, max_length, add_response=True)
    pad = _pad_id(tokenizer)
    device = _device_of(model)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(runtime, users, batch_size, range(len(records))):
            batch = collate([examples[i] for i in idx], pad)
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            inputs: dict[str, Any] = _with_prefix(model, prefix, [records[i] for i in idx], batch)  # model kwargs
            labels = inputs.pop("labels")
            with _using(runtime, users, idx):
                ce, valid = token_losses(model, labels=labels, **inputs)
            out += (ce.sum(1) / valid.sum(1).clamp(min=1)).tolist()
    finally:
        model.train(was_training)
    return out


class Answer(str):
    """A generated answer: its text (a ``str``: it compares, hashes, prints and serialises as
    that text), with how it was generated, as :func:`generate_responses` gives it.

    Attributes:
        prompt_tokens: the prompt's length in tokens.
        new_tokens: the tokens generated for it: up to and including its end-of-text token, up
            to the one that completed a stop string, or its ``max_new_tokens``.
        finish_reason: ``"stop"`` (its end-of-text token or a stop string ended it), ``"length"``
            (its ``max_new_tokens`` did) or ``"cancelled"`` (``stop(i)`` did).
        logprobs: where they were asked for (``generate_responses(logprobs=)``), one
            :class:`milp.sampling.TokenLogprob` per token generated (``new_tokens`` of them, the
            end-of-text token included); else ``None``.

    Example:
        >>> a = Answer("Rest and drink water.", 31, 7, "stop")
        >>> a == "Rest and drink water.", a.new_tokens, a.finish_reason
        (True, 7, 'stop')
    """

    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None

    def __new__(cls, text: str, prompt_tokens: int, new_tokens: int, finish_reason: str,
                logprobs: Sequence[TokenLogprob] | None = None) -> Answer:
        self = super().__new__(cls, text)
        self.prompt_tokens, self.new_tokens, self.finish_reason = prompt_tokens, new_tokens, finish_reason
        self.logprobs = tuple(logprobs) if logprobs is not None else None
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # pickle and copy: the text and the attributes
        return (Answer, (str(self), self.prompt_tokens, self.new_tokens, self.finish_reason, self.logprobs))


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    runtime: Any = None,
    context_fn: ContextFn | None = None,
    prefix: PrefixEncoder | None = None,
    max_new_tokens: int | Sequence[int] = 64,
    batch_size: int = 8,
    max_length: int = 384,
    progress: bool = True,
    stream: Callable[[int, str], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    sampling: Sampling | Sequence[Sampling | None] | None = None,
    batching: str = "static",
    stop_strings: Sequence[str] | Sequence[Sequence[str] | None] | None = None,
    logprobs: int | Sequence[int | None] | None = None,
) -> list[Answer]:
    """Greedy (or sampled: ``sampling``) answers to each record's query, with the record's user's
    adapters (mixed-user batches through the runtime), in order: each an :class:`Answer`, its
    text with its token counts and why it ended. Batches hold ``batch_size``
    records, fewer where a store-backed ``runtime`` has fewer free slots than a batch names users.

    ``max_new_tokens``: the longest answer, one for all or one per record. Records of different
    lengths share a batch: it generates for its longest, and a row that reached its own length
    ends there (its answer is the one it gets with that length), as it does at the end-of-text
    token.

    ``stream(i, text)``, where given, is called as the tokens come with record ``i``'s answer so
    far: each text extends the one before (trailing whitespace and an incomplete UTF-8
    character are held back until what follows them comes), and the last one is the returned
    answer. (A tokenizer that re-spelled text it had decoded, on seeing more tokens, would pause
    the stream until a text extends the last one again: the returned answer is the authority.)
    It runs in the generating thread, once per row and step at most: keep it short.

    ``stop(i)``, where given, is asked after each generated token whether record ``i``'s answer
    ends there (a server's request whose client left, say): ``True`` ends it with the tokens so
    far, which are its answer, and its row takes no more of the batch's steps (a batch whose rows
    all ended stops generating). It is asked once per row and step until it says ``True`` or the
    row reaches its ``max_new_tokens`` (rows that ended at the end-of-text token included), in the
    generating thread: keep it short.

    ``sampling``: a :class:`milp.sampling.Sampling` for every record, or one per record (``None``:
    greedy, the default). Each record samples with its own generator, seeded by its sampling's
    seed (one drawn from torch's global generator where it has none): a record's answer does not
    depend on the records batched with it, and is the one :class:`milp.decode.ContinuousBatch`
    gives it with that sampling.

    ``stop_strings``: texts that end an answer, for every record (a sequence of strings) or one
    sequence (or ``None``) per record: an answer ends once its text holds one of them, and is its
    text before the first one (the stop string is not part of it). A stream holds back a text's
    end while it could be the start of a stop string.

    ``logprobs``: where given (for every record, or one per record, ``None`` for none), each
    answer's :attr:`Answer.logprobs` holds every generated token's log-probability under the
    model with this many of the most likely alternatives (0 to 20): a
    :class:`milp.sampling.TokenLogprob` per token. The same with either batching, computed step
    by step (static batching: from each forward's logits, :class:`milp.sampling.LogprobSteps`).

    ``batching``: ``"static"`` (the default) answers each batch of ``batch_size`` records with one
    ``generate`` call, run to its longest answer; ``"continuous"`` runs them through a
    :class:`milp.decode.ContinuousBatch` of ``batch_size`` rows, where a record takes the place of
    one whose answer ended (its end-of-text token, its length, ``stop``): fewer steps where answers
    end early, the same answers (each is the one its record gets alone, either way). ``"auto"``:
    continuous where the model allows it (:func:`milp.decode.continuous_unsupported`; not with
    a ``prefix``), static otherwise.

    Example:
        >>> generate_responses(model, tok, test_records, runtime=rt, max_new_tokens=32)  # doctest: +SKIP
        ['You should rest and drink water ...']
    """
    records = _check_records(records)
    _pos_int(batch_size, "batch_size")
    limits = _per_record_lengths(max_new_tokens, len(records))
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable (record index, answer so far) or None, got "
                        f"{type(stream).__name__}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable (record index) -> bool or None, got {type(stop).__name__}")
    _check_stage_args(runtime, None, prefix, context_fn=context_fn)
    if batching not in ("static", "continuous", "auto"):
        raise ValueError(f"batching must be 'static', 'continuous' or 'auto', got {batching!r:.40}")
    samplings = sampling_per_record(sampling, len(records))
    stops = _stops_per_record(stop_strings, len(records))
    tops = _logprobs_per_record(logprobs, len(records))
    users = _runtime_users(runtime, records, None)
    examples = _instruction_examples(records, tokenizer, context_fn, max_length, add_response=False)
    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = _device_of(model)
    # longest prompts first: less padding per batch
    order = sorted(range(len(records)), key=lambda i: -len(examples[i]["input_ids"]))
    if batching != "static" and records:
        from .decode import continuous_unsupported

        reach = max(len(e["input_ids"]) for e in examples) + max(limits)
        why = "a prefix encoder gives the prompts as embeddings" if prefix is not None else \
            continuous_unsupported(model, reach)
        if why is None:
            return _continuous_responses(model, tokenizer, examples, order, limits, runtime, users, batch_size,
                                         samplings, progress, stream, stop, stops, tops)
        if batching == "continuous":
            raise ValueError(f"batching='continuous': the model cannot be decoded so: {why}")
    answers: dict[int, Answer] = {}
    from .decode import _eos_ids

    ends_at = _eos_ids(model, eos)  # generate's: the tokenizer's, else the model's
    was_training = model.training
    model.eval()
    try:
        bar = _progress(total=len(records), desc="generation", enabled=progress)
        for idx in _batches(runtime, users, batch_size, order):
            batch = collate([{"input_ids": examples[i]["input_ids"]} for i in idx], pad, padding_side="left")
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            inputs = _with_prefix(model, prefix, [records[i] for i in idx], batch)
            ends = [limits[i] for i in idx]
            n = max(ends)
            kwargs: dict[str, Any] = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad)
            if eos is not None:  # None would override the model's own generation_config.eos_token_id
                kwargs["eos_token_id"] = eos
            row_stops = [stops[i] for i in idx]
            # with input_ids the output repeats the prompt; with inputs_embeds it holds new tokens only
            offset = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
            stopper = _StopRows(list(idx), stop, ends, row_stops, tokenizer, offset, ends_at) if (
                stop is not None or min(ends) < n or any(row_stops)) else None
            if stopper is not None:
                from transformers import StoppingCriteriaList

                kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
            samplers = [row_sampler(samplings[i]) for i in idx]
            if any(samplers):  # generate stays greedy: the processor leaves it one token to pick per row
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList([_sample_rows(samplers)])
            streamer = _AnswerStream(tokenizer, list(idx), stream, stopper, row_stops, ends_at) if (
                stream is not None) else None
            if streamer is not None:
                kwargs["streamer"] = streamer
            kwargs.update(_growing_cache(model, inputs["attention_mask"].shape[1] + n))
            row_tops = [tops[i] for i in idx]
            # the tokens' logprobs, from each forward's raw logits (one step's held at a time)
            recorder = LogprobSteps(row_tops) if any(k is not None for k in row_tops) else None
            lm = cast(Any, model)  # a transformers model: generate()
            with contextlib.ExitStack() as stack:
                if recorder is not None:
                    stack.callback(lm.register_forward_hook(recorder.hook, with_kwargs=True).remove)
                if runtime is not None and users is not None:
                    stack.enter_context(runtime.using([users[i] for i in idx]))
                out = lm.generate(**inputs, **kwargs)
            steps = recorder.finish(out, offset) if recorder is not None else []
            for j, (i, row) in enumerate(zip(idx, out[:, offset:].tolist())):
                if stopper is not None and stopper.ended[j] is not None:  # without an eos, generate goes on
                    row = row[:stopper.ended[j]]  # filling an ended row with tokens, not padding
                answers[i] = _answer(tokenizer, row, stops[i], ends_at, limits[i], len(examples[i]["input_ids"]))
                if tops[i] is not None:
                    answers[i].logprobs = tuple(cast(TokenLogprob, s[j]) for s in steps[:answers[i].new_tokens])
            if streamer is not None:
                streamer.finish([answers[i] for i in idx])
            bar.update(len(idx))
        bar.close()
    finally:
        model.train(was_training)
    return [answers[i] for i in range(len(records))]


def _continuous_responses(model: nn.Module, tokenizer: Any, examples: list[dict[str, Any]], order: list[int],
                          limits: list[int], runtime: Any, users: list[Hashable | None] | None, rows: int,
                          samplings: list[Sampling | None], progress: bool, stream: Callable[[int, str], None] | None,
                          stop: Callable[[int], bool] | None, stops: list[tuple[str, ...]],
                          tops: list[int | None]) -> list[Answer]:
    """:func:`generate_responses` with ``batching="continuous"``: the records in ``order`` join a
    :class:`milp.decode.ContinuousBatch` of ``rows`` rows as places free up (a store-backed
    runtime's: as their users fit beside the running rows')."""
    from collections import deque

    batch = _continuous_batch(model, tokenizer, runtime, rows)
    waiting = deque(order)
    answers: dict[int, Answer] = {}
    texts: dict[int, AnswerText] = {}  # the running rows' texts, where they are read (stop strings, a stream)
    logprobs: dict[int, list[TokenLogprob]] = {}  # the running rows' tokens' logprobs, where asked for
    # its extend-only hand-over, row j being record j
    streamer = _AnswerStream(tokenizer, list(range(len(examples))), stream) if stream is not None else None
    bar = _progress(total=len(order), desc="generation", enabled=progress)
    try:
        while waiting or len(batch):
            while waiting and batch.can_join(users[waiting[0]] if users is not None else None):
                i = waiting.popleft()
                batch.join(i, examples[i]["input_ids"], limits[i], users[i] if users is not None else None,
                           sampling=samplings[i], logprobs=tops[i])
                if stops[i] or streamer is not None:
                    texts[i] = AnswerText(tokenizer, stops[i])
            for u in batch.step():
                if u.error is not None:
                    raise u.error
                i = cast(int, u.key)
                if u.logprob is not None:
                    logprobs.setdefault(i, []).append(u.logprob)
                answer = _row_answer(batch, tokenizer, u, texts.get(i),
                                     stop=functools.partial(stop, i) if stop else None, limit=limits[i],
                                     prompt_tokens=len(examples[i]["input_ids"]))
                if answer is None:
                    if streamer is not None:
                        streamer._hand(i, texts[i].partial())
                    continue
                answers[i] = answer
                texts.pop(i, None)
                if tops[i] is not None:
                    answer.logprobs = tuple(logprobs.pop(i, [])[:answer.new_tokens])
                if streamer is not None:
                    streamer._hand(i, answer)
                bar.update(1)
    finally:
        batch.close()
    bar.close()
    return [answers[i] for i in range(len(examples))]


def _continuous_batch(model: nn.Module, tokenizer: Any, runtime: Any, rows: int,
                      prefill_chunk: int | None = None, max_length: int | None = None, compile: bool = False) -> Any:
    """A :class:`milp.decode.ContinuousBatch` of ``rows`` rows that ends a row at the tokenizer's
    end-of-text token and pads with its pad token, as :func:`generate_responses`' ``generate`` does
    (``prefill_chunk``, ``max_length``, ``compile``: the batch's)."""
    from .decode import ContinuousBatch

    return ContinuousBatch(model, eos_token_id=getattr(tokenizer, "eos_token_id", None),
                           pad_token_id=_pad_id(tokenizer), runtime=runtime, max_rows=rows,
                           prefill_chunk=prefill_chunk, max_length=max_length, compile=compile)


def _row_answer(batch: Any, tokenizer: Any, update: Any, text: AnswerText | None,
                stop: Callable[[], bool] | None = None, *, limit: int, prompt_tokens: int) -> Answer | None:
    """The answer of the row of a :meth:`ContinuousBatch.step` ``update`` once the row ended: at
    its own end, or here, where its text holds one of its stop strings or ``stop()`` says ``True``
    (asked only while the row runs), the row then leaving ``batch``. ``None`` while it runs on.
    ``text``: the row's :class:`~milp.detok.AnswerText`, with its stop strings, given the update's
    tokens here (``None``: a row without stop strings whose text no stream reads). ``limit``: the
    row's ``max_new_tokens``; ``prompt_tokens``: its prompt's length."""
    if text is not None:
        text.update(update.tokens)
    if not update.done and not ((stop is not None and stop()) or (text is not None and text.stopped)):
        return None
    if not update.done:
        batch.leave(update.key)  # its answer ends with the tokens so far
    return _answer(tokenizer, update.tokens, text.stops if text is not None else (), batch.eos, limit, prompt_tokens)


def _per_record_lengths(max_new_tokens: Any, n: int) -> list[int]:
    """``max_new_tokens`` (an int, or one per record) as one int per record of ``n``."""
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        return [_pos_int(max_new_tokens, "max_new_tokens")] * n
    if isinstance(max_new_tokens, (str, bytes)) or not isinstance(max_new_tokens, Sequence):
        raise ValueError(f"max_new_tokens must be an int >= 1 or a sequence of them, one per record, got "
                         f"{max_new_tokens!r:.60}")
    if len(max_new_tokens) != n:
        raise ValueError(f"max_new_tokens must give one length per record: got {len(max_new_tokens)} for {n} records")
    return [_pos_int(v, f"max_new_tokens[{i}]") for i, v in enumerate(max_new_tokens)]


class _StopRows:
    """A ``generate`` stopping criterion (transformers' ``StoppingCriteria`` protocol) that ends
    each row once it has ``limits[row]`` new tokens, once ``stop(record index)`` says ``True``
    (asked after each step until then), or once its text (its new tokens from ``offset``) holds
    one of its ``stops`` (stop strings); :attr:`ended` holds per row the number of new tokens it
    ended with (``None``: not ended here, at the end-of-text token or the batch's own
    ``max_new_tokens`` alone). The rows' flags go to the device only when one changed: no copy
    on most steps."""

    def __init__(self, rows: list[int], stop: Callable[[int], bool] | None, limits: list[int],
                 stops: list[tuple[str, ...]] | None = None, tokenizer: Any = None, offset: int = 0,
                 eos: frozenset[int] = frozenset()) -> None:
        self.rows, self.stop, self.limits = rows, stop, limits
        self.offset, self.eos = offset, eos
        # each row's text, decoded as its tokens come (only where it has stop strings to look for)
        self.texts = [AnswerText(tokenizer, s) if s else None for s in (stops or [()] * len(rows))]
        self.ended: list[int | None] = [None] * len(rows)
        self.steps = self.read = 0  # generate's steps so far; new tokens read
        self.flags: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.steps += 1
        changed = self.flags is None
        # stop strings read the rows' new tokens (a copy to the host per step, only where some are given)
        new = input_ids[:, self.offset + self.read:].tolist() if any(self.texts) else None
        self.read = input_ids.shape[1] - self.offset
        for j, i in enumerate(self.rows):
            text = self.texts[j]
            if text is not None and new is not None and self.ended[j] is None and not _ended_at(text, self.eos):
                text.extend(new[j])
            if self.ended[j] is None and (self.steps >= self.limits[j] or (self.stop is not None and self.stop(i))
                                          or (text is not None and text.stopped)):
                self.ended[j], changed = self.steps, True
        if changed:
            self.flags = torch.tensor([e is not None for e in self.ended], dtype=torch.bool, device=input_ids.device)
        assert self.flags is not None
        return self.flags


def _ended_at(text: AnswerText, eos: frozenset[int]) -> bool:
    """Whether the answer ``text`` holds ended at an end-of-text token (``generate`` pads it after)."""
    return bool(text.tokens) and text.tokens[-1] in eos


def _growing_cache(model: nn.Module, reach: int) -> dict[str, Any]:
    """``generate``'s cache argument for a batch that grows to ``reach`` columns: a
    :class:`milp.kvcache.GrowingCache` (written in place, not copied each step) where it is the
    cache ``generate`` would use (full attention, no cache implementation asked for), else none."""
    from .decode import growing_cache_unsupported
    from .kvcache import GrowingCache, cache_argument

    gc = getattr(model, "generation_config", None)
    if getattr(gc, "cache_implementation", None) is not None or growing_cache_unsupported(model, reach) is not None:
        return {}
    name = cache_argument(model)
    return {name: GrowingCache(reach=reach)} if name is not None else {}


def _sample_rows(samplers: list[Any]) -> Any:
    """A ``generate`` logits processor that picks each row's token with its sampler
    (:func:`milp.sampling.pick_tokens`; ``None``: the most likely) and leaves that token alone
    finite, so that greedy ``generate`` takes it."""
    from transformers import LogitsProcessor

    class SampleRows(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            tokens = pick_tokens(scores, samplers)
            return torch.full_like(scores, -math.inf).scatter_(1, tokens[:, None], 0.0)

    return SampleRows()


def _logprobs_per_record(logprobs: Any, n: int) -> list[int | None]:
    """``logprobs`` (an int or ``None`` for every record, or one per record) as one per record of ``n``."""
    if logprobs is None or isinstance(logprobs, numbers.Integral):
        return [check_logprobs(logprobs)] * n
    if isinstance(logprobs, (str, bytes)) or not isinstance(logprobs, Sequence) or len(logprobs) != n:
        raise ValueError(f"logprobs must be None, an int in [0, {MAX_TOP_LOGPROBS}], or a sequence of them (one per "
                         f"record, {n} in all), got {logprobs!r:.60}")
    return [check_logprobs(v, f"logprobs[{i}]") for i, v in enumerate(logprobs)]


def _stops_per_record(stop_strings: Any, n: int) -> list[tuple[str, ...]]:
    """``stop_strings`` (strings for every record, or one sequence or ``None`` per record) as one
    tuple per record of ``n``."""
    def checked(v: Any, name: str) -> tuple[str, ...]:
        if v is None:
            return ()
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(isinstance(t, str) and t for t in v):
            raise ValueError(f"{name} must be a sequence of non-empty strings, got {v!r:.60}")
        return tuple(v)

    if stop_strings is None or (isinstance(stop_strings, Sequence) and not isinstance(stop_strings, (str, bytes))
                                and all(isinstance(t, str) for t in stop_strings)):
        return [checked(stop_strings, "stop_strings")] * n
    if isinstance(stop_strings, (str, bytes)) or not isinstance(stop_strings, Sequence) or len(stop_strings) != n:
        raise ValueError(f"stop_strings must be a sequence of strings (for every record) or one sequence of them "
                         f"(or None) per record, {n} in all; got {stop_strings!r:.60}")
    return [checked(v, f"stop_strings[{i}]") for i, v in enumerate(stop_strings)]


def _answer(tokenizer: Any, ids: Sequence[int], stops: Sequence[str], eos: frozenset[int], limit: int,
            prompt_tokens: int) -> Answer:
    """The :class:`Answer` of a row's generated tokens ``ids`` (after its end-of-text token, if
    any, only padding): its text (:func:`_answer_text`), its new tokens, why it ended."""
    text, hit = cut_at_stops(decode(tokenizer, ids), stops)
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
    n = len(ids) if end is None else end
    why = "stop" if end is not None or hit else ("length" if n >= limit else "cancelled")
    return Answer(text.strip(), prompt_tokens, n, why)


def _answer_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[str] = ()) -> str:
    """An answer's text from its generated tokens: special tokens skipped, cut before the first
    of its stop strings, stripped."""
    return cut_at_stops(decode(tokenizer, ids), stops)[0].strip()


class _AnswerStream:
    """A ``generate`` streamer (transformers' ``BaseStreamer`` protocol: ``put``, ``end``) that
    hands ``callback(record index, answer so far)`` each row's decoded answer as its tokens
    come: the text as :func:`generate_responses` decodes it (special tokens skipped, stripped),
    without trailing whitespace or a trailing incomplete UTF-8 character (the next token may
    complete them, or the answer end there and drop them), and only when it extends what was
    handed before. :meth:`finish` hands over the final answers."""

    def __init__(self, tokenizer: Any, rows: list[int], callback: Callable[[int, str], None],
                 stopper: _StopRows | None = None, stops: list[tuple[str, ...]] | None = None,
                 eos: frozenset[int] = frozenset()) -> None:
        self.tokenizer, self.rows, self.callback = tokenizer, rows, callback
        self.stops = stops or [()] * len(rows)
        self.stopper = stopper  # a row it ended takes no more tokens (without an eos, generate gives some)
        self.eos = eos  # nor does a row after its end-of-text token (generate pads it)
        self.texts = [AnswerText(tokenizer, s) for s in self.stops]
        self.sent = [""] * len(rows)
        self.prompt_seen = False

    def _hand(self, j: int, text: str) -> None:
        if len(text) > len(self.sent[j]) and text.startswith(self.sent[j]):
            self.sent[j] = text
            self.callback(self.rows[j], text)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put: the prompts (or an empty tensor with embeddings)
            self.prompt_seen = True
            return
        for j, new in enumerate(value.reshape(len(self.rows), -1).tolist()):
            ended = self.stopper.ended[j] if self.stopper is not None else None
            text = self.texts[j]
            if (ended is not None and len(text.tokens) >= ended) or _ended_at(text, self.eos):
                continue
            text.extend(new)
            self._hand(j, text.partial())

    def end(self) -> None:
        pass  # the answers come with finish(), decoded from generate's output

    def finish(self, answers: list[str]) -> None:
        for j, a in enumerate(answers):
            self._hand(j, a)


def score(records: Sequence[Record], predictions: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-L (F-measure ×100, stemmed) against each record's response, and
    Persona-F1 (×100) against the user's own content (profile + history).

    Example:
        >>> r = Record("u", "I run marathons", ["My knee hurts"], "What now?", "Rest your knee.")
        >>> {k: round(v, 1) for k, v in score([r], ["Rest the knee."]).items()}
        {'rouge1': 66.7, 'rougeL': 66.7, 'persona_f1': 33.3}
    """
    from .metrics import persona_f1, rouge_scores

    records = _check_records(records)
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a sequence of str (one per record), got {type(predictions).__name__}")
    if len(predictions) != len(records):
        raise ValueError(f"predictions has {len(predictions)} entries, records {len(records)}")
    rs = rouge_scores(list(predictions), [r.response for r in records])
    out = {"rouge1": rs["rouge1"], "rougeL": rs["rougeL"]}
    out["persona_f1"] = persona_f1(list(predictions), [user_content(r) for r in records])
    return out
