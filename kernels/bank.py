"""Ragged packed storage of many users' LoRA adapters for one target linear.

For a linear ``h = x Wᵀ`` with ``W: [out_features, in_features]``, user ``u`` owns
``n`` modules ``(A_j: [r_j, in], B_j: [out, r_j], s_j = alpha_j / r_j)``. The bank
stores them *ragged*, without padding to a maximum rank::

    lora_a  [capacity, in_features]   rows r of every module's A_j, stacked
    lora_b  [capacity, out_features]  rows r of every module's B_jᵀ, stacked
    scale   [capacity]  float32       s_j repeated over the rows of module j
    slots   [max_users, 2] int32      (row offset, total rank) per user; rank 0 = none

A user's modules at this layer sit contiguously, so ``Σ_j s_j B_j A_j x`` is one
segment ``B_uᵀ diag(s_u) A_u x`` of total rank ``R_u = Σ_j r_j``. Rows are handed out
by a first-fit free list; :meth:`AdapterBank.compact` defragments in place (tensor
storage unchanged, so captured CUDA graphs stay valid) and the bank grows by
reallocation only when the free rows cannot hold a new segment (``version`` then
increments: re-capture graphs and rebuild optimizers).

Under ``torch.compile`` a compiled step re-traces when the bank grows (every growth, not only
the first: torch takes a parameter's shape as static) and when ``max_rank`` rises (an int
the op takes); adding, removing and swapping users inside the capacity and the rank seen so
far re-traces nothing. Reserve the working capacity up front to serve from one graph.
"""
from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from ._checks import FLOAT_DTYPES, check_device, check_finite, check_positive_int, check_tensor

__all__ = ["AdapterBank", "AdapterSegment"]

_INITS = ("lora", "random", "zeros")


@dataclass(frozen=True)
class AdapterSegment:
    """Where one user's modules live in the bank."""

    offset: int
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(a / r for a, r in zip(self.alphas, self.ranks))


