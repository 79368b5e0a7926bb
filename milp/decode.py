"""Continuous batching: decoding whose rows join and leave a running batch between steps.

:func:`milp.pipeline.generate_responses` answers a batch with one ``generate`` call: a request
that arrives while it runs waits for the whole batch to end, and a row that ended (at its
end-of-text token, its own length, or cancelled) keeps its place, and its share of each step's
compute, until the longest row is done. :class:`ContinuousBatch` runs the decode loop itself, so
that between two steps

* a row that ended leaves: its rows of the key/value cache are dropped (and the cache's leading
  columns, once they are padding for every row left);
* new rows join: their prompts are prefilled together (left-padded; with ``prefill_chunk``, a
  chunk of their columns per step, beside the running rows' decode, so that a long prompt
  delays the running rows' next token by a chunk's time, not its whole prefill's), and their
  caches are padded on the left to the running batch's length and appended to it;

and each step is one forward of the running rows (one token each) through the model, every row
with its own user's adapters (one :meth:`milp.runtime.MilpRuntime.using` block per set of rows,
kept open while the set does not change: the batch plan is built once per set, not per step).

A row's tokens are the ones ``generate(do_sample=False)`` gives its prompt alone (left padding is
masked; positions count each row's own tokens), which the tests check on every supported
architecture. A row may sample instead (``join(sampling=)``, :mod:`milp.sampling`): its own seeded
generator makes its tokens the ones :func:`milp.pipeline.generate_responses` samples for it, beside
any other rows. Models it cannot decode this way are named by :func:`continuous_unsupported`
(a generation config that changes greedy choices, such as a repetition penalty, or a sliding
attention window shorter than a row can grow): use ``generate`` for those.

A grouped-query attention model (``sdpa``) decodes with its query heads packed per key/value head
(:func:`packed_sdpa_attention`): attention reads each cached column once, not once per query head
as transformers does under ``torch.compile`` (and eagerly too in 4.57, which has no packing of
its own). Measured (2-core
CPU, a 4-layer hidden-512 LLaMA with 16 query and 2 key/value heads, 16 rows at 1500 columns):
a static-cache step 14 ms compiled against 125 ms unpacked; 13 ms eager against 182 ms under
transformers 4.57.

The key/value cache is a :class:`milp.kvcache.GrowingCache`: each step's keys and values are
written in place into buffers with room (not appended with a ``torch.cat`` of the whole cache per
layer and step, as ``DynamicCache`` does), the room capped by what the running rows can still
grow (their ``max_new_tokens``), with rows for ``max_rows``. A row that joins is written after
the running rows (its prompt right-aligned to their columns; one that is longer than they are
moves the cache to new buffers once), and a row that leaves has its place taken by the last row:
a join or a leave copies the rows that change, not the others. A row's cache spans the longest
row's length since the oldest running row joined: a reference loop on Hugging Face models, not
a paged-attention engine. Measured (2-core CPU, a 4-layer hidden-512 LLaMA, 16 rows, 48
requests of 600–1000-token prompts and 8–64-token answers): 11.5 s, against 16.8 s with
``DynamicCache`` and the whole cache copied at each join and leave, the same tokens.

With ``max_length`` the cache is static instead (:class:`milp.kvcache.SlotCache`): ``max_rows``
rows of ``max_length`` columns, allocated once; a row's prompt is written into the first free row
from column 0, and a row that leaves has its row taken by the last running one (that row's cache
copied), so that the running rows are the cache's first. A decode step runs the first ``b`` rows,
``b`` the smallest of a few row buckets (``row_buckets``, :func:`static_row_buckets`) that holds
the running rows (a free one among them on a pad token, without adapters; its logits unused),
over the first ``width`` columns, the smallest of :func:`static_widths` that holds the longest
running row, with an attention mask that hides each row's columns past its own. A step's shapes
then depend on the bucket and the width alone, so ``compile=True`` compiles it once per pair (by
default at most 4 × 8) and replays that graph whoever joins and leaves: on a GPU with CUDA graphs,
where an eager step of a small model is bound by the host (one launch per op per layer, three
more per adapted linear). The adapters read the runtime's static plan of the decode shape
(:meth:`milp.inject.MilpState.prepare_static`), rewritten in place when the rows' users change;
each layer's write into the cache is an opaque op (:func:`milp.kvcache.slot_cache_step`), which
no backend turns into a copy of the cache. The prefills stay eager. On this CPU a compiled step
gains nothing (inductor: 0.41 s against 0.37 s eager for ``bench/test_continuous.py``'s
small queue, after a 29 s compile): it is for GPUs.

Example:
    >>> from milp.inject import tiny_model
    >>> batch = ContinuousBatch(tiny_model("llama"), eos_token_id=[], max_rows=4)  # rows end at their length
    >>> batch.join("a", [5, 6, 7], max_new_tokens=3)
    >>> [(u.key, len(u.tokens), u.done) for u in batch.step()]   # "a" prefilled: its first token
    [('a', 1, False)]
    >>> batch.join("b", [9, 4], max_new_tokens=1)                # joins while "a" runs
    >>> [(u.key, len(u.tokens), u.done) for u in batch.step()]
    [('a', 2, False), ('b', 1, True)]
    >>> [(u.key, len(u.tokens), u.done) for u in batch.step()]
    [('a', 3, True)]
    >>> len(batch)
    0
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import types
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kernels import nvtx_range

from .cudagraphs import BACKEND, register
from .kvcache import GrowingCache, GrowingLayer, SlotCache, cache_argument, stack_rows
from .sampling import Sampling, TokenLogprob, check_logprobs, pick_tokens, row_sampler, token_logprobs

__all__ = ["PACKED_SDPA", "ContinuousBatch", "Update", "continuous_unsupported", "packed_sdpa_attention",
           "static_row_buckets", "static_widths"]

#: generation-config settings that change which token greedy decoding picks, and their neutral values
_GREEDY_CHANGERS: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "min_length": 0,
    "min_new_tokens": None, "num_beams": 1, "penalty_alpha": None, "watermarking_config": None,
}


def continuous_unsupported(model: nn.Module, reach: int | None = None) -> str | None:
    """Why :class:`ContinuousBatch` cannot decode ``model`` as ``generate(do_sample=False)``
    does (``None``: it can): not a Hugging Face causal LM with a key/value cache, a generation
    config whose settings change greedy choices (``repetition_penalty``, ``no_repeat_ngram_size``,
    ``bad_words_ids``, ...), or a sliding attention window shorter than ``reach`` (the longest
    prompt plus answer a row may hold; ``None``: any window is refused).

    Example:
        >>> from milp.inject import tiny_model
        >>> continuous_unsupported(tiny_model("llama")) is None
        True
        >>> continuous_unsupported(tiny_model("mistral", sliding_window=16), reach=64)
        'its sliding attention window (16 tokens) is shorter than a row may grow (64 tokens)'
    """
    why = growing_cache_unsupported(model, reach)
    if why is not None:
        return why
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        for name, neutral in _GREEDY_CHANGERS.items():
            v = getattr(gc, name, None)
            if v is not None and v != neutral and v not in ((), [], 0):  # transformers 5: None = unset
                return f"its generation config sets {name}={v!r}, which changes greedy decoding"
    return None


def growing_cache_unsupported(model: nn.Module, reach: int | None = None) -> str | None:
    """Why a :class:`milp.kvcache.GrowingCache` (full attention over every cached token) is not
    the key/value cache ``generate`` would give ``model`` (``None``: it is): the first reasons of
    :func:`continuous_unsupported`, and a sliding window shorter than ``reach``."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        return "it is not a Hugging Face causal LM (no config or generate())"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if not getattr(config, "use_cache", True):
        return "its config turns the key/value cache off (use_cache=False)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and (reach is None or window < reach):
        return (f"its sliding attention window ({window} tokens) is shorter than a row may grow "
                + (f"({reach} tokens)" if reach is not None else "(no reach given)"))
    return None


