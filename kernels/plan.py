"""Batch plan: token → user ids turned once per batch into sorted segments and tile schedules.

Every multi-LoRA linear of a model sees the same batch, so the plan is built once per
batch and reused by every layer (each layer's :class:`~kernels.bank.AdapterBank` maps a
user id to its own rows; a user without adapters at a layer has rank 0 there).

All buffers have a fixed capacity and are rewritten in place by :meth:`BatchPlan.update`
with device-side torch ops only (no host synchronisation when ``validate=False``), so a
CUDA graph captured over ``update`` + the model stays valid across batches.

Layout (all ``int32``)::

    sorted_tokens [max_tokens]            token indices grouped by user (stable), tail = 0
    segments      [max_segments, 3]       (start, end, user) in sorted order; unused: (0, 0, -1)
    tiles         [Σ_bm max_tiles(bm), 3] per BLOCK_M in ``block_ms``, consecutive blocks of
                                          (start, end, user) tiles of ≤ bm rows that never cross
                                          a segment; unused tiles are empty (start == end)

``user = -1`` marks the segment of tokens with no adapter (base output only).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import SupportsIndex, cast

import torch

from ._checks import check_device, check_positive_int, check_tensor

__all__ = ["BatchPlan", "max_tiles", "tile_block", "tile_span", "DEFAULT_BLOCK_MS"]

DEFAULT_BLOCK_MS: tuple[int, ...] = (16, 32, 64, 128)


def max_tiles(max_tokens: int, max_segments: int, block_m: int) -> int:
    """Upper bound on the tiles of ``block_m`` rows that segments of ``max_tokens`` tokens need."""
    return -(-max_tokens // block_m) + max_segments


def tile_block(
    tiles: torch.Tensor, sorted_tokens: torch.Tensor, segments: torch.Tensor, block_ms: Sequence[int], block_m: int
) -> torch.Tensor:
    """The ``[max_tiles(block_m), 3]`` rows of a plan's concatenated ``tiles`` for ``block_m``.

    The layout follows from the capacities alone (``sorted_tokens.numel()`` tokens,
    ``segments.shape[0]`` segments), so the ops can slice it without the plan object.
    """
    off, n = tile_span(sorted_tokens.numel(), segments.shape[0], block_ms, block_m, tiles.shape[0])
    return tiles[off : off + n]


def tile_span(max_tokens: int, max_segments: int, block_ms: Sequence[int], block_m: int,
              tile_rows: int | None = None) -> tuple[int, int]:
    """``(first row, rows)`` of the ``block_m`` schedule in the concatenated ``tiles`` of a plan
    with these capacities (:func:`tile_block` slices them); ``tile_rows``, when given, is the
    ``tiles`` table's length, checked to hold them.

    Example:
        >>> tile_span(100, 4, (16, 64), 64)  # after the 7 + 4 tiles of block_m = 16
        (11, 6)
    """
    block_ms = tuple(block_ms)  # a list (as_args() gives one) is taken too: the key must hash
    key = (max_tokens, max_segments, block_ms, block_m)
    span = _TILE_SPANS.get(key)
    if span is None:
        off = 0
        for bm in block_ms:
            n = max_tiles(max_tokens, max_segments, bm)
            if bm == block_m:
                span = (off, n)
                break
            off += n
        else:
            raise ValueError(f"block_m={block_m!r} is not one of the plan's block_ms {list(block_ms)}")
        if len(_TILE_SPANS) > 4096:
            _TILE_SPANS.clear()
        _TILE_SPANS[key] = span
    if tile_rows is not None and span[0] + span[1] > tile_rows:
        raise ValueError(f"tiles has {tile_rows} rows, fewer than block_ms={list(block_ms)} need")
    return span


# (tokens, segments, block_ms, block_m) -> (first row, rows) in the concatenated tiles
_TILE_SPANS: dict[tuple, tuple[int, int]] = {}


def _check_block_ms(block_ms: object) -> tuple[int, ...]:
    """``block_ms`` as a tuple of distinct powers of two: ints (numpy's too), not ``16.5`` cut to
    16, nor a bare ``16`` or a string."""
    try:
        if isinstance(block_ms, (str, bytes)):
            raise TypeError
        bms = tuple(map(operator.index, cast("Iterable[SupportsIndex]", block_ms)))  # TypeError if not
    except TypeError:
        raise TypeError(f"block_ms must be a sequence of ints (tile heights), got {block_ms!r}") from None
    if not bms or any(b < 1 or b & (b - 1) for b in bms) or len(set(bms)) != len(bms):
        raise ValueError(f"block_ms must be distinct powers of two, got {block_ms!r}")
    return bms


class BatchPlan:
    """Sorted segments and tile schedules of one batch, in fixed-capacity device buffers.

    Args:
        max_tokens: capacity in tokens (a batch may have fewer).
        max_users: size of the user-id space (ids ``0 .. max_users-1``; ``-1`` = no adapter).
        device: where the buffers live (that of the activations).
        block_ms: the tile heights the kernels may use; a schedule is kept for each.

    Example:
        >>> plan = BatchPlan.build(torch.tensor([1, -1, 0, 1]), max_users=2)
        >>> plan.segments[: plan.num_segments_host()].tolist()
        [[0, 1, -1], [1, 2, 0], [2, 4, 1]]
    """

    def __init__(
        self,
        max_tokens: int,
        max_users: int,
        *,
        device: torch.device | str | None = None,
        block_ms: Sequence[int] = DEFAULT_BLOCK_MS,
    ) -> None:
        check_positive_int("max_tokens", max_tokens)
        check_positive_int("max_users", max_users)
        block_ms = _check_block_ms(block_ms)
        self.max_tokens = max_tokens
        self.max_users = max_users
        self.max_segments = min(max_users, max_tokens) + 1
        self.block_ms = block_ms
        device = check_device("device", device)
        self.device = device if device is not None else torch.device("cpu")
        dev = self.device
        self.num_tokens = 0
        #: segments (users, with -1) present in the batch: a host value set by a validated
        #: update(), ``None`` after ``validate=False`` (kernels then choose by token count)
        self.num_segments: int | None = 0
        # buffers updated in place by every later batch: never inference tensors (a plan made under
        # torch.inference_mode could not be updated outside it)
        with torch.inference_mode(False):
            self.sorted_tokens = torch.zeros(max_tokens, dtype=torch.int32, device=dev)
            self.segments = torch.zeros(self.max_segments, 3, dtype=torch.int32, device=dev)
            self.segments[:, 2] = -1
            self._tile_offsets: dict[int, tuple[int, int]] = {}
            total = 0
            for bm in block_ms:
                n = max_tiles(max_tokens, self.max_segments, bm)
                self._tile_offsets[bm] = (total, n)
                total += n
            self.tiles = torch.zeros(total, 3, dtype=torch.int32, device=dev)
            self.tiles[:, 2] = -1
        # the buffers' device, with its index: a plan made for "cuda" accepts ids on "cuda:0"
        self.device = dev = self.tiles.device
        # constants reused by every update (kept so update() allocates little)
        self._user_range = torch.arange(-1, max_users, dtype=torch.int32, device=dev)  # [U+1]

    # ----------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        token_user: torch.Tensor,
        max_users: int,
        *,
        block_ms: Sequence[int] = DEFAULT_BLOCK_MS,
        validate: bool = True,
    ) -> BatchPlan:
        """A plan sized exactly for ``token_user`` (``[T]`` ids, ``-1`` = no adapter).

        For compiled code keep one plan of a fixed capacity and :meth:`update` it: a plan built
        per batch has buffers sized by that batch (the tokens, and the segment table once a
        batch has fewer tokens than ``max_users``), and each such dimension costs
        ``torch.compile`` a re-trace when it first changes (torch then makes it dynamic)."""
        check_tensor("token_user", token_user, ndim=1)
        plan = cls(max(1, token_user.numel()), max_users, device=token_user.device, block_ms=block_ms)
        return plan.update(token_user, validate=validate)

    def update(self, token_user: torch.Tensor, *, validate: bool = True,
               num_segments: int | None = None) -> BatchPlan:
        """Rewrite the buffers for a new batch in place.

        ``token_user``: ``[T]`` integer user ids (``-1`` = base only), ``T <= max_tokens``,
        on the plan's device. ``validate=True`` checks the id range and counts the users
        present (one host sync); pass ``False`` inside CUDA-graph capture. With
        ``validate=False``, ``num_segments`` (a host value the caller knows without a sync,
        e.g. the distinct ids of the batch rows; an upper bound is fine) still lets the ops
        pick the decode path for batches with few tokens per user.
        """
        if num_segments is not None:
            check_positive_int("num_segments", num_segments, minimum=0)
        check_tensor("token_user", token_user, ndim=1)
        if token_user.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"token_user must be an integer tensor, got {token_user.dtype}")
        if token_user.device != self.device:
            raise ValueError(f"token_user must be on {self.device} (the plan's device), got {token_user.device}")
        n = token_user.numel()
        if n > self.max_tokens:
            raise ValueError(f"token_user has {n} tokens, more than the plan's max_tokens={self.max_tokens}")
        dev = self.device
        U1 = self.max_users + 1
        S = self.max_segments
        key = token_user.to(torch.int64) + 1  # [T] in [0, U] when valid
        # stable sort groups tokens by user, keeping their order inside a user
        _, order = torch.sort(key, stable=True)
        counts = torch.zeros(U1, dtype=torch.int64, device=dev).scatter_add_(
            0, key.clamp(0, U1 - 1), torch.ones_like(key)
        )
        active = counts > 0
        if validate:
            # one host sync for the id range and the number of users present
            stats = torch.stack([token_user.min().long(), token_user.max().long(), active.sum()]) if n else None
            lo, hi, n_active = stats.tolist() if stats is not None else (0, 0, 0)
            if lo < -1 or hi >= self.max_users:
                raise ValueError(
                    f"token_user ids must be in [-1, {self.max_users}) (max_users={self.max_users}), "
                    f"got values in [{lo}, {hi}]"
                )
            self.num_segments = int(n_active)
        else:
            self.num_segments = num_segments
        self.num_tokens = n
        self.sorted_tokens.zero_()
        self.sorted_tokens[:n] = order.to(torch.int32)

        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        pos = torch.cumsum(active.to(torch.int64), 0) - 1
        dst = torch.where(active, pos, torch.full_like(pos, S))  # inactive users go to a dump row
        seg = torch.zeros(S + 1, 3, dtype=torch.int32, device=dev)
        seg[:, 2] = -1
        rows = torch.stack([starts, ends, self._user_range.to(torch.int64)], 1).to(torch.int32)
        seg.index_copy_(0, dst, rows)
        # every inactive user was written to the dump row S; active ones fill rows 0..n_active-1
        # in user order and the rest keep (0, 0, -1)
        seg = seg[:S]
        self.segments.copy_(seg)

        seg_len = (seg[:, 1] - seg[:, 0]).to(torch.int64)  # [S]
        for bm, (off, cap) in self._tile_offsets.items():
            per_seg = (seg_len + bm - 1) // bm  # [S]
            cum = torch.cumsum(per_seg, 0)
            t = torch.arange(cap, device=dev, dtype=torch.int64)
            sid = torch.searchsorted(cum, t, right=True).clamp_(max=S - 1)  # [cap]
            first = cum[sid] - per_seg[sid]
            start = seg[sid, 0].to(torch.int64) + (t - first) * bm
            end = torch.minimum(start + bm, seg[sid, 1].to(torch.int64))
            live = t < cum[-1]
            start = torch.where(live, start, torch.zeros_like(start))
            end = torch.where(live, end, torch.zeros_like(end))
            user = torch.where(live, seg[sid, 2].to(torch.int64), torch.full_like(start, -1))
            self.tiles[off : off + cap] = torch.stack([start, end, user], 1).to(torch.int32)
        return self

    # ---------------------------------------------------------------- access
    def tiles_for(self, block_m: int) -> torch.Tensor:
        """The ``[max_tiles(block_m), 3]`` schedule for tiles of ``block_m`` rows."""
        return tile_block(self.tiles, self.sorted_tokens, self.segments, self.block_ms, block_m)

    def num_segments_host(self) -> int:
        """Number of non-empty segments (host sync; for inspection and tests)."""
        return int((self.segments[:, 1] > self.segments[:, 0]).sum())

    def token_user_host(self) -> torch.Tensor:
        """Reconstruct the ``[T]`` user ids (host sync; for inspection and tests)."""
        out = torch.full((self.num_tokens,), -1, dtype=torch.int64)
        segs = self.segments.cpu().tolist()
        sorted_tokens = self.sorted_tokens.cpu()
        for start, end, user in segs:
            out[sorted_tokens[start:end].long()] = user
        return out

    def as_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """``(sorted_tokens, tiles, segments, block_ms)``: the plan as the ops take it."""
        return self.sorted_tokens, self.tiles, self.segments, list(self.block_ms)
