"""Sampled answers whose tokens depend on the request alone: per-row seeds, not a shared generator.

The pipeline answers greedily, as the paper evaluates. A server's clients often want sampled
answers instead (``temperature``, ``top_p``, ...), and want to get an answer again: the same
request with the same ``seed`` should give the same answer, whatever else the server was
generating at the time. ``generate(do_sample=True)`` cannot promise that: every row of a batch
draws from one generator, so a row's tokens change with the batch it was put in.

Here each row has its own generator, seeded by its :class:`Sampling`'s ``seed`` and drawn once
per token it generates. A token is chosen by inverse transform sampling: one uniform number
``u`` from the row's generator picks the token whose interval of the cumulative distribution
holds ``u``. The distribution is ``generate``'s: the logits divided by ``temperature``, then
``top_k``, ``top_p`` and ``min_p`` applied in that order, with the rules of transformers'
``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper`` (which the tests check).
So a row's tokens depend on its prompt, its user's adapters, its :class:`Sampling` and its
seed only (to the rounding of the logits, which a batch's shape may move in the last bits, as
for greedy decoding). Rows of one batch may sample with different settings, or decode greedily.

:func:`pick_tokens` is used by :class:`milp.decode.ContinuousBatch` (``join(sampling=)``) and,
through a logits processor, by :func:`milp.pipeline.generate_responses` (``sampling=``): the
same request gives the same answer from either, and from ``milp.serve``'s two batchers.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    >>> rows = [row_sampler(Sampling(temperature=0.8, top_k=2, seed=7)), None]   # None: greedy
    >>> picks = [pick_tokens(logits, rows).tolist() for _ in range(8)]
    >>> {b for a, b in picks}   # the greedy row
    {1}
    >>> set(a for a, b in picks) <= {1, 2}   # top_k=2: never token 0
    True
    >>> again = [row_sampler(Sampling(temperature=0.8, top_k=2, seed=7))]   # the same seed, alone
    >>> [pick_tokens(logits[:1], again).tolist() for _ in range(8)] == [[a] for a, b in picks]
    True
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

__all__ = ["MAX_SEED", "MAX_TOP_LOGPROBS", "Sampling", "TokenLogprob", "check_logprobs", "pick_tokens", "row_sampler",
           "sampling_per_record", "token_logprobs", "LogprobSteps"]

#: seeds are ints in [0, MAX_SEED] (what ``torch.Generator.manual_seed`` takes without wrapping)
MAX_SEED = 2**63 - 1
#: the most alternatives a token's :class:`TokenLogprob` lists (OpenAI's ``top_logprobs`` limit)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    """How one row chooses its tokens: sampled from its model's distribution, shaped as
    ``generate(do_sample=True, ...)`` shapes it, with its own seeded generator.

    Args:
        temperature: the logits are divided by it. ``0`` decodes greedily (the other settings
            then change nothing).
        top_k: keep the ``top_k`` most likely tokens (ties with the last one kept too); ``0``:
            all of them. (``generate``'s own default is 50; here the default keeps all.)
        top_p: keep the most likely tokens whose probabilities sum to at least ``top_p``
            (nucleus sampling); ``1``: all of them.
        min_p: drop the tokens less likely than ``min_p`` times the most likely one; ``0``: none.
        seed: the row's generator's seed, an int in [0, 2**63 - 1]. ``None``: one drawn from
            torch's global generator when the row starts (:meth:`resolved`), so
            ``torch.manual_seed`` makes a run repeat.

    Raises ``ValueError`` naming the setting for a value out of its range.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r:.40}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: every token), got {k!r:.40}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: every token), got {p!r:.40}")
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0: every token), got {m!r:.40}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= s <= MAX_SEED):
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}] or None (drawn), got {s!r:.40}")

    @property
    def greedy(self) -> bool:
        """Whether the row decodes greedily (``temperature == 0``)."""
        return self.temperature == 0

    def resolved(self) -> Sampling:
        """This sampling with a seed: its own, or one drawn from torch's global generator."""
        if self.seed is not None:
            return self
        return replace(self, seed=int(torch.randint(0, MAX_SEED, (), dtype=torch.int64)))