@dataclass
class Update:
    """What one :meth:`ContinuousBatch.step` did to a row: ``tokens`` are all of its tokens so far
    (the new one last; an end-of-text token included, as ``generate`` gives it); ``done``: the row
    ended (end-of-text token, ``max_new_tokens`` reached, or ``error``) and has left the batch.
    ``error``: the exception its prefill raised (it then has no tokens), or the step's forward
    (every running row gets it, and the batch is empty after it). ``logprob``: the new token's
    :class:`milp.sampling.TokenLogprob`, where the row asked for them (``join(logprobs=)``)."""

    key: Hashable
    tokens: list[int]
    done: bool
    error: BaseException | None = None
    logprob: TokenLogprob | None = None


@dataclass
class _Row:
    key: Hashable
    prompt: list[int]
    limit: int
    user: Hashable | None
    sampler: Any = None  # its milp.sampling row sampler (None: greedy)
    tops: int | None = None  # the alternatives its tokens' logprobs list (None: no logprobs)
    tokens: list[int] = field(default_factory=list)
    logprob: TokenLogprob | None = None  # its last token's
    slot: int = -1  # its row of the static cache (max_length)


@dataclass
class _Prefill:
    """Rows that joined together, their prompts being prefilled (a chunk of columns per step
    with ``prefill_chunk``, else all at once): ``ids``/``mask``/``positions`` of the distinct
    (prompt, user) pairs, left-padded, and ``users``; ``source[j]``: the pair ``rows[j]`` is a
    copy of."""

    rows: list[_Row]
    source: list[int]
    users: list[Hashable | None]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: GrowingCache
    done: int = 0  # columns prefilled