class AdapterBank(torch.nn.Module):
    """All users' adapters for one target linear, packed ragged.

    Args:
        in_features: ``k``, the input width of the target linear.
        out_features: ``d``, its output width.
        max_users: size of the user-id space (ids ``0 .. max_users-1``).
        capacity: rank rows to preallocate (grows on demand).
        dtype / device: of ``lora_a`` and ``lora_b``.

    ``state_dict()`` holds the tensors and the segment table (``_extra_state``, a float64
    tensor), so ``load_state_dict`` gives a bank of any size the saved users, free rows and
    ``max_rank``. A model's user ids live in its runtime, not here: save and load users with
    :meth:`milp.MilpRuntime.save_user` / ``load_user``.

    Example:
        >>> bank = AdapterBank(64, 96, max_users=4)
        >>> seg = bank.add(2, ranks=[8, 16], alpha=16.0)
        >>> bank.rank_of(2), bank.max_rank
        (24, 24)
    """

    # the buffers __init__ registers (annotations only: a type checker would see Module.__getattr__'s Tensor | Module)
    scale: torch.Tensor
    slots: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_users: int,
        *,
        capacity: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_positive_int("max_users", max_users)
        check_positive_int("capacity", capacity, minimum=0)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        device = check_device("device", device)
        self.in_features = in_features
        self.out_features = out_features
        self.lora_a = torch.nn.Parameter(torch.zeros(capacity, in_features, dtype=dtype, device=device))
        self.lora_b = torch.nn.Parameter(torch.zeros(capacity, out_features, dtype=dtype, device=device))
        self.register_buffer("scale", torch.zeros(capacity, dtype=torch.float32, device=device))
        self.register_buffer("slots", torch.zeros(max_users, 2, dtype=torch.int32, device=device))
        self._segments: dict[int, AdapterSegment] = {}
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, length)
        self._max_rank = 0  # kept up to date by add/remove: read on every forward (and by torch.compile)
        self._used = 0  # rows the segments hold (used_rows), kept up to date: add reads it
        # the users whose segment was added or removed in this layout epoch, in order, for mirrors of
        # the segment table (layout_changes); an epoch ends when rows of other users move
        self._layout_epoch = 0
        self._journal: list[int] = []
        self.version = 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AdapterBank:
        """``module.to(...)``, ``.half()``, ``.cuda()``…: ``lora_a``/``lora_b`` follow (the model's
        dtype and device), ``scale`` only moves. It stays float32, as the kernels read it:
        ``model.to(torch.bfloat16)`` would otherwise round it (a rank-3 module's 16/3) and every
        forward would refuse it."""
        scale = self._buffers["scale"]
        out = super()._apply(fn, recurse)
        moved = self._buffers["scale"]
        if moved.dtype != scale.dtype:  # type: ignore[union-attr]  # the buffer __init__ registers: never None
            self._buffers["scale"] = scale.to(device=moved.device)  # type: ignore[union-attr]  # (as above)
        return out

    # ------------------------------------------------------------- state dict
    # The segment table travels in the state dict as a float64 tensor (``<prefix>_extra_state``:
    # tensors only, so ``safetensors`` and ``torch.save`` both take it): a header row
    # ``(format, max_rank, 0, 0)``, then a row ``(user, offset, rank_j, alpha_j)`` per module, in
    # user order. Ints below 2⁵³ and the float alphas are exact in float64.
    _STATE_FORMAT = 1

    def get_extra_state(self) -> torch.Tensor:
        rows = [(float(self._STATE_FORMAT), float(self._max_rank), 0.0, 0.0)]
        for user in sorted(self._segments):
            seg = self._segments[user]
            offset = seg.offset
            for r, alpha in zip(seg.ranks, seg.alphas):
                rows.append((float(user), float(offset), float(r), float(alpha)))
                offset += r
        return torch.tensor(rows, dtype=torch.float64)

    def set_extra_state(self, state: object) -> None:
        segments, max_rank = self._segments_from_state(state, self.slots.tolist(), self.capacity)
        self._segments = segments
        self._free = self._gaps()
        self._max_rank = max_rank
        self._used = sum(s.rank for s in segments.values())
        self._new_layout_epoch()

    @staticmethod
    def _segments_from_state(state: object, slots: list[list[int]],
                             capacity: int) -> tuple[dict[int, AdapterSegment], int]:
        """The segment table of a saved ``_extra_state``, checked against the ``slots`` table
        and ``capacity`` it comes with: ``ValueError`` naming what does not fit."""
        def bad(why: str) -> ValueError:
            return ValueError(f"AdapterBank state: _extra_state {why}")

        if not isinstance(state, torch.Tensor) or state.dim() != 2 or state.shape[1] != 4 or state.shape[0] < 1:
            shape = f" of shape {tuple(state.shape)}" if isinstance(state, torch.Tensor) else ""
            raise bad(f"must be a [1 + modules, 4] tensor, got {type(state).__name__}{shape}")
        rows = state.detach().to("cpu", torch.float64).tolist()
        fmt, max_rank = rows[0][0], rows[0][1]
        if fmt != AdapterBank._STATE_FORMAT:
            raise bad(f"has format {fmt:g}; this version reads format {AdapterBank._STATE_FORMAT}")
        modules: dict[int, list[tuple[int, int, float]]] = {}
        for i, (user, offset, r, alpha) in enumerate(rows[1:], 1):
            if not all(math.isfinite(v) and v == int(v) for v in (user, offset, r)) or not math.isfinite(alpha):
                raise bad(f"row {i} is not (user, offset, rank, alpha) numbers: {rows[i]}")
            modules.setdefault(int(user), []).append((int(offset), int(r), alpha))
        segments: dict[int, AdapterSegment] = {}
        held = [False] * capacity
        for user, mods in modules.items():
            offset, ranks = mods[0][0], tuple(r for _, r, _ in mods)
            total = sum(ranks)
            if not 0 <= user < len(slots) or min(ranks) < 1 or offset < 0 or offset + total > capacity \
                    or [o for o, _, _ in mods] != [offset + sum(ranks[:j]) for j in range(len(mods))]:
                raise bad(f"holds an impossible segment for user {user} (ranks {ranks} at row {offset}; "
                          f"{capacity} rows, {len(slots)} users)")
            if any(held[offset : offset + total]):
                raise bad(f"gives user {user} rows another user holds")
            held[offset : offset + total] = [True] * total
            if slots[user] != [offset, total]:
                raise bad(f"places user {user} at (row {offset}, rank {total}) but slots say {tuple(slots[user])}")
            segments[user] = AdapterSegment(offset, ranks, tuple(a for _, _, a in mods))
        orphans = [u for u, (_, rank) in enumerate(slots) if rank and u not in segments]
        if orphans:
            raise bad(f"lists no segment for users {orphans[:5]} that slots give rows")
        need = max([s.rank for s in segments.values()], default=0)
        if max_rank != int(max_rank) or max_rank < need:
            raise bad(f"has max_rank {max_rank:g} below its largest segment's rank {need}")
        return segments, int(max_rank)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """``load_state_dict``: the bank takes the saved capacity and user-id space (its tensors
        are resized first, bumping ``version``) and the saved segment table, so ``add`` and
        ``remove`` go on from the loaded state. A state that does not fit (other feature
        widths, a damaged table, or no table while users hold rows: the bank could not tell
        which rows are free) is an error and leaves the bank as it was."""
        names = ("lora_a", "lora_b", "scale", "slots")
        got: dict[str, Any] = {n: state_dict.get(prefix + n) for n in names}
        extra = state_dict.get(prefix + "_extra_state")
        if not all(isinstance(t, torch.Tensor) for t in got.values()):  # missing keys: torch reports them
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        a, b, scale, slots = got.values()
        rows = a.shape[0] if a.dim() == 2 else -1
        if not (a.dim() == 2 and a.shape[1] == self.in_features and b.dim() == 2 and b.shape[1] == self.out_features
                and b.shape[0] == rows and scale.shape == (rows,) and slots.dim() == 2 and slots.shape[1] == 2):
            error_msgs.append(
                f"AdapterBank {prefix!r}: the state holds lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}, "
                f"scale {tuple(scale.shape)}, slots {tuple(slots.shape)}; this bank needs lora_a [rows, "
                f"{self.in_features}], lora_b [rows, {self.out_features}], scale [rows], slots [users, 2]")
            return
        slot_rows = slots.tolist()
        try:
            if extra is None:
                if any(rank for _, rank in slot_rows):
                    raise ValueError(f"AdapterBank state: no {prefix + '_extra_state'!r} (the segment table), "
                                     "but slots give users rows; save the bank with this version's state_dict()")
            else:
                self._segments_from_state(extra, slot_rows, rows)
        except ValueError as e:
            error_msgs.append(f"{prefix!r}: {e}")
            return
        if rows != self.capacity or slots.shape[0] != self.max_users:
            with torch.no_grad():  # the saved sizes; the copy below fills them
                for p in (self.lora_a, self.lora_b):
                    p.data = p.data.new_zeros(rows, p.shape[1])
                    p.grad = None
                self.scale = self.scale.new_zeros(rows)
                self.slots = self.slots.new_zeros(slots.shape[0], 2)
            self.version += 1
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if extra is None:  # an empty bank's state from before the table: every row free
            if prefix + "_extra_state" in missing_keys:
                missing_keys.remove(prefix + "_extra_state")
            self.set_extra_state(torch.tensor([[float(self._STATE_FORMAT), 0.0, 0.0, 0.0]], dtype=torch.float64))

    # ------------------------------------------------------------------ info
    @property
    def capacity(self) -> int:
        return self.lora_a.shape[0]

    @property
    def max_users(self) -> int:
        return self.slots.shape[0]

    @property
    def used_rows(self) -> int:
        return self._used

    @property
    def max_rank(self) -> int:
        """Largest total rank any user of the bank has had (0 before the first). Like the
        capacity it does not shrink when users leave: buffers sized by it, and a compiled step
        that reads it (an int argument of the op), stay valid as users come and go. Host value,
        no sync."""
        return self._max_rank

    @property
    def users(self) -> list[int]:
        return sorted(self._segments)

    def layout_changes(self, since: tuple[int, int] | None) -> tuple[tuple[int, int], set[int] | None]:
        """``(mark, users)``: the users whose segment was added, replaced or removed since ``since``
        (a ``mark`` this method returned before), or ``users=None`` when they are not known one by
        one: ``since`` is ``None``, or from before a :meth:`compact` that moved rows, a loaded
        state, or many changes ago. Lets a mirror of the segment table (an optimizer's moments)
        follow the bank in time proportional to the changes, not to the users; host values only.

        Example:
            >>> bank = AdapterBank(8, 8, max_users=4); mark, _ = bank.layout_changes(None)
            >>> _ = bank.add(3, 2); bank.layout_changes(mark)[1]
            {3}
        """
        mark = (self._layout_epoch, len(self._journal))
        if since is None or since[0] != self._layout_epoch or since[1] > len(self._journal):
            return mark, None
        return mark, set(self._journal[since[1]:])

    def has(self, user: int) -> bool:
        """Whether ``user`` has adapters here (``False`` for an id outside ``[0, max_users)``)."""
        if isinstance(user, bool) or not isinstance(user, int):
            raise TypeError(f"user must be an int id, got {type(user).__name__}")
        return user in self._segments

    def segment(self, user: int) -> AdapterSegment:
        self._check_user(user, must_exist=True)
        return self._segments[user]

    def rank_of(self, user: int) -> int:
        """Total rank of ``user`` here, 0 when it has no adapter at this layer."""
        self._check_user(user)
        seg = self._segments.get(user)
        return seg.rank if seg else 0

    def num_parameters(self, user: int | None = None) -> int:
        """Trainable parameters of one user (or of all users) at this layer."""
        rows = self.rank_of(user) if user is not None else self.used_rows
        return rows * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, users={len(self._segments)}, "
            f"rows={self.used_rows}/{self.capacity}, max_users={self.max_users}"
        )

    # -------------------------------------------------------------- mutation
    def add(
        self,
        user: int,
        ranks: Sequence[int] | int,
        alpha: float | Sequence[float] = 16.0,
        *,
        init: str = "lora",
        generator: torch.Generator | None = None,
    ) -> AdapterSegment:
        """Give ``user`` modules of the given ranks (replacing any it had).

        ``alpha`` is ``lora_alpha`` (one per module or shared); module ``j`` is scaled by
        ``alpha_j / r_j``. ``init="lora"`` draws ``A`` like PEFT (Kaiming-uniform) and sets
        ``B = 0`` so the adapter starts at zero (the linear's output unchanged); ``"random"`` draws both (tests,
        benchmarks); ``"zeros"`` zeroes both.
        """
        self._check_user(user)
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = [ranks]
        ranks = _as_list("ranks", ranks, "an int or a sequence of ints")
        if not ranks:
            raise ValueError("ranks must name at least one module; use remove() for none")
        for r in ranks:
            check_positive_int("ranks[...]", r)
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            alphas = [float(alpha)] * len(ranks)  # float() as below
        else:
            alphas = _as_list("alpha", alpha, "a number or a sequence of numbers (one per module)")
            if len(alphas) != len(ranks):
                raise ValueError(f"alpha has {len(alphas)} values for {len(ranks)} ranks")
        alphas = [check_finite("alpha", float(a) if isinstance(a, numbers.Real) and not isinstance(a, bool) else a)
                  for a in alphas]  # a numpy float32 too
        # stored as float32 (the kernels read them so): a finite alpha / r beyond its range is inf there
        scales = torch.tensor([a / r for a, r in zip(alphas, ranks)], dtype=torch.float32)
        if not torch.isfinite(scales).all():
            raise ValueError(f"alpha / rank must be finite in float32 (the scales' dtype), got alpha={alphas}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if generator is not None and not isinstance(generator, torch.Generator):  # before the bank changes
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

        total = sum(ranks)
        replaced = self._segments.get(user)
        held = replaced.rank if replaced else 0  # rows the replaced modules give back
        if self.capacity - self.used_rows + held < total:
            # grown before the replaced user goes: a failed allocation leaves the bank as it was
            self.reserve(max(self.used_rows - held + total, 2 * self.capacity, 64))
        if replaced:
            self.remove(user)
        offset = self._allocate(total)
        seg = AdapterSegment(offset, tuple(ranks), tuple(alphas))
        self._segments[user] = seg
        self._used += total
        self._note_change(user)
        self._max_rank = max(self._max_rank, total)
        with torch.no_grad():
            self.scale[offset : offset + total] = scales.repeat_interleave(torch.tensor(ranks))
            self._init_rows(seg, init, generator)
            self.slots[user, 0] = offset
            self.slots[user, 1] = total
        return seg

    def remove(self, user: int) -> None:
        """Drop ``user``'s adapters at this layer; its rows return to the free list."""
        self._check_user(user, must_exist=True)
        seg = self._segments.pop(user)
        self._used -= seg.rank
        self._note_change(user)
        with torch.no_grad():
            self.slots[user].zero_()
            self.scale[seg.offset : seg.offset + seg.rank] = 0
            for g in self._grads():  # a pending gradient must not reach the rows' next owner
                g[seg.offset : seg.offset + seg.rank] = 0
        self._release(seg.offset, seg.rank)

    def clear(self) -> None:
        for user in list(self._segments):
            self.remove(user)

    def adapter_weights(self, user: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(A [R, in], B [R, out], scale [R])`` of ``user``'s rows (modules stacked)."""
        seg = self.segment(user)
        sl = slice(seg.offset, seg.offset + seg.rank)
        return self.lora_a[sl], self.lora_b[sl], self.scale[sl]

    def set_adapter_weights(self, user: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy ``A [R, in]`` and ``B [R, out]`` (``B`` stored transposed: row r of module j
        is column r of PEFT's ``lora_B``) into ``user``'s rows.

        Refused (``ValueError``, rows untouched) unless finite in the bank's dtype: NaN or inf,
        or a value the cast would overflow (a float32 ``1e5`` into a float16 bank)."""
        seg = self.segment(user)
        check_tensor("a", a, shape=(seg.rank, self.in_features), dtypes=FLOAT_DTYPES)
        check_tensor("b", b, shape=(seg.rank, self.out_features), dtypes=FLOAT_DTYPES)
        # checked as the rows will hold them: a finite value beyond the dtype's range casts to inf
        a, b = a.to(self.lora_a.dtype), b.to(self.lora_b.dtype)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"adapter weights of user {user} contain NaN or inf (in the bank's dtype {a.dtype})")
        with torch.no_grad():
            self.lora_a[seg.offset : seg.offset + seg.rank].copy_(a)
            self.lora_b[seg.offset : seg.offset + seg.rank].copy_(b)

    def compact(self) -> None:
        """Move all segments to the front, in offset order, in place (no reallocation); pending
        gradients (``lora_a.grad``, ``lora_b.grad``) move with their rows."""
        cursor = 0
        moved = False
        try:
            with torch.no_grad():
                for user in sorted(self._segments, key=lambda u: self._segments[u].offset):
                    seg = self._segments[user]
                    if seg.offset != cursor:
                        src = slice(seg.offset, seg.offset + seg.rank)
                        dst = slice(cursor, cursor + seg.rank)
                        # the rows may overlap: copies of all of them first, so a copy that fails (out
                        # of memory) leaves this segment where it was, whole
                        tensors = (self.lora_a, self.lora_b, self.scale, *self._grads())
                        for t, rows in zip(tensors, [t[src].clone() for t in tensors]):
                            t[dst] = rows
                        self._segments[user] = seg = AdapterSegment(cursor, seg.ranks, seg.alphas)
                        self.slots[user, 0] = cursor
                        moved = True
                    cursor += seg.rank
        finally:  # after a failed copy too: the free list is the rows no segment holds, their scale 0
            self._free = self._gaps()
            if moved:
                self._new_layout_epoch()
            with torch.no_grad():
                for start, rows in self._free:  # type: ignore[assignment]  # ints here: the copies' tensors above
                    for t in (self.scale, *self._grads()):
                        t[start : start + rows] = 0

    def _gaps(self) -> list[tuple[int, int]]:
        """``(start, length)`` of the runs of rows no segment holds, in order."""
        gaps, cursor = [], 0
        for seg in sorted(self._segments.values(), key=lambda s: s.offset):
            if seg.offset > cursor:
                gaps.append((cursor, seg.offset - cursor))
            cursor = seg.offset + seg.rank
        if cursor < self.capacity:
            gaps.append((cursor, self.capacity - cursor))
        return gaps

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in (self.lora_a, self.lora_b) if p.grad is not None]

    def reserve(self, capacity: int, max_rank: int = 0) -> None:
        """Grow storage to at least ``capacity`` rows (bumps ``version`` when it reallocates; a
        compiled step that reads the bank then re-traces), and raise :attr:`max_rank` to at
        least ``max_rank``: a compiled step traced after this serves users up to that total rank
        without re-tracing."""
        check_positive_int("capacity", capacity, minimum=0)
        check_positive_int("max_rank", max_rank, minimum=0)
        self._max_rank = max(self._max_rank, max_rank)
        if capacity <= self.capacity:
            return
        old = self.capacity
        with torch.no_grad():
            # every new tensor first, then the swap: an allocation that fails (out of memory)
            # leaves the bank as it was, not lora_a grown and lora_b not
            def grown(t: torch.Tensor) -> torch.Tensor:
                out = t.new_zeros(capacity, *t.shape[1:])
                out[:old] = t
                return out

            params = (self.lora_a, self.lora_b)
            data = [grown(p.data) for p in params]
            # a pending gradient keeps its rows and the parameter's shape
            grads = [None if p.grad is None else grown(p.grad) for p in params]
            scale = grown(self.scale)
            for p, d, g in zip(params, data, grads):
                p.data = d
                if g is not None:
                    p.grad = g
            self.scale = scale
        self._release(old, capacity - old)
        self.version += 1

    def resize_users(self, max_users: int) -> None:
        """Grow the user-id space to ``max_users`` (bumps ``version``)."""
        check_positive_int("max_users", max_users)
        if max_users <= self.max_users:
            return
        slots = torch.zeros(max_users, 2, dtype=torch.int32, device=self.slots.device)
        slots[: self.max_users] = self.slots
        self.slots = slots
        self.version += 1

    # ------------------------------------------------------------- internals
    def _check_user(self, user: object, must_exist: bool = False) -> None:
        if isinstance(user, bool) or not isinstance(user, int):
            raise TypeError(f"user must be an int id, got {type(user).__name__}")
        if not 0 <= user < self.max_users:
            raise ValueError(f"user must be in [0, {self.max_users}), got {user}")
        if must_exist and user not in self._segments:
            raise KeyError(f"user {user} has no adapters in this bank")

    def _allocate(self, rows: int) -> int:
        """First fit of ``rows`` free rows (``add`` has grown the bank to hold them), compacting
        when they are free but not contiguous."""
        for i, (start, length) in enumerate(self._free):
            if length >= rows:
                if length == rows:
                    del self._free[i]
                else:
                    self._free[i] = (start + rows, length - rows)
                return start
        self.compact()  # the free rows are all at the end now
        return self._allocate(rows)

    def _release(self, start: int, rows: int) -> None:
        """Return ``rows`` rows at ``start`` to the free list (sorted, runs apart), merged with the
        runs it touches: a bisect, not a sort of the whole list (churn of many users)."""
        if rows == 0:
            return
        free = self._free
        i = bisect.bisect_left(free, (start, rows))
        if i > 0 and free[i - 1][0] + free[i - 1][1] == start:
            i -= 1
            start, rows = free[i][0], free[i][1] + rows
            del free[i]
        if i < len(free) and start + rows == free[i][0]:
            rows += free[i][1]
            del free[i]
        free.insert(i, (start, rows))

    def _note_change(self, user: int) -> None:
        """Journal a change of ``user``'s segment (:meth:`layout_changes`); a long journal ends the
        epoch (mirrors then re-read the table once, amortized over the changes)."""
        self._journal.append(user)
        if len(self._journal) > 2 * self.max_users + 64:
            self._new_layout_epoch()

    def _new_layout_epoch(self) -> None:
        """Rows of users not journaled moved (or the table was replaced): marks from before are void."""
        self._layout_epoch += 1
        self._journal = []

    def _init_rows(self, seg: AdapterSegment, init: str, generator: torch.Generator | None) -> None:
        a = self.lora_a.data
        b = self.lora_b.data
        row = seg.offset
        for r in seg.ranks:
            sa, sb = slice(row, row + r), slice(row, row + r)
            if init == "zeros":
                a[sa].zero_()
                b[sb].zero_()
            else:
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                a[sa] = _uniform((r, self.in_features), bound, a, generator)
                if init == "lora":
                    b[sb].zero_()
                else:
                    b[sb] = _uniform((r, self.out_features), 1.0 / math.sqrt(r), b, generator)
            row += r


def _as_list(name: str, value: object, expected: str) -> list:
    """``list(value)``, or a ``TypeError`` naming ``name`` when it is no sequence (a string neither)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return list(cast("Iterable[Any]", value))
    except TypeError:  # not iterable (a bool, a numpy scalar, a 0-d tensor)
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None


def _uniform(shape: tuple[int, int], bound: float, like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    # draw on the generator's device (CPU by default) so seeds give the same weights everywhere
    dev = gen.device if gen is not None else torch.device("cpu")
    u = torch.rand(shape, generator=gen, device=dev, dtype=torch.float64)
    return ((u * 2 - 1) * bound).to(device=like.device, dtype=like.dtype)