class _RowSampler:
    """A row's :class:`Sampling` and its generator, drawn once per token."""

    __slots__ = ("generator", "sampling")

    def __init__(self, sampling: Sampling) -> None:
        assert sampling.seed is not None
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed)

    def draw(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


def row_sampler(sampling: Sampling | None) -> _RowSampler | None:
    """The token chooser of one row for :func:`pick_tokens`: ``None`` (greedy) for ``None`` or a
    zero temperature; otherwise a generator seeded by the sampling's seed (one drawn where it
    has none)."""
    if sampling is None:
        return None
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a milp.Sampling or None, got {type(sampling).__name__}")
    return None if sampling.greedy else _RowSampler(sampling.resolved())


def sampling_per_record(sampling: Any, n: int) -> list[Sampling | None]:
    """``sampling`` (one :class:`Sampling` or ``None`` for all, or one per record) as one per record of ``n``."""
    if sampling is None or isinstance(sampling, Sampling):
        return [sampling] * n
    if isinstance(sampling, (str, bytes)) or not isinstance(sampling, Sequence):
        raise TypeError(f"sampling must be a milp.Sampling, None, or a sequence of them (one per record), "
                        f"got {type(sampling).__name__}")
    if len(sampling) != n:
        raise ValueError(f"sampling must give one Sampling (or None) per record: got {len(sampling)} for {n} records")
    for i, s in enumerate(sampling):
        if s is not None and not isinstance(s, Sampling):
            raise TypeError(f"sampling[{i}] must be a milp.Sampling or None, got {type(s).__name__}")
    return list(sampling)


def pick_tokens(logits: torch.Tensor, rows: Sequence[_RowSampler | None]) -> torch.Tensor:
    """Each row's next token from its ``logits`` ``[rows, vocab]``: the most likely one where its
    sampler is ``None``, else one sampled by its sampler (which draws one number). A long
    tensor ``[rows]`` on the logits' device."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [rows, vocab] with one row per sampler ({len(rows)}), "
                         f"got {tuple(logits.shape)}")
    tokens = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r is not None]
    if not sampled:
        return tokens
    chosen = [r for r in rows if r is not None]
    index = torch.tensor(sampled, device=logits.device)
    scores = _filtered(logits.index_select(0, index).float(), chosen)
    u = torch.tensor([r.draw() for r in chosen], dtype=torch.float64, device=logits.device)
    cdf = scores.softmax(-1).double().cumsum(-1)
    # the first token whose cumulative probability passes u (times the total: the sum rounds)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    tokens[index] = picked.clamp_(max=logits.shape[1] - 1)
    return tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability under the model, and the most likely tokens
    at its place with theirs (``top``: ``(token id, logprob)`` pairs, most likely first; as many
    as asked, none where 0). The log-probabilities are the model's own (the log-softmax of its
    logits, in float32), before a sampled row's temperature and filters, as vLLM and OpenAI
    report them."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def check_logprobs(value: Any, name: str = "logprobs") -> int | None:
    """``value`` checked as a request for log-probabilities: ``None`` (none), or how many of the
    most likely alternatives each token lists, an int in [0, :data:`MAX_TOP_LOGPROBS`]."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                              or not 0 <= int(value) <= MAX_TOP_LOGPROBS):
        raise ValueError(f"{name} must be None (no log-probabilities) or an int in [0, {MAX_TOP_LOGPROBS}] (the "
                         f"alternatives listed per token), got {value!r:.40}")
    return None if value is None else int(value)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Each row's :class:`TokenLogprob` of its chosen token ``tokens[row]`` under ``logits``
    ``[rows, vocab]``, with its ``tops[row]`` most likely alternatives (``None``: the row asks
    for none, and gets ``None``). One copy to the host for all rows that ask."""
    asked = [i for i, k in enumerate(tops) if k is not None]
    if not asked:
        return [None] * len(tops)
    index = torch.tensor(asked, device=logits.device)
    lp, values, ids = _log_softmax_top(logits, index, max(cast(int, tops[i]) for i in asked))
    return _unpack(_table(lp, values, ids, tokens.index_select(0, index)).tolist(), tops, asked)


class LogprobSteps:
    """The token logprobs of one ``generate`` call, step by step, from the model's own forward
    outputs (its raw logits, as ``output_logits=True`` gives them) without keeping them: register
    :meth:`hook` as a forward hook with kwargs on the model, call ``generate``, then
    :meth:`finish`. Each forward keeps its log-softmax until the next one names the token
    chosen from it (its ``input_ids``), and a ``[rows, 2 + 2k]`` table of it on the device: one
    step's logits held at a time, one copy to the host at the end. ``tops``: each row's number of
    alternatives (``None``: none)."""

    def __init__(self, tops: Sequence[int | None]) -> None:
        self.tops = list(tops)
        self.asked = [i for i, k in enumerate(self.tops) if k is not None]
        self.k = max((cast(int, self.tops[i]) for i in self.asked), default=0)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._tables: list[torch.Tensor] = []
        self._index: torch.Tensor | None = None  # the rows asking, on the logits' device (made once)

    def hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """The forward hook: close the last step with the token fed now, open this one."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._pending is not None and isinstance(ids, torch.Tensor):
            self._close(ids[:, -1])
        logits = output.logits if hasattr(output, "logits") else output[0]
        last = logits[:, -1]
        self._pending = _log_softmax_top(last, self._rows(last.device), self.k)

    def finish(self, sequences: torch.Tensor, offset: int) -> list[list[TokenLogprob | None]]:
        """Per step (of ``sequences[:, offset:]``, the tokens ``generate`` made), each row's
        :class:`TokenLogprob` (``None`` where the row asked for none)."""
        steps = sequences.shape[1] - offset
        if len(self._tables) < steps and self._pending is not None:  # the last token is never fed
            self._close(sequences[:, -1])
        tables = torch.stack(self._tables[:steps]).tolist() if self._tables and self.asked else []
        self._pending, self._tables = None, []
        return [_unpack(t, self.tops, self.asked) for t in tables] if tables else [[None] * len(self.tops)] * steps

    def _close(self, tokens: torch.Tensor) -> None:
        assert self._pending is not None
        lp, values, ids = self._pending
        self._tables.append(_table(lp, values, ids, tokens.index_select(0, self._rows(tokens.device))))
        self._pending = None

    def _rows(self, device: torch.device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            self._index = torch.tensor(self.asked, device=device)
        return self._index


def _log_softmax_top(logits: torch.Tensor, index: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows ``index`` of ``logits``: their float32 log-softmax, and its ``k`` largest values and ids."""
    lp = logits.index_select(0, index).float().log_softmax(-1)
    values, ids = lp.topk(k, dim=-1)
    return lp, values, ids


def _table(lp: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """One float64 table (token ids are exact in it) per row: [token, logprob, k ids, k logprobs]."""
    picked = picked[:, None].to(lp.device)
    return torch.cat([picked.double(), lp.gather(1, picked).double(), ids.double(), values.double()], 1)


def _unpack(table: list[list[float]], tops: Sequence[int | None], asked: Sequence[int]) -> list[TokenLogprob | None]:
    """:func:`_table`'s rows (one per row in ``asked``) as each row's :class:`TokenLogprob`."""
    out: list[TokenLogprob | None] = [None] * len(tops)
    k = (len(table[0]) - 2) // 2 if table else 0
    for j, row in zip(asked, table):
        n = cast(int, tops[j])
        top = tuple((int(t), v) for t, v in zip(row[2:2 + n], row[2 + k:2 + k + n]))
        out[j] = TokenLogprob(int(row[0]), row[1], top)
    return out


def _filtered(scores: torch.Tensor, rows: Sequence[_RowSampler]) -> torch.Tensor:
    """The rows' float32 ``scores`` divided by their temperatures, their tokens outside
    ``top_k``, ``top_p`` and ``min_p`` (applied in that order, as ``generate`` does) at ``-inf``."""
    settings = [r.sampling for r in rows]
    device, vocab = scores.device, scores.shape[1]
    temps = torch.tensor([s.temperature for s in settings], dtype=scores.dtype, device=device)
    scores = scores / temps[:, None]
    ks = [min(s.top_k, vocab) for s in settings]
    if any(ks):
        top = torch.topk(scores, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
        on = torch.tensor([k > 0 for k in ks], device=device)[:, None]
        scores = scores.masked_fill((scores < kth) & on, -math.inf)
    ps = [s.top_p for s in settings]
    if any(p < 1 for p in ps):
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        top_p = torch.tensor(ps, dtype=scores.dtype, device=device)[:, None]
        drop = (cumulative <= 1 - top_p) & (top_p < 1)
        drop[:, -1] = False  # the most likely token stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    mins = [s.min_p for s in settings]
    if any(mins):
        probs = scores.softmax(-1)
        floor = torch.tensor(mins, dtype=scores.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
        drop = probs < floor
        drop.scatter_(1, probs.argmax(-1, keepdim=True), False)  # the most likely token stays
        scores = scores.masked_fill(drop, -math.inf)
    return scores