class ContinuousBatch:
    """Decoding (greedy, or sampled per row) of rows that join (:meth:`join`) and leave
    (:meth:`leave`, or at their end) between steps (:meth:`step`); see the module doc.

    Args:
        model: a Hugging Face causal LM (:func:`continuous_unsupported` says which decode as
            ``generate`` does).
        eos_token_id: the end-of-text token(s): a row whose new token is one of them ends there.
            ``None`` (the model's generation config's, where it has one).
        pad_token_id: fills the left of shorter prompts (masked: its value only has to be a token).
            ``None``: the generation config's, else the first end-of-text token, else 0.
        runtime: a :class:`milp.runtime.MilpRuntime` of ``model``: each row runs its ``user``'s
            adapters. Without one every row runs the model as it is, and ``user`` must be ``None``.
        max_rows: rows joined at most (running and waiting for their prefill).
        prefill_chunk: the most prompt tokens one step prefills (chunked prefill): rows that
            join together are prefilled ``prefill_chunk // rows`` columns per step, beside the
            running rows' decode, so that a long prompt delays their next token by a chunk's
            time, not its whole prefill's; it gets its first token at the step of its last chunk.
            ``None`` (default): every joining prompt whole at the next step.
        max_length: a static key/value cache (:class:`milp.kvcache.SlotCache`): ``max_rows``
            rows of ``max_length`` columns, allocated at the first join, each row's tokens in its
            own row from column 0 (a row's prompt plus ``max_new_tokens`` must fit). A decode step
            then runs every row, used or not, over the first ``width`` columns, ``width`` the
            smallest of a few sizes (:func:`static_widths`) that holds the longest row: its
            shapes depend on the width alone, whoever joins and leaves. ``None`` (default): the
            growing cache of the running rows (module doc), whose shapes change every step.
        compile: compile the decode step (needs ``max_length``): one graph per row bucket and
            width, which every later step of that shape replays, whatever rows run. ``True``:
            ``torch.compile`` with the ``milp_cudagraphs`` backend on CUDA (:mod:`milp.cudagraphs`:
            the graph captured and replayed, no host work per layer, the weights read in place),
            ``inductor`` elsewhere; a mapping: these ``torch.compile`` arguments
            (``{"backend": "eager"}``, say). ``False`` (default): eager.
        row_buckets: with ``max_length``, the row counts a decode step may run (ascending;
            ``max_rows`` is added): a step runs the first ``b`` rows of the static cache, ``b``
            the smallest bucket that holds the running rows (kept in the first rows: a row that
            leaves has its place taken by the last one, its cache copied), so that a few rows
            do not read every row's cache. ``None`` (default): :func:`static_row_buckets`
            (``max_rows`` halved up to 3 times while at least 8: 32 rows → 8, 16, 32). With
            ``compile``, one graph per bucket and width.

    Not thread-safe: one thread calls :meth:`join`, :meth:`leave` and :meth:`step`.
    """

    def __init__(self, model: nn.Module, *, eos_token_id: int | Iterable[int] | None = None,
                 pad_token_id: int | None = None, runtime: Any = None, max_rows: int = 8,
                 prefill_chunk: int | None = None, max_length: int | None = None,
                 compile: bool | Mapping[str, Any] = False, row_buckets: Sequence[int] | None = None) -> None:
        if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
            raise TypeError(f"model must be a Hugging Face causal LM (an nn.Module with a config), "
                            f"got {type(model).__name__}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be an int >= 1 (prompt tokens per step) or None, "
                             f"got {prefill_chunk!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 (a row's prompt plus new tokens) or None, "
                             f"got {max_length!r}")
        if row_buckets is not None:
            _check_buckets(row_buckets, max_rows)
            if max_length is None:
                raise ValueError("row_buckets needs max_length (it buckets the static cache's rows)")
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(f"compile must be a bool or a mapping of torch.compile arguments, got {compile!r:.60}")
        if compile is not False and max_length is None:
            raise ValueError("compile needs max_length (a static cache: the compiled step's shapes must not "
                             "change as rows join and leave)")
        if runtime is not None and getattr(runtime, "model", None) is not model:
            raise ValueError("runtime must be the MilpRuntime of model (runtime.model is model)")
        gc = getattr(model, "generation_config", None)
        self.eos: frozenset[int] = _eos_ids(model, eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(gc, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = min(self.eos) if self.eos else 0
        self.pad = _token_ids(pad_token_id, "pad_token_id")[0]
        self.model, self.runtime, self.max_rows, self.prefill_chunk = model, runtime, max_rows, prefill_chunk
        self._cache_arg = cache_argument(model) or "past_key_values"
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._rows: list[_Row] = []  # running, in the cache's row order
        self._joining: list[_Row] = []  # joined since the last step
        self._prefills: list[_Prefill] = []  # joined, their prompts being prefilled (the first one's, chunked)
        self._cache: GrowingCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length]: 1 = a row's own token
        self._next: torch.Tensor | None = None  # [rows]: each row's last token, fed at the next step
        self._block: contextlib.ExitStack | None = None  # the running rows' runtime.using block
        self.max_length, self._compile = max_length, compile
        # with max_length: the static cache, its free rows, each row's last token, the decode step
        self._slots = SlotCache(max_rows, max_length) if max_length is not None else None
        self._widths = static_widths(max_length) if max_length is not None else []
        self._buckets = (sorted({*row_buckets, max_rows}) if row_buckets is not None
                         else static_row_buckets(max_rows)) if max_length is not None else []
        self._free = list(range(max_rows))
        self._ids: torch.Tensor | None = None
        self._step_fns: dict[int, Any] = {}  # the decode step of each row bucket (compiled, with compile)
        self._eager = compile is False  # True also once torch failed to compile the step

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        """Rows joined: running, or waiting for their prefill."""
        return len(self._rows) + len(self._waiting)

    @property
    def keys(self) -> list[Hashable]:
        """The keys of the rows joined, running ones first (in the cache's order: the last
        running row takes the place of one that leaves)."""
        return [r.key for r in self._rows + self._waiting]

    @property
    def cache_bytes(self) -> int:
        """Bytes the key/value cache holds: the running rows' buffers (room included) and those of
        the prompts being prefilled."""
        caches = [self._cache, self._slots, *(p.cache for p in self._prefills)]
        return sum(c.nbytes for c in caches if c is not None)

    @property
    def _waiting(self) -> list[_Row]:
        """The rows joined that have no token yet (being prefilled, or to be)."""
        return [r for p in self._prefills for r in p.rows] + self._joining

    def can_join(self, user: Hashable | None = None) -> bool:
        """Whether a row of ``user`` may join now: fewer than ``max_rows`` rows, and (with a
        store-backed runtime) slots for its user beside the users of the rows joined. A user the
        runtime cannot place even alone may join where the batch is empty: its prefill then fails
        with the runtime's error, in its :class:`Update`."""
        if len(self) >= self.max_rows:
            return False
        if self.runtime is None or self.runtime.store is None or user is None or not len(self):
            return True
        users = [r.user for r in self._rows + self._waiting] + [user]
        groups = self.runtime.row_batches(users, len(users))
        next(groups)
        return next(groups, None) is None  # one group: all of them can be placed at once

    def join(self, key: Hashable, prompt: Sequence[int], max_new_tokens: int, user: Hashable | None = None,
             sampling: Sampling | None = None, logprobs: int | None = None) -> None:
        """Add a row: ``prompt``'s token ids, answered with at most ``max_new_tokens`` tokens by
        ``user``'s adapters (``None``: the model alone). It is prefilled at the next :meth:`step`,
        which gives its first token. ``key`` names it in :class:`Update` and :meth:`leave`.
        ``sampling``: how the row chooses its tokens (:class:`milp.sampling.Sampling`, its own
        seeded generator: the same tokens whichever rows run beside it); ``None``: greedy.
        ``logprobs``: each of its tokens comes with its :class:`milp.sampling.TokenLogprob`
        (:attr:`Update.logprob`), listing this many of the most likely alternatives (0 to
        :data:`milp.sampling.MAX_TOP_LOGPROBS`); ``None``: none."""
        if any(r.key == key for r in self._rows + self._waiting):
            raise ValueError(f"key {key!r} is already a row of the batch")
        if len(self) >= self.max_rows:
            raise ValueError(f"the batch is full (max_rows={self.max_rows}): check can_join() first")
        if isinstance(prompt, (str, bytes, torch.Tensor)) or not isinstance(prompt, Sequence) or not prompt:
            raise ValueError(f"prompt must be a non-empty sequence of token ids, got {prompt!r:.60}")
        ids = _token_ids(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if self.max_length is not None and len(ids) + max_new_tokens > self.max_length:
            raise ValueError(f"the prompt's {len(ids)} tokens plus max_new_tokens={max_new_tokens} exceed the "
                             f"batch's max_length={self.max_length}")
        if user is not None:
            if self.runtime is None:
                raise ValueError(f"user {user!r} needs a runtime: this batch was made without one")
            self.runtime.check_user(user)
        tops = check_logprobs(logprobs)
        self._joining.append(_Row(key, ids, max_new_tokens, user, row_sampler(sampling), tops))

    def leave(self, key: Hashable) -> list[int] | None:
        """Take the row ``key`` out of the batch (a cancelled request): its tokens so far, or
        ``None`` where no row has that key (it ended already, say)."""
        for i, r in enumerate(self._joining):
            if r.key == key:
                del self._joining[i]
                return r.tokens
        for p in self._prefills:  # its prompt's prefill goes on where other rows share it
            for i, r in enumerate(p.rows):
                if r.key == key:
                    del p.rows[i], p.source[i]
                    self._prefills = [q for q in self._prefills if q.rows]
                    return r.tokens
        for i, r in enumerate(self._rows):
            if r.key == key:
                self._keep([j for j in range(len(self._rows)) if j != i])
                return r.tokens
        return None

    def close(self) -> None:
        """Drop every row (and the runtime block the running ones hold)."""
        self._joining, self._prefills = [], []
        self._keep([])

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self) -> list[Update]:
        """One decode step of the running rows, then the prefill of the rows that joined since
        the last step: every row gets one token. Returns one :class:`Update` per row that got a
        token or an error; the rows that ended have left the batch. The model runs in eval mode
        (dropout off, as ``generate_responses`` runs it), the mode it was in restored after."""
        with _eval(self.model), _packed_gqa(self.model):
            return self._step()

    @torch.no_grad()
    def warm_up(self) -> list[tuple[int, int]]:
        """Compile the decode step for every row bucket and width now (``compile``), so that no
        row waits for a compile later: a one-token prompt is prefilled (allocating the static
        cache) and ends at once, then steps run at each bucket of ``row_buckets`` and width of
        :func:`static_widths` with every row free (two: CUDA graph trees run a new graph once
        before they record it). Returns the ``(rows, width)`` shapes compiled (``[]`` without
        ``compile``: nothing to do). The batch must be empty; it is empty again after. Each shape
        is a trace of the whole step: about 10 s for a 22-layer LLaMA with adapters on a 2-core
        CPU (dynamo and AOT autograd, the ``cudagraphs`` path without the capture), so 32 rows
        (3 buckets) of 2048 columns (6 widths) take about 3 minutes there."""
        if self._compile is False or self._slots is None:
            return []
        if len(self):
            raise RuntimeError(f"warm_up needs an empty batch, {len(self)} rows have joined")
        shapes = [(rows, width) for rows in self._buckets for width in self._widths]
        with _eval(self.model), _packed_gqa(self.model):
            self.join(_WARM_UP, [self.pad], 1)
            for u in self._step():  # its prefill, its one token: it has left
                if u.error is not None:
                    raise u.error
            for rows, width in shapes:
                try:
                    self._open_block(rows)  # every row free: no user
                    for _ in range(2):
                        self._run_static(width, rows)
                finally:
                    self._close_block()
        return shapes

    def _step(self) -> list[Update]:
        updates: list[Update] = []
        stepped: list[_Row] = []
        if self._rows:
            try:
                tokens = self._decode() if self._slots is None else self._decode_static()
            except Exception as e:  # noqa: BLE001 (handed to every running row)
                updates += [Update(r.key, r.tokens, True, e) for r in self._rows]
                self._keep([])
            else:
                for r, t in zip(self._rows, tokens):
                    r.tokens.append(t)
                stepped += self._rows
        if self._joining:  # the rows that joined since the last step start their prefill together
            self._prefills.append(self._start_prefill(self._joining))
            self._joining = []
        chunks = 0
        while self._prefills and (self.prefill_chunk is None or not chunks):  # chunked: one chunk a step
            group = self._prefills[0]
            try:
                chunks += 1
                if not self._prefill(group):
                    continue
            except Exception as e:  # noqa: BLE001
                if len(group.rows) > 1:  # one bad row (a damaged user, say) must not fail the others
                    self._prefills[:1] = [self._start_prefill([r]) for r in group.rows]
                    chunks -= 1
                else:
                    del self._prefills[0]
                    updates.append(Update(group.rows[0].key, group.rows[0].tokens, True, e))
                continue
            del self._prefills[0]
            stepped += group.rows
        ended = {id(r) for r in self._rows if r.tokens[-1] in self.eos or len(r.tokens) >= r.limit}
        updates += [Update(r.key, list(r.tokens), id(r) in ended, logprob=r.logprob) for r in stepped]
        if ended:
            keep = [j for j, r in enumerate(self._rows) if id(r) not in ended]
            self._keep(keep)
        return updates

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The model's logits at each row's last position (``cache`` filled in place)."""
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1]

    def _decode(self) -> list[int]:
        assert self._mask is not None and self._next is not None
        self._open_block()
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], 1)
        positions = mask.sum(1, keepdim=True) - 1  # each row's own token count: left padding not counted
        with nvtx_range("milp.decode.step"):
            logits = self._forward(self._next[:, None], mask, positions, self._cache)
        self._mask = mask
        self._next = self._pick(logits, self._rows)
        return [int(t) for t in self._next.tolist()]  # one host sync per step, as generate's (+1 for logprobs)

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The rows' next tokens, and their logprobs where they asked (on the rows)."""
        tokens = pick_tokens(logits, [r.sampler for r in rows])
        if any(r.tops is not None for r in rows):
            for r, lp in zip(rows, token_logprobs(logits, tokens, [r.tops for r in rows])):
                r.logprob = lp
        return tokens

    def _start_prefill(self, group: list[_Row]) -> _Prefill:
        """The prefill of ``group``'s prompts, together. Rows of one prompt and one user (a
        request's ``n`` choices, say) are prefilled once: their cache and first logits are copies
        of one row's."""
        from .pipeline import _device_of
        from .runtime import pad_sequences

        firsts: dict[tuple[tuple[int, ...], Hashable | None], int] = {}
        which = [firsts.setdefault((tuple(r.prompt), r.user), j) for j, r in enumerate(group)]
        unique = sorted(firsts.values())  # the rows prefilled
        ids, mask = pad_sequences([group[j].prompt for j in unique], self.pad, side="left",
                                  device=_device_of(self.model))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        # the batch's first rows: buffers with room for every row it may hold (later ones join them in place)
        first = self._cache is None and self._slots is None and not self._prefills
        cache = GrowingCache(reach=ids.shape[1] + max(r.limit for r in group), rows=self.max_rows if first else None)
        return _Prefill(list(group), [unique.index(k) for k in which], [group[j].user for j in unique], ids, mask,
                        positions, cache)

    def _prefill(self, prefill: _Prefill) -> bool:
        """Prefill the next chunk of ``prefill``'s prompts (all of them without ``prefill_chunk``).
        After the last one, give each row its first token, append the rows to the running batch
        and return ``True``."""
        ids, cache, group = prefill.ids, prefill.cache, prefill.rows
        width = ids.shape[1] if self.prefill_chunk is None else max(1, self.prefill_chunk // ids.shape[0])
        a, b = prefill.done, min(ids.shape[1], prefill.done + width)
        with contextlib.ExitStack() as stack:
            if self.runtime is not None:
                if self._rows:
                    self._open_block()  # the running rows' users stay placed (never evicted for these)
                stack.enter_context(self.runtime.using(prefill.users))
            with nvtx_range("milp.decode.prefill"):
                logits = self._forward(ids[:, a:b], prefill.mask[:, :b], prefill.positions[:, a:b], cache)
        prefill.done = b
        if b < ids.shape[1]:
            return False
        layers, mask = _cache_layers(cache), prefill.mask
        if prefill.source != list(range(ids.shape[0])):  # each row its prompt's copy
            index = torch.tensor(prefill.source, device=logits.device)
            logits, mask = logits.index_select(0, index), mask.index_select(0, index.to(mask.device))
            for layer in layers:
                layer.select(index)
        first = self._pick(logits, group)
        for r, t in zip(group, first.tolist()):
            r.tokens.append(int(t))
        if self._slots is not None:
            self._place(group, layers, first, ids.shape[1])
            return True
        running = self._cache
        if running is None:
            self._cache, self._mask, self._next = cache, mask, first
        else:
            assert self._mask is not None and self._next is not None
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], 0)
            self._next = torch.cat([self._next, first])
        self._rows += group
        self._reach()
        if running is not None:
            olds = _cache_layers(running)
            if all(old.can_append(len(group), mask.shape[1]) for old in olds):
                for old, new in zip(olds, layers):  # the new rows copied in after the running ones
                    old.append(*new.filled)
            else:  # one copy of both caches into buffers with room for the next steps
                room, rows = running.room(self._mask.shape[1] + 1), running.row_room(self.max_rows)
                for old, new in zip(olds, layers):
                    old.place(*stack_rows([old.filled, new.filled], width, room, rows), width, len(self._rows))
        self._close_block()  # the set of rows changed
        return True

    def _keep(self, rows: list[int]) -> None:
        """Keep only the running rows ``rows`` (indices, ascending), dropping the leading cache
        columns that are padding for every row kept. Rows past the last kept place fill the
        places of rows that left (the others stay where they are): only the moved rows' cache
        is copied."""
        self._close_block()
        if self._slots is not None:
            self._keep_slots(rows)
            return
        if not rows:
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        assert self._mask is not None and self._next is not None
        n, kept = len(rows), set(rows)
        moves = list(zip([j for j in rows if j >= n], [p for p in range(n) if p not in kept]))
        order = list(range(n))  # the old row each place holds
        for src, dst in moves:
            order[dst] = src
        index = torch.tensor(order, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in _cache_layers(self._cache):
            layer.compact(moves, n, start)
        self._mask, self._next = mask[:, start:], self._next.index_select(0, index.to(self._next.device))
        self._rows = [self._rows[j] for j in order]
        self._reach()

    # ------------------------------------------------------------------ the static cache (max_length)
    def _keep_slots(self, rows: list[int]) -> None:
        """:meth:`_keep` with the static cache: the rows that leave free their rows, and running
        rows past the first ``len(rows)`` move into them (their cache copied), so that the running
        rows hold the first rows of the cache (a step runs the smallest row bucket holding them)."""
        assert self._slots is not None
        kept = [self._rows[j] for j in rows]
        n = len(kept)
        if n < len(self._rows):
            assert self._ids is not None
            holes = sorted(set(range(n)) - {r.slot for r in kept})
            for r, dst in zip([r for r in kept if r.slot >= n], holes):
                length = len(r.prompt) + len(r.tokens) - 1  # its cache: the last token is fed at the next step
                self._slots.place(dst, self._slots.row(r.slot, length))
                self._ids[dst] = self._ids[r.slot]
                r.slot = dst
            self._slots.columns[n:] = 0  # a free row decodes at column 0 (its writes land where nobody reads)
        self._free = list(range(n, self.max_rows))
        self._rows = kept

    def _place(self, group: list[_Row], layers: list[GrowingLayer], first: torch.Tensor, width: int) -> None:
        """Write the prefilled ``group`` (its prompts left-padded to ``width`` in ``layers``) into
        free rows of the static cache, each from column 0, and its first tokens beside them."""
        assert self._slots is not None
        filled = [layer.filled for layer in layers]
        for j, r in enumerate(group):
            r.slot = self._free.pop(0)
            pad = width - len(r.prompt)
            self._slots.place(r.slot, [(k[j, :, pad:], v[j, :, pad:]) for k, v in filled])
        if self._ids is None:
            from .pipeline import _compute_dtype

            self._ids = torch.full((self.max_rows,), self.pad, dtype=torch.long, device=first.device)
            torch._dynamo.mark_static_address(self._ids)
            self._dtype = _compute_dtype(self.model)  # the attention mask's
            self._mask_3d = _legacy_mask(self.model)
        self._ids[torch.tensor([r.slot for r in group], device=first.device)] = first
        self._rows += group
        self._close_block()  # the set of rows changed

    def _decode_static(self) -> list[int]:
        """One decode step of the static cache's first rows, the smallest row bucket that holds the
        running rows (their tokens picked)."""
        assert self._slots is not None and self._ids is not None
        self._open_block()
        longest = max(len(r.prompt) + len(r.tokens) for r in self._rows)  # its new token's column, plus one
        logits = self._run_static(next(w for w in self._widths if w >= longest), self._bucket())
        slots = torch.tensor([r.slot for r in self._rows], device=self._ids.device)
        tokens = self._pick(logits.index_select(0, slots.to(logits.device)), self._rows)
        self._ids[slots] = tokens.to(self._ids.device)
        self._slots.columns[slots] += 1
        return [int(t) for t in tokens.tolist()]

    def _bucket(self) -> int:
        """The row bucket of the running rows: the smallest of ``row_buckets`` that holds them."""
        return next(b for b in self._buckets if b >= len(self._rows))

    def _run_static(self, width: int, rows: int) -> torch.Tensor:
        """The logits of one decode step of the first ``rows`` rows of the static cache over
        ``width`` columns (the step compiled at its first call, with ``compile``). A step torch
        fails to compile (a ``TorchDynamoException``: tracing or the backend) is run eagerly, then
        and from then on, with a ``RuntimeWarning``: a server keeps answering."""
        assert self._slots is not None and self._ids is not None
        self._slots.set_step(rows, width)
        with nvtx_range("milp.decode.step"):
            if self._eager:
                return self._static_step(self._ids, self._slots.columns, width, rows)
            fn = self._step_fns.get(rows)
            if fn is None:
                fn = self._step_fns[rows] = self._compiled_step(rows)
            try:
                return fn(self._ids, self._slots.columns, width, rows)
            except torch._dynamo.exc.TorchDynamoException as e:  # raised before the graph ran
                why = " ".join(str(e).split())[:300]
                warnings.warn(f"ContinuousBatch: torch could not compile the decode step ({type(e).__name__}: {why}); "
                              "it runs eagerly from now on", RuntimeWarning, stacklevel=2)
                self._eager = True
                return self._static_step(self._ids, self._slots.columns, width, rows)

    def _static_step(self, ids: torch.Tensor, columns: torch.Tensor, width: int, rows: int) -> torch.Tensor:
        """The logits of one decode step of the first ``rows`` rows: row ``r`` feeds ``ids[r]`` at
        position ``columns[r]`` and attends to its columns ``[0, columns[r]]`` of the first
        ``width``."""
        assert self._slots is not None
        dtype = self._dtype
        ids, columns = ids[:rows], columns[:rows]
        seen = torch.arange(width, device=columns.device)[None, :] <= columns[:, None]
        if self._mask_3d:  # [rows, 1, width] of 1 = attended: the model makes it additive itself
            mask = seen[:, None, :].to(dtype)
        else:  # additive, [rows, 1, 1, width]: the models' attention takes it as it is (eager and sdpa)
            mask = torch.zeros((columns.shape[0], 1, 1, width), dtype=dtype, device=columns.device)
            mask = mask.masked_fill(~seen[:, None, None, :], torch.finfo(dtype).min)
        return self._forward(ids[:, None], mask, columns[:, None], self._slots)

    def _compiled_step(self, rows: int) -> Any:
        """``torch.compile`` of :meth:`_static_step` (``compile``'s arguments) for steps of
        ``rows`` rows, the static plan of their decode shape registered first (the injected
        layers read it in a compiled graph)."""
        assert self._ids is not None
        if self.runtime is not None:  # [rows, 1, features], or flattened to [rows, features] (OPT)
            for lead in ((rows, 1), (rows,)):
                self.runtime.state.prepare_static(lead, self._ids.device)
        opts: dict[str, Any] = dict(self._compile) if isinstance(self._compile, Mapping) else {
            "backend": BACKEND if self._ids.device.type == "cuda" else "inductor"}
        if opts.get("backend") == BACKEND:
            register()  # a source tree without the package's entry point
        opts.setdefault("dynamic", False)
        # a copy of the step's code for this batch and row bucket: torch keeps compiled graphs per code
        # object, at most recompile_limit (8) of them, and every batch (another model, another cache) and
        # bucket would count against the one limit of a shared code object, past which torch runs eagerly
        step = ContinuousBatch._static_step
        fn = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__)
        return torch.compile(types.MethodType(fn, self), **opts)

    def _reach(self) -> None:
        """Cap the cache's room at what its rows can still fill: each row is fed ``limit - tokens``
        more tokens at most."""
        assert self._mask is not None and self._cache is not None
        self._cache.reach = self._mask.shape[1] + max(r.limit - len(r.tokens) for r in self._rows)

    def _open_block(self, rows: int | None = None) -> None:
        """Enter the runtime's ``using`` block of the running rows' users (kept until they change;
        with the static cache, one user per row of its first ``rows`` (the running rows' bucket):
        ``None`` where no row runs)."""
        if self.runtime is None or self._block is not None:
            return
        users = [r.user for r in self._rows]
        if self._slots is not None:
            users = [None] * (self._bucket() if rows is None else rows)
            for r in self._rows:
                users[r.slot] = r.user
        stack = contextlib.ExitStack()
        stack.enter_context(self.runtime.using(users))
        self._block = stack

    def _close_block(self) -> None:
        if self._block is not None:
            block, self._block = self._block, None
            block.close()

    def __del__(self) -> None:  # a batch dropped with rows running must not keep the runtime's lock
        with contextlib.suppress(Exception):
            self._close_block()


_WARM_UP = object()  # the key of warm_up's row


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, the mode it was in restored after."""
    training = model.training
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


#: the attention implementation a decode step runs a model whose own is ``sdpa`` under (:func:`_packed_gqa`)
PACKED_SDPA = "milp_packed_sdpa"


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, but a single query token of grouped-query attention runs
    on the key/value heads, its query heads packed as that many query rows of their group's head
    (``[rows, kv heads, group, dim]``), rather than on keys and values repeated per query head:
    what transformers does under ``torch.compile`` (and eagerly in 4.57), a copy of
    every cached column per query head, layer and step, eight per key/value head for a
    TinyLlama-shaped model. Anything else (a prompt, dropout, a softcap or attention sinks, a
    per-head mask) is transformers' own ``sdpa`` attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    if (groups > 1 and q_len == 1 and h == key.shape[1] * groups and not (dropout and module.training)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
            and (attention_mask is None or attention_mask.dim() == 4 and attention_mask.shape[1] == 1)):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, d), key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@contextlib.contextmanager
def _packed_gqa(model: nn.Module) -> Iterator[None]:
    """Inside the block, a grouped-query attention model whose attention implementation is
    ``sdpa`` runs :func:`packed_sdpa_attention` (the same outputs; a decode step reads each
    cached column once, not once per query head); other models run as they are."""
    config = getattr(model, "config", None)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if (getattr(config, "_attn_implementation", None) != "sdpa" or not isinstance(heads, int)
            or not isinstance(kv_heads, int) or not 0 < kv_heads < heads):
        yield
        return
    _register_packed_sdpa()
    config._attn_implementation = PACKED_SDPA  # type: ignore[union-attr]
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"  # type: ignore[union-attr]


@functools.cache
def _register_packed_sdpa() -> None:
    """:data:`PACKED_SDPA` registered with transformers' attention functions (and its masks:
    ``sdpa``'s)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    with contextlib.suppress(ImportError):  # transformers < 4.53: no mask interface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


def _legacy_mask(model: nn.Module) -> bool:
    """Whether ``model`` takes a decode step's attention mask as ``[rows, 1, columns]`` (made
    additive by ``get_extended_attention_mask``) rather than an additive ``[rows, 1, 1, columns]``
    one: RoBERTa under transformers 4.x, which refuses a 4-D mask."""
    import transformers

    return (getattr(model.config, "model_type", None) == "roberta"
            and int(transformers.__version__.split(".")[0]) < 5)


def static_widths(max_length: int) -> list[int]:
    """The widths a static cache's decode step attends over (:class:`ContinuousBatch`'s
    ``max_length``): ``max_length`` halved up to 7 times while at least 64, ascending. A step
    takes the smallest that holds its longest row, so a compiled step has at most 8 graphs, and
    reads at most twice the columns its longest row needs, or the smallest width (64 to 127
    columns; ``max_length`` itself below 128).

    Example:
        >>> static_widths(2048), static_widths(100)
        ([64, 128, 256, 512, 1024, 2048], [100])
    """
    return _halvings(max_length, 7, 64)


def _check_buckets(row_buckets: Any, max_rows: int) -> None:
    ok = (isinstance(row_buckets, Sequence) and not isinstance(row_buckets, (str, bytes)) and len(row_buckets) > 0
          and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= max_rows for b in row_buckets)
          and list(row_buckets) == sorted(set(row_buckets)))
    if not ok:
        raise ValueError(f"row_buckets must be ascending distinct ints in [1, max_rows={max_rows}] or None, "
                         f"got {row_buckets!r:.60}")


def static_row_buckets(max_rows: int) -> list[int]:
    """The row counts a static cache's decode step runs by default (:class:`ContinuousBatch`'s
    ``row_buckets``): ``max_rows`` halved up to 3 times while at least 8, ascending. A step runs
    the smallest that holds the running rows, so it reads the cache of at most twice the rows
    that run, or 8 (``max_rows`` itself below 16); a compiled step has at most 4 graphs per width.

    Example:
        >>> static_row_buckets(32), static_row_buckets(100), static_row_buckets(8)
        ([8, 16, 32], [12, 25, 50, 100], [8])
    """
    return _halvings(max_rows, 3, 8)


def _halvings(n: int, most: int, least: int) -> list[int]:
    """``n`` and ``n`` halved (rounded down) up to ``most`` times while at least ``least``, ascending."""
    return sorted({n >> k for k in range(most + 1) if k == 0 or n >> k >= least})


def _cache_layers(cache: Any) -> list[GrowingLayer]:
    """The layers of a :class:`milp.kvcache.GrowingCache` the model filled (each with ``keys``/
    ``values`` ``[rows, heads, length, dim]``)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(x, GrowingLayer) and isinstance(x.keys, torch.Tensor) and x.keys.dim() == 4
                             and isinstance(x.values, torch.Tensor) for x in layers):
        raise RuntimeError(f"the model filled a {type(cache).__name__} whose layers are not [rows, heads, length, "
                           "dim] keys and values: continuous batching cannot join its rows (use generate)")
    return list(layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    n = width - t.shape[dim]
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)


def _eos_ids(model: nn.Module, eos_token_id: Any) -> frozenset[int]:
    """The end-of-text token ids rows end at, as ``generate`` takes them: ``eos_token_id`` where
    given, the model's generation config's otherwise (none: no row ends early)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return frozenset(_token_ids(eos_token_id, "eos_token_id") if eos_token_id is not None else ())


def _token_ids(value: Any, name: str) -> list[int]:
    """``value`` (a token id or a sequence of them) as a list of ints >= 0."""
    items = [value] if isinstance(value, numbers.Integral) else value
    if value is None or isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ValueError(f"{name} must be a token id or a sequence of them, got {value!r:.60}")
    out = list(items)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 0 for v in out):
        raise ValueError(f"{name} must hold token ids (ints >= 0), got {value!r:.60}")
    return [int(v) for v in out]
